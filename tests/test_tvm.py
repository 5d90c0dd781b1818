"""Terminal Velocity Matching properties (Zhou et al., arXiv:2511.19797): the flow map is the
identity at s = t with the instantaneous velocity as its terminal velocity, the JVP is d/ds of the
map (and the loss is differentiated through it), the exact flow map of Gaussian data is a fixed
point, t = s is flow matching, Eq. 15 by hand with guidance, the time and guidance samplers, the
few-step sampler, the DiT's Lipschitz options, the paper-scale preset and a tiny run."""

import dataclasses
import importlib.util
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowjax import models, objectives, paths, train
from flowjax.models import dit, layers
from flowjax.objectives import tvm

from helpers import tiny_run_errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (3,)
NUM_CLASSES = 4
NULL = NUM_CLASSES


class TinyBackbone(nn.Module):
  """A small smooth stand-in for the backbone contract: Dense -> tanh -> dropout -> Dense on
  [x, times, one-hot label]."""
  num_classes: int = 0
  dropout: float = 0.0
  attention_impl: str = "xla"
  time_scale: float = 1.0

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
  overrides.setdefault("target_ema", "current")
  model = TinyBackbone(num_classes=num_classes, dropout=dropout)
  return tvm.TVM(model=model, image_shape=SHAPE, num_classes=num_classes, **overrides)


def random_params(objective, seed=0, scale=0.5):
  """Parameters of the right structure with every entry N(0, scale^2), filled from NumPy."""
  batch = {"image": jnp.zeros((1,) + SHAPE), "label": jnp.zeros((1,), jnp.int32)}
  shapes = jax.eval_shape(lambda: nn.meta.unbox(objective.init(jax.random.key(0), batch)[0]))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype),
                      shapes)


def draws(seed, batch=8):
  keys = jax.random.split(jax.random.key(seed), 2)
  return (jax.random.normal(keys[0], (batch,) + SHAPE),
          jax.random.normal(keys[1], (batch,) + SHAPE))


# The Gaussian closed form: data N(mu, var I) on x_t = (1 - t) x + t eps.

MU, VAR = jnp.array([1.5, -0.5, 0.0]), 0.3


def gaussian_flow(z, t, s):
  """psi(z, t, s) = m(s) + sigma(s) / sigma(t) (z - m(t)), m(t) = (1 - t) mu, sigma(t)^2 =
  (1 - t)^2 var + t^2: the marginal velocity is linear in z, so its flow keeps the standardised
  coordinate."""
  m = lambda u: (1.0 - paths.expand(u, z)) * MU
  sigma = lambda u: jnp.sqrt((1.0 - paths.expand(u, z)) ** 2 * VAR + paths.expand(u, z) ** 2)
  return m(s) + sigma(s) / sigma(t) * (z - m(t))


def gaussian_velocity(z, t):
  """u(z, t) = d/ds psi(z, t, s) at s = t = -mu + sigma'(t) / sigma(t) (z - m(t))."""
  tt = paths.expand(t, z)
  sigma = jnp.sqrt((1.0 - tt) ** 2 * VAR + tt ** 2)
  return -MU + ((tt - 1.0) * VAR + tt) / sigma ** 2 * (z - (1.0 - tt) * MU)


@dataclasses.dataclass(frozen=True)
class ExactGaussian(tvm.TVM):
  """TVM whose network is the exact F of Gaussian data: F(z, t, s) = (psi(z, t, s) - z) / (s - t),
  and u(z, t) at s = t."""

  def network(self, params, x, t, s, w, cond, rng=None, train=False):
    h = paths.expand(s - t, x)
    safe = jnp.where(h != 0, h, 1.0)
    return jnp.where(h != 0, (gaussian_flow(x, t, s) - x) / safe, gaussian_velocity(x, t))


@dataclasses.dataclass(frozen=True)
class EulerGaussian(tvm.TVM):
  """A wrong map for the same data: every jump follows the start velocity, F = u(z, t)."""

  def network(self, params, x, t, s, w, cond, rng=None, train=False):
    return gaussian_velocity(x, t)


def test_flow_map_is_the_identity_at_s_equal_t_with_the_velocity_as_terminal_velocity():
  """f(x, t, t) = 0 and d/ds f(x, t, s)|_{s=t} = u(x, t) = w F(x, t, t) (Eq. 4, scaled, Sec. 4)."""
  objective = make_objective(NUM_CLASSES)
  params = random_params(objective, seed=1)
  x, _ = draws(2)
  t = jnp.linspace(0.1, 0.9, 8)
  w = jnp.linspace(1.0, 3.0, 8)
  cond = jnp.arange(8) % (NUM_CLASSES + 1)
  np.testing.assert_array_equal(objective.flow_map(params, x, t, t, w, cond), x)
  F = lambda y, s_: objective.network(params, y, t, s_, w, cond)
  f, df_ds = tvm.terminal_velocity(F, x, t, t, w)
  np.testing.assert_array_equal(f, jnp.zeros_like(x))
  u = objective.velocity(params, x, t, w, cond)
  np.testing.assert_allclose(df_ds, u, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(u, w[:, None] * objective.network(params, x, t, t, w, cond),
                             rtol=1e-6)
  # Without the scaled parameterisation the velocity is F itself.
  plain = make_objective(NUM_CLASSES, scaled_param=False)
  np.testing.assert_allclose(plain.velocity(params, x, t, w, cond),
                             objective.network(params, x, t, t, w, cond), rtol=1e-6)


def test_terminal_velocity_is_d_ds_of_the_flow_map():
  """df/ds from the JVP (Eq. 17) matches central differences of s -> f(x_t, t, s), for both
  objective.jvp methods; the backbone gets (t, t - s, 1 / w)."""
  objective = make_objective(NUM_CLASSES)
  params = random_params(objective, seed=3)
  x, _ = draws(4)
  t = jnp.linspace(0.4, 0.95, 8)
  s = t * jnp.linspace(0.0, 0.8, 8)
  w = jnp.full((8,), 2.0)
  cond = jnp.arange(8) % (NUM_CLASSES + 1)
  f_of = lambda s_: objective.flow_map(params, x, t, s_, w, cond) - x
  delta = 1e-2
  fd = (f_of(s + delta) - f_of(s - delta)) / (2 * delta)
  F = lambda y, s_: objective.network(params, y, t, s_, w, cond)
  for method in ("autodiff", "finite_difference"):
    f, df_ds = tvm.terminal_velocity(F, x, t, s, w, method=method, step=1e-2)
    np.testing.assert_allclose(f, f_of(s), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(df_ds, fd, rtol=2e-3, atol=2e-3 * float(jnp.max(jnp.abs(fd))))
  times = objective.network(params, x, t, s, w, cond)
  by_hand = objective.model.apply({"params": params}, x, (t, t - s, 1.0 / w), cond, train=False)
  np.testing.assert_array_equal(times, by_hand)


def test_exact_gaussian_flow_map_is_a_fixed_point():
  """For data N(mu, var I) the exact map has zero terminal-velocity error (its terminal velocity
  is the velocity of its own end point, Eq. 6), and its flow-matching term is that of the exact
  velocity; a map that follows the start velocity (F = u(x_t, t)) has a clear error."""
  objective = ExactGaussian(model=None, image_shape=SHAPE, num_classes=0)
  keys = jax.random.split(jax.random.key(5), 5)
  x = MU + math.sqrt(VAR) * jax.random.normal(keys[0], (256,) + SHAPE)
  eps = jax.random.normal(keys[1], x.shape)
  t = jax.random.uniform(keys[2], (256,), minval=0.05, maxval=1.0)
  s = t * jax.random.uniform(keys[3], (256,))
  s_fm = jax.random.uniform(keys[4], (256,))
  w = jnp.ones((256,))
  loss, metrics = jax.jit(objective.loss_at)(None, None, x, eps, None, t, s, s_fm, w, None)
  assert float(metrics["terminal_mse"]) < 1e-9
  x_fm = (1 - s_fm[:, None]) * x + s_fm[:, None] * eps
  fm = jnp.mean(jnp.square(gaussian_velocity(x_fm, s_fm) - (eps - x)))
  np.testing.assert_allclose(metrics["fm_mse"], fm, rtol=1e-5)
  np.testing.assert_allclose(loss, fm, rtol=1e-5)
  euler = EulerGaussian(model=None, image_shape=SHAPE, num_classes=0)
  _, wrong = jax.jit(euler.loss_at)(None, None, x, eps, None, t, s, s_fm, w, None)
  assert float(wrong["terminal_mse"]) > 1e-2


def test_t_equal_s_is_flow_matching():
  """With every s = t and s' = s, the terminal term is dropped (1_{t != s}, Eq. 12) and the loss
  is flow matching's mean (u_theta(x_t, t) - (eps - x))^2 with u_theta = F(x_t, t, t), whatever
  the target network; dropout masks are those of the rng."""
  objective = make_objective(0, dropout=0.2, fraction_t_equals_s=1.0, fm_time="shared")
  params, target = random_params(objective, seed=6), random_params(objective, seed=7)
  x, eps = draws(8, batch=32)
  t, s, s_fm = objective.sample_times(jax.random.key(9), 32)
  np.testing.assert_array_equal(s, t)
  np.testing.assert_array_equal(s_fm, t)
  w = jnp.ones((32,))
  rng = jax.random.key(10)
  loss, metrics = objective.loss_at(params, target, x, eps, None, t, s, s_fm, w, rng)
  x_t = (1 - t[:, None]) * x + t[:, None] * eps
  u = objective.model.apply({"params": params}, x_t, (t, jnp.zeros_like(t)), None, train=True,
                            rngs={"dropout": rng})
  np.testing.assert_allclose(loss, jnp.mean(jnp.square(u - (eps - x))), rtol=1e-6)
  assert float(metrics["terminal_mse"]) == 0.0 and float(metrics["t_equals_s"]) == 1.0
  other, _ = objective.loss_at(params, params, x, eps, None, t, s, s_fm, w, rng)
  np.testing.assert_allclose(other, loss, rtol=1e-7)


def eq15_by_hand(objective, params, target, x, eps, cond, t, s, s_fm, w, detach=False):
  """Eq. 15 (scaled parameterisation) written out with jax.jvp: mean over the batch of
  [1_{t > s} |w (F + (s - t) dF/ds) - w F^-(x_t + sg f, s, s, c, w)|^2
   + |w F(x', s', s', c, w) - (w v + (1 - w) F^-(x', s', s', null, 1))|^2] / w^2, squared norms as
  means over dimensions, target networks under stop-gradient."""
  net = lambda p, y, a, b, ww, c: objective.model.apply({"params": p}, y, (a, a - b, 1.0 / ww),
                                                        c, train=False)
  target = jax.lax.stop_gradient(target)
  col = lambda a: a[:, None]
  x_t = (1 - col(t)) * x + col(t) * eps
  F, dF = jax.jvp(lambda s_: net(params, x_t, t, s_, w, cond), (s,), (jnp.ones_like(s),))
  if detach:
    dF = jax.lax.stop_gradient(dF)
  f = col(w) * col(s - t) * F
  df_ds = col(w) * (F + col(s - t) * dF)
  u_target = col(w) * net(target, x_t + jax.lax.stop_gradient(f), s, s, w, cond)
  terminal = (t > s) * jnp.mean(jnp.square(df_ds - u_target), axis=1)
  x_fm = (1 - col(s_fm)) * x + col(s_fm) * eps
  u = col(w) * net(params, x_fm, s_fm, s_fm, w, cond)
  u_null = net(target, x_fm, s_fm, s_fm, jnp.ones_like(w), jnp.full_like(cond, NULL))
  fm = jnp.mean(jnp.square(u - (col(w) * (eps - x) + (1 - col(w)) * u_null)), axis=1)
  return jnp.mean((terminal + fm) / w ** 2)


def guided_inputs():
  x, eps = draws(11)
  cond = jnp.array([0, 1, 2, 3, NULL, 0, 1, NULL])
  w = jnp.where(cond == NULL, 1.0, 2.0)
  t = jnp.linspace(0.3, 0.95, 8)
  s = (t * jnp.linspace(0.0, 0.9, 8)).at[2].set(t[2])
  s_fm = jnp.linspace(0.05, 0.9, 8)
  return x, eps, cond, t, s, s_fm, w


def test_guided_loss_is_eq15():
  """The loss with guidance (w = 2 for kept labels, 1 for null ones) is Eq. 15 by hand: the
  terminal target from theta^- at the model's own end point, the flow-matching target w v +
  (1 - w) u^-(x, s, null, 1), the 1/w^2 weight; the unweighted error is logged as "mse"."""
  objective = make_objective(NUM_CLASSES, guidance_scale=2.0)
  params, target = random_params(objective, seed=12), random_params(objective, seed=13)
  x, eps, cond, t, s, s_fm, w = guided_inputs()
  loss, metrics = objective.loss_at(params, target, x, eps, cond, t, s, s_fm, w, None)
  expected = eq15_by_hand(objective, params, target, x, eps, cond, t, s, s_fm, w)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert float(metrics["mse"]) > float(loss) and float(metrics["t_equals_s"]) == 1 / 8
  # Without guidance (w = 1 everywhere) the flow-matching target is v: no network call at all.
  plain = make_objective(NUM_CLASSES)
  v = eps - x
  np.testing.assert_array_equal(plain.guided_target(None, x, s_fm, v, jnp.ones(8), cond), v)


def test_gradient_flows_through_the_jvp_and_not_into_the_targets():
  """The gradient is that of Eq. 15 with dF/ds differentiated (Sec. 4) and the targets (theta^-
  and the end point x_t + f) held fixed, even when theta^- is theta itself; detach_jvp stops the
  gradient through dF/ds (Sec. 7.4) and changes it."""
  objective = make_objective(NUM_CLASSES, guidance_scale=2.0)
  detached = make_objective(NUM_CLASSES, guidance_scale=2.0, detach_jvp=True)
  params = random_params(objective, seed=14)
  x, eps, cond, t, s, s_fm, w = guided_inputs()
  args = (x, eps, cond, t, s, s_fm, w)
  grad = lambda fn: jax.grad(fn)(params)
  got = grad(lambda p: objective.loss_at(p, p, *args, None)[0])
  want = grad(lambda p: eq15_by_hand(objective, p, p, *args))
  got_detached = grad(lambda p: detached.loss_at(p, p, *args, None)[0])
  want_detached = grad(lambda p: eq15_by_hand(objective, p, p, *args, detach=True))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(got_detached), jax.tree.leaves(want_detached)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(got), jax.tree.leaves(got_detached))) > 1e-3


def test_finite_difference_jvp_gives_the_same_loss_and_gradient():
  objective = make_objective(NUM_CLASSES, guidance_scale=2.0)
  fd = make_objective(NUM_CLASSES, guidance_scale=2.0, jvp="finite_difference", jvp_step=1e-2)
  params, target = random_params(objective, seed=15), random_params(objective, seed=16)
  args = guided_inputs()
  value_and_grad = lambda o: jax.value_and_grad(
      lambda p: o.loss_at(p, target, *args, None)[0])(params)
  (loss, grads), (loss_fd, grads_fd) = value_and_grad(objective), value_and_grad(fd)
  np.testing.assert_allclose(loss_fd, loss, rtol=1e-3)
  for a, b in zip(jax.tree.leaves(grads_fd), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3 * float(jnp.max(jnp.abs(b))))


def logit(p):
  return np.log(p / (1 - p))


def test_gap_times():
  """gap: t - s ~ LN(-0.8, 1), s ~ LN(-0.4, 1) truncated to s <= 1 - (t - s), so t <= 1 is never
  clamped; the flow-matching s' is an independent LN(-0.4, 1) (gap*, Table 6) or s itself."""
  objective = make_objective()
  t, s, s_fm = jax.jit(objective.sample_times, static_argnums=1)(jax.random.key(17), 40000)
  t, s, s_fm = (np.asarray(a, np.float64) for a in (t, s, s_fm))
  assert np.all((0 <= s) & (s <= t) & (t <= 1))
  assert np.mean(t >= 1.0 - 1e-6) < 1e-3
  gap = logit(t - s)
  assert abs(np.median(gap) + 0.8) < 0.03 and abs(np.std(gap) - 1.0) < 0.03
  assert abs(np.median(logit(s_fm)) + 0.4) < 0.03 and abs(np.std(logit(s_fm)) - 1.0) < 0.03
  assert abs(np.corrcoef(s, s_fm)[0, 1]) < 0.02
  # s is the truncated law: below the untruncated median of sigmoid(-0.4).
  assert np.median(s) < float(jax.nn.sigmoid(-0.4)) - 0.05
  shared = make_objective(fm_time="shared")
  t, s, s_fm = shared.sample_times(jax.random.key(18), 100)
  np.testing.assert_array_equal(s_fm, s)


def test_trunc_clamp_times_and_t_equal_s_fraction():
  for sampler in ("trunc", "clamp"):
    objective = make_objective(time_sampler=sampler, t_mean=1.0, t_std=1.0)
    t, s, _ = objective.sample_times(jax.random.key(19), 40000)
    t, s = np.asarray(t, np.float64), np.asarray(s, np.float64)
    assert np.all(s <= t)
    assert abs(np.median(logit(t)) - 1.0) < 0.03
    equal = np.mean(s == t)
    if sampler == "trunc":
      assert equal < 1e-3
    else:  # P(s_raw > t), logit difference ~ N(-1.4, 2)
      expected = 0.5 * (1 - math.erf(1.4 / 2))
      assert abs(equal - expected) < 0.01
  objective = make_objective(fraction_t_equals_s=0.3)
  t, s, _ = objective.sample_times(jax.random.key(20), 40000)
  assert abs(float(jnp.mean(s == t)) - 0.3) < 0.01


def test_guidance_weights():
  """fixed: w = guidance_scale; uniform_beta: 1/w ~ U(1/w_max, 1/w_min) (App. F.1); uniform_w:
  w ~ U(w_min, w_max); null labels and unconditional models: w = 1."""
  cond = jnp.where(jnp.arange(40000) % 10 == 0, NULL, 1)
  draw = lambda **k: np.asarray(make_objective(NUM_CLASSES, **k).sample_guidance(
      jax.random.key(21), 40000, cond))
  fixed = draw(guidance_scale=2.0)
  kept = np.asarray(cond != NULL)
  assert np.all(fixed[kept] == 2.0) and np.all(fixed[~kept] == 1.0)
  beta = 1.0 / draw(guidance_sampler="uniform_beta", guidance_min=1.5, guidance_max=4.0)[kept]
  assert beta.min() >= 0.25 - 1e-6 and beta.max() <= 1 / 1.5 + 1e-6
  assert abs(beta.mean() - (0.25 + 1 / 1.5) / 2) < 0.005
  w = draw(guidance_sampler="uniform_w", guidance_min=1.5, guidance_max=4.0)[kept]
  assert abs(w.mean() - 2.75) < 0.02 and w.min() >= 1.5 and w.max() <= 4.0
  np.testing.assert_array_equal(make_objective().sample_guidance(jax.random.key(0), 5, None),
                                np.ones(5))


def test_sampler_steps_guidance_and_exact_gaussian_map():
  """One step is one jump x_1 - w F(x_1, (1, 1, 1/w)); guidance 1 is the plain jump with beta = 1;
  sample.times chains jumps along the given grid; with the exact Gaussian map 1 and 4 steps both
  map N(0, I) onto N(mu, var I)."""
  objective = make_objective(NUM_CLASSES)
  params = random_params(objective, seed=22)
  rng, cond = jax.random.key(23), jnp.arange(16) % NUM_CLASSES
  x1 = jax.random.normal(rng, (16,) + SHAPE)
  ones = jnp.ones((16,))
  apply = lambda x, t, h, beta: objective.model.apply({"params": params}, x, (t, h, beta), cond,
                                                      train=False)
  got = objective.sample(params, rng, 16, cond, num_steps=1, guidance=2.0)
  np.testing.assert_allclose(got, x1 - 2.0 * apply(x1, ones, ones, 0.5 * ones), rtol=1e-6,
                             atol=1e-6)
  plain = objective.sample(params, rng, 16, cond, num_steps=1, guidance=1.0)
  np.testing.assert_allclose(plain, x1 - apply(x1, ones, ones, ones), rtol=1e-6, atol=1e-6)
  two = objective.sample(params, rng, 16, cond, num_steps=2, times=(1.0, 0.3, 0.0))
  mid = x1 - 0.7 * apply(x1, ones, 0.7 * ones, ones)
  np.testing.assert_allclose(two, mid - 0.3 * apply(mid, 0.3 * ones, 0.3 * ones, ones),
                             rtol=1e-5, atol=1e-5)

  exact = ExactGaussian(model=None, image_shape=SHAPE, num_classes=0)
  z1 = jax.random.normal(jax.random.key(24), (20000,) + SHAPE)
  one, four = jax.jit(lambda key: (exact.sample(None, key, 20000, num_steps=1),
                                   exact.sample(None, key, 20000, num_steps=4)))(
      jax.random.key(24))
  np.testing.assert_allclose(one, MU + math.sqrt(VAR) * z1, rtol=0, atol=1e-4)
  np.testing.assert_allclose(four, one, rtol=0, atol=1e-4)


def test_losses_and_samples_are_deterministic_in_the_key():
  objective = make_objective(NUM_CLASSES, dropout=0.1, guidance_sampler="uniform_beta")
  params = random_params(objective, seed=25)
  x, _ = draws(26, batch=16)
  batch = {"image": x, "label": jnp.arange(16) % NUM_CLASSES}
  loss = jax.jit(lambda key: objective.loss(params, batch, key, 0, None)[0])
  assert float(loss(jax.random.key(1))) == float(loss(jax.random.key(1)))
  assert float(loss(jax.random.key(1))) != float(loss(jax.random.key(2)))
  sample = lambda key: objective.sample(params, key, 4, jnp.arange(4), num_steps=2)
  np.testing.assert_array_equal(sample(jax.random.key(3)), sample(jax.random.key(3)))


def test_target_network_is_the_named_ema():
  objective = make_objective(NUM_CLASSES, target_ema="0.99")
  params, ema = random_params(objective, seed=27), random_params(objective, seed=28)
  view = {"ema": {"0.9999": params, "0.99": ema}}
  assert objective.target_params(params, view) is not params
  for a, b in zip(jax.tree.leaves(objective.target_params(params, view)), jax.tree.leaves(ema)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="several decays"):
    make_objective(target_ema="").target_params(params, view)
  with pytest.raises(ValueError, match="'0.9'"):
    make_objective(target_ema="0.9").target_params(params, view)
  with pytest.raises(ValueError, match="optim.ema_decays"):
    make_objective(target_ema="0.99").target_params(params, {"ema": {}})


def test_bad_config_values_name_the_key():
  with pytest.raises(ValueError, match="objective.time_sampler.*Did you mean 'gap'"):
    make_objective(time_sampler="gapp")
  with pytest.raises(ValueError, match="objective.fm_time"):
    make_objective(fm_time="independent")
  with pytest.raises(ValueError, match="objective.guidance_sampler"):
    make_objective(guidance_sampler="random")
  with pytest.raises(ValueError, match="objective.gap_std"):
    make_objective(gap_std=0.0)
  with pytest.raises(ValueError, match="objective.fraction_t_equals_s"):
    make_objective(fraction_t_equals_s=1.5)
  with pytest.raises(ValueError, match="objective.guidance_scale"):
    make_objective(NUM_CLASSES, guidance_scale=0.5)
  with pytest.raises(ValueError, match="objective.guidance_min"):
    make_objective(NUM_CLASSES, guidance_sampler="uniform_w", guidance_min=3.0, guidance_max=2.0)
  with pytest.raises(ValueError, match="needs class labels"):
    make_objective(0, guidance_scale=2.0)
  with pytest.raises(ValueError, match="objective.label_dropout"):
    make_objective(label_dropout=1.0)
  with pytest.raises(ValueError, match="attention_impl='xla'"):
    tvm.TVM(model=dit.DiT(2, 32, 1, 2, attention_impl="cudnn"), image_shape=(8, 8, 4),
            num_classes=0)
  objective = make_objective()
  params = random_params(objective)
  with pytest.raises(ValueError, match="sample.guidance"):
    objective.sample(params, jax.random.key(0), 4, guidance=2.0)
  with pytest.raises(ValueError, match="Did you mean 'uniform'"):
    objective.sample(params, jax.random.key(0), 4, method="uniformm")
  with pytest.raises(ValueError, match="sample.times"):
    objective.sample(params, jax.random.key(0), 4, num_steps=2, times=(1.0, 0.5, 0.1))


# The DiT's Lipschitz controls (Sec. 4, App. B.2, Table 6).

def dit_params(model, seed=0, shape=(2, 8, 8, 4), num_times=3):
  x = jax.random.normal(jax.random.key(seed), shape)
  times = tuple(jnp.full((shape[0],), 0.3 + 0.2 * i) for i in range(num_times))
  cond = jnp.arange(shape[0]) % (model.num_classes + 1) if model.num_classes else None
  params = nn.meta.unbox(model.init({"params": jax.random.key(seed)}, x, times, cond,
                                    train=False)["params"])
  return params, (x, times, cond)


def randomized(params, seed):
  """Every zero-initialised leaf (adaLN, output layer) made nonzero, so that modulations act."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape).astype(a.dtype), params)


def test_spectral_initialisation_has_spectral_norm_one():
  """linear_init='spectral': patch embedding, attention output and MLP kernels have spectral norm
  1, q, k, v (each a third of a normalised fused kernel) at most 1; time_init='spectral' does the
  same for the time embedders, which otherwise stay N(0, 0.02)."""
  norm = lambda a: float(np.linalg.norm(np.asarray(a, np.float64), 2))
  model = dit.DiT(2, 64, 1, 4, num_classes=3, linear_init="spectral", time_init="spectral")
  params, _ = dit_params(model)
  block = params["block_0"]
  for kernel in (params["x_embed"]["kernel"], block["attn"]["out"]["kernel"],
                 block["mlp"]["fc1"]["kernel"], block["mlp"]["fc2"]["kernel"],
                 params["time_embed_0"]["fc1"]["kernel"], params["time_embed_2"]["fc2"]["kernel"]):
    assert abs(norm(kernel) - 1.0) < 1e-5
  for name in ("query", "key", "value"):
    assert 0.4 < norm(block["attn"][name]["kernel"]) < 1.0
  default = dit.DiT(2, 64, 1, 4, num_classes=3, linear_init="spectral")
  params, _ = dit_params(default)
  assert abs(np.std(np.asarray(params["time_embed_0"]["fc1"]["kernel"])) - 0.02) < 0.002
  assert norm(dit_params(dit.DiT(2, 64, 1, 4, num_classes=3))[0]["x_embed"]["kernel"]) > 1.2


@pytest.mark.parametrize("which", ["block", "final"])
def test_normalised_modulation_ignores_the_modulation_scale(which):
  """modulation_norm: every adaLN output (shift, scale and gate of a block; shift and scale of the
  final layer) passes through RMSNorm without parameters, so scaling the modulation layer leaves
  the network's output unchanged; without it the output changes."""
  for normalised in (True, False):
    model = dit.DiT(2, 32, 1, 2, num_classes=3, norm="rms", qk_norm=True,
                    modulation_norm=normalised)
    params, inputs = dit_params(model)
    params = randomized(params, 1)
    apply = lambda p: model.apply({"params": p}, *inputs, train=False)
    path = ("block_0", "adaLN_modulation") if which == "block" else ("final", "adaLN_modulation")
    scaled = jax.tree.map(lambda a: a, params)
    layer = scaled[path[0]][path[1]]
    scaled[path[0]][path[1]] = {k: 10.0 * v for k, v in layer.items()}
    change = float(jnp.max(jnp.abs(apply(scaled) - apply(params))))
    scale = float(jnp.max(jnp.abs(apply(params))))
    if normalised:
      assert change < 1e-4 * scale
    else:
      assert change > 1e-2 * scale


def test_qk_norm_and_rms_norm():
  """qk_norm: a learned-scale RMSNorm on queries and keys, so scaling the query or key projection
  leaves attention unchanged; norm='rms': the block inputs are x / rms(x), no LayerNorm
  centring."""
  for normalised in (True, False):
    attention = layers.Attention(2, qk_norm=normalised)
    x = jax.random.normal(jax.random.key(2), (2, 5, 8))
    params = nn.meta.unbox(attention.init(jax.random.key(3), x)["params"])
    if normalised:
      assert params["query_norm"]["scale"].shape == (4,) and "value_norm" not in params
    for name in ("query", "key"):
      scaled = dict(params, **{name: {k: 7.0 * v for k, v in params[name].items()}})
      change = float(jnp.max(jnp.abs(attention.apply({"params": scaled}, x)
                                     - attention.apply({"params": params}, x))))
      assert (change < 1e-4) if normalised else (change > 1e-2)
  x = jnp.array([[1.0, 2.0, 3.0, 6.0]])
  np.testing.assert_allclose(dit.normalize(x, "rms", jnp.float32, "n"),
                             x / jnp.sqrt(jnp.mean(x ** 2) + 1e-6), rtol=1e-6)


def load_experiment(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "experiments",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_imagenet_preset_is_the_papers_678m_network():
  """tvm_imagenet: DiT-XL/2 with 18 heads, three time embedders (t, t - s, beta) and QK-norm
  scales: DiT-XL/2's 674,816,272 parameters + 2 embedders + 28 x 2 x 64 = 678,068,496, Table 1's
  678M; the objective and optimizer follow Table 6."""
  config = load_experiment("tvm_imagenet").get_config(None)
  info = type("Info", (), {"image_shape": (32, 32, 4), "num_classes": 1000})
  objective = objectives.build(config.objective, models.build(config.model, info), info)
  batch = {"image": jnp.zeros((1, 32, 32, 4)), "label": jnp.zeros((1,), jnp.int32)}
  shapes = jax.eval_shape(lambda: nn.meta.unbox(objective.init(jax.random.key(0), batch)[0]))
  embedder = 256 * 1152 + 1152 + 1152 * 1152 + 1152
  assert sum(math.prod(a.shape) for a in jax.tree.leaves(shapes)) == (
      674_816_272 + 2 * embedder + 28 * 2 * 64)
  assert shapes["block_0"]["attn"]["query_norm"]["scale"].shape == (64,)
  assert objective.num_times == 3 and objective.guidance_scale == 2.0
  assert (config.optim.b2, config.train.batch_size, tuple(config.optim.ema_decays)) == (
      0.95, 2048, (0.9999, 0.99))


def test_toy2d_tiny_trains_end_to_end(tmp_path):
  """The tiny run logs at step 1 the loss and error of the first global batch at the initial state
  (recomputed on one device with that step's key), and its trained state fits the batches it
  trained on better: their error falls by over 5%."""
  errors = tiny_run_errors(load_experiment("tvm_toy2d").get_config("tiny"), tmp_path)
  assert errors[1].mean() < 0.95 * errors[0].mean(), errors


def test_digits_tiny_dit_trains_with_guidance(tmp_path):
  """The class-conditional DiT preset (Lipschitz controls, w = 1.5, EMA targets) runs through the
  trainer: finite losses, no skipped step, a sample grid."""
  config = load_experiment("tvm_digits").get_config("tiny")
  with config.unlocked():
    config.ckpt.every_steps = 0
  state = train.run(config, str(tmp_path))
  assert int(state.step) == config.train.steps and int(state.skipped) == 0
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert all(np.isfinite(r["loss"]) and r["error"] >= r["loss"] for r in records)
  assert (tmp_path / "samples" / f"step_{config.train.steps}.png").exists()
