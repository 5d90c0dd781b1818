"""sCM properties (Lu and Song, arXiv:2410.11081): the TrigFlow boundary condition, the JVP
against finite differences, the TrigFlow <-> OT conversions on exact Gaussian flows, the exact
consistency function as a fixed point of the loss, the tangent warm-up and normalisation, the
loss assembly with the adaptive weight, the samplers, tiny sCT and sCD runs, and the presets."""

import ast
import importlib.util
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowjax import checkpoint, objectives, train
from flowjax import config as config_lib
from flowjax.data import pipeline
from flowjax.objectives import ctm, scm
from test_preset_sources import lookup, same

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 2
MU = np.array([0.4, -0.3], np.float32)
HALF_PI = 0.5 * math.pi


class TinyBackbone(nn.Module):
  """A small smooth stand-in for the backbone contract (Dense -> tanh -> Dense on [x, t])."""

  @nn.compact
  def __call__(self, x, times, cond, *, train):
    del cond, train
    h = jnp.tanh(nn.Dense(16)(jnp.concatenate([x, times[0][:, None]], axis=-1)))
    return nn.Dense(x.shape[-1])(h)


def make_scm(model=None, **overrides):
  return scm.SCM(model=model or TinyBackbone(), image_shape=(DIM,), num_classes=0, **overrides)


def init_params(objective, seed=0):
  init = jax.jit(lambda key: nn.meta.unbox(objective.init(key, {"image": jnp.zeros((1, DIM))})))
  return init(jax.random.key(seed))[0]


def draws(seed, n=16, sigma_d=0.5):
  """(x0, z, t): data, noise N(0, sigma_d^2) and times spread over (0, pi/2)."""
  keys = jax.random.split(jax.random.key(seed), 3)
  x0 = jax.random.normal(keys[0], (n, DIM))
  z = sigma_d * jax.random.normal(keys[1], (n, DIM))
  t = jax.random.uniform(keys[2], (n,), minval=0.05, maxval=1.5)
  return x0, z, t


# Closed forms for data N(mu, var I).

def trigflow_variance(t, var, sigma_d):
  """V(t) = cos^2 t var + sin^2 t sigma_d^2, the variance of x_t."""
  return jnp.cos(t) ** 2 * var + jnp.sin(t) ** 2 * sigma_d ** 2


def exact_trigflow_F(x_t, t, mu, var, sigma_d):
  """The diffusion F of TrigFlow: dx_t/dt / sigma_d along the PF-ODE, which keeps the
  standardised coordinate: dx_t/dt = -sin(t) mu + V'(t) / (2 V(t)) (x_t - cos(t) mu)."""
  t_ = t[:, None]
  half_dV = jnp.sin(t_) * jnp.cos(t_) * (sigma_d ** 2 - var)
  dx = -jnp.sin(t_) * mu + half_dV / trigflow_variance(t_, var, sigma_d) * (x_t - jnp.cos(t_) * mu)
  return dx / sigma_d


def exact_consistency(x_t, t, mu, var, sigma_d):
  """f(x_t, t) = mu + sqrt(var / V(t)) (x_t - cos(t) mu), the exact PF-ODE map to t = 0."""
  t_ = t[:, None]
  return mu + jnp.sqrt(var / trigflow_variance(t_, var, sigma_d)) * (x_t - jnp.cos(t_) * mu)


def exact_ot_velocity(x, s, mu, var):
  """The OT velocity of data N(mu, var I) with eps ~ N(0, I): x_s ~ N((1 - s) mu, s_s^2),
  v = -mu + (ds_s / ds) / s_s (x - (1 - s) mu)."""
  s_ = s[:, None]
  std = jnp.sqrt((1.0 - s_) ** 2 * var + s_ ** 2)
  d_std = ((s_ - 1.0) * var + s_) / std
  return -mu + d_std / std * (x - (1.0 - s_) * mu)


class GaussianVelocity(nn.Module):
  """The exact flow-matching velocity of data N(mu, var I) in flowjax time, mu a parameter."""
  var: float

  @nn.compact
  def __call__(self, x, times, cond, *, train):
    del cond, train
    return exact_ot_velocity(x, times[0], self.param("mu", lambda key: jnp.asarray(MU)),
                             self.var)


class ExactConsistencyNet(nn.Module):
  """F such that cos(t) x_t - sin(t) sigma_d F is the exact consistency function of data
  N(mu, var I), with mu a parameter and a learnable scale a of F (a = 1 exact). It undoes the
  objective's inputs: x_t = sigma_d x_in, t = u pi/2."""
  var: float
  sigma_d: float

  @nn.compact
  def __call__(self, x_in, times, cond, *, train):
    del cond, train
    mu = self.param("mu", lambda key: jnp.asarray(MU))
    scale = self.param("scale", nn.initializers.ones, ())
    t = times[0] * HALF_PI
    x_t = self.sigma_d * x_in
    f = exact_consistency(x_t, t, mu, self.var, self.sigma_d)
    return scale * (jnp.cos(t)[:, None] * x_t - f) / (jnp.sin(t)[:, None] * self.sigma_d)


# The parameterisation.

def test_boundary_condition_is_exact_and_the_backbone_sees_x_over_sigma_d_and_u():
  objective = make_scm(sigma_data=0.7)
  params = init_params(objective)
  x = 3.0 * jax.random.normal(jax.random.key(1), (16, DIM))
  f = jax.jit(lambda x, t: objective.consistency_fn(params, x, t, None))
  np.testing.assert_array_equal(f(x, jnp.zeros(16)), x)

  class Echo(nn.Module):
    @nn.compact
    def __call__(self, x_in, times, cond, *, train):
      return jnp.concatenate([x_in[:, :1], times[0][:, None]], axis=-1)

  echo = make_scm(Echo(), sigma_data=0.7, weighting="none")
  t = jnp.linspace(0.1, 1.5, 16)
  F = echo.network({}, x / 0.7, t, None)
  np.testing.assert_allclose(F[:, 0], x[:, 0] / 0.7, rtol=1e-6)
  np.testing.assert_allclose(F[:, 1], t / HALF_PI, rtol=1e-6)
  out = echo.consistency_fn({}, x, t, None)
  np.testing.assert_allclose(out, jnp.cos(t)[:, None] * x - jnp.sin(t)[:, None] * 0.7 * F,
                             rtol=1e-5, atol=1e-6)


def test_adaptive_weight_lives_beside_the_backbone_parameters_and_starts_at_zero():
  objective = make_scm()
  params = init_params(objective)
  assert set(params) == {"Dense_0", "Dense_1", scm.WEIGHTING_KEY}
  assert set(init_params(make_scm(weighting="none"))) == {"Dense_0", "Dense_1"}
  np.testing.assert_array_equal(objective.adaptive_weight(params, jnp.linspace(0, 1.5, 8)), 0.0)
  # The backbone never sees w_phi's parameters.
  assert set(objective.backbone_params(params)) == {"Dense_0", "Dense_1"}


# TrigFlow <-> OT.

def test_trigflow_and_ot_points_times_and_outputs_round_trip():
  sigma_d = 0.5
  t = jnp.linspace(0.0, 1.55, 32)
  s = scm.ot_time(t, sigma_d)
  np.testing.assert_allclose(scm.trigflow_time(s, sigma_d), t, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s[0], 0.0, atol=1e-7)
  assert float(scm.trigflow_time(jnp.ones(()), sigma_d)) == pytest.approx(HALF_PI)
  # The same (x0, noise) pair lands on both paths: x_t / (cos t + sigma_d sin t) = x_s.
  x0, eps = jax.random.normal(jax.random.key(2), (2, 32, DIM))
  x_t = jnp.cos(t)[:, None] * x0 + jnp.sin(t)[:, None] * sigma_d * eps
  x_s = (1.0 - s)[:, None] * x0 + s[:, None] * eps
  np.testing.assert_allclose(scm.ot_point(x_t, t, sigma_d), x_s, rtol=1e-5, atol=1e-5)
  # Their conditional velocities map to each other: F = (cos t z - sin t x0) / sigma_d.
  F_cond = (jnp.cos(t)[:, None] * sigma_d * eps - jnp.sin(t)[:, None] * x0) / sigma_d
  np.testing.assert_allclose(scm.ot_velocity_to_trigflow(eps - x0, x_t, t, sigma_d), F_cond,
                             rtol=1e-5, atol=1e-5)
  F = jax.random.normal(jax.random.key(3), (32, DIM))
  v = scm.trigflow_to_ot_velocity(F, x_s, s, sigma_d)
  np.testing.assert_allclose(scm.ot_velocity_to_trigflow(v, x_t, t, sigma_d), F, rtol=1e-4,
                             atol=1e-4)


@pytest.mark.parametrize("sigma_d, var", [(0.5, 0.25), (1.0, 0.6), (0.5, 2.0)])
def test_exact_gaussian_F_and_ot_velocity_map_to_each_other(sigma_d, var):
  x_t = 2.0 * jax.random.normal(jax.random.key(4), (64, DIM))
  t = jnp.linspace(0.02, 1.55, 64)
  s = scm.ot_time(t, sigma_d)
  x_s = scm.ot_point(x_t, t, sigma_d)
  F = exact_trigflow_F(x_t, t, MU, var, sigma_d)
  v = exact_ot_velocity(x_s, s, MU, var)
  np.testing.assert_allclose(scm.ot_velocity_to_trigflow(v, x_t, t, sigma_d), F, rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(scm.trigflow_to_ot_velocity(F, x_s, s, sigma_d), v, rtol=1e-4,
                             atol=1e-4)
  # The exact consistency function is constant along the exact F's trajectory.
  f = lambda tt: exact_consistency(x_t + 0.0, tt, MU, var, sigma_d)
  _, df_dt = jax.jvp(lambda xx, tt: exact_consistency(xx, tt, MU, var, sigma_d), (x_t, t),
                     (sigma_d * F, jnp.ones_like(t)))
  assert f(t).shape == x_t.shape
  np.testing.assert_allclose(df_dt, 0.0, atol=2e-5)


# The tangent.

def test_jvp_equals_central_differences_of_the_network_along_the_tangent():
  """tangent_at's g rebuilt from float64 central differences of the network along
  (cos t sin t dx_t/dt / sigma_d, cos t sin t), and the finite-difference option agrees."""
  sigma_d = 0.5
  objective = make_scm(sigma_data=sigma_d, tangent_warmup_steps=0)
  params = init_params(objective)
  x0, z, t = draws(5)
  F, g = jax.jit(lambda p: objective.tangent_at(p, x0, z, t, None, None, None, 0, None))(params)
  net = jax.jit(lambda y, tt: objective.network(params, y, tt, None))
  x_t = np.cos(t)[:, None] * x0 + np.sin(t)[:, None] * z
  dx_dt = np.cos(t)[:, None] * z - np.sin(t)[:, None] * x0
  cos_sin = np.asarray(np.cos(t) * np.sin(t), np.float64)[:, None]
  h = 1e-2
  y = np.asarray(x_t / sigma_d, np.float64)
  step_y, step_t = h * cos_sin * dx_dt / sigma_d, h * cos_sin[:, 0]
  plus = np.asarray(net(jnp.asarray(y + step_y, jnp.float32), t + step_t), np.float64)
  minus = np.asarray(net(jnp.asarray(y - step_y, jnp.float32), t - step_t), np.float64)
  cos_sin_dF = (plus - minus) / (2 * h)
  F_here = np.asarray(net(x_t / sigma_d, t), np.float64)
  expected = (-np.cos(t)[:, None] ** 2 * (sigma_d * F_here - dx_dt)
              - (cos_sin * x_t + sigma_d * cos_sin_dF))
  np.testing.assert_allclose(F, F_here, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(g, expected, rtol=2e-3, atol=2e-4)
  finite = make_scm(sigma_data=sigma_d, tangent_warmup_steps=0, jvp="finite_difference",
                    jvp_step=1e-2)
  _, g_fd = jax.jit(lambda p: finite.tangent_at(p, x0, z, t, None, None, None, 0, None))(params)
  np.testing.assert_allclose(g_fd, g, rtol=2e-3, atol=2e-4)
  loss = lambda o: float(jax.jit(lambda p: o.loss_at(p, x0, z, t, None, None, None, 0,
                                                     None)[0])(params))
  assert loss(finite) == pytest.approx(loss(objective), rel=1e-3, abs=1e-5)


def test_tangent_warmup_and_normalisation_by_hand():
  assert float(scm.tangent_warmup(0, 10)) == 0.0
  assert float(scm.tangent_warmup(4, 10)) == pytest.approx(0.4)
  assert float(scm.tangent_warmup(25, 10)) == 1.0
  assert float(scm.tangent_warmup(0, 0)) == 1.0
  g = jnp.asarray([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4]])
  np.testing.assert_allclose(scm.normalize_tangent(g, 0.1),
                             [[3 / 5.1, 4 / 5.1], [0.0, 0.0], [0.3 / 0.6, 0.4 / 0.6]], rtol=1e-6)
  # g = -cos^2 (sigma_d F - dx/dt) - r (cos sin x + sigma_d cos sin dF/dt), one example.
  t = jnp.asarray([math.pi / 3])
  F, dF, x, dx = (jnp.asarray([[v]]) for v in (2.0, 3.0, 1.5, -1.0))
  c, s = 0.5, math.sqrt(3) / 2
  for r in (0.0, 0.5, 1.0):
    expected = -c * c * (0.5 * 2.0 + 1.0) - r * (c * s * 1.5 + 0.5 * 3.0)
    np.testing.assert_allclose(scm.tangent(F, dF, x, dx, t, 0.5, r), [[expected]], rtol=1e-6)


def test_loss_assembles_the_adaptive_weight_and_the_normalised_tangent():
  """loss = mean(lambda e^w mean_D (F - F^- - g / (||g|| + c))^2 - w); error = the unweighted
  mean; the warm-up r follows the step; w_phi gets gradients that move e^w toward 1 / error."""
  objective = make_scm(tangent_warmup_steps=10, prior_weighting="inverse_tan")
  params = init_params(objective)
  params[scm.WEIGHTING_KEY]["out"]["bias"] = jnp.asarray([0.3])
  x0, z, t = draws(6)
  F, g = objective.tangent_at(params, x0, z, t, None, None, None, 4, None)
  _, g_full = objective.tangent_at(params, x0, z, t, None, None, None, 40, None)
  assert np.max(np.abs(g - g_full)) > 1e-3
  g = np.asarray(g)
  g_hat = g / (np.linalg.norm(g, axis=1, keepdims=True) + 0.1)
  error = np.mean(g_hat ** 2, axis=1)
  prior = 1.0 / (0.5 * np.tan(np.asarray(t)))
  loss, metrics = objective.loss_at(params, x0, z, t, None, None, None, 4, None)
  np.testing.assert_allclose(metrics["mse"], error.mean(), rtol=1e-5)
  np.testing.assert_allclose(loss, np.mean(prior * np.exp(0.3) * error - 0.3), rtol=1e-5)
  assert float(metrics["tangent_warmup"]) == pytest.approx(0.4)
  grads = jax.grad(lambda p: objective.loss_at(p, x0, z, t, None, None, None, 4, None)[0])(params)
  # d loss / d bias = mean(prior e^w error) - 1.
  np.testing.assert_allclose(grads[scm.WEIGHTING_KEY]["out"]["bias"],
                             [np.mean(prior * np.exp(0.3) * error) - 1.0], rtol=1e-4)
  # d loss / d F = -2 lambda e^w g_hat / (B D): the network's gradient is the tangent's pullback.
  dF = jax.grad(lambda F_: jnp.mean(jnp.asarray(prior) * np.exp(0.3) * jnp.mean(
      (F_ - jax.lax.stop_gradient(F_) - g_hat) ** 2, axis=1)))(F)
  np.testing.assert_allclose(dF, -2 * prior[:, None] * np.exp(0.3) * g_hat / g.size, rtol=1e-5)


@pytest.mark.parametrize("sigma_d, var", [(0.5, 0.25), (1.0, 0.5)])
def test_exact_consistency_function_is_a_fixed_point_of_scd(sigma_d, var):
  """With the exact teacher and the exact consistency function as the student, g = 0 (f is
  constant along the teacher's trajectories), so the loss's gradient vanishes for every weight;
  a wrong student mean gives a clear gradient."""
  objective = make_scm(ExactConsistencyNet(var=var, sigma_d=sigma_d), sigma_data=sigma_d,
                       mode="scd", teacher_model=GaussianVelocity(var=var),
                       tangent_warmup_steps=0, weighting="none")
  params = {"mu": jnp.asarray(MU), "scale": jnp.ones(())}
  teacher = {"mu": jnp.asarray(MU)}
  x0, z, t = draws(7, n=64, sigma_d=sigma_d)
  x0 = MU + math.sqrt(var) * x0
  tangent = jax.jit(lambda p: objective.tangent_at(p, x0, z, t, None, None, teacher, 0, None))
  F, g = tangent(params)
  assert float(jnp.max(jnp.abs(F))) > 0.1
  assert float(jnp.max(jnp.abs(g))) < 2e-5
  # Through the whole loss, with normalisation and the view.
  view = {"extra": {"teacher": teacher}, "ema": {}, "step": 0}
  batch = {"image": x0}
  grad = jax.jit(jax.grad(lambda p: objective.loss(p, batch, jax.random.key(8), 0, view)[0]))
  grads = grad(params)
  assert max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(grads)) < 1e-4
  shifted = grad({"mu": jnp.asarray(MU + 0.3), "scale": jnp.ones(())})
  assert float(jnp.max(jnp.abs(shifted["mu"]))) > 1e-2


def test_exact_consistency_function_is_a_fixed_point_of_sct_in_expectation():
  """sCT's dx_t/dt = cos t z - sin t x0 is the teacher's in expectation given x_t, and g is affine
  in dx_t/dt, so without normalisation the gradient vanishes on average over many draws."""
  sigma_d, var = 0.5, 0.25
  objective = make_scm(ExactConsistencyNet(var=var, sigma_d=sigma_d), sigma_data=sigma_d,
                       tangent_warmup_steps=0, weighting="none", tangent_normalization="none")
  batch = {"image": MU + math.sqrt(var) * jax.random.normal(jax.random.key(9), (200_000, DIM))}
  grad = jax.jit(jax.grad(lambda p: objective.loss(p, batch, jax.random.key(10), 0, {})[0]))
  exact = grad({"mu": jnp.asarray(MU), "scale": jnp.ones(())})
  off = grad({"mu": jnp.asarray(MU), "scale": jnp.asarray(1.2)})
  assert abs(float(exact["scale"])) < 0.1 * abs(float(off["scale"]))


# Sampling.

CALLS = []
TRACES = []


class CountingEcho(nn.Module):
  """Records the backbone time of every executed call in CALLS (inside compiled loops too) and
  every trace in TRACES, and returns zeros (so f = cos(t) x_t)."""

  @nn.compact
  def __call__(self, x, times, cond, *, train):
    TRACES.append(1)
    jax.debug.callback(lambda t: CALLS.append(np.asarray(t)), times[0], ordered=True)
    return jnp.zeros_like(x)


def test_one_step_is_one_call_at_t_max_and_two_steps_go_through_t_mid():
  calls = CALLS
  calls.clear()
  objective = make_scm(CountingEcho(), weighting="none", sigma_data=0.5)
  x = objective.sample({}, jax.random.key(11), 8, None, num_steps=1)
  assert len(calls) == 1
  t_max = math.atan(80.0 / 0.5)
  np.testing.assert_allclose(calls[0], t_max / HALF_PI, rtol=1e-6)
  noise = 0.5 * jax.random.normal(jax.random.split(jax.random.key(11), 1)[0], (8, DIM))
  np.testing.assert_allclose(x, math.cos(t_max) * noise, rtol=1e-5, atol=1e-7)
  calls.clear()
  objective.sample({}, jax.random.key(11), 8, None, num_steps=2)
  assert len(calls) == 2
  np.testing.assert_allclose(calls[1], 1.1 / HALF_PI, rtol=1e-6)
  calls.clear()
  objective.sample({}, jax.random.key(11), 8, None, num_steps=2, times=(1.0, 0.5, 0.0))
  np.testing.assert_allclose([c[0] for c in calls], [1.0, 0.5], rtol=1e-6)
  with pytest.raises(ValueError, match="guidance"):
    objective.sample({}, jax.random.key(11), 8, None, guidance=2.0)


def test_later_steps_are_one_fused_loop():
  """Four steps trace the network twice (the first step and the scan body), not once per step,
  and still run it at each time of the grid, in order."""
  objective = make_scm(CountingEcho(), weighting="none", sigma_data=0.5)
  CALLS.clear()
  TRACES.clear()
  x = jax.jit(lambda k: objective.sample({}, k, 8, None, num_steps=4))(jax.random.key(3))
  jax.effects_barrier()
  assert len(TRACES) == 2
  np.testing.assert_allclose([np.ravel(c)[0] for c in CALLS],
                             np.asarray(objective.sampling_times(4)) / HALF_PI, rtol=1e-6)
  # f = cos(t) x_t at every step: the last step's output is cos(t_3) times its input.
  keys = jax.random.split(jax.random.key(3), 4)
  expected = None
  for key, t in zip(keys, objective.sampling_times(4)):
    noise = 0.5 * jax.random.normal(key, (8, DIM))
    x_t = noise if expected is None else math.cos(t) * expected + math.sin(t) * noise
    expected = math.cos(t) * x_t
  np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-6)


def test_two_step_sampling_of_the_exact_map_reproduces_the_data_law():
  sigma_d, var = 0.5, 0.25
  objective = make_scm(ExactConsistencyNet(var=var, sigma_d=sigma_d), sigma_data=sigma_d,
                       weighting="none")
  params = {"mu": jnp.asarray(MU), "scale": jnp.ones(())}
  for steps in (1, 2):
    x = np.asarray(jax.jit(lambda k: objective.sample(params, k, 20_000, None,
                                                      num_steps=steps))(jax.random.key(12)))
    np.testing.assert_allclose(x.mean(0), MU, atol=0.02)
    np.testing.assert_allclose(x.std(0), math.sqrt(var), rtol=0.03)


# Configuration and teachers.

def test_options_are_checked_and_a_missing_teacher_names_the_command(tmp_path):
  with pytest.raises(ValueError, match="objective.jvp"):
    make_scm(jvp="forward")
  with pytest.raises(ValueError, match="mid_time"):
    make_scm(mid_time=2.0)
  with pytest.raises(ValueError, match="teacher_guidance"):
    make_scm(teacher_guidance=2.0)
  info = pipeline.DataInfo(image_shape=(2,), num_classes=0, num_examples=None)
  config = config_lib.load_experiment("experiments/scm_toy2d.py", "tiny_scd")
  with pytest.raises(ctm.TeacherError, match=r"python -m flowjax\.main --config=experiments/"):
    objectives.build(config.objective, TinyBackbone(), info)


PAPER_EXPERIMENTS = ("scm_cifar10", "scm_imagenet64")


@pytest.mark.parametrize("name, preset", [
    ("scm_toy2d", None), ("scm_toy2d", "tiny"), ("scm_toy2d", "scd"), ("scm_digits", None),
    ("scm_digits", "tiny"), ("scm_cifar10", None), ("scm_cifar10", "scd"),
    ("scm_cifar10", "tiny"), ("scm_imagenet64", None), ("scm_imagenet64", "scd"),
    ("scm_imagenet64", "tiny")])
def test_presets_validate_and_sct_presets_build(name, preset):
  config = config_lib.load_experiment(os.path.join(REPO, "experiments", f"{name}.py"), preset)
  config_lib.validate(config, 8)
  assert config.objective.name == "scm"
  if config.objective.mode == "sct" and preset == "tiny":
    setup = train.build(config, jax.devices()[:1])
    assert scm.WEIGHTING_KEY in setup.abstract_state.params


def test_paper_tables_hold():
  """BUILD.md's tables for the sCM presets, read and checked as tests/test_preset_sources.py
  reads every paper preset's table."""
  spec = importlib.util.spec_from_file_location(
      "preset_sources", os.path.join(REPO, "tests", "test_preset_sources.py"))
  sources = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sources)
  tables = {key: rows for key, rows in sources.TABLES.items() if key[0] in PAPER_EXPERIMENTS}
  assert {name for name, _ in tables} == set(PAPER_EXPERIMENTS)
  for (name, preset), rows in tables.items():
    assert len(rows) >= (10 if preset is None else 1)
    config = config_lib.load_experiment(os.path.join(REPO, "experiments", f"{name}.py"), preset)
    for key, literal, source, _ in rows:
      assert source, (name, preset, key)
      expected = ast.literal_eval(literal)
      assert sources.same(expected, sources.lookup(config, key)), (name, preset, key)


# The paper's values (arXiv:2410.11081 v2: App. G.1, G.2, Algorithm 1, Table 4 for ImageNet 64x64
# model size S), pinned here independently of BUILD.md so that a table and its preset cannot
# drift together; the last test keeps the keys of both in step. Values that flowjax cannot match
# (no inverse-sqrt decay, no power EMA, dropout only at resolutions <= 16) pin flowjax's stated
# stand-in, as BUILD.md's rows explain.
HALF_PI_SCALE = math.pi / 2
PAPER_VALUES = {
    ("scm_cifar10", None): {
        "objective.mode": "sct", "objective.sigma_data": 0.5, "objective.p_mean": -1.0,
        "objective.p_std": 1.4, "objective.tangent_warmup_steps": 10_000,
        "objective.tangent_normalization": "norm", "objective.tangent_norm_c": 0.1,
        "objective.weighting": "adaptive", "objective.prior_weighting": "none",
        "objective.jvp": "autodiff", "objective.sigma_max": 80.0, "objective.mid_time": 1.1,
        # sCT without a teacher starts from random weights (the paper: the teacher's, App. G.2).
        "objective.init_from_teacher": False,
        # DDPM++ (App. G.1) at EDM's CIFAR-10 widths, positional embeddings of c_noise = t.
        "model.model_channels": 128, "model.channel_mult": (2, 2, 2), "model.num_blocks": 4,
        "model.attn_resolutions": (16,), "model.channel_mult_noise": 1,
        "model.encoder_type": "standard", "model.resample_filter": (1, 1),
        "model.embedding_type": "positional", "model.time_scale": HALF_PI_SCALE,
        "model.dropout": 0.2, "model.augment_dim": 0,
        "optim.name": "radam", "optim.lr": 1e-4, "optim.b1": 0.9, "optim.b2": 0.99,
        "optim.eps": 1e-8, "optim.schedule": "constant", "optim.warmup_steps": 0,
        "optim.weight_decay": 0.0, "optim.grad_clip": 0.0,
        # EMA half-life 0.5 Mimg at batch 512.
        "optim.ema_decays": (0.5 ** (512 / 500_000),),
        "train.batch_size": 512, "train.steps": 400_000, "data.random_flip": True,
        "sample.num_steps": 2},
    ("scm_cifar10", "scd"): {"objective.mode": "scd", "model.dropout": 0.0,
                             "objective.init_from_teacher": True},
    ("scm_imagenet64", None): {
        "objective.mode": "sct", "objective.sigma_data": 0.5, "objective.p_mean": -1.0,
        "objective.p_std": 1.6, "objective.tangent_warmup_steps": 10_000,
        "objective.tangent_normalization": "norm", "objective.tangent_norm_c": 0.1,
        "objective.weighting": "adaptive", "objective.prior_weighting": "none",
        "objective.sigma_max": 80.0, "objective.mid_time": 1.1, "objective.label_dropout": 0.0,
        "objective.init_from_teacher": False,
        "model.model_channels": 192, "model.channel_mult": (1, 2, 3, 4), "model.num_blocks": 3,
        "model.attn_resolutions": (16, 8), "model.embedding_type": "positional",
        "model.time_scale": HALF_PI_SCALE, "model.dropout": 0.0, "data.random_flip": False,
        "optim.name": "adam", "optim.b1": 0.9, "optim.b2": 0.99, "optim.eps": 1e-11,
        "optim.weight_decay": 0.0, "optim.grad_clip": 0.0, "optim.lr": 1e-4,
        "optim.schedule": "constant",
        # sigma_rel = 0.05 at step 400k: a profile of width sqrt(d) / (1 - d) = 20k steps.
        "optim.ema_decays": (0.99995,),
        "train.batch_size": 2048, "train.steps": 400_000, "sample.num_steps": 2},
    ("scm_imagenet64", "scd"): {"objective.mode": "scd", "model.dropout": 0.0,
                                "objective.teacher_guidance": 1.0,
                                "objective.init_from_teacher": True},
}


def _paper_value_cases():
  return [(name, preset, key, value) for (name, preset), values in PAPER_VALUES.items()
          for key, value in values.items()]


@pytest.mark.parametrize("name, preset, key, expected", _paper_value_cases())
def test_preset_holds_the_paper_value(name, preset, key, expected):
  config = config_lib.load_experiment(os.path.join(REPO, "experiments", f"{name}.py"), preset)
  actual = lookup(config, key)
  assert same(expected, actual, rel_tol=1e-9), (
      f"{name}:{preset} {key}: paper {expected!r}, preset {actual!r}")


def test_paper_values_and_build_tables_name_the_same_keys():
  spec = importlib.util.spec_from_file_location(
      "preset_sources", os.path.join(REPO, "tests", "test_preset_sources.py"))
  sources = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sources)
  tables = {key: rows for key, rows in sources.TABLES.items() if key[0] in PAPER_EXPERIMENTS}
  assert set(tables) == set(PAPER_VALUES)
  for table, rows in tables.items():
    assert {row[0] for row in rows} == set(PAPER_VALUES[table]), table
    # No row cites an unchecked recollection.
    assert not [row for row in rows if "recalled" in row[2]], table


# Tiny end-to-end runs: fm_toy2d teaches scm_toy2d:tiny_scd; scm_toy2d:tiny trains alone.

RUN = {"train.steps": 40, "train.log_every": 10, "ckpt.every_steps": 40, "sample.num": 16,
       "objective.tangent_warmup_steps": 10, "train.batch_size": 64}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """The workdir of fm_toy2d:tiny trained for 40 steps: the flow-matching teacher."""
  root = tmp_path_factory.mktemp("scm_teacher")
  fm = config_lib.load_experiment("experiments/fm_toy2d.py", "tiny",
                                  **{"train.steps": 40, "sample.num": 16})
  train.run(fm, str(root), devices=jax.devices()[:1])
  return str(root)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_dir):
  root = tmp_path_factory.mktemp("scm")
  devices = jax.devices()[:1]
  out = {}
  for mode, preset in (("sct", "tiny"), ("scd", "tiny_scd")):
    overrides = dict(RUN)
    if mode == "scd":
      overrides["objective.teacher_workdir"] = teacher_dir
    config = config_lib.load_experiment("experiments/scm_toy2d.py", preset, **overrides)
    state = train.run(config, str(root / mode), devices=devices)
    lines = (root / mode / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    out[mode] = (config, state, records)
  return root, out


@pytest.mark.parametrize("mode", ["sct", "scd"])
def test_tiny_runs_train_end_to_end(runs, mode):
  root, out = runs
  config, state, records = out[mode]
  assert int(state.step) == config.train.steps and int(state.skipped) == 0
  assert [r["step"] for r in records] == [10, 20, 30, 40]
  for r in records:
    assert all(np.isfinite(r[k]) for k in ("loss", "error", "tangent_norm", "weight_mean"))
    assert r["error"] == r["tangent_norm"] and r["error"] > 0
  # The warm-up reached 1, and w_phi learned (it starts at 0) so that the loss fell.
  assert records[-1]["tangent_warmup"] == 1.0
  assert records[-1]["loss"] < records[0]["loss"]
  assert abs(records[-1]["weight_mean"]) > 1e-3
  assert (root / mode / "samples" / f"step_{config.train.steps}.png").is_file()
  if mode == "scd":
    assert set(state.extra) == {"teacher"}


# Initialisation from the teacher (objective.init_from_teacher; arXiv:2410.11081, App. G.2): the
# student runs as the teacher (its OT velocity network through ot_velocity_to_trigflow) and
# starts from its weights. fm_toy2d:tiny (MLP, time_scale 1000) teaches scm_toy2d:tiny with the
# teacher's time_scale.

def init_config(mode, teacher_dir, **overrides):
  preset = "tiny_scd" if mode == "scd" else "tiny"
  return config_lib.load_experiment("experiments/scm_toy2d.py", preset, **{
      "objective.init_from_teacher": True, "objective.teacher_workdir": teacher_dir,
      "model.time_scale": 1000.0, **overrides})


def fresh_start(config, workdir):
  setup = train.build(config, jax.devices()[:1])
  state, _, start = train.restore_or_init(setup, checkpoint.manager(workdir, config.ckpt),
                                          workdir)
  return setup, state, start


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("mode", ["scd", "sct"])
def test_init_from_teacher_starts_the_student_as_the_teacher(teacher_dir, tmp_path, mode):
  """A fresh start through train.restore_or_init: the backbone holds the teacher's (EMA) weights
  and w_phi its fresh ones, every EMA equals the parameters, the student's F is the teacher's
  unguided TrigFlow F, and its one-step sample is the teacher's one-step map (for the OT path
  x_ot - s v(x_ot, s), the Euler jump from s(t_max) to the data)."""
  config = init_config(mode, teacher_dir)
  setup, state, start = fresh_start(config, str(tmp_path / "student"))
  objective = setup.objective
  assert start == 0 and objective.init_from_teacher and objective.mode == mode
  assert objective.teacher_key == ("ema", "0.999")
  teacher, _ = checkpoint.restore_params(
      teacher_dir, objective.backbone_params(setup.abstract_state.params),
      key=objective.teacher_key)
  if mode == "scd":
    assert_trees_equal(state.extra["teacher"], teacher)
  else:
    assert state.extra == {}
  assert_trees_equal(objective.backbone_params(state.params), teacher)
  fresh = setup.init_fn().params
  assert_trees_equal(state.params[scm.WEIGHTING_KEY], fresh[scm.WEIGHTING_KEY])
  assert set(state.ema) == {"0.999"}
  for ema in state.ema.values():
    assert_trees_equal(ema, state.params)
  assert jax.tree.leaves(state.ema)[0] is not jax.tree.leaves(state.params)[0]

  sigma_d = objective.sigma_data
  n = 64
  keys = jax.random.split(jax.random.key(21), 2)
  x_t = 2.0 * jax.random.normal(keys[0], (n, DIM))
  t = jnp.concatenate([jnp.asarray([0.0, HALF_PI]),
                       jax.random.uniform(keys[1], (n - 2,), maxval=HALF_PI)])
  F = jax.jit(lambda p: objective.network(p, x_t / sigma_d, t, None))
  F_teacher = objective.teacher_trigflow(teacher, x_t, t, None)
  assert float(jnp.max(jnp.abs(F_teacher))) > 0.1
  np.testing.assert_allclose(F(state.params), F_teacher, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(F(state.ema["0.999"]), F_teacher, rtol=1e-5, atol=1e-5)

  key = jax.random.key(22)
  x = jax.jit(lambda p: objective.sample(p, key, n, None, num_steps=1))(state.params)
  z = sigma_d * jax.random.normal(jax.random.split(key, 1)[0], (n, DIM))
  t_max = jnp.full((n,), objective.t_max)
  trigflow_map = (jnp.cos(t_max)[:, None] * z - jnp.sin(t_max)[:, None] * sigma_d
                  * objective.teacher_trigflow(teacher, z, t_max, None))
  np.testing.assert_allclose(x, trigflow_map, rtol=1e-5, atol=1e-5)
  s = scm.ot_time(t_max, sigma_d)
  x_ot = scm.ot_point(z, t_max, sigma_d)
  v = objective.teacher_model.apply({"params": teacher}, x_ot, (s,), None, train=False)
  np.testing.assert_allclose(x, x_ot - s[:, None] * v, rtol=1e-5, atol=1e-5)


def test_init_from_teacher_keeps_the_boundary_condition_exact():
  """f(x, 0) = x exactly with the student run as a velocity network, for any weights."""
  objective = make_scm(sigma_data=0.7, mode="scd", teacher_model=TinyBackbone(),
                       init_from_teacher=True)
  params = init_params(objective)
  x = 3.0 * jax.random.normal(jax.random.key(23), (16, DIM))
  f = jax.jit(lambda x, t: objective.consistency_fn(params, x, t, None))
  np.testing.assert_array_equal(f(x, jnp.zeros(16)), x)
  # The option is in effect: F is the velocity network's output through the OT conversion.
  t = jnp.linspace(0.0, HALF_PI, 16)
  v = TinyBackbone().apply({"params": objective.backbone_params(params)},
                           scm.ot_point(x, t, 0.7), (scm.ot_time(t, 0.7),), None, train=False)
  np.testing.assert_allclose(objective.network(params, x / 0.7, t, None),
                             scm.ot_velocity_to_trigflow(v, x, t, 0.7), rtol=1e-5, atol=1e-5)


def test_init_from_teacher_is_not_repeated_on_resume(teacher_dir, tmp_path):
  """A run resumed from its checkpoint keeps its trained parameters and EMA: the teacher's
  weights are copied on the fresh start only."""
  config = init_config("scd", teacher_dir, **{"train.steps": 2, "ckpt.every_steps": 2})
  workdir = str(tmp_path / "student")
  trained = train.run(config, workdir, devices=jax.devices()[:1])
  setup, state, start = fresh_start(config, workdir)
  assert start == 2
  assert_trees_equal(state.params, trained.params)
  assert_trees_equal(state.ema, trained.ema)
  teacher = state.extra["teacher"]
  moved = jax.tree.map(lambda p, w: float(jnp.max(jnp.abs(p - w))),
                       setup.objective.backbone_params(state.params), teacher)
  assert max(jax.tree.leaves(moved)) > 1e-5


def test_init_from_teacher_refuses_another_architecture(teacher_dir):
  """A config.model that differs from the teacher's is one config error naming every differing
  key with both values and the fix; attention_impl, remat and dropout may differ; a missing
  teacher names the command that trains one."""
  config = config_lib.load_experiment("experiments/scm_toy2d.py", "tiny", **{
      "objective.init_from_teacher": True, "objective.teacher_workdir": teacher_dir,
      "model.hidden_size": 16})
  with pytest.raises(config_lib.ConfigError) as error:
    train.build(config, jax.devices()[:1])
  message = str(error.value)
  assert "model.hidden_size: 16 -> 32" in message
  assert f"model.time_scale: {math.pi / 2!r} -> 1000.0" in message
  assert "model.depth" not in message
  assert "objective.init_from_teacher=False" in message and "teacher's values" in message
  # Without the option the same student builds.
  with config.unlocked():
    config.objective.init_from_teacher = False
  train.build(config, jax.devices()[:1])
  from flowjax.models import dit
  a = dit.DiT(patch_size=2, hidden_size=8, depth=1, num_heads=2, num_classes=0,
              attention_impl="cudnn", remat="full")
  assert scm.architecture_differences(
      a, a.clone(attention_impl="xla", remat="none", dropout=0.1)) == []
  assert scm.architecture_differences(a, a.clone(dtype=jnp.bfloat16)) == [
      "model.dtype: 'float32' -> 'bfloat16'"]
  info = pipeline.DataInfo(image_shape=(2,), num_classes=0, num_examples=None)
  with config.unlocked():
    config.objective.update(dict(init_from_teacher=True, teacher_workdir=""))
  with pytest.raises(ctm.TeacherError, match=r"init_from_teacher.*python -m flowjax\.main"):
    objectives.build(config.objective, TinyBackbone(), info)
