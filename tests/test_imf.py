"""Improved MeanFlow (objective.variant='imf'; Geng, Lu, Wu, Shechtman, Kolter and He,
arXiv:2512.02012) properties: with r = t the loss is flow matching's; the compound prediction
V = u + (t - r) sg(du/dt) differentiates along the network's own velocity (finite differences),
its stop-gradient, and the exact Gaussian average velocity as its fixed point; the guided target's
fixed point is the guided field; the guidance-scale and interval draws; guidance as a network
input of the sampler; the in-context DiT with its auxiliary head; errors; a tiny end-to-end run.
"""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowjax import models, objectives
from flowjax.objectives import flow_matching, meanflow
from flowjax.models import imf_dit

from helpers import tiny_run_errors
from test_meanflow import gaussian_fields, load_experiment

SHAPE = (3,)
NUM_CLASSES = 4


class TinyBackbone(nn.Module):
  """Dense -> tanh -> dropout -> Dense on [x, every time input, one-hot label]; one time input
  (flow matching) is padded with h = 0. aux_head_depth > 0: a second Dense head, stacked after
  the first on the last axis (the backbone contract of an auxiliary velocity head)."""
  num_classes: int = 0
  dropout: float = 0.0
  aux_head_depth: int = 0

  @nn.compact
  def __call__(self, x, times, cond, *, train):
    if len(times) == 1:
      times = (times[0], jnp.zeros_like(times[0]))
    features = [x.reshape(x.shape[0], -1)] + [t[:, None] for t in times]
    if self.num_classes:
      labels = jnp.full(x.shape[:1], self.num_classes) if cond is None else cond
      features.append(jax.nn.one_hot(labels, self.num_classes + 1))
    h = jnp.tanh(nn.Dense(16)(jnp.concatenate(features, axis=-1)))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    out = nn.Dense(features[0].shape[-1])(h).reshape(x.shape)
    if self.aux_head_depth:
      out = jnp.concatenate([out, nn.Dense(features[0].shape[-1])(h).reshape(x.shape)], -1)
    return out


def make_objective(num_classes=0, dropout=0.0, head=False, **overrides):
  model = TinyBackbone(num_classes=num_classes, dropout=dropout, aux_head_depth=int(head))
  keys = dict(variant="imf", imf_velocity="head" if head else "boundary")
  return meanflow.MeanFlow(model=model, image_shape=SHAPE, num_classes=num_classes,
                           **dict(keys, **overrides))


def random_params(objective, seed=0, scale=0.5, shape=SHAPE):
  """Parameters of the right structure with every entry N(0, scale^2), filled from NumPy."""
  batch = {"image": jnp.zeros((1,) + shape), "label": jnp.zeros((1,), jnp.int32)}
  shapes = jax.eval_shape(lambda: nn.meta.unbox(objective.init(jax.random.key(0), batch)[0]))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype),
                      shapes)


def draws(seed, batch=8, interval=(0.2, 0.9)):
  keys = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(keys[0], (batch,) + SHAPE)
  eps = jax.random.normal(keys[1], x.shape)
  t = jax.random.uniform(keys[2], (batch,), minval=interval[0], maxval=interval[1])
  r = t * jax.random.uniform(keys[3], (batch,))
  return x, eps, t, r


@pytest.mark.parametrize("head", [False, True])
def test_r_equal_t_without_weighting_is_flow_matching(head):
  """fraction_r_equals_t = 1, p = 0, no guidance: V = u(z_t, t, t), so iMF's loss is flow
  matching's on the same rng-derived t, eps, dropped labels and dropout mask; with the auxiliary
  head, plus flow matching's loss of the head."""
  objective = make_objective(NUM_CLASSES, dropout=0.2, head=head, fraction_r_equals_t=1.0,
                             adaptive_p=0.0, time_sampler="uniform")
  params = random_params(objective)
  keys = jax.random.split(jax.random.key(1), 2)
  batch = {"image": jax.random.normal(keys[0], (32,) + SHAPE),
           "label": jax.random.randint(keys[1], (32,), 0, NUM_CLASSES)}
  rng = jax.random.key(7)
  # Flow matching's draws, reproduced; r = t.
  time_key, noise_key, drop_key, model_key = jax.random.split(rng, 4)
  t = jax.random.uniform(time_key, (32,))
  eps = jax.random.normal(noise_key, batch["image"].shape)
  cond = objectives.common.drop_labels(batch["label"], drop_key, 0.1, NUM_CLASSES)
  x = batch["image"]
  got, metrics = objective.loss_at(params, x, cond, t, t, eps, model_key)
  z_t = (1 - t[:, None]) * x + t[:, None] * eps
  u, v_head = objective.fields(params, z_t, t, jnp.zeros_like(t), cond, (), model_key, True)
  expected = jnp.mean(jnp.square(u - (eps - x)))
  if head:
    expected = expected + jnp.mean(jnp.square(v_head - (eps - x)))
  else:
    fm = flow_matching.FlowMatching(model=objective.model, image_shape=SHAPE,
                                    num_classes=NUM_CLASSES, time_sampler="uniform")
    np.testing.assert_allclose(fm.loss(params, batch, rng, 0, None)[0], expected, rtol=1e-6)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  assert float(metrics["r_equals_t"]) == 1.0


@pytest.mark.parametrize("head", [False, True])
def test_compound_prediction_differentiates_along_the_networks_velocity(head):
  """V = u + (t - r) du/dt with du/dt the total derivative along (v_theta, 1, 0), v_theta the
  network's velocity (u_theta(z_t, t, t), or the head at h = 0): central differences of
  tau -> u(z_t + tau v_theta, t + tau, r); and the loss (p = 0) is mean (V - v)^2 with that V,
  not with the sample velocity e - x as the tangent."""
  objective = make_objective(NUM_CLASSES, head=head, adaptive_p=0.0)
  params = random_params(objective, seed=3)
  x, eps, t, r = draws(2)
  cond = jnp.arange(8) % (NUM_CLASSES + 1)
  z_t = (1 - t[:, None]) * x + t[:, None] * eps
  v_theta = objective.velocity(params, z_t, t, cond)
  boundary = objective.fields(params, z_t, t, jnp.zeros_like(t), cond)
  np.testing.assert_allclose(v_theta, boundary[1] if head else boundary[0], rtol=1e-6)
  compound, _ = objective.imf_compound(params, z_t, t, r, cond, v_theta)
  fn = lambda z, t_: objective.network(params, z, t_, t_ - r, cond)
  delta = 1e-2
  fd = (fn(z_t + delta * v_theta, t + delta) - fn(z_t - delta * v_theta, t - delta)) / (2 * delta)
  expected = fn(z_t, t) + (t - r)[:, None] * fd
  np.testing.assert_allclose(compound, expected, rtol=1e-3, atol=2e-3)
  loss, metrics = objective.loss_at(params, x, cond, t, r, eps, None)
  np.testing.assert_allclose(metrics["mse"], jnp.mean(jnp.square(compound - (eps - x))),
                             rtol=1e-5)
  sample_tangent, _ = objective.imf_compound(params, z_t, t, r, cond, eps - x)
  assert float(jnp.abs(metrics["mse"] - jnp.mean(jnp.square(sample_tangent - (eps - x))))) > 1e-3
  if not head:
    np.testing.assert_allclose(loss, metrics["mse"], rtol=1e-6)


def test_gradient_flows_through_u_only():
  """sg(du/dt): the gradient of iMF's loss (p = 0) is that of mean (u + (t - r) c - v)^2 with
  c = du/dt held fixed, not that of the fully differentiated compound prediction."""
  objective = make_objective(NUM_CLASSES, adaptive_p=0.0, label_dropout=0.0)
  params = random_params(objective, seed=5)
  x, eps, t, r = draws(4)
  cond = jnp.arange(8) % NUM_CLASSES
  z_t = (1 - t[:, None]) * x + t[:, None] * eps
  v_theta = objective.velocity(params, z_t, t, cond)
  fixed_rate = (objective.imf_compound(params, z_t, t, r, cond, v_theta)[0]
                - objective.network(params, z_t, t, t - r, cond)) / (t - r)[:, None]

  def by_hand(params, stop):
    u_fn = lambda z, t_: objective.network(params, z, t_, t_ - r, cond)
    u, du_dt = jax.jvp(u_fn, (z_t, t), (objective.velocity(params, z_t, t, cond),
                                         jnp.ones_like(t)))
    du_dt = jax.lax.stop_gradient(fixed_rate) if stop else du_dt
    return jnp.mean(jnp.square(u + (t - r)[:, None] * du_dt - (eps - x)))

  loss_fn = lambda params: objective.loss_at(params, x, cond, t, r, eps, None)[0]
  np.testing.assert_allclose(loss_fn(params), by_hand(params, True), rtol=1e-5)
  grads = jax.tree.leaves(jax.grad(loss_fn)(params))
  for got, want in zip(grads, jax.tree.leaves(jax.grad(by_hand)(params, True))):
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6)
  full = jax.tree.leaves(jax.grad(by_hand)(params, False))
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(grads, full)) > 1e-3


class GaussianAverageVelocity(nn.Module):
  """The exact average velocity u(z, t, t - h) of data N(mu, var I) as a parameter-free
  backbone; times beyond (t, h) are ignored."""
  mu: tuple
  var: float

  def __call__(self, x, times, cond, *, train):
    _, average, _ = gaussian_fields(jnp.asarray(self.mu), self.var)
    t, h = times[:2]
    return average(x, t, t - h)


def test_exact_gaussian_average_velocity_is_a_fixed_point():
  """For data N(mu, var I) and u_theta the exact average velocity, v_theta = u_theta(z, t, t) is
  the marginal velocity and V(z_t) = u + (t - r) du/dt equals the marginal velocity v(z_t) for
  every r: iMF's v-loss is minimised by the exact u (Lyy-iiis/imeanflow `imf.py`
  `iMeanFlow.forward`). The same V with the sample's e - x as the tangent (MeanFlow's) is not."""
  mu, var = (1.5, -0.5, 0.0), 0.3
  velocity, _, _ = gaussian_fields(jnp.asarray(mu), var)
  objective = meanflow.MeanFlow(model=GaussianAverageVelocity(mu, var), image_shape=SHAPE,
                                num_classes=0, variant="imf")
  x, eps, t, r = draws(6, batch=64, interval=(0.05, 0.95))
  r = r.at[:8].set(t[:8])
  z_t = (1 - t[:, None]) * x + t[:, None] * eps
  no_guidance = (jnp.ones_like(t), jnp.zeros_like(t), jnp.ones_like(t))

  @jax.jit
  def compute():
    v_g, v_theta = objective.imf_target({}, z_t, t, eps - x, None, *no_guidance)
    compound, _ = objective.imf_compound({}, z_t, t, r, None, v_theta)
    mf_tangent, _ = objective.imf_compound({}, z_t, t, r, None, eps - x)
    return v_g, v_theta, compound, mf_tangent

  v_g, v_theta, compound, mf_tangent = compute()
  np.testing.assert_array_equal(v_g, eps - x)  # no guidance: the target is the sample's v
  np.testing.assert_allclose(v_theta, velocity(z_t, t), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(compound, velocity(z_t, t), rtol=1e-4, atol=1e-4)
  assert float(jnp.max(jnp.abs(mf_tangent - velocity(z_t, t))[8:])) > 1e-2


class GuidedFields(nn.Module):
  """A parameter-free backbone whose velocity at (t, h = 0) is the guided field
  v_omega(z | c) = U + omega (C_c - U) for a label c (U for the null label), with
  U(z, t) = t tanh(z) and C_c(z, t) = U + 0.3 (c + 1) z; omega = 1 / (1 - g) from the guidance
  input g = 1 - 1/omega. The interval inputs are ignored."""
  num_classes: int

  def __call__(self, x, times, cond, *, train):
    t, _, g = times[:3]
    omega = 1.0 / (1.0 - g)
    uncond = t[:, None] * jnp.tanh(x)
    conditional = uncond + 0.3 * (cond[:, None] + 1.0) * x
    guided = uncond + omega[:, None] * (conditional - uncond)
    return jnp.where((cond != self.num_classes)[:, None], guided, uncond)


def test_guided_target_has_the_guided_field_as_fixed_point():
  """v_g = v + (1 - 1/omega') (v_theta(y, omega') - v_theta(null, 1)) (Lyy-iiis/imeanflow
  `imf.py` `guidance_fn`). Where the network already predicts the guided field
  v_omega(.|y) = omega C_y + (1 - omega) U and v is the class-conditional velocity C_y (the
  conditional mean of e - x), v_g is v_omega: the guided field is a fixed point. omega' = 1
  outside [t_min, t_max] and omega = 1 give no guidance (v_g = v), null labels keep v, and the
  JVP tangent is v_theta(y, omega')."""
  objective = meanflow.MeanFlow(model=GuidedFields(NUM_CLASSES), image_shape=SHAPE,
                                num_classes=NUM_CLASSES, variant="imf", guidance_scale_max=8.0)
  z = jax.random.normal(jax.random.key(8), (10,) + SHAPE)
  t = jnp.linspace(0.05, 0.95, 10)
  cond = jnp.array([0, 1, 2, 3, NUM_CLASSES, 0, 1, 2, NUM_CLASSES, 3])
  omega = jnp.linspace(1.0, 8.0, 10)
  t_min, t_max = jnp.full((10,), 0.2), jnp.full((10,), 0.8)
  uncond = t[:, None] * jnp.tanh(z)
  conditional = uncond + 0.3 * (jnp.where(cond == NUM_CLASSES, 0, cond)[:, None] + 1.0) * z
  v_g, v_theta = objective.imf_target({}, z, t, conditional, cond, omega, t_min, t_max)
  inside = (t >= 0.2) & (t <= 0.8)
  omega_used = jnp.where(inside, omega, 1.0)
  guided = uncond + omega_used[:, None] * (conditional - uncond)
  kept = cond != NUM_CLASSES
  np.testing.assert_allclose(v_g, jnp.where(kept[:, None], guided, conditional), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(v_theta, jnp.where(kept[:, None], guided, uncond), rtol=1e-6)
  assert float(jnp.max(jnp.abs(v_g - conditional)[inside & kept & (omega > 1)])) > 1e-2
  # omega = 1 everywhere: no guidance, whatever the network predicts.
  v_g, _ = objective.imf_target({}, z, t, conditional, cond, jnp.ones(10), t_min, t_max)
  np.testing.assert_allclose(v_g, conditional, rtol=1e-6)


def test_guidance_scale_and_interval_draws():
  """omega on [1, guidance_scale_max] with density proportional to omega^-beta (median
  sqrt(8) for beta = 1 on [1, 8]; (1 - 1/omega) / (1 - 1/8) = 1/2 for beta = 2), t_min ~
  U[0, 0.5], t_max ~ U[0.5, 1], and [0, 1] for examples with r = t (Lyy-iiis/imeanflow
  `imf.py` `sample_cfg_scale`, `sample_cfg_interval`)."""
  n = 40000
  equal = jnp.arange(n) % 4 == 0
  for beta, median in ((1.0, 8 ** 0.5), (2.0, 1.0 / (1.0 - 0.5 * (1.0 - 1.0 / 8)))):
    objective = make_objective(NUM_CLASSES, guidance_scale_max=8.0, guidance_scale_beta=beta)
    omega, t_min, t_max = jax.jit(objective.sample_guidance)(jax.random.key(9), equal)
    omega = np.asarray(omega)
    assert omega.min() >= 1.0 and omega.max() <= 8.0
    assert abs(np.median(omega) - median) < 0.03 * median
    # The density ratio p(2) / p(4) = 2^beta, from the counts in [2, 2.2] and [4, 4.4].
    ratio = np.mean((omega > 2) & (omega < 2.2)) / np.mean((omega > 4) & (omega < 4.4))
    assert abs(ratio - 2 ** beta / 2) < 0.15 * 2 ** beta / 2
  t_min, t_max, kept = np.asarray(t_min), np.asarray(t_max), ~np.asarray(equal)
  assert t_min[kept].min() >= 0 and t_min[kept].max() <= 0.5 and t_max[kept].min() >= 0.5
  assert abs(t_min[kept].mean() - 0.25) < 0.01 and abs(t_max[kept].mean() - 0.75) < 0.01
  assert np.all(t_min[~kept] == 0.0) and np.all(t_max[~kept] == 1.0)
  no_interval = make_objective(NUM_CLASSES, guidance_scale_max=8.0, guidance_interval=False)
  _, t_min, t_max = no_interval.sample_guidance(jax.random.key(10), equal)
  assert np.all(np.asarray(t_min) == 0.0) and np.all(np.asarray(t_max) == 1.0)
  omega, _, _ = make_objective(NUM_CLASSES).sample_guidance(jax.random.key(11), equal)
  assert np.all(np.asarray(omega) == 1.0)


def imf_dit_objective(**overrides):
  model = imf_dit.InContextDiT(patch_size=2, hidden_size=16, depth=2, num_heads=2,
                               num_classes=NUM_CLASSES, time_tokens=(2, 2, 2, 1, 1),
                               label_tokens=2, aux_head_depth=1)
  keys = dict(variant="imf", imf_velocity="head", guidance_scale_max=8.0, guidance_t_min=0.3,
              guidance_t_max=0.7)
  return meanflow.MeanFlow(model=model, image_shape=(4, 4, 2), num_classes=NUM_CLASSES,
                           **dict(keys, **overrides))


def test_guidance_scale_and_interval_are_inputs_of_the_sampler():
  """One step is z_1 - u(z_1, 1, 1 | y, 1 - 1/omega, t_min, t_max) with omega = sample.guidance
  and the interval of guidance_t_min, guidance_t_max; two steps chain two such calls; omega and
  the interval change the samples."""
  objective = imf_dit_objective()
  params = random_params(objective, seed=12, scale=0.3, shape=(4, 4, 2))
  rng, cond = jax.random.key(13), jnp.arange(6) % NUM_CLASSES
  z1 = jax.random.normal(rng, (6, 4, 4, 2))
  ones = jnp.ones((6,))
  for omega in (1.0, 4.0):
    got = objective.sample(params, rng, 6, cond, num_steps=1, guidance=omega)
    inputs = objective.guidance_inputs(omega * ones, 0.3 * ones, 0.7 * ones)
    expected = z1 - objective.network(params, z1, ones, ones, cond, guidance=inputs)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  two = objective.sample(params, rng, 6, cond, num_steps=2, guidance=4.0)
  inputs = objective.guidance_inputs(4.0 * ones, 0.3 * ones, 0.7 * ones)
  half = z1 - 0.5 * objective.network(params, z1, ones, 0.5 * ones, cond, guidance=inputs)
  expected = half - 0.5 * objective.network(params, half, 0.5 * ones, 0.5 * ones, cond,
                                            guidance=inputs)
  np.testing.assert_allclose(two, expected, rtol=1e-5, atol=1e-5)
  sample = lambda o, **k: imf_dit_objective(**k).sample(params, rng, 6, cond, guidance=o)
  assert float(jnp.max(jnp.abs(sample(1.0) - sample(4.0)))) > 1e-3
  assert float(jnp.max(jnp.abs(sample(4.0) - sample(4.0, guidance_t_min=0.0)))) > 1e-3
  with pytest.raises(ValueError, match="sample.guidance=0.0: iMF's guidance scale omega"):
    objective.sample(params, rng, 6, cond, guidance=0.0)
  unguided = make_objective(NUM_CLASSES)
  with pytest.raises(ValueError, match="trained without guidance conditioning"):
    unguided.sample(random_params(unguided), rng, 6, cond, guidance=2.0)


def test_in_context_dit_uses_every_condition_and_its_head_is_separate():
  """imf_dit: zero output at initialisation (zero gates and final layers); with random
  parameters each time input and the label change the output; the auxiliary head's own blocks
  change only the second half of the channels; a count of time inputs other than time_tokens'
  is an error; the forward-mode JVP through it is finite."""
  objective = imf_dit_objective()
  model = objective.model
  x = jax.random.normal(jax.random.key(14), (3, 4, 4, 2))
  times = tuple(jnp.full((3,), 0.1 * (i + 2)) for i in range(5))
  cond = jnp.array([0, 1, NUM_CLASSES])
  variables = model.init({"params": jax.random.key(0)}, x, times, cond, train=False)
  out = model.apply(variables, x, times, cond, train=False)
  assert out.shape == (3, 4, 4, 4) and float(jnp.max(jnp.abs(out))) == 0.0
  params = random_params(objective, seed=15, scale=0.3, shape=(4, 4, 2))
  apply = lambda p, times=times, cond=cond: model.apply({"params": p}, x, times, cond,
                                                        train=False)
  base = apply(params)
  for i in range(5):
    moved = tuple(t + 0.3 * (j == i) for j, t in enumerate(times))
    assert float(jnp.max(jnp.abs(apply(params, times=moved) - base))) > 1e-4, i
  assert float(jnp.max(jnp.abs(apply(params, cond=jnp.array([2, 3, 0])) - base))) > 1e-4
  assert {"label_tokens", "aux_block_1", "aux_final"} <= set(params)
  assert not any("adaLN" in jax.tree_util.keystr(path) for path, _ in
                 jax.tree_util.tree_flatten_with_path(params)[0])
  moved = dict(params, aux_block_1=jax.tree.map(lambda a: a + 0.1, params["aux_block_1"]))
  np.testing.assert_array_equal(apply(moved)[..., :2], base[..., :2])
  assert float(jnp.max(jnp.abs(apply(moved)[..., 2:] - base[..., 2:]))) > 1e-4
  with pytest.raises(ValueError, match="model.time_tokens=.*2 time inputs"):
    apply(params, times=times[:2])
  _, tangent = jax.jvp(lambda z: model.apply({"params": params}, z, times, cond, train=False),
                       (x,), (jnp.ones_like(x),))
  assert bool(jnp.all(jnp.isfinite(tangent))) and float(jnp.max(jnp.abs(tangent))) > 0
  config = models.default_config("imf_dit")
  config.update(dict(depth=2, aux_head_depth=3))
  info = type("Info", (), {"image_shape": (8, 8, 1), "num_classes": 0})
  with pytest.raises(ValueError, match="model.aux_head_depth=3 must be in"):
    models.build(config, info)


@pytest.mark.parametrize("preset, millions", [(None, 89), ("M2", 174), ("L2", 409),
                                             ("XL2", 610)])
def test_imagenet_presets_have_the_papers_parameter_counts(preset, millions):
  """imf_imagenet's networks, without the auxiliary head (training only) and without the
  embedder and tokens of t (the official network conditions on h alone), have the paper's
  reported sizes (iMF-B/2 89M, M/2 174M, L/2 409M, XL/2 610M) to 0.5%; shapes only."""
  config = load_experiment("imf_imagenet").get_config(preset)
  info = type("Info", (), {"image_shape": (32, 32, 4), "num_classes": 1000})
  model = models.build(config.model, info)
  times = tuple(jnp.zeros((1,)) for _ in config.model.time_tokens)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(
      {"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 4)), times,
      jnp.zeros((1,), jnp.int32), train=False)["params"]))
  count = lambda tree: sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
  inference = count({k: v for k, v in shapes.items()
                     if not k.startswith("aux_") and k not in ("time_embed_0", "time_tokens_0")})
  assert abs(inference / 1e6 - millions) < 0.005 * millions, inference
  assert count(shapes) > inference + config.model.aux_head_depth * 12 * 768 ** 2


def test_bad_inputs():
  with pytest.raises(ValueError, match="objective.variant.*Did you mean 'imf'"):
    make_objective(variant="imff")
  with pytest.raises(ValueError, match="objective.imf_velocity.*Did you mean 'head'"):
    make_objective(imf_velocity="haed")
  with pytest.raises(ValueError, match="objective.guidance_scale_max=8.0 applies to improved"):
    make_objective(NUM_CLASSES, variant="meanflow", guidance_scale_max=8.0)
  with pytest.raises(ValueError, match="objective.imf_velocity='head' takes v_theta"):
    meanflow.MeanFlow(model=TinyBackbone(), image_shape=SHAPE, num_classes=0, variant="imf",
                      imf_velocity="head")
  with pytest.raises(ValueError, match="model.aux_head_depth=1 gives the backbone"):
    meanflow.MeanFlow(model=TinyBackbone(aux_head_depth=1), image_shape=SHAPE, num_classes=0,
                      variant="imf")
  with pytest.raises(ValueError, match="guidance_scale_max=0.5 must be >= 1"):
    make_objective(NUM_CLASSES, guidance_scale_max=0.5)
  with pytest.raises(ValueError, match="guidance_scale_beta=-1.0 must be >= 0"):
    make_objective(NUM_CLASSES, guidance_scale_max=8.0, guidance_scale_beta=-1.0)
  with pytest.raises(ValueError, match="guidance_scale_max=8.0 trains classifier-free"):
    make_objective(0, guidance_scale_max=8.0)
  with pytest.raises(ValueError, match="variant='imf' takes the guidance scale as a network"):
    make_objective(NUM_CLASSES, guidance_w=2.0)
  with pytest.raises(ValueError, match="guidance interval passed to the network"):
    make_objective(NUM_CLASSES, guidance_scale_max=8.0, guidance_interval=False,
                   guidance_t_min=0.4)
  with pytest.raises(ValueError, match="guidance_interval='yes' must be True or False"):
    make_objective(NUM_CLASSES, guidance_interval="yes")


def test_digits_tiny_trains_end_to_end(tmp_path):
  """imf_digits (in-context DiT with an auxiliary head, guidance and interval conditioning): the
  run logs at step 1 the loss and unweighted error of the first global batch at the initial
  state (recomputed on one device with that step's key), and its trained state fits the batches
  it trained on better: their mean squared error falls by over 5%."""
  errors = tiny_run_errors(load_experiment("imf_digits").get_config("tiny"), tmp_path, steps=24)
  assert errors[1].mean() < 0.95 * errors[0].mean(), errors
