"""Consistency training (iCT) properties (Song and Dhariwal, arXiv:2310.14189): the boundary
condition, the backbone's time, the discretisation curriculum, the pseudo-Huber limits, zero loss
and gradient at an exact consistency function, the lognormal interval probabilities, the samplers,
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

from flowjax import train
from flowjax.objectives import consistency

from helpers import run_batch_errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (2,)


class TinyBackbone(nn.Module):
  @nn.compact
  def __call__(self, x, times, cond, *, train):
    h = jnp.tanh(nn.Dense(16)(jnp.concatenate([x, times[0][:, None]], axis=-1)))
    return nn.Dense(x.shape[-1])(h)


class ExactGaussian(nn.Module):
  """F such that c_skip x + c_out F is the exact consistency function of data N(mu, var I),
  f(x, sigma) = mu + sqrt((var + sigma_min^2) / (var + sigma^2)) (x - mu), times a learnable
  scale a (1 = exact). It inverts the objective's inputs: sigma from u(sigma), x from c_in x."""
  objective: object
  mu: float
  var: float

  @nn.compact
  def __call__(self, x_in, times, cond, *, train):
    obj = self.objective
    low, high = math.log(obj.sigma_min), math.log(obj.sigma_max)
    sigma = jnp.exp(low + times[0] * (high - low))[:, None]
    c_skip, c_out, c_in = obj.scalings(sigma)
    x = x_in / c_in
    exact = self.mu + jnp.sqrt((self.var + obj.sigma_min**2) / (self.var + sigma**2)) * (
        x - self.mu)
    scale = self.param("scale", nn.initializers.ones, ())
    return scale * jnp.where(c_out > 0, (exact - c_skip * x) / jnp.where(c_out > 0, c_out, 1), 0)


def make_objective(model=None, **overrides):
  return consistency.Consistency(model=model or TinyBackbone(), image_shape=SHAPE,
                                 num_classes=0, **overrides)


def test_boundary_condition_and_backbone_time():
  """f(x, sigma_min) = x exactly for any network; the backbone gets u(sigma) in [0, 1] with
  u(sigma_min) = 0, u(sigma_max) = 1, affine in ln sigma, and c_in x."""
  objective = make_objective()
  x = jax.random.normal(jax.random.key(0), (8,) + SHAPE)
  params = objective.init(jax.random.key(1), {"image": x})[0]
  sigma = jnp.full((8,), objective.sigma_min, jnp.float32)
  np.testing.assert_array_equal(objective.consistency_fn(params, x, sigma, None), x)
  sigmas = jnp.array([0.002, 1.0, 80.0])
  np.testing.assert_allclose(objective.backbone_time(sigmas),
                             [0.0, math.log(500) / math.log(40000), 1.0], rtol=1e-6, atol=1e-7)

  class Echo(nn.Module):
    @nn.compact
    def __call__(self, x_in, times, cond, *, train):
      return jnp.concatenate([x_in[:, :1], times[0][:, None]], axis=-1)

  echo = make_objective(Echo())
  sigma = jnp.array([0.5, 3.0])
  x2 = x[:2]
  c_skip, c_out, c_in = echo.scalings(sigma)
  out = (echo.consistency_fn({}, x2, sigma, None) - c_skip[:, None] * x2) / c_out[:, None]
  np.testing.assert_allclose(out[:, 0], c_in * x2[:, 0], rtol=1e-5)
  np.testing.assert_allclose(out[:, 1], echo.backbone_time(sigma), rtol=1e-5)


def test_curriculum_and_discretisation():
  """N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1)), at
  a few steps; the Karras grid runs from sigma_min to sigma_max with rho = 7."""
  objective = make_objective(total_steps=400_000)  # K' = floor(400000 / 8) = 50000
  for step, points in ((0, 11), (49_999, 11), (50_000, 21), (100_000, 41), (150_000, 81),
                       (300_000, 641), (350_000, 1281), (399_999, 1281)):
    assert int(objective.num_points(step)) == points, step
  short = make_objective(total_steps=1000, initial_steps=10, final_steps=80)  # K' = 250
  assert [int(short.num_points(k)) for k in (0, 249, 250, 500, 750, 999)] == [
      11, 11, 21, 41, 81, 81]
  sigmas = np.asarray(objective.karras_sigmas(11))[:11]
  i = np.arange(11)
  expected = (0.002 ** (1 / 7) + i / 10 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
  np.testing.assert_allclose(sigmas, expected, rtol=1e-5)
  assert sigmas[0] == np.float32(0.002)


def test_pseudo_huber_limits():
  """d = sqrt(r^2 + c^2) - c: r^2 / (2c) for small r, |r| - c (so ~ |r|) for large r."""
  c = 0.00054 * math.sqrt(2)
  small = jnp.array([[1e-5, 0.0], [0.0, 2e-5]])
  np.testing.assert_allclose(consistency.pseudo_huber(small, jnp.zeros_like(small), c),
                             jnp.sum(small**2, 1) / (2 * c), rtol=1e-3)
  large = jnp.array([[3.0, 4.0], [-1.0, 0.0]])
  got = consistency.pseudo_huber(large, jnp.zeros_like(large), c)
  np.testing.assert_allclose(got, np.array([5.0, 1.0]) - c, rtol=1e-5)
  np.testing.assert_allclose(got / np.array([5.0, 1.0]), 1.0, atol=1e-3)


def test_zero_loss_and_gradient_at_an_exact_consistency_function():
  """For point-mass data N(mu, 0) the trajectories are straight, so x + sigma n and
  x + sigma' n lie on one trajectory and the exact consistency function has zero iCT loss and
  zero gradient; a scaled (wrong) function has a clearly positive loss."""
  mu = 0.7
  objective = make_objective()
  objective = make_objective(ExactGaussian(objective, mu=mu, var=0.0))
  x = jnp.full((256,) + SHAPE, mu)
  keys = jax.random.split(jax.random.key(2), 2)
  sigma, sigma_next = objective.sample_sigma_pairs(keys[0], 256, 10**6)
  noise = jax.random.normal(keys[1], x.shape)
  loss_fn = jax.jit(lambda p: objective.loss_at(p, x, None, sigma, sigma_next, noise, None)[0])
  exact = {"scale": jnp.ones(())}
  loss, grad = loss_fn(exact), jax.grad(loss_fn)(exact)
  assert float(loss) < 1e-4
  assert abs(float(grad["scale"])) < 1e-3
  assert float(loss_fn({"scale": jnp.array(0.9)})) > 100 * max(float(loss), 1e-6)


def test_interval_probabilities():
  """Adjacent sigma pairs of the discretisation, drawn with p(i) proportional to
  erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt 2 P_std))."""
  objective = make_objective(total_steps=1000)
  sigma, sigma_next = jax.jit(objective.sample_sigma_pairs, static_argnums=1)(
      jax.random.key(3), 100_000, 0)
  grid = np.asarray(objective.karras_sigmas(11))[:11]
  index = np.searchsorted(grid, np.asarray(sigma) * (1 + 1e-6)) - 1
  np.testing.assert_allclose(np.asarray(sigma), grid[index], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(sigma_next), grid[index + 1], rtol=1e-6)
  cdf = np.array([math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in grid])
  expected = np.diff(cdf) / (cdf[-1] - cdf[0])
  observed = np.bincount(index, minlength=10) / index.size
  np.testing.assert_allclose(observed, expected, atol=0.006)


def test_samplers():
  """One step is f(sigma_max z, sigma_max); with the exact consistency function of N(mu, var I)
  one and three steps both give samples of mean mu and variance var + sigma_min^2."""
  objective = make_objective()
  params = objective.init(jax.random.key(4), {"image": jnp.zeros((1,) + SHAPE)})[0]
  rng = jax.random.key(5)
  one = objective.sample(params, rng, 8)
  z = jax.random.normal(jax.random.split(rng)[0], (8,) + SHAPE)
  np.testing.assert_allclose(one, objective.consistency_fn(params, 80.0 * z, jnp.full((8,), 80.0),
                                                           None), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="multistep"):
    objective.sample(params, rng, 8, method="euler")
  mu, var = 0.7, 0.3
  exact = make_objective(ExactGaussian(objective, mu=mu, var=var))
  sample = jax.jit(lambda n: exact.sample({"scale": jnp.ones(())}, rng, 20_000, num_steps=n),
                   static_argnums=0)
  for num_steps in (1, 3):
    x = np.asarray(sample(num_steps))
    np.testing.assert_allclose(x.mean(0), mu, atol=0.02)
    np.testing.assert_allclose(x.var(0), var, rtol=0.05)


def test_tiny_toy2d_run(tmp_path):
  """The tiny run logs at step 1 the iCT loss and squared error of the first global batch at
  the initial state (recomputed on one device with that step's key), and its trained state fits
  the batches it trained on better: their mean squared error falls by over 10%."""
  spec = importlib.util.spec_from_file_location(
      "consistency_toy2d", os.path.join(REPO, "experiments", "consistency_toy2d.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  assert config.objective.total_steps == config.train.steps
  with config.unlocked():
    config.train.log_every = 1
  state = train.run(config, str(tmp_path))
  assert int(state.step) == config.train.steps and int(state.skipped) == 0
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(1, config.train.steps + 1))
  losses, errors = run_batch_errors(config, [None, state])
  np.testing.assert_allclose(records[0]["loss"], losses[0, 0], rtol=1e-5)
  np.testing.assert_allclose(records[0]["error"], errors[0, 0], rtol=1e-5)
  assert errors[1].mean() < 0.9 * errors[0].mean(), errors
  assert (tmp_path / "samples" / f"step_{config.train.steps}.png").is_file()


def test_explicit_times_reproduce_the_karras_grid_and_pick_other_points():
  """sample.times from karras_times over every point of the (N + 1)-point grid is the default
  N-step sampler; other indices (openai/consistency_models' ts) evaluate at those sigmas."""
  objective = make_objective()
  params = objective.init(jax.random.key(4), {"image": jnp.zeros((1,) + SHAPE)})[0]
  rng = jax.random.key(5)
  times = objective.karras_times(range(4), 4)
  assert times[0] == 1.0 and times[-1] == 0.0
  np.testing.assert_allclose(objective.sigma_of_time(jnp.asarray(times[:-1])),
                             objective.sampling_sigmas(3), rtol=1e-5)
  default = objective.sample(params, rng, 8, num_steps=3)
  timed = objective.sample(params, rng, 8, num_steps=3, times=times)
  np.testing.assert_allclose(timed, default, rtol=1e-4, atol=1e-5)
  # iCT's two-step CIFAR-10 sampler: points 0 and 22 of 40, then sigma_min.
  two = objective.karras_times((0, 22, 39), 40)
  sigma_22 = (80 ** (1 / 7) + 22 / 39 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
  np.testing.assert_allclose(objective.sigma_of_time(two[1]), sigma_22, rtol=1e-5)
  timed = objective.sample(params, rng, 8, num_steps=2, times=two)
  first_key, rest_key = jax.random.split(rng)
  f = lambda x, sigma: objective.consistency_fn(params, x, jnp.full((8,), sigma), None)
  x = f(80.0 * jax.random.normal(first_key, (8,) + SHAPE), 80.0)
  noise = jax.random.normal(jax.random.split(rest_key, 1)[0], (8,) + SHAPE)
  x = f(x + math.sqrt(sigma_22 ** 2 - 0.002 ** 2) * noise, sigma_22)
  np.testing.assert_allclose(timed, x, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="ending at 0"):
    objective.sample(params, rng, 8, num_steps=2, times=(1.0, 0.5, 0.1))
