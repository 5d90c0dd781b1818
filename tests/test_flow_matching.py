"""Flow matching: path identities, the closed-form Gaussian optimum, ODE time direction, CFG and
label dropout (Lipman et al., arXiv:2210.02747)."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowjax import paths
from flowjax.objectives import common
from flowjax.objectives import flow_matching
from flowjax.samplers import ode

# Gaussian data N(MU, S^2 I) in 2-D for the closed-form tests.
MU = np.array([2.0, -1.0], np.float32)
S = 0.5
NUM = 4096


def optimal_velocity(x_t, t, mu=MU, s=S):
  """E[eps - x | x_t] on the OT path x_t = (1 - t) x + t eps, x ~ N(mu, s^2 I), eps ~ N(0, I).

  (v, x_t) are jointly Gaussian: E[v] = -mu, E[x_t] = (1 - t) mu, Var(x_t) = (1 - t)^2 s^2 + t^2,
  Cov(v, x_t) = t - (1 - t) s^2 per coordinate, so
  v* = -mu + (t - (1 - t) s^2) / Var(x_t) (x_t - (1 - t) mu).
  x_t: [B, D], t: [B].
  """
  t = t[:, None]
  var = (1 - t) ** 2 * s ** 2 + t ** 2
  return -mu + (t - (1 - t) * s ** 2) / var * (x_t - (1 - t) * mu)


class ClosedFormModel(nn.Module):
  """A backbone that returns v* + delta * g(x_t) with one learnable scalar delta (0 at init).

  perturbation: "constant" (g = 1) or "linear" (g = x_t).
  """
  perturbation: str = "constant"

  @nn.compact
  def __call__(self, x, times, cond, *, train):
    del cond, train
    delta = self.param("delta", nn.initializers.zeros, ())
    g = jnp.ones_like(x) if self.perturbation == "constant" else x
    return optimal_velocity(x, times[0]) + delta * g


def gaussian_batch(seed, num=NUM):
  return {"image": MU + S * jax.random.normal(jax.random.key(seed), (num, 2))}


def make_objective(**kwargs):
  defaults = dict(model=ClosedFormModel(), image_shape=(2,), num_classes=0)
  defaults.update(kwargs)
  return flow_matching.FlowMatching(**defaults)


# Paths.

@pytest.mark.parametrize("name", paths.PATHS)
def test_interpolate_endpoints_are_data_and_noise(name):
  path = paths.get(name)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 4, 4, 2), np.float32)
  eps = rng.standard_normal(x.shape, np.float32)
  np.testing.assert_allclose(path.interpolate(x, eps, np.zeros(3, np.float32)), x, atol=1e-6)
  np.testing.assert_allclose(path.interpolate(x, eps, np.ones(3, np.float32)), eps, atol=1e-6)


@pytest.mark.parametrize("name", paths.PATHS)
def test_velocity_is_the_time_derivative_of_interpolate(name):
  path = paths.get(name)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((5, 3))
  eps = rng.standard_normal(x.shape)
  t = rng.uniform(0.05, 0.95, (5,))

  @jax.jit
  def velocities(x, eps, t):
    _, tangent = jax.jvp(lambda t: path.interpolate(x, eps, t), (t,), (jnp.ones_like(t),))
    return path.velocity(x, eps, t), tangent

  velocity, tangent = velocities(x, eps, t)
  np.testing.assert_allclose(velocity, tangent, rtol=1e-5, atol=1e-5)
  # And against a central finite difference (in float64 numpy), independent of jax's rules.
  def interpolate(t):
    if name == "ot":
      return (1 - t)[:, None] * x + t[:, None] * eps
    return np.cos(0.5 * np.pi * t)[:, None] * x + np.sin(0.5 * np.pi * t)[:, None] * eps

  h = 1e-4
  fd = (interpolate(t + h) - interpolate(t - h)) / (2 * h)
  np.testing.assert_allclose(velocity, fd, rtol=1e-4, atol=1e-4)


def test_ot_velocity_is_eps_minus_x():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((4, 3), np.float32)
  eps = rng.standard_normal(x.shape, np.float32)
  t = rng.uniform(0, 1, (4,)).astype(np.float32)
  np.testing.assert_allclose(paths.get("ot").velocity(x, eps, t), eps - x, atol=1e-6)


@pytest.mark.parametrize("name", paths.PATHS)
def test_ddim_identities(name):
  path = paths.get(name)
  rng = np.random.default_rng(3)
  x, eps, x_hat = rng.standard_normal((3, 6, 2, 2, 3), np.float32)
  t = rng.uniform(0.1, 1.0, (6,)).astype(np.float32)
  s = (t * rng.uniform(0, 1, (6,))).astype(np.float32)

  @jax.jit
  def steps(x, eps, x_hat, t, s):
    x_t = path.interpolate(x, eps, t)
    return x_t, path.ddim(x_t, x_hat, t, t), path.ddim(x_t, x, t, s), path.interpolate(x, eps, s)

  x_t, same_time, true_data, x_s = steps(x, eps, x_hat, t, s)
  # A step to the same time is the identity, whatever the data estimate.
  np.testing.assert_allclose(same_time, x_t, atol=1e-5)
  # With the true data the step stays on the same noise: alpha_s x + sigma_s eps.
  np.testing.assert_allclose(true_data, x_s, atol=1e-5)


def test_unknown_path_names_the_choices():
  with pytest.raises(ValueError, match="ot"):
    paths.get("linear_ish")


# Samplers.

def test_one_euler_step_runs_from_t1_to_t0():
  x1 = jax.random.normal(jax.random.key(4), (8, 2))
  # A constant flow v = x1 - mu: one Euler step from t = 1 lands exactly at mu.
  x0 = ode.solve(lambda x, t: x1 - MU, x1, num_steps=1, method="euler")
  np.testing.assert_allclose(x0, np.broadcast_to(MU, x0.shape), atol=1e-6)


@pytest.mark.parametrize("method, expected_shift", [("euler", 1.0), ("heun", 0.5)])
def test_solver_evaluates_times_from_one_down_to_zero(method, expected_shift):
  # v = t c: Euler's only evaluation is at t = 1 (x0 = x1 - c); Heun averages t = 1 and t = 0,
  # which integrates the linear-in-t field exactly (x0 = x1 - c / 2).
  c = jnp.array([1.0, -2.0])
  seen = []

  def velocity(x, t):
    seen.append(t.shape)
    return t[:, None] * c

  x1 = jnp.zeros((3, 2))
  x0 = ode.solve(velocity, x1, num_steps=1, method=method)
  np.testing.assert_allclose(x0, np.broadcast_to(-expected_shift * c, (3, 2)), atol=1e-6)
  assert all(shape == (3,) for shape in seen)


def test_time_grid_is_decreasing_from_one_to_zero():
  grid = np.asarray(ode.time_grid(4))
  np.testing.assert_allclose(grid, [1.0, 0.75, 0.5, 0.25, 0.0])


def test_unknown_solver_is_an_error():
  with pytest.raises(ValueError, match="heun"):
    ode.solve(lambda x, t: x, jnp.zeros((1, 2)), 2, method="rk45")


# The closed-form optimum for Gaussian data.

def test_closed_form_velocity_matches_conditional_expectation_at_the_ends():
  x = np.random.default_rng(5).standard_normal((7, 2)).astype(np.float32)
  # t = 0: x_t is the data, so E[eps - x | x] = -x. t = 1: x_t is the noise, E[eps - x] = x_t - mu.
  np.testing.assert_allclose(optimal_velocity(x, jnp.zeros(7)), -x, atol=1e-5)
  np.testing.assert_allclose(optimal_velocity(x, jnp.ones(7)), x - MU, atol=1e-5)


def test_heun_on_the_optimal_velocity_reproduces_the_data_distribution():
  x1 = jax.random.normal(jax.random.key(6), (NUM, 2))
  x0 = jax.jit(lambda x: ode.solve(optimal_velocity, x, num_steps=100, method="heun"))(x1)
  x0 = np.asarray(x0)
  # Statistics: mean within 5 standard errors, variance within 5 standard errors of s^2.
  np.testing.assert_allclose(x0.mean(0), MU, atol=5 * S / np.sqrt(NUM))
  np.testing.assert_allclose(x0.var(0), S ** 2, atol=5 * S ** 2 * np.sqrt(2 / NUM))
  # The exact flow of N(0, I) to N(mu, s^2 I) is the affine map x1 -> mu + s x1.
  np.testing.assert_allclose(x0, MU + S * np.asarray(x1), atol=1e-3)


def test_objective_sample_integrates_the_model_velocity_from_noise():
  objective = make_objective()
  params = {"delta": jnp.zeros(())}
  rng = jax.random.key(7)
  x0 = jax.jit(lambda p, r: objective.sample(p, r, NUM, None, num_steps=50, method="heun"))(
      params, rng)
  x0 = np.asarray(x0)
  assert x0.shape == (NUM, 2)
  np.testing.assert_allclose(x0.mean(0), MU, atol=5 * S / np.sqrt(NUM))
  np.testing.assert_allclose(x0.var(0), S ** 2, atol=5 * S ** 2 * np.sqrt(2 / NUM))


@pytest.mark.parametrize("perturbation", ["constant", "linear"])
def test_optimal_velocity_minimises_the_flow_matching_loss(perturbation):
  objective = make_objective(model=ClosedFormModel(perturbation))
  batch = gaussian_batch(8, num=4 * NUM)
  rng = jax.random.key(9)
  params, _ = objective.init(rng, batch)
  assert jax.tree.map(jnp.shape, params) == {"delta": ()}
  deltas = jnp.array([0.0, -0.2, -0.05, 0.05, 0.2, 1.0, -1.0])

  @jax.jit
  def losses_and_slope(batch):
    loss_at = lambda delta: objective.loss({"delta": delta}, batch, rng, 0, {})[0]
    return jax.vmap(loss_at)(deltas), jax.grad(loss_at)(0.0)

  # The same rng gives the same (t, eps) for every delta: only the model output changes.
  losses, slope = losses_and_slope(batch)
  losses = np.asarray(losses)
  best = losses[0]
  assert np.all(losses[1:5] > best), losses
  # At the minimiser the derivative in any direction vanishes (up to sampling noise); the loss
  # is quadratic in delta with curvature E|g|^2 / D.
  curvature = (losses[5] + losses[6] - 2 * best) / 2
  assert curvature > 0.5
  assert abs(float(slope)) < 0.05 * curvature


def test_loss_target_is_eps_minus_x():
  # A model that returns 0 has loss E||eps - x||^2 / D = 1 + s^2 + |mu|^2 / D per coordinate.
  class Zero(nn.Module):
    @nn.compact
    def __call__(self, x, times, cond, *, train):
      return jnp.zeros_like(x) + 0.0 * self.param("unused", nn.initializers.zeros, ())

  objective = make_objective(model=Zero())
  batch = gaussian_batch(10, num=4 * NUM)
  loss, metrics = jax.jit(lambda b: objective.loss({"unused": jnp.zeros(())}, b,
                                                  jax.random.key(11), 0, {}))(batch)
  expected = 1 + S ** 2 + float(np.mean(MU ** 2))
  assert abs(float(loss) - expected) < 0.05 * expected
  assert 0.45 < float(metrics["t_mean"]) < 0.55  # uniform t


# Classifier-free guidance.

def fake_fn(x, t, cond):
  """An fn whose output depends on x, t and the label: x (1 + label) + t."""
  return x * (1.0 + cond[:, None].astype(x.dtype)) + t[:, None]


def test_guidance_one_is_the_conditional_call():
  x = jax.random.normal(jax.random.key(12), (4, 3))
  t = jnp.full((4,), 0.3)
  cond = jnp.array([0, 1, 2, 1])
  np.testing.assert_allclose(ode.guided(fake_fn, cond, 1.0, 10)(x, t), fake_fn(x, t, cond))


def test_guidance_without_labels_is_the_plain_call():
  seen = []

  def fn(x, t, cond):
    seen.append(cond)
    return x + t[:, None]

  x = jnp.ones((2, 3))
  t = jnp.full((2,), 0.5)
  np.testing.assert_allclose(ode.guided(fn, None, 3.0, 10)(x, t), x + 0.5)
  assert seen == [None]


@pytest.mark.parametrize("guidance", [0.0, 1.5, 4.0])
def test_guidance_extrapolates_from_the_null_label(guidance):
  x = jax.random.normal(jax.random.key(13), (4, 3))
  t = jnp.linspace(0.1, 0.9, 4)
  cond = jnp.array([0, 3, 2, 1])
  null = 10
  conditional = fake_fn(x, t, cond)
  unconditional = fake_fn(x, t, jnp.full_like(cond, null))
  np.testing.assert_allclose(ode.guided(fake_fn, cond, guidance, null)(x, t),
                             unconditional + guidance * (conditional - unconditional),
                             rtol=1e-5, atol=1e-5)


# Label dropout.

def test_drop_labels_at_rate_one_gives_the_null_label():
  labels = jnp.arange(20) % 7
  dropped = common.drop_labels(labels, jax.random.key(14), 1.0, 7)
  np.testing.assert_array_equal(dropped, np.full(20, 7))


def test_drop_labels_at_rate_zero_is_the_identity():
  labels = jnp.arange(20) % 7
  np.testing.assert_array_equal(common.drop_labels(labels, jax.random.key(15), 0.0, 7), labels)
  assert common.drop_labels(None, jax.random.key(15), 0.5, 7) is None


def test_drop_labels_replaces_about_rate_of_the_labels_and_keeps_the_rest():
  num = 20_000
  labels = jnp.arange(num) % 10
  dropped = np.asarray(common.drop_labels(labels, jax.random.key(16), 0.5, 10))
  is_null = dropped == 10
  assert abs(is_null.mean() - 0.5) < 5 * np.sqrt(0.25 / num)
  np.testing.assert_array_equal(dropped[~is_null], np.asarray(labels)[~is_null])


def test_loss_uses_label_dropout_with_the_null_label():
  seen = []

  class Spy(nn.Module):
    @nn.compact
    def __call__(self, x, times, cond, *, train):
      seen.append((cond, train))
      return x * self.param("w", nn.initializers.zeros, ())

  num_classes = 5
  objective = make_objective(model=Spy(), num_classes=num_classes, label_dropout=1.0)
  batch = {"image": jnp.zeros((6, 2)), "label": jnp.arange(6, dtype=jnp.int32) % num_classes}
  seen.clear()
  objective.loss({"w": jnp.zeros(())}, batch, jax.random.key(17), 0, {})
  (cond, train), = seen
  np.testing.assert_array_equal(cond, np.full(6, num_classes))
  assert train


def test_build_reads_the_objective_config():
  from flowjax import objectives
  config = objectives.default_config("flow_matching")
  config.time_sampler = "logit_normal"
  config.logit_mean = -0.4
  info = types.SimpleNamespace(image_shape=(2,), num_classes=3)
  objective = objectives.build(config, ClosedFormModel(), info)
  assert isinstance(objective, flow_matching.FlowMatching)
  assert (objective.time_sampler, objective.logit_mean, objective.num_classes,
          objective.image_shape) == ("logit_normal", -0.4, 3, (2,))
