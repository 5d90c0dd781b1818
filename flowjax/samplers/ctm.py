"""gamma-sampling for trajectory maps x_s = G(x_t, t, s) in EDM sigma space (CTM), in `lax.scan`.

Along a decreasing noise grid sigma_0 = sigma_max > ... > sigma_N = sigma_min, each step jumps
with G to s_n = sqrt(1 - gamma^2) sigma_{n+1} and adds fresh noise back up to sigma_{n+1}:
x_{n+1} = G(x_n, sigma_n, s_n) + sqrt(sigma_{n+1}^2 - s_n^2) z (Kim et al. 2024, section 4;
Kim et al., arXiv:2310.02279). gamma = 0 is deterministic (the PF-ODE jump to sigma_{n+1});
gamma = 1 is consistency-model multistep sampling (jump to sigma_min, re-noise). s_n is floored at
sigma_min, the smallest noise level the map was trained on, and the last step lands on sigma_min
without added noise, so N steps take N map evaluations.
"""

import jax
import jax.numpy as jnp


def karras_grid(num_steps: int, sigma_max: float, sigma_min: float, rho: float = 7.0):
  """[num_steps + 1] float32 noise levels (sigma_max^(1/rho) + i / N (sigma_min^(1/rho) -
  sigma_max^(1/rho)))^rho, i = 0 .. N, from sigma_max down to sigma_min (both ends exact)."""
  if num_steps < 1:
    raise ValueError(f"sample.num_steps={num_steps}: a CTM sampler takes at least one step.")
  fraction = jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps
  high, low = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
  grid = (high + fraction * (low - high)) ** rho
  return grid.at[0].set(sigma_max).at[-1].set(sigma_min)


def gamma_sample(trajectory_map, x_start, grid, rng, gamma: float, draw_noise=None):
  """gamma-sampling along `grid`.

  trajectory_map: (x: [B, ...], t: [B], s: [B]) -> [B, ...], noise levels in sigma units;
  x_start: [B, ...] at grid[0] (e.g. sigma_max z); grid: [N + 1] decreasing, grid[-1] = sigma_min;
  rng: key for the re-noising; gamma in [0, 1]; draw_noise: (key, shape, dtype) -> the unit
  noise z of the re-noising (None: jax.random.normal). Returns [B, ...] at sigma_min.
  """
  draw_noise = draw_noise or jax.random.normal
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f"objective.sample_gamma={gamma} must be in [0, 1] (0: deterministic "
                     "jumps along the ODE trajectory, 1: consistency-model multistep).")
  batch = x_start.shape[0]
  sigma_min = grid[-1]
  num_steps = grid.shape[0] - 1
  last = jnp.arange(num_steps) == num_steps - 1

  def step(x, inputs):
    t, t_next, is_last, key = inputs
    s = jnp.where(is_last, sigma_min,
                  jnp.maximum(jnp.sqrt(1.0 - gamma ** 2) * t_next, sigma_min))
    x = trajectory_map(x, jnp.full((batch,), t), jnp.full((batch,), s))
    noise_std = jnp.where(is_last, 0.0, jnp.sqrt(jnp.maximum(t_next ** 2 - s ** 2, 0.0)))
    return x + noise_std * draw_noise(key, x.shape, x.dtype), None

  keys = jax.random.split(rng, num_steps)
  x, _ = jax.lax.scan(step, x_start, (grid[:-1], grid[1:], last, keys))
  return x
