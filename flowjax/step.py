"""make_train_step / make_eval_step: pure functions of (state, batch), testable without a mesh."""

import jax
import jax.numpy as jnp
import optax

from flowjax import optim
from flowjax.state import TrainState


def view_of(state: TrainState) -> dict:
  """Read-only state an objective may use besides its parameters."""
  return {"ema": state.ema, "extra": state.extra, "step": state.step}


def _split_microbatches(batch: dict, num: int) -> dict:
  """[B, ...] -> [num, B / num, ...] where microbatch j holds rows j, j + num, ... so that each
  device keeps its own rows (no data movement under batch sharding)."""
  return jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape((x.shape[0] // num, num) + x.shape[1:]), 0, 1), batch)


def make_train_step(objective, tx: optax.GradientTransformation, lr_schedule, optim_config,
                    train_config, step_rng: jax.Array):
  """Returns train_step(state, batch) -> (state, metrics).

  The per-step key is fold_in(step_rng, step); microbatch j of a gradient-accumulated step
  uses fold_in(step key, j). A non-finite loss or gradient norm leaves the state unchanged except
  for `skipped`, and is reported as metrics["nonfinite"] = 1 for the host to act on
  (`train.nonfinite`).
  """
  accum = train_config.grad_accum_steps
  decays = tuple(optim_config.ema_decays)

  def grads_of(params, batch, key, step, view):
    (loss, metrics), grads = jax.value_and_grad(objective.loss, has_aux=True)(
        params, batch, key, step, view)
    return loss, metrics, grads

  def train_step(state: TrainState, batch: dict):
    step_key = jax.random.fold_in(step_rng, state.step)
    view = view_of(state)
    if accum == 1:
      loss, metrics, grads = grads_of(state.params, batch, step_key, state.step, view)
    else:
      micro = _split_microbatches(batch, accum)

      def body(carry, inputs):
        index, mb = inputs
        loss, metrics, grads = grads_of(state.params, mb, jax.random.fold_in(step_key, index),
                                        state.step, view)
        carry = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
        return carry, None

      zero = jax.eval_shape(grads_of, state.params, jax.tree.map(lambda x: x[0], micro),
                            step_key, state.step, view)
      zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
      (loss, metrics, grads), _ = jax.lax.scan(body, zero, (jnp.arange(accum), micro))
      loss, metrics, grads = jax.tree.map(lambda x: x / accum, (loss, metrics, grads))

    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optim.update_ema(state.ema, params, state.step, decays, optim_config.ema_start_step)
    updated = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
    kept = state.replace(step=state.step + 1, skipped=state.skipped + 1)
    new_state = jax.tree.map(lambda u, k: jnp.where(finite, u, k), updated, kept)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=lr_schedule(state.step),
                   nonfinite=(~finite).astype(jnp.int32), skipped=new_state.skipped)
    return new_state, metrics

  return train_step


def make_eval_step(objective, eval_rng: jax.Array):
  """Returns eval_step(params, view, batch, index) -> metrics, the objective's loss on a batch with
  a fixed key per batch index (so evaluations are comparable across steps)."""
  def eval_step(params, view, batch, index):
    loss, metrics = objective.loss(params, batch, jax.random.fold_in(eval_rng, index),
                                   view["step"], view)
    return dict(metrics, loss=loss)

  return eval_step
