"""Probability-flow ODE samplers from t = 1 (noise) to t = 0 (data), fused in `lax.scan`."""

import jax
import jax.numpy as jnp

METHODS = ("euler", "heun")


def time_grid(num_steps: int, t_max: float = 1.0, t_min: float = 0.0):
  """[num_steps + 1] times from t_max down to t_min, uniform."""
  return jnp.linspace(t_max, t_min, num_steps + 1)


def solve(velocity, x1, num_steps: int, method: str = "euler", t_max: float = 1.0,
          t_min: float = 0.0):
  """Integrates dx/dt = velocity(x, t) from t_max to t_min.

  velocity: (x: [B, ...], t: [B]) -> [B, ...]; x1: [B, ...] at t_max. "euler" takes one velocity
  evaluation per step, "heun" two (Heun's second-order correction).
  """
  if method not in METHODS:
    from flowjax.registry import unknown_name_message
    raise ValueError(unknown_name_message("ODE method", method, list(METHODS)))
  grid = time_grid(num_steps, t_max, t_min)
  batch = x1.shape[0]

  def step(x, times):
    t, s = times
    t_b, s_b = jnp.full((batch,), t), jnp.full((batch,), s)
    v = velocity(x, t_b)
    x_euler = x + (s - t) * v
    if method == "euler":
      return x_euler, None
    v_next = velocity(x_euler, s_b)
    return x + (s - t) * 0.5 * (v + v_next), None

  x0, _ = jax.lax.scan(step, x1, (grid[:-1], grid[1:]))
  return x0


def guided(fn, cond, guidance: float, null_label):
  """Classifier-free guidance: out_u + w (out_c - out_u) from one batched call of fn.

  fn: (x: [B, ...], t: [B], cond: [B] | [B, T, D] | None) -> [B, ...]. null_label: the null
  label index, or a text model's null caption features [T, D]. Returns (x, t) -> guided
  output. With cond None or guidance == 1 it is the plain conditional call.
  """
  if cond is None or guidance == 1.0:
    return lambda x, t: fn(x, t, cond)

  def call(x, t):
    both = fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
              jnp.concatenate([cond, jnp.broadcast_to(jnp.asarray(null_label, cond.dtype),
                                                      cond.shape)]))
    out_c, out_u = jnp.split(both, 2)
    return out_u + guidance * (out_c - out_u)

  return call
