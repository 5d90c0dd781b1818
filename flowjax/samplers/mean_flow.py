"""Few-step samplers for an average-velocity field u(z, t, h = t - r) (MeanFlow), in `lax.scan`.

u is the average velocity over [r, t] (t = 0 is data, t = 1 is noise), so one step is exact
for the true u: z_r = z_t - (t - r) u(z_t, t, t - r) (Geng et al., arXiv:2505.13447). Extra
network inputs that stay fixed along the trajectory (improved MeanFlow's guidance scale and
guidance interval, arXiv:2512.02012; Lyy-iiis/imeanflow `models/mit.py` `_build_sequence`) are
`conditions`.
"""

import jax
import jax.numpy as jnp

METHODS = ("euler",)


def time_grid(num_steps: int):
  """[num_steps + 1] float32 times uniform from 1 down to 0, both ends exact."""
  if num_steps < 1:
    raise ValueError(f"sample.num_steps={num_steps}: a MeanFlow sampler takes at least one step.")
  return jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)


def solve(average_velocity, z1, num_steps: int = 1, method: str = "euler", conditions=()):
  """Maps z1 at t = 1 to t = 0 in num_steps uniform steps z_r = z_t - (t - r) u(z_t, t, t - r).

  average_velocity: (z: [B, ...], t: [B], h: [B], *conditions) -> [B, ...]; z1: [B, ...].
  conditions: scalars or [B] arrays passed after (z, t, h) to every call, each as a [B] float32
  array (e.g. iMF's 1 - 1/omega, t_min, t_max). One step is z_0 = z_1 - u(z_1, 1, 1) (the
  (t - r) = 1 factor is exact in float32). Returns [B, ...] float32.
  """
  if method not in METHODS:
    from flowjax.registry import unknown_name_message
    raise ValueError("sample.method: " + unknown_name_message("MeanFlow sampling method", method,
                                                              list(METHODS)))
  grid = time_grid(num_steps)
  batch = z1.shape[0]
  conditions = tuple(jnp.broadcast_to(jnp.asarray(c, jnp.float32), (batch,)) for c in conditions)

  def step(z, times):
    t, r = times
    t_b, h_b = jnp.full((batch,), t), jnp.full((batch,), t - r)
    u = average_velocity(z, t_b, h_b, *conditions).astype(jnp.float32)
    return z - (t - r) * u, None

  z0, _ = jax.lax.scan(step, z1.astype(jnp.float32), (grid[:-1], grid[1:]))
  return z0
