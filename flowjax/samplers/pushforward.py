"""Few-step pushforward samplers for flow maps x_s = f(x_t, t, s) (IMM), fused in `lax.scan`.

A flow map jumps from time t straight to an earlier time s <= t (t = 0 is data, t = 1 is noise),
so N steps along a decreasing grid T = t_0 > t_1 > ... > t_N = t_min give a sample with N map
evaluations (Zhou et al., arXiv:2503.07565). The grid ends at t_min, the
smallest time the map was trained on, not at 0: the sample then carries noise of std
sigma_d t_min (5e-4 for the defaults), far below the data's quantisation.
"""

import jax
import jax.numpy as jnp

SCHEDULES = ("uniform", "edm")


def time_grid(schedule: str, num_steps: int, path, t_max: float, t_min: float,
              rho: float = 7.0):
  """[num_steps + 1] float32 times from t_max down to t_min, both ends exact.

  "uniform": uniform in t. "edm": EDM-like in eta = sigma / alpha,
  eta_i = (eta_max^(1/rho) + i / N (eta_min^(1/rho) - eta_max^(1/rho)))^rho, t_i = t(eta_i),
  with eta_max = eta(t_max), eta_min = eta(t_min); rho = 7 puts more steps at low noise.
  """
  if schedule not in SCHEDULES:
    from flowjax.registry import unknown_name_message
    raise ValueError(unknown_name_message("pushforward schedule", schedule, list(SCHEDULES)))
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps}: a pushforward sampler takes at least one step.")
  fraction = jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps
  if schedule == "uniform":
    grid = t_max + fraction * (t_min - t_max)
  else:
    eta_max = path.eta(jnp.float32(t_max))
    eta_min = path.eta(jnp.float32(t_min))
    low, high = eta_min ** (1.0 / rho), eta_max ** (1.0 / rho)
    grid = path.t_of_eta((high + fraction * (low - high)) ** rho)
  return grid.at[0].set(t_max).at[-1].set(t_min)


def pushforward(flow_map, x_start, grid):
  """x_{t_{i+1}} = f(x_{t_i}, t_i, t_{i+1}) for i = 0 .. N-1, one map evaluation per step.

  flow_map: (x: [B, ...], t: [B], s: [B]) -> [B, ...]; x_start: [B, ...] at grid[0];
  grid: [N + 1] decreasing times. Returns x at grid[N].
  """
  batch = x_start.shape[0]

  def step(x, times):
    t, s = times
    return flow_map(x, jnp.full((batch,), t), jnp.full((batch,), s)), None

  x, _ = jax.lax.scan(step, x_start, (grid[:-1], grid[1:]))
  return x


def restart(flow_map, x_start, grid, rng, renoise):
  """Restart sampling: from each t_i jump straight to t_min, then re-noise to t_{i+1}.

  x0_i = f(x_{t_i}, t_i, t_min) and x_{t_{i+1}} = renoise(x0_i, t_{i+1}, key_i) (fresh noise,
  x = alpha x0 + sigma eps) for i = 0 .. N-1; returns x0_{N-1}. N map evaluations, like
  `pushforward`, and with N = 1 the two coincide.

  flow_map: as in `pushforward`; x_start: [B, ...] at grid[0]; grid: [N + 1] decreasing times
  ending at t_min; renoise: (x0: [B, ...], t: [B], key) -> [B, ...].
  """
  batch = x_start.shape[0]
  t_min = jnp.full((batch,), grid[-1])
  num_steps = grid.shape[0] - 1

  def step(carry, inputs):
    x, _ = carry
    t, t_next, key = inputs
    x0 = flow_map(x, jnp.full((batch,), t), t_min)
    return (renoise(x0, jnp.full((batch,), t_next), key), x0), None

  keys = jax.random.split(rng, num_steps)
  (_, x0), _ = jax.lax.scan(step, (x_start, x_start), (grid[:-1], grid[1:], keys))
  return x0
