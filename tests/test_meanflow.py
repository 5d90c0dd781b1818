"""MeanFlow properties (Geng et al., arXiv:2505.13447): the r = t limit is flow
matching, the JVP is the total time derivative, the Gaussian closed form satisfies the MeanFlow
identity and is a fixed point of the target, the (t, r) sampler, the few-step sampler, errors,
and a tiny end-to-end run."""

import importlib.util
import json
import math
import os

import flax.linen as nn

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowjax import config as config_lib
from flowjax import objectives, paths, train
from flowjax.objectives import flow_matching, meanflow
from flowjax.samplers import mean_flow

from helpers import run_batch_errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (3,)
NUM_CLASSES = 4


class TinyBackbone(nn.Module):
  """A small smooth stand-in for the backbone contract: Dense -> tanh -> dropout -> Dense on
  [x, t, h, one-hot label]. Called with one time (flow matching) it uses h = 0, so both
  objectives share one parameter tree."""
  num_classes: int = 0
  dropout: float = 0.0
  attention_impl: str = "xla"

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
    return nn.Dense(features[0].shape[-1])(h).reshape(x.shape)


def make_objective(num_classes=0, dropout=0.0, **overrides):
  model = TinyBackbone(num_classes=num_classes, dropout=dropout)
  return meanflow.MeanFlow(model=model, image_shape=SHAPE, num_classes=num_classes, **overrides)


def random_params(objective, seed=0, scale=0.5):
  """Parameters of the right structure with every entry N(0, scale^2), filled from NumPy."""
  batch = {"image": jnp.zeros((1,) + SHAPE), "label": jnp.zeros((1,), jnp.int32)}
  shapes = jax.eval_shape(lambda: nn.meta.unbox(objective.init(jax.random.key(0), batch)[0]))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype),
                      shapes)


def gaussian_fields(mu, var):
  """Closed forms for data N(mu, var I) on z_t = (1 - t) x + t eps, eps ~ N(0, I).

  z_t ~ N(m_t, s_t^2) with m_t = (1 - t) mu, s_t^2 = (1 - t)^2 var + t^2. The marginal velocity
  is linear in z, so its flow keeps the standardised coordinate: z_r = m_r + (s_r / s_t)(z - m_t).
  Returns (v(z, t), u(z, t, r) = (z - z_r) / (t - r) with u(z, t, t) = v(z, t), flow(z, t, r)).
  t, r: [B]; z: [B, D].
  """
  m = lambda t: (1.0 - t) * mu
  s = lambda t: jnp.sqrt((1.0 - t) ** 2 * var + t ** 2)
  ds = lambda t: ((t - 1.0) * var + t) / s(t)

  def velocity(z, t):
    t = paths.expand(t, z)
    return -mu + ds(t) / s(t) * (z - m(t))

  def flow(z, t, r):
    t, r = paths.expand(t, z), paths.expand(r, z)
    return m(r) + s(r) / s(t) * (z - m(t))

  def average(z, t, r):
    h = paths.expand(t - r, z)
    safe = jnp.where(h > 0, h, 1.0)
    return jnp.where(h > 0, (z - flow(z, t, r)) / safe, velocity(z, t))

  return velocity, average, flow


def test_all_r_equal_t_without_weighting_is_flow_matching():
  """fraction_r_equals_t = 1, p = 0, no guidance: MeanFlow's loss is flow matching's, on the
  same rng-derived t, eps, dropped labels and dropout mask, to 1e-6."""
  objective = make_objective(NUM_CLASSES, dropout=0.2, fraction_r_equals_t=1.0, adaptive_p=0.0,
                             time_sampler="uniform")
  fm = flow_matching.FlowMatching(model=objective.model, image_shape=SHAPE,
                                  num_classes=NUM_CLASSES, time_sampler="uniform")
  params = random_params(objective)
  keys = jax.random.split(jax.random.key(1), 2)
  batch = {"image": jax.random.normal(keys[0], (32,) + SHAPE),
           "label": jax.random.randint(keys[1], (32,), 0, NUM_CLASSES)}
  rng = jax.random.key(7)
  expected, _ = fm.loss(params, batch, rng, 0, None)
  # Flow matching's draws, reproduced; r = t.
  time_key, noise_key, drop_key, model_key = jax.random.split(rng, 4)
  t = jax.random.uniform(time_key, (32,))
  eps = jax.random.normal(noise_key, batch["image"].shape)
  cond = objectives.common.drop_labels(batch["label"], drop_key, 0.1, NUM_CLASSES)
  got, metrics = objective.loss_at(params, batch["image"], cond, t, t, eps, model_key)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  # And by hand: mean over examples and dims of (u(z_t, t, 0) - (eps - x))^2.
  z_t = (1 - t[:, None]) * batch["image"] + t[:, None] * eps
  u = objective.network(params, z_t, t, jnp.zeros_like(t), cond, model_key, train=True)
  np.testing.assert_allclose(got, jnp.mean(jnp.square(u - (eps - batch["image"]))), rtol=1e-6)
  assert float(metrics["r_equals_t"]) == 1.0


def test_jvp_is_the_total_time_derivative():
  """du/dt from jax.jvp matches central differences of tau -> u(z + tau v, t + tau, r)."""
  objective = make_objective(NUM_CLASSES)
  params = random_params(objective, seed=3)
  keys = jax.random.split(jax.random.key(2), 4)
  z = jax.random.normal(keys[0], (8,) + SHAPE)
  v = jax.random.normal(keys[1], z.shape)
  t = jax.random.uniform(keys[2], (8,), minval=0.3, maxval=0.9)
  r = t * jax.random.uniform(keys[3], (8,))
  cond = jnp.arange(8) % (NUM_CLASSES + 1)
  fn = lambda z_, t_, r_: objective.network(params, z_, t_, t_ - r_, cond)
  _, du_dt = jax.jvp(fn, (z, t, r), (v, jnp.ones_like(t), jnp.zeros_like(r)))
  delta = 1e-2
  fd = (fn(z + delta * v, t + delta, r) - fn(z - delta * v, t - delta, r)) / (2 * delta)
  np.testing.assert_allclose(du_dt, fd, rtol=1e-3, atol=2e-3 * float(jnp.max(jnp.abs(fd))))
  # The target uses it: u_tgt = v - (t - r) du/dt.
  u, u_tgt = meanflow.meanflow_target(fn, z, t, r, v)
  np.testing.assert_allclose(u_tgt, v - (t - r)[:, None] * du_dt, rtol=1e-5, atol=1e-6)


def test_jvp_pass_asks_for_float32_products():
  """The JVP pass runs its matrix products in full float32 (HIGHEST) even under a lower ambient
  precision (GPUs default to TensorFloat-32); jvp_precision='default' follows the ambient one."""
  w = jax.random.normal(jax.random.key(0), (3, 3))
  fn = lambda z, t, r: jnp.tanh(z @ w) * (t - r)[:, None]
  z, t, r = jnp.ones((2, 3)), jnp.full((2,), 0.5), jnp.zeros((2,))

  def precisions(precision):
    with jax.default_matmul_precision("bfloat16"):
      jaxpr = jax.make_jaxpr(lambda *a: meanflow.meanflow_target(fn, *a, precision))(z, t, r, z)
    return {str(e.params["precision"]) for e in jaxpr.jaxpr.eqns
            if e.primitive.name == "dot_general"}

  assert precisions("float32") == {"(Precision.HIGHEST, Precision.HIGHEST)"}
  assert "HIGHEST" not in str(precisions("default"))
  with pytest.raises(ValueError, match="jvp_precision"):
    make_objective(0, jvp_precision="fp32")


def test_gaussian_closed_form_satisfies_the_identity_and_is_a_fixed_point():
  """For data N(mu, var I): u = v - (t - r) du/dt with du/dt = v d_z u + d_t u, and the
  implementation's target with u := the closed form and v_g := the marginal v returns u."""
  velocity, average, _ = gaussian_fields(mu=jnp.array([1.5, -0.5, 0.0]), var=0.3)
  keys = jax.random.split(jax.random.key(4), 3)
  z = 2.0 * jax.random.normal(keys[0], (64,) + SHAPE)
  t = jax.random.uniform(keys[1], (64,), minval=0.05, maxval=0.95)
  r = t * jax.random.uniform(keys[2], (64,))
  r = r.at[:8].set(t[:8])  # r = t: u is v and the target is v.

  @jax.jit
  def compute(z, t, r):
    v = velocity(z, t)
    u, du_dt = jax.jvp(average, (z, t, r), (v, jnp.ones_like(t), jnp.zeros_like(r)))
    u_impl, u_tgt = meanflow.meanflow_target(average, z, t, r, v)
    # A wrong u (the instantaneous velocity) is not a fixed point when r < t.
    _, wrong = meanflow.meanflow_target(lambda z_, t_, r_: velocity(z_, t_), z, t, r, v)
    return v, u, du_dt, u_impl, u_tgt, wrong

  v, u, du_dt, u_impl, u_tgt, wrong = compute(z, t, r)
  np.testing.assert_allclose(u, v - (t - r)[:, None] * du_dt, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(u_impl, u, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(u_tgt, u, rtol=1e-4, atol=1e-4)
  assert float(jnp.max(jnp.abs(wrong - velocity(z, t))[8:])) > 1e-2


def test_time_pairs():
  """r <= t, both in (0, 1), and the fraction with r = t is about fraction_r_equals_t."""
  for sampler, fraction in (("uniform", 0.75), ("logit_normal", 0.0)):
    objective = make_objective(time_sampler=sampler, fraction_r_equals_t=fraction)
    t, r = jax.jit(objective.sample_time_pairs, static_argnums=1)(jax.random.key(5), 20000)
    t, r = np.asarray(t), np.asarray(r)
    assert np.all(r > 0) and np.all(t < 1)
    assert abs(np.mean(r == t) - fraction) < 0.015
  # With fraction 0, (t, r) are the max and min of two logit-normal(-0.4, 1) draws, whose
  # pooled median is sigmoid(-0.4).
  assert abs(np.median(np.concatenate([t, r])) - float(jax.nn.sigmoid(-0.4))) < 0.01


def test_separate_time_pairs_follow_py_meanflow_v1():
  """pair_sampler='separate' (py-meanflow's v1, its CIFAR-10 script's t ~ LN(-0.6, 1.6),
  r ~ LN(-4.0, 1.6)): t has its own law, r = min(t, r_raw)."""
  objective = make_objective(pair_sampler="separate", time_mean=-0.6, time_std=1.6,
                             r_mean=-4.0, r_std=1.6, fraction_r_equals_t=0.0)
  t, r = jax.jit(objective.sample_time_pairs, static_argnums=1)(jax.random.key(6), 40000)
  t, r = np.asarray(t), np.asarray(r)
  assert np.all(r <= t)
  logit = lambda p: np.log(p / (1 - p))
  # t alone is logit-normal(-0.6, 1.6): not the max of two draws (whose median is higher).
  assert abs(np.median(logit(t)) + 0.6) < 0.03 and abs(np.std(logit(t)) - 1.6) < 0.03
  # r = min(t, r_raw): P(r = t) = P(r_raw > t), the normal CDF at (-0.6 + 4.0) / (1.6 sqrt 2).
  expected = 1 - 0.5 * (1 + math.erf((-0.6 + 4.0) / (1.6 * math.sqrt(2)) / math.sqrt(2)))
  assert abs(np.mean(r == t) - expected) < 0.01
  with pytest.raises(ValueError, match="pair_sampler"):
    make_objective(pair_sampler="v1")


def test_sampler_one_step_and_exact_gaussian_map():
  """1 step is z_1 - u(z_1, 1, 1) (to float32 rounding: the scan body is compiled, the
  reference runs op by op); with the exact Gaussian average velocity, 1 and 4
  steps both map N(0, I) to N(mu, var I)."""
  objective = make_objective(NUM_CLASSES)
  params = random_params(objective, seed=8)
  rng, cond = jax.random.key(9), jnp.arange(16) % NUM_CLASSES
  got = objective.sample(params, rng, 16, cond, num_steps=1)
  z1 = jax.random.normal(rng, (16,) + SHAPE)
  ones = jnp.ones((16,))
  np.testing.assert_allclose(got, z1 - objective.network(params, z1, ones, ones, cond),
                             rtol=1e-6, atol=1e-6)

  mu, var = jnp.array([1.5, -0.5, 0.0]), 0.3
  _, average, _ = gaussian_fields(mu, var)
  u_fn = lambda z, t, h: average(z, t, t - h)
  z1 = jax.random.normal(jax.random.key(10), (50000,) + SHAPE)
  one, four = jax.jit(lambda z: (mean_flow.solve(u_fn, z, 1), mean_flow.solve(u_fn, z, 4)))(z1)
  np.testing.assert_allclose(four, one, rtol=0, atol=1e-4)
  np.testing.assert_allclose(one, mu + np.sqrt(var) * z1, rtol=0, atol=1e-4)
  np.testing.assert_allclose(jnp.mean(one, 0), mu, atol=0.02)
  np.testing.assert_allclose(jnp.var(one, 0), var, rtol=0.03)


def test_guidance_in_training():
  """With w != 1 the target uses v_g = w v + (1 - w - kappa) u(null) + kappa u(y) inside the
  guidance interval and for kept labels, v elsewhere; w = 1, kappa = 0 makes no extra calls."""
  objective = make_objective(NUM_CLASSES, guidance_w=2.0, guidance_kappa=0.25,
                             guidance_t_min=0.2, guidance_t_max=0.8)
  params = random_params(objective, seed=11)
  keys = jax.random.split(jax.random.key(12), 2)
  z = jax.random.normal(keys[0], (10,) + SHAPE)
  v = jax.random.normal(keys[1], z.shape)
  t = jnp.linspace(0.05, 0.95, 10)
  cond = jnp.array([0, 1, 2, 3, NUM_CLASSES, 0, 1, 2, NUM_CLASSES, 3])
  zero = jnp.zeros_like(t)
  expected = (2.0 * v - 1.25 * objective.network(params, z, t, zero,
                                                    jnp.full_like(cond, NUM_CLASSES)) +
              0.25 * objective.network(params, z, t, zero, cond))
  use = (t >= 0.2) & (t <= 0.8) & (cond != NUM_CLASSES)
  got = objective.guided_velocity(params, z, t, v, cond)
  np.testing.assert_allclose(got, jnp.where(use[:, None], expected, v), rtol=1e-5, atol=1e-6)
  plain = make_objective(NUM_CLASSES)
  assert not plain.guided
  # No network call: parameters are not even needed.
  np.testing.assert_array_equal(plain.guided_velocity(None, z, t, v, cond), v)


def test_bad_inputs():
  with pytest.raises(ValueError, match="attention_impl='xla'"):
    meanflow.MeanFlow(model=TinyBackbone(attention_impl="cudnn"), image_shape=SHAPE,
                      num_classes=0)
  objective = make_objective()
  params = random_params(objective)
  with pytest.raises(ValueError, match="sample.guidance"):
    objective.sample(params, jax.random.key(0), 4, guidance=1.5)
  with pytest.raises(ValueError, match="Did you mean 'euler'"):
    objective.sample(params, jax.random.key(0), 4, method="eulr")
  with pytest.raises(ValueError, match="objective.time_sampler.*Did you mean 'uniform'"):
    make_objective(time_sampler="unform")
  with pytest.raises(ValueError, match="objective.guidance_w"):
    make_objective(guidance_w=2.0)
  with pytest.raises(ValueError, match="objective.fraction_r_equals_t"):
    make_objective(fraction_r_equals_t=1.5)


def test_loss_gradient_is_finite_with_adaptive_weight():
  objective = make_objective(NUM_CLASSES, dropout=0.1)
  params = random_params(objective, seed=13)
  batch = {"image": jax.random.normal(jax.random.key(14), (16,) + SHAPE),
           "label": jnp.arange(16) % NUM_CLASSES}
  (loss, metrics), grads = jax.jit(jax.value_and_grad(
      lambda p: objective.loss(p, batch, jax.random.key(15), 0, None), has_aux=True))(params)
  assert np.isfinite(float(loss)) and 0 < float(loss) < 1  # l / (l + eps) with p = 1
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(metrics["mse"]) > 0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_adaptive_weight_value_and_its_stop_gradient(reduction):
  """loss = mean_B l / (l + eps)^p with l the per-example mean (or sum) of (u - u_tgt)^2, and
  the weight is a constant for the gradient: the gradient is mean_B grad(l) / (l + eps)^p, not
  the gradient of l / (l + eps)^p (which would differ by -p l grad(l) / (l + eps)^(p + 1))."""
  p, adaptive_eps = 0.75, 0.05
  objective = make_objective(NUM_CLASSES, adaptive_p=p, adaptive_eps=adaptive_eps,
                             error_reduction=reduction, label_dropout=0.0)
  params = random_params(objective, seed=21)
  x = jax.random.normal(jax.random.key(22), (8,) + SHAPE)
  eps = jax.random.normal(jax.random.key(23), (8,) + SHAPE)
  cond = jnp.arange(8) % NUM_CLASSES
  t = jnp.linspace(0.2, 0.9, 8)
  r = t * jnp.linspace(0.0, 1.0, 8)

  def per_example(params):
    z_t = (1 - t[:, None]) * x + t[:, None] * eps
    u_fn = lambda z, t_, r_: objective.network(params, z, t_, t_ - r_, cond)
    u, u_tgt = meanflow.meanflow_target(u_fn, z_t, t, r, eps - x)
    squared = jnp.square(u - u_tgt).reshape(8, -1)
    return jnp.mean(squared, 1) if reduction == "mean" else jnp.sum(squared, 1)

  l = np.asarray(per_example(params), np.float64)
  weight = 1.0 / (l + adaptive_eps) ** p
  loss_fn = lambda params: objective.loss_at(params, x, cond, t, r, eps, None)[0]
  np.testing.assert_allclose(float(loss_fn(params)), np.mean(l * weight), rtol=1e-5)
  grads = jax.grad(loss_fn)(params)
  expected = jax.grad(lambda params: jnp.mean(per_example(params) * weight))(params)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6)
  # Without the stop-gradient the gradient would be scaled by 1 - p l / (l + eps) per example.
  differentiated = jax.grad(lambda params: jnp.mean(
      per_example(params) / (per_example(params) + adaptive_eps) ** p))(params)
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(grads), jax.tree.leaves(differentiated))) > 1e-3


def load_experiment(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "experiments",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_toy2d_tiny_trains_end_to_end(tmp_path):
  """The tiny run logs at step 1 the loss and squared error of the first global batch at the
  initial state (recomputed on one device with that step's key), and its trained state fits the
  batches it trained on better: their mean squared error falls by over 5%."""
  config = load_experiment("meanflow_toy2d").get_config("tiny")
  config_lib.validate(config, 8)
  with config.unlocked():
    config.train.log_every = 1
    config.ckpt.every_steps = 0
  state = train.run(config, str(tmp_path))
  assert int(state.step) == config.train.steps and int(state.skipped) == 0
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == list(range(1, config.train.steps + 1))
  losses, errors = run_batch_errors(config, [None, state])
  np.testing.assert_allclose(records[0]["loss"], losses[0, 0], rtol=1e-5)
  np.testing.assert_allclose(records[0]["error"], errors[0, 0], rtol=1e-5)
  assert errors[1].mean() < 0.95 * errors[0].mean(), errors
  assert (tmp_path / "samples" / f"step_{config.train.steps}.png").exists()
