"""IMM properties (Zhou et al., arXiv:2503.07565): boundary conditions, DDIM identities,
the r(s, t) mapping, MMD^2, the M = 1 closed form, guidance, sharding and the pushforward
sampler."""

import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowjax import config as config_lib
from flowjax import paths, train
from flowjax.objectives import imm
from flowjax.samplers import pushforward

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (3,)


def load_experiment(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "experiments",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class TinyBackbone(nn.Module):
  """A small stand-in for the backbone contract (cheap to compile): Dense -> tanh -> dropout ->
  Dense on [x, times, one-hot label]."""
  num_classes: int = 0
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, times, cond, *, train):
    features = [x.reshape(x.shape[0], -1)] + [t[:, None] for t in times]
    if self.num_classes:
      labels = jnp.full(x.shape[:1], self.num_classes) if cond is None else cond
      features.append(jax.nn.one_hot(labels, self.num_classes + 1))
    h = jnp.tanh(nn.Dense(16)(jnp.concatenate(features, axis=-1)))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return nn.Dense(features[0].shape[-1])(h).reshape(x.shape)


def make_objective(num_classes=0, dropout=0.0, **overrides):
  model = TinyBackbone(num_classes=num_classes, dropout=dropout)
  return imm.IMM(model=model, image_shape=SHAPE, num_classes=num_classes, **overrides)


def random_params(objective, seed=0, scale=0.3):
  """Parameters of the right structure with every entry N(0, scale^2), filled from NumPy
  (compiling the initializers would dominate the test time)."""
  batch = {"image": jnp.zeros((1,) + SHAPE), "label": jnp.zeros((1,), jnp.int32)}
  shapes = jax.eval_shape(lambda: nn.meta.unbox(objective.init(jax.random.key(0), batch)[0]))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype),
                      shapes)


def times(num, seed=0, t_min=1e-3, t_max=0.994):
  t_key, s_key = jax.random.split(jax.random.key(seed))
  t = jax.random.uniform(t_key, (num,), minval=t_min, maxval=t_max)
  return t, t_min + jax.random.uniform(s_key, (num,)) * (t - t_min)


@pytest.mark.parametrize("f_type,path", [("euler_fm", "ot"), ("simple_edm", "ot"),
                                         ("simple_edm", "cosine")])
def test_flow_map_is_identity_at_s_equal_t(f_type, path):
  objective = make_objective(f_type=f_type, path=path)
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (16,) + SHAPE)
  out = 10.0 * jax.random.normal(keys[1], x.shape)
  t = jax.random.uniform(keys[2], (16,), minval=1e-3, maxval=0.994)
  np.testing.assert_allclose(objective.parameterize(x, out, t, t), x, rtol=0, atol=1e-6)
  # And the map does depend on F when s < t.
  assert not np.allclose(objective.parameterize(x, out, t, 0.5 * t), x)


@pytest.mark.parametrize("name", paths.PATHS)
def test_ddim_identities(name):
  path = paths.get(name)
  keys = jax.random.split(jax.random.key(1), 2)
  x = jax.random.normal(keys[0], (32,) + SHAPE)
  eps = 0.5 * jax.random.normal(keys[1], x.shape)
  t, s = times(32)
  x_t = path.interpolate(x, eps, t)
  np.testing.assert_allclose(path.ddim(x_t, x, t, t), x_t, atol=1e-6)
  np.testing.assert_allclose(path.ddim(x_t, x, t, s), path.interpolate(x, eps, s), atol=1e-5)


@pytest.mark.parametrize("name", paths.PATHS)
def test_eta_and_log_snr_helpers(name):
  path = paths.get(name)
  t = jnp.linspace(0.01, 0.99, 50)
  np.testing.assert_allclose(path.t_of_eta(path.eta(t)), t, rtol=1e-5)
  np.testing.assert_allclose(path.log_snr(t), -2.0 * jnp.log(path.eta(t)), rtol=1e-5,
                             atol=1e-5)
  closed_form = 2.0 / (t * (1 - t)) if name == "ot" else 2 * jnp.pi / jnp.sin(jnp.pi * t)
  np.testing.assert_allclose(path.neg_d_log_snr(t), closed_form, rtol=1e-4)
  t, h = jnp.linspace(0.1, 0.9, 17), 1e-3
  finite_difference = -(path.log_snr(t + h) - path.log_snr(t - h)) / (2 * h)
  np.testing.assert_allclose(path.neg_d_log_snr(t), finite_difference, rtol=1e-3)


class Probe(nn.Module):
  """Backbone stand-in returning x_in + 10 times[0] + 100 times[1]."""

  @nn.compact
  def __call__(self, x, times, cond, *, train):
    del cond, train
    self.param("unused", nn.initializers.zeros, ())
    return x + 10.0 * paths.expand(times[0], x) + 100.0 * paths.expand(times[1], x)


@pytest.mark.parametrize("embedding", imm.TIME_EMBEDDINGS)
def test_network_input_is_c_in_x_and_times_in_unit_interval(embedding):
  """The reference feeds c_in x_t and 1000 (t, s or t - s); flowjax feeds (t, s or t - s) in
  [0, 1] to a backbone whose time_scale is 1000."""
  objective = imm.IMM(model=Probe(), image_shape=SHAPE, num_classes=0, time_embedding=embedding,
                      sigma_d=0.5)
  x = jax.random.normal(jax.random.key(2), (8,) + SHAPE)
  t, s = times(8)
  out = objective.network({"unused": jnp.zeros(())}, x, t, s, None)
  c_in = 1.0 / (0.5 * jnp.sqrt((1 - t) ** 2 + t ** 2))
  second = s if embedding == "identity" else t - s
  expected = c_in[:, None] * x + 10.0 * t[:, None] + 100.0 * second[:, None]
  np.testing.assert_allclose(out, expected, rtol=1e-5)


# eta(t) and its inverse in float64, written out apart from flowjax.paths.
ETA_OF_T = {
    "ot": (lambda t: t / (1 - t), lambda eta: eta / (1 + eta)),
    "cosine": (lambda t: np.tan(0.5 * np.pi * t), lambda eta: np.arctan(eta) / (0.5 * np.pi)),
}


@pytest.mark.parametrize("sampler", imm.TIME_SAMPLERS)
@pytest.mark.parametrize("path", paths.PATHS)
def test_mapping_keeps_s_le_r_le_t(sampler, path):
  """r(s, t) is max(s, t(eta_r)) with eta_r = clip(eta_t - (eta_max - eta_min) / 2^k, eta_min,
  eta_max), computed here in float64 from the sampled times: that r is below t wherever s < t, so
  the mapping's own final clip to [s, t] changes r by float32 rounding only. The sampler's times
  lie in (t_min, t_max) with s < t, none of them pushed onto a bound by its clip."""
  objective = make_objective(time_sampler=sampler, path=path, f_type="simple_edm")

  @jax.jit
  def draw(rng):
    t, s = objective.sample_times(rng, 20_000)
    return t, s, objective.mapping(t, s)

  t, s, r = (np.asarray(a) for a in draw(jax.random.key(3)))
  t_min, t_max = np.float32(objective.t_min), np.float32(objective.t_max)
  assert np.all(t_min < s) and np.all(s < t) and np.all(t < t_max)
  eta, t_of_eta = ETA_OF_T[path]
  eta_min, eta_max = eta(np.float64(t_min)), eta(np.float64(t_max))
  t64 = t.astype(np.float64)
  step_below = t_of_eta(np.clip(eta(t64) - (eta_max - eta_min) / 2.0 ** objective.mapping_k,
                                eta_min, eta_max))
  expected = np.maximum(step_below, s.astype(np.float64))
  assert np.all(expected < t64)
  np.testing.assert_allclose(r, expected, rtol=0, atol=1e-6)
  assert np.all(r < t)
  # Near t = 0 the step below t clips at eta_min, so r = s there: the target is then exact.
  assert np.any(r == s) and np.any(r > s)


def test_mapping_approaches_t_as_k_grows():
  t, s = times(4096, seed=4)
  gaps = [float(jnp.mean(t - make_objective(mapping_k=k).mapping(t, s)))
          for k in (2, 4, 6, 8, 10, 12, 14)]
  assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
  # Once the step (eta_max - eta_min) / 2^k is small, the gap is about proportional to it.
  assert gaps[-1] < 0.3 * gaps[-2] and gaps[-1] < 0.02 * gaps[0], gaps


def test_mapping_bounds_and_min_gap_are_settable():
  """The replication's fixed eta bounds (0, 160) set the step (160 / 2^k) and clip eta_r at 160;
  mapping_min_gap keeps r <= t - gap wherever s allows it."""
  t = jnp.asarray([0.994, 0.9, 0.5, 0.1], jnp.float32)
  s = jnp.full((4,), 0.006, jnp.float32)
  paper = make_objective(t_min=0.006, t_max=0.994)
  fixed = make_objective(t_min=0.006, t_max=0.994, mapping_eta_min=0.0, mapping_eta_max=160.0)
  eta = np.asarray(t, np.float64) / (1 - np.asarray(t, np.float64))
  for objective, (low, high) in ((paper, (0.006 / 0.994, 0.994 / 0.006)), (fixed, (0.0, 160.0))):
    eta_r = np.clip(eta - (high - low) / 2 ** 12, low, high)
    expected = np.maximum(eta_r / (1 + eta_r), 0.006)
    np.testing.assert_allclose(objective.mapping(t, s), expected, rtol=2e-6)
  # At t = 0.994 the fixed eta_max = 160 < eta(t) clips r to t(160): a step 100x the paper's.
  assert float(t[0] - fixed.mapping(t, s)[0]) > 50 * float(t[0] - paper.mapping(t, s)[0])
  guarded = make_objective(t_min=0.006, t_max=0.994, mapping_min_gap=1e-4)
  r = guarded.mapping(t, s)
  assert np.all(np.asarray(t - r) >= 1e-4 - 1e-7) and np.all(np.asarray(r) >= 0.006)
  np.testing.assert_allclose(r[0], 0.994 - 1e-4, rtol=1e-6)
  with pytest.raises(ValueError, match="mapping_min_gap"):
    make_objective(mapping_min_gap=-1e-4)


def test_lognormal_eta_sampler_follows_its_law():
  objective = make_objective(time_sampler="lognormal_eta", eta_mean=-1.1, eta_std=2.0)
  t, _ = objective.sample_times(jax.random.key(5), 20_000)
  log_eta = np.log(np.asarray(paths.get("ot").eta(t)))
  # Truncation at [log eta(1e-3), log eta(0.994)] = [-6.9, 5.1] barely moves the median.
  assert abs(np.median(log_eta) + 1.1) < 0.1


@pytest.mark.parametrize("kernel", imm.KERNELS)
def test_mmd_properties(kernel):
  keys = jax.random.split(jax.random.key(6), 3)
  a = jax.random.normal(keys[0], (64, 4, 5))
  b = jax.random.normal(keys[1], (64, 4, 5)) + 0.5
  bandwidth = jax.random.uniform(keys[2], (64,), minval=0.5, maxval=20.0)
  perm_a, perm_b = np.array([2, 0, 3, 1]), np.array([1, 3, 0, 2])
  mmd2 = lambda a, b: imm.mmd2(a, b, bandwidth, kernel)
  value, same, swapped, permuted = jax.jit(lambda a, b: (
      mmd2(a, b), mmd2(a, a), mmd2(b, a), mmd2(a[:, perm_a], b[:, perm_b])))(a, b)
  assert np.all(value > 0)
  np.testing.assert_allclose(same, 0.0, atol=1e-6)
  np.testing.assert_allclose(swapped, value, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(permuted, value, rtol=1e-5, atol=1e-7)


def test_mmd_gradient_is_finite_at_zero_distance():
  a = jnp.ones((2, 4, 3))
  grads = jax.jit(jax.grad(lambda y: jnp.sum(imm.mmd2(y, a + 0.1, jnp.ones((2,))))))(a)
  assert np.all(np.isfinite(grads)) and np.any(grads != 0)


@pytest.mark.parametrize("f_type", imm.F_TYPES)
def test_single_particle_loss_is_consistency_matching(f_type):
  """M = 1: loss = mean_b w(t_b) (2 - 2 k(y_st, y_sr)), the consistency-model special case."""
  objective = make_objective(f_type=f_type, group_size=1)
  params = random_params(objective)
  keys = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(keys[0], (16,) + SHAPE)
  eps = 0.5 * jax.random.normal(keys[1], x.shape)
  t, s = times(16, seed=8)
  r = objective.mapping(t, s)
  loss, _ = jax.jit(objective.loss_at)(params, x, None, t, r, s, eps, keys[2])

  @jax.jit
  def closed_form(params):
    path = paths.get("ot")
    x_t = path.interpolate(x, eps, t)
    y_st = objective.flow_map(params, x_t, t, s, None)
    y_sr = objective.flow_map(params, path.ddim(x_t, x, t, r), r, s, None)
    distance = jnp.linalg.norm(y_st - y_sr, axis=-1)
    kernel = jnp.exp(-objective.kernel_bandwidth(t, s) * distance / SHAPE[0])
    return jnp.mean(objective.loss_weight(t) * (2.0 - 2.0 * kernel))

  np.testing.assert_allclose(loss, closed_form(params), rtol=1e-5)
  assert loss > 0


@pytest.mark.parametrize("f_type,path", [("euler_fm", "ot"), ("simple_edm", "ot"),
                                         ("simple_edm", "cosine")])
def test_coefficients_and_kernel_bandwidth(f_type, path):
  """f = c_skip x_t + c_out F with the reference's coefficients, and w~(s, t) = 1 / |c_out|."""
  objective = make_objective(f_type=f_type, path=path)
  t, s = times(64, seed=15)
  ones, zeros = jnp.ones((64,) + SHAPE), jnp.zeros((64,) + SHAPE)
  c_skip = objective.parameterize(ones, zeros, t, s)[:, 0]
  c_out = objective.parameterize(zeros, ones, t, s)[:, 0]
  np.testing.assert_allclose(objective.kernel_bandwidth(t, s), 1.0 / jnp.abs(c_out), rtol=1e-4)
  if path == "ot":  # alpha_s sigma_t - alpha_t sigma_s = t - s on the OT path
    norm = (1 - t) ** 2 + t ** 2
    if f_type == "euler_fm":
      expected_skip, expected_out = jnp.ones_like(t), -(t - s) * 0.5
    else:
      expected_skip = ((1 - t) * (1 - s) + t * s) / norm
      expected_out = -(t - s) * 0.5 / jnp.sqrt(norm)
    np.testing.assert_allclose(c_skip, expected_skip, rtol=1e-5)
    np.testing.assert_allclose(c_out, expected_out, rtol=1e-4, atol=1e-7)


def test_target_shares_the_dropout_mask():
  """With r = t, x_r = x_t and the target f(x_r, r, s) equals the prediction exactly when both
  calls draw the same dropout mask, so the MMD vanishes."""
  objective = make_objective(dropout=0.5)
  params = random_params(objective)
  keys = jax.random.split(jax.random.key(16), 4)
  x = jax.random.normal(keys[0], (8,) + SHAPE)
  eps = 0.5 * jax.random.normal(keys[1], x.shape)
  t, s = times(2, seed=17)

  @jax.jit
  def run(params):
    _, metrics = objective.loss_at(params, x, None, t, t, s, eps, keys[2])
    t_b, s_b = jnp.repeat(t, 4), jnp.repeat(s, 4)
    masked = [objective.flow_map(params, x, t_b, s_b, None, key, train=True)
              for key in keys[2:]]
    return metrics["mmd"], masked

  mmd, (first, second) = run(params)
  assert abs(float(mmd)) < 1e-6
  assert not np.allclose(first, second)


def test_loss_weight_matches_closed_form_on_ot():
  objective = make_objective(weight_a=2.0, weight_b=4.0)
  t = jnp.linspace(0.01, 0.99, 50)
  log_snr = 2 * jnp.log((1 - t) / t)
  expected = (0.5 * jax.nn.sigmoid(4.0 - log_snr) * 2 / (t * (1 - t)) * (1 - t) ** 2 /
              ((1 - t) ** 2 + t ** 2))
  np.testing.assert_allclose(objective.loss_weight(t), expected, rtol=1e-5)
  np.testing.assert_allclose(make_objective(weighting="none").loss_weight(t), 1.0)


@pytest.mark.parametrize("f_type", imm.F_TYPES)
def test_gradient_is_finite_at_extreme_times(f_type):
  objective = make_objective(f_type=f_type)
  params = random_params(objective)
  keys = jax.random.split(jax.random.key(9), 3)
  x = jax.random.normal(keys[0], (8,) + SHAPE)
  eps = 0.5 * jax.random.normal(keys[1], x.shape)
  grad = jax.jit(jax.grad(lambda p, t, s: objective.loss_at(p, x, None, t, objective.mapping(
      t, s), s, eps, keys[2])[0]))
  t = jnp.array([objective.t_max, objective.t_max])
  for s in (jnp.array([objective.t_min, 1e-7]), t, t - 1e-6):
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grad(params, t, s))]
    assert all(np.isfinite(norms)), (s, norms)
  s = jnp.array([objective.t_min, objective.t_min])
  assert sum(float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grad(params, t, s))) > 0


def test_batch_not_divisible_by_group_size_errors():
  objective = make_objective(group_size=4)
  params = random_params(objective)
  batch = {"image": jnp.zeros((6,) + SHAPE)}
  with pytest.raises(ValueError, match="objective.group_size=4.*train.batch_size"):
    objective.loss(params, batch, jax.random.key(0), 0, {})


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="objective.f_type.*Did you mean 'euler_fm'"):
    make_objective(f_type="euler")
  with pytest.raises(ValueError, match="euler_fm.*path='ot'"):
    make_objective(f_type="euler_fm", path="cosine")
  with pytest.raises(ValueError, match="Did you mean 'restart'"):
    make_objective().sample({}, jax.random.key(0), 2, method="restrat")


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_guidance_acts_on_raw_output(guidance):
  """CFG: f(x, t, s) with F = F_u + w (F_c - F_u); w = 1 is the conditional flow map."""
  objective = make_objective(num_classes=3)
  params = random_params(objective)
  rng = jax.random.key(10)
  cond = jnp.array([0, 1, 2, 1])

  @jax.jit
  def run(params):
    sample = objective.sample(params, rng, 4, cond, num_steps=1, guidance=guidance)
    x_start = objective.initial_noise(jax.random.split(rng)[0], 4)
    t, s = jnp.full((4,), objective.t_max), jnp.full((4,), objective.t_min)
    out_c = objective.network(params, x_start, t, s, cond)
    out_u = objective.network(params, x_start, t, s, jnp.full_like(cond, 3))
    expected = objective.parameterize(x_start, out_u + guidance * (out_c - out_u), t, s)
    return sample, expected, objective.flow_map(params, x_start, t, s, cond), out_c - out_u

  sample, expected, conditional, difference = run(params)
  np.testing.assert_allclose(sample, expected, rtol=1e-5, atol=1e-6)
  if guidance == 1.0:
    np.testing.assert_allclose(sample, conditional, rtol=1e-5, atol=1e-6)
  assert np.abs(difference).max() > 1e-3


@pytest.mark.parametrize("method", imm.SAMPLE_METHODS)
def test_one_step_sample_is_one_flow_map_call(method):
  objective = make_objective()
  params = random_params(objective)
  rng = jax.random.key(11)

  @jax.jit
  def run(params):
    sample = objective.sample(params, rng, 8, num_steps=1, method=method)
    x_start = objective.initial_noise(jax.random.split(rng)[0], 8)
    return sample, objective.flow_map(params, x_start, jnp.full((8,), objective.t_max),
                                      jnp.full((8,), objective.t_min), None)

  sample, expected = run(params)
  np.testing.assert_allclose(sample, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", pushforward.SCHEDULES)
def test_time_grid(schedule):
  grid = np.asarray(pushforward.time_grid(schedule, 8, paths.get("ot"), 0.994, 1e-3))
  assert grid[0] == np.float32(0.994) and grid[-1] == np.float32(1e-3)
  assert np.all(np.diff(grid) < 0)
  if schedule == "edm":  # denser at low noise than the uniform grid
    assert grid[-2] < 0.994 / 8


def gaussian_flow_map(mu, var, sigma_d):
  """The exact probability-flow map of data N(mu, var I) on the OT path with noise std sigma_d:
  x_s = m_s + (std_s / std_t)(x_t - m_t), m_t = alpha_t mu, std_t^2 = alpha_t^2 var +
  sigma_t^2 sigma_d^2."""
  def stats(t):
    t = t[:, None]
    return (1 - t) * mu, jnp.sqrt((1 - t) ** 2 * var + t ** 2 * sigma_d ** 2)

  def flow_map(x, t, s):
    (m_t, std_t), (m_s, std_s) = stats(t), stats(s)
    return m_s + std_s / std_t * (x - m_t)

  return flow_map


def test_pushforward_of_an_exact_flow_map_is_step_independent():
  """With the exact map, N steps on any grid compose to the 1-step map; restart re-noises with
  fresh noise, so its samples change but their law (the data's, N(1.5, 1)) does not."""
  flow_map = gaussian_flow_map(mu=1.5, var=1.0, sigma_d=0.5)
  path = paths.get("ot")
  grid = lambda schedule, num: pushforward.time_grid(schedule, num, path, 0.994, 1e-3)
  renoise = lambda x0, t, key: path.interpolate(x0, 0.5 * jax.random.normal(key, x0.shape), t)

  @jax.jit
  def run(x_start):
    one = pushforward.pushforward(flow_map, x_start, grid("uniform", 1))
    many = [pushforward.pushforward(flow_map, x_start, grid(schedule, 5))
            for schedule in pushforward.SCHEDULES]
    restarted = pushforward.restart(flow_map, x_start, grid("uniform", 4), jax.random.key(13),
                                    renoise)
    return one, many, restarted

  one, many, restarted = run(0.5 * jax.random.normal(jax.random.key(12), (4096, 2)))
  for x in many:
    np.testing.assert_allclose(x, one, atol=1e-4)
  assert not np.allclose(restarted, one)
  np.testing.assert_allclose(restarted.mean(), 1.5, atol=0.05)
  np.testing.assert_allclose(restarted.std(), 1.0, atol=0.03)


@pytest.mark.parametrize("name", ["imm_toy2d", "imm_digits", "imm_imagenet", "imm_cifar10"])
def test_experiment_presets_validate(name):
  module = load_experiment(name)
  for arg in [None] + sorted(module.PRESETS):
    config = module.get_config(arg)
    config_lib.validate(config, 8)
    assert config.objective.name == "imm"
    assert config.train.batch_size % config.objective.group_size == 0


def test_toy2d_tiny_trains_end_to_end_and_eight_devices_match_one(tmp_path):
  """train.run on a mesh of 8 devices (data=8, one group per device), then the first step's
  loss again on 1 device, with the step key the trainer uses: they agree to 1e-5."""
  config = load_experiment("imm_toy2d").get_config("tiny")
  with config.unlocked():
    config.mesh.data = 8
    config.train.log_every = 1
    config.ckpt.every_steps = 0
  assert len(jax.devices()) == 8
  state = train.run(config, str(tmp_path))
  assert int(state.step) == config.train.steps
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == list(range(1, config.train.steps + 1))
  assert all(np.isfinite(r["loss"]) for r in records)
  assert (tmp_path / "samples" / f"step_{config.train.steps}.png").exists()

  with config.unlocked():
    config.mesh.data = 1
  setup = train.build(config, jax.devices()[:1])
  first_batch = next(train.data.build(config.data, split="train",
                                      global_batch_size=config.train.batch_size,
                                      seed=config.seed,
                                      sharding=train.sharding.batch_sharding(setup.mesh)))
  with train.context(setup):
    state = setup.init_fn()
    loss, metrics = jax.jit(setup.objective.loss)(
        state.params, first_batch, jax.random.fold_in(setup.step_rng, 0), state.step,
        train.step_lib.view_of(state))
  np.testing.assert_allclose(float(loss), records[0]["loss"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(metrics["mmd"]), records[0]["mmd"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("time_sampler", ["uniform", "lognormal_eta"])
def test_t_min_zero_gives_a_finite_loss_and_a_zero_weight_at_zero(time_sampler):
  """IMM's ImageNet networks are sampled down to t = 0 (eps = 0): the weight's limit there is 0
  and a training loss with t_min = 0 is finite."""
  objective = make_objective(t_min=0.0, time_sampler=time_sampler)
  weight = objective.loss_weight(jnp.array([0.0, 1e-6, 0.5]))
  assert weight[0] == 0.0 and np.all(np.isfinite(np.asarray(weight)))
  assert float(weight[1]) < 1e-4
  params = random_params(objective)
  batch = {"image": jax.random.normal(jax.random.key(1), (16,) + SHAPE)}
  loss, _ = objective.loss(params, batch, jax.random.key(2), 0, None)
  assert np.isfinite(float(loss))


def test_explicit_times_replace_the_grid():
  """sample.times equal to the uniform grid is the uniform sampler; an intermediate time of
  choice (IMM's CIFAR-10 eta = 1.4) is two flow-map calls through it; times outside [t_min,
  t_max] are refused."""
  objective = make_objective()
  params = random_params(objective)
  rng = jax.random.key(3)
  grid = tuple(float(t) for t in pushforward.time_grid("uniform", 2, objective.schedule,
                                                        objective.t_max, objective.t_min))
  np.testing.assert_allclose(objective.sample(params, rng, 8, num_steps=2, times=grid),
                             objective.sample(params, rng, 8, num_steps=2), rtol=1e-6)
  mid = 1.4 / 2.4
  timed = objective.sample(params, rng, 8, num_steps=2, times=(objective.t_max, mid,
                                                                objective.t_min))
  x = objective.initial_noise(jax.random.split(rng)[0], 8)
  full = lambda v: jnp.full((8,), v)
  x = objective.flow_map(params, x, full(objective.t_max), full(mid), None)
  x = objective.flow_map(params, x, full(mid), full(objective.t_min), None)
  np.testing.assert_allclose(timed, x, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(timed) - np.asarray(objective.sample(params, rng, 8, num_steps=2))
                ).max() > 1e-4
  with pytest.raises(ValueError, match="inside it"):
    objective.sample(params, rng, 8, num_steps=2, times=(0.999, 0.5, objective.t_min))
  with pytest.raises(ValueError, match="num_steps"):
    objective.sample(params, rng, 8, num_steps=1, times=grid)


def test_sample_times_config_checks(tmp_path):
  """A times/num_steps mismatch stops at validation; an objective whose sampler takes no times
  stops before training with the objectives that do."""
  load = lambda **kw: config_lib.load_experiment("experiments/fm_toy2d.py", "tiny", **kw)
  with pytest.raises(config_lib.ConfigError, match="num_steps=2"):
    config_lib.validate(load(**{"sample.times": (0.9, 0.5, 0.1)}), 1)
  with pytest.raises(config_lib.ConfigError, match="decreasing"):
    config_lib.validate(load(**{"sample.times": (0.5, 0.9), "sample.num_steps": 1}), 1)
  config = load(**{"sample.times": (0.9, 0.1), "sample.num_steps": 1})
  with pytest.raises(config_lib.ConfigError, match="imm"):
    train.run(config, str(tmp_path / "fm"))


def test_the_target_is_a_constant_for_the_gradient():
  """The gradient of the IMM loss is that of mean_g w(t) MMD^2(f(x_t, t, s), y) with the target
  y = f(x_r, r, s) held fixed (the stop-gradient of Zhou et al., arXiv:2503.07565): it differs
  from the gradient through both sides."""
  objective = make_objective(f_type="simple_edm")
  params = random_params(objective, seed=31)
  groups, m = 4, objective.group_size
  x = jax.random.normal(jax.random.key(32), (groups * m,) + SHAPE)
  eps = objective.sigma_d * jax.random.normal(jax.random.key(33), x.shape)
  t = jnp.asarray([0.9, 0.7, 0.5, 0.3])
  s = jnp.asarray([0.1, 0.2, 0.05, 0.01])
  r = objective.mapping(t, s)
  path = objective.schedule
  t_b, r_b, s_b = (jnp.repeat(v, m) for v in (t, r, s))
  x_t = path.interpolate(x, eps, t_b)
  x_r = path.ddim(x_t, x, t_b, r_b)
  grouped = lambda y: y.reshape(groups, m, -1)

  def manual(params, target):
    y_st = objective.flow_map(params, x_t, t_b, s_b, None)
    mmd = imm.mmd2(grouped(y_st), grouped(target), objective.kernel_bandwidth(t, s))
    return jnp.mean(objective.loss_weight(t) * mmd)

  fixed = objective.flow_map(params, x_r, r_b, s_b, None)
  loss, _ = objective.loss_at(params, x, None, t, r, s, eps, jax.random.key(0))
  np.testing.assert_allclose(float(loss), float(manual(params, fixed)), rtol=1e-5)
  grads = jax.grad(lambda p: objective.loss_at(p, x, None, t, r, s, eps, jax.random.key(0))[0])(
      params)
  expected = jax.grad(lambda p: manual(p, fixed))(params)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  both = jax.grad(lambda p: manual(p, objective.flow_map(p, x_r, r_b, s_b, None)))(params)
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(grads), jax.tree.leaves(both))) > 1e-5



class GaussianFlowMapNet(nn.Module):
  """A backbone whose raw output F makes IMM's euler_fm map f = x_t - (t - s) sigma_d F equal to
  a given map of (x_t, t, s): it undoes c_in (OT path) and reads s from the 'identity' time
  embedding. kind: "exact" (the PF-ODE map Phi of data N(mu, var I)), "overshoot" (the step
  x_t + factor (Phi - x_t)) or "mean_at_t" (Phi with the mean m_s replaced by m_t)."""
  mu: tuple
  var: float
  sigma_d: float
  kind: str = "exact"
  factor: float = 1.0

  @nn.compact
  def __call__(self, x_in, times, cond, *, train):
    del cond, train
    self.param("unused", nn.initializers.zeros, ())
    t, s = times
    x_t = x_in * (self.sigma_d * jnp.sqrt((1 - t) ** 2 + t ** 2))[:, None]
    mu = jnp.asarray(self.mu)
    f = gaussian_flow_map(mu, self.var, self.sigma_d)(x_t, t, s)
    if self.kind == "overshoot":
      f = x_t + self.factor * (f - x_t)
    elif self.kind == "mean_at_t":
      f = f + (s - t)[:, None] * mu
    step = ((t - s) * self.sigma_d)[:, None]
    return jnp.where(step > 0, (x_t - f) / jnp.where(step > 0, step, 1.0), 0.0)


@pytest.mark.parametrize("var, overshoot", [(0.0, 1.1), (0.5, 2.0)])
def test_loss_of_the_exact_flow_map_of_gaussian_data_vanishes(var, overshoot):
  """With the exact PF-ODE map of data N(mu, var I) as the network, f(x_t, t, s) and
  f(x_r, r, s) are both distributed as x_s for every s <= r <= t, so the population MMD^2 is 0.
  IMM's V-statistic over a group of M = 4 particles exceeds its unbiased off-diagonal part by
  its diagonal, which is the M = 1 (consistency) loss of the same particles over M; the debiased
  loss (M loss_M - loss_1) / (M - 1), over 128 replicates of 64 groups, is within 4 standard
  errors of 0 (for a point mass, var = 0, each particle's two maps coincide and loss_M itself is
  0). A map with the mean m_t in place of m_s, or whose step x_t -> Phi is `overshoot` times
  too long (IMM's kernel resolves a 10% error on the point mass; on var = 0.5 it needs a larger
  one at this sample size), gives a debiased loss more than 8 standard errors above 0."""
  mu, sigma_d, group_size = (1.0, -0.5, 0.25), 0.5, 4
  replicates, groups = 128, 64
  kinds = ("exact", "overshoot", "mean_at_t")

  def objective(kind, m):
    model = GaussianFlowMapNet(mu=mu, var=var, sigma_d=sigma_d, kind=kind, factor=overshoot)
    return imm.IMM(model=model, image_shape=SHAPE, num_classes=0, sigma_d=sigma_d,
                   time_embedding="identity", group_size=m)

  keys = jax.random.split(jax.random.key(40), 4)
  shape = (replicates, groups * group_size) + SHAPE
  x = jnp.asarray(mu) + np.sqrt(var) * jax.random.normal(keys[0], shape)
  eps = sigma_d * jax.random.normal(keys[1], shape)
  t, s = jax.vmap(lambda key: objective("exact", group_size).sample_times(key, groups))(
      jax.random.split(keys[2], replicates))
  r = s + jax.random.uniform(keys[3], t.shape) * (t - s)
  params = {"unused": jnp.zeros(())}

  @jax.jit
  @jax.vmap
  def losses(x, eps, t, r, s):
    """{kind: (the loss with groups of M, the M = 1 loss of the same particles and times)}."""
    repeat = lambda v: jnp.repeat(v, group_size)
    return {kind: (objective(kind, group_size).loss_at(params, x, None, t, r, s, eps, None)[0],
                   objective(kind, 1).loss_at(params, x, None, repeat(t), repeat(r),
                                              repeat(s), eps, None)[0])
            for kind in kinds}

  results = losses(x, eps, t, r, s)

  def debiased(kind):
    """(mean, standard error) of the debiased loss over the replicates, and loss_M's mean."""
    loss_m, loss_1 = (np.asarray(v, np.float64) for v in results[kind])
    values = (group_size * loss_m - loss_1) / (group_size - 1)
    return values.mean(), values.std(ddof=1) / np.sqrt(replicates), loss_m.mean()

  mean, error, raw = debiased("exact")
  assert abs(mean) < 4 * error + 1e-6, (mean, error)
  if var == 0.0:
    assert raw < 1e-5, raw
  else:  # the V-statistic's diagonal keeps loss_M itself away from 0
    assert raw > 100 * error, (raw, error)
  for kind in kinds[1:]:
    wrong_mean, wrong_error, _ = debiased(kind)
    assert wrong_mean > 8 * max(wrong_error, error), (kind, wrong_mean, wrong_error, error)


def test_same_label_pairs_give_the_per_label_mmds_weighted_by_their_pair_counts():
  """With a same-label pair mask the group MMD^2 is sum_c n_c^2 MMD^2_c / sum_c n_c^2, each
  label's V-statistic computed alone; an all-true mask is the plain estimator."""
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 3, 6, 5)).astype(np.float32)
  labels = np.array([[0, 1, 0, 2, 1, 0], [4, 4, 4, 4, 4, 4], [0, 1, 2, 3, 5, 6]])
  bandwidth = np.array([0.7, 1.3, 2.0], np.float32)
  pairs = labels[:, :, None] == labels[:, None, :]
  got = np.asarray(imm.mmd2(jnp.asarray(a), jnp.asarray(b), jnp.asarray(bandwidth), "laplace",
                            jnp.asarray(pairs)))
  for g in range(3):
    total, weight = 0.0, 0
    for c in np.unique(labels[g]):
      members = labels[g] == c
      n = int(members.sum())
      one = np.asarray(imm.mmd2(jnp.asarray(a[g:g + 1, members]), jnp.asarray(b[g:g + 1, members]),
                                jnp.asarray(bandwidth[g:g + 1])))[0]
      total, weight = total + n * n * one, weight + n * n
    np.testing.assert_allclose(got[g], total / weight, rtol=1e-5)
  plain = np.asarray(imm.mmd2(jnp.asarray(a), jnp.asarray(b), jnp.asarray(bandwidth)))
  np.testing.assert_allclose(got[1], plain[1], rtol=1e-6)  # one label: every pair
  assert abs(got[0] - plain[0]) > 1e-3


def test_label_groups_sort_the_batch_by_label_before_grouping():
  """label_groups='by_label' equals the mixed loss of the batch sorted by label (stable) when that
  sort leaves one label per group, and differs from the mixed loss of the unsorted batch."""
  num_classes = 3
  by_label = make_objective(num_classes=num_classes, label_dropout=0.0, label_groups="by_label")
  mixed = make_objective(num_classes=num_classes, label_dropout=0.0)
  params = random_params(mixed, seed=1)
  rng = np.random.default_rng(2)
  labels = np.array([2, 0, 1, 2, 0, 1, 1, 0, 2, 0, 1, 2], np.int32)  # 4 of each label
  x = rng.normal(size=(12,) + SHAPE).astype(np.float32)
  order = np.argsort(labels, kind="stable")
  key = jax.random.key(3)
  loss = lambda objective, x, y: objective.loss(
      params, {"image": jnp.asarray(x), "label": jnp.asarray(y)}, key, 0, {})[0]
  sorted_loss = float(loss(mixed, x[order], labels[order]))
  np.testing.assert_allclose(float(loss(by_label, x, labels)), sorted_loss, rtol=1e-6)
  assert abs(float(loss(mixed, x, labels)) - sorted_loss) > 1e-4 * abs(sorted_loss)
  with pytest.raises(ValueError, match="label_groups"):
    make_objective(label_groups="sorted")
