"""N-step sampler of a shortcut model s(x_t, t, level), fused in `lax.scan`.

A shortcut s(x_t, t, level) is the average velocity over one step of size d = 2^-level that ends
at t - d (t = 0 is data, t = 1 is noise), so N = 2^level uniform steps
x_{t - d} = x_t - d s(x_t, t, level) carry noise at t = 1 to data at t = 0
(Frans et al., arXiv:2410.12557). N may be any power of two up to the finest number of
steps M the model was trained with; at N = M the level is the flow-matching level and the sampler
is plain Euler integration of the learned velocity.
"""

import math

import jax
import jax.numpy as jnp

METHODS = ("euler",)


def level_of(num_steps: int, finest_steps: int) -> int:
  """log2(num_steps) for num_steps in {1, 2, 4, ..., finest_steps}; an error otherwise."""
  levels = int(round(math.log2(finest_steps)))
  allowed = [2**k for k in range(levels + 1)]
  if num_steps not in allowed:
    raise ValueError(f"sample.num_steps={num_steps}: a shortcut model samples with a power of "
                     f"two number of steps up to objective.finest_steps={finest_steps}; use one "
                     f"of {allowed}.")
  return allowed.index(num_steps)


def solve(shortcut, x1, num_steps: int, finest_steps: int = 128, method: str = "euler"):
  """Maps x1 at t = 1 to t = 0 in num_steps steps x_{t - d} = x_t - d s(x_t, t, log2(num_steps)).

  shortcut: (x: [B, ...], t: [B], level: [B] int32) -> [B, ...]; x1: [B, ...]; d = 1/num_steps.
  The step times t = 1, 1 - d, ..., d are exact multiples of d (float32 k / num_steps).
  Returns [B, ...] float32.
  """
  if method not in METHODS:
    from flowjax.registry import unknown_name_message
    raise ValueError("sample.method: " + unknown_name_message("shortcut sampling method", method,
                                                              list(METHODS)))
  level = level_of(num_steps, finest_steps)
  batch = x1.shape[0]
  step_size = 1.0 / num_steps
  times = jnp.arange(num_steps, 0, -1, dtype=jnp.float32) / num_steps
  levels = jnp.full((batch,), level, jnp.int32)

  def step(x, t):
    s = shortcut(x, jnp.full((batch,), t), levels).astype(jnp.float32)
    return x - step_size * s, None

  x0, _ = jax.lax.scan(step, x1.astype(jnp.float32), times)
  return x0
