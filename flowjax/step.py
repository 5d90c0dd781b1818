"""make_train_step / make_eval_step: pure functions of (state, batch), testable without a mesh."""

import jax
import jax.numpy as jnp
import optax

from flowjax import optim, sharding
from flowjax.objectives import common
from flowjax.state import TrainState


def view_of(state: TrainState) -> dict:
  """Read-only state an objective may use besides its parameters."""
  return {"ema": state.ema, "extra": state.extra, "step": state.step}


def gather_for_compute(tree, shardings):
  """`tree` constrained to the compute shardings of `shardings` (sharding.for_compute); the
  identity when shardings is None (no mesh)."""
  if shardings is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, sharding.for_compute(shardings))


def gather_params_and_view(params, view: dict, state_shardings):
  """(params, view) with params, view["ema"] and view["extra"] gathered to the compute shardings
  of `state_shardings` (a TrainState of storage shardings); unchanged when it is None."""
  if state_shardings is None:
    return params, view
  return (gather_for_compute(params, state_shardings.params),
          dict(view, ema=gather_for_compute(view["ema"], state_shardings.ema),
               extra=gather_for_compute(view["extra"], state_shardings.extra)))


def _split_microbatches(batch: dict, num: int) -> dict:
  """[B, ...] -> [num, B / num, ...] where microbatch j holds rows j, j + num, ... so that each
  device keeps its own rows (no data movement under batch sharding)."""
  return jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape((x.shape[0] // num, num) + x.shape[1:]), 0, 1), batch)


def make_gradient(objective, train_config, step_rng: jax.Array, state_shardings=None):
  """Returns gradient(state, batch) -> (loss, metrics, grads): the train step's gradient, mean
  over `train.grad_accum_steps` microbatches.

  With `state_shardings` (the state's storage shardings on a mesh), params, EMA and extra enter
  the objective gathered to their compute shardings (`sharding.for_compute`) and the gradients
  leave on the parameters' storage shardings. State an objective carries across steps
  (metrics[common.EXTRA_UPDATES]) is threaded through the microbatches in order, each seeing the
  previous one's update, and the last update is returned, not averaged.
  """
  accum = train_config.grad_accum_steps

  def grads_of(params, batch, key, step, view):
    (loss, metrics), grads = jax.value_and_grad(objective.loss, has_aux=True)(
        params, batch, key, step, view)
    metrics = dict(metrics)
    updates = metrics.pop(common.EXTRA_UPDATES, {})
    return loss, metrics, grads, updates

  def gradient(state: TrainState, batch: dict):
    step_key = jax.random.fold_in(step_rng, state.step)
    params, view = gather_params_and_view(state.params, view_of(state), state_shardings)
    if accum == 1:
      loss, metrics, grads, updates = grads_of(params, batch, step_key, state.step, view)
    else:
      micro = _split_microbatches(batch, accum)

      def body(carry, inputs):
        total, updates = carry
        index, mb = inputs
        seen = dict(view, extra=dict(view["extra"], **updates)) if updates else view
        loss, metrics, grads, updates = grads_of(params, mb, jax.random.fold_in(step_key, index),
                                                 state.step, seen)
        total = jax.tree.map(jnp.add, total, (loss, metrics, grads))
        return (total, updates), None

      shapes = jax.eval_shape(grads_of, params, jax.tree.map(lambda x: x[0], micro),
                              step_key, state.step, view)
      zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[:3])
      initial = {k: view["extra"][k] for k in shapes[3]}
      ((loss, metrics, grads), updates), _ = jax.lax.scan(body, (zero, initial),
                                                          (jnp.arange(accum), micro))
      loss, metrics, grads = jax.tree.map(lambda x: x / accum, (loss, metrics, grads))
    if state_shardings is not None:
      grads = jax.lax.with_sharding_constraint(grads, state_shardings.params)
    if updates:
      metrics = dict(metrics, **{common.EXTRA_UPDATES: updates})
    return loss, metrics, grads

  return gradient


def error_of(objective, loss, metrics):
  """The unweighted error logged beside the loss: the objective's ERROR_METRIC (e.g. MeanFlow's
  squared error before its adaptive weight, which keeps the loss near 1 whatever the error), or
  the loss itself where nothing reweights it, without REPA's alignment term when config.repa
  adds one (which, a negative cosine, would take the logged error below zero)."""
  from flowjax.objectives.repa import UNALIGNED_LOSS
  return metrics.get(getattr(objective, "ERROR_METRIC", UNALIGNED_LOSS), loss)


def make_train_step(objective, tx: optax.GradientTransformation, lr_schedule, optim_config,
                    train_config, step_rng: jax.Array, state_shardings=None):
  """Returns train_step(state, batch) -> (state, metrics).

  The per-step key is fold_in(step_rng, step); microbatch j of a gradient-accumulated step
  uses fold_in(step key, j). A non-finite loss or gradient norm leaves the state unchanged except
  for `skipped`, and is reported as metrics["nonfinite"] = 1 for the host to act on
  (`train.nonfinite`). `state_shardings`: see make_gradient.
  """
  decays = tuple(optim_config.ema_decays)
  gradient = make_gradient(objective, train_config, step_rng, state_shardings)

  sets = optim.param_sets(objective)

  def train_step(state: TrainState, batch: dict):
    loss, metrics, grads = gradient(state, batch)
    metrics = dict(metrics)
    extra_updates = metrics.pop(common.EXTRA_UPDATES, None)
    extra = dict(state.extra, **extra_updates) if extra_updates else state.extra
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if sets:
      # Several networks (optim.by_set): each applies its update at the steps the objective
      # marks active.
      active = objective.active_sets(state.step)
      updates, opt_state = tx.update(grads, state.opt_state, state.params, active=active,
                                     step=state.step - state.skipped)
      metrics = dict(metrics, **{f"grad_norm_{k}": optax.global_norm(grads[k]) for k in sets},
                     **{f"lr_{k}": lr_schedule[k](state.step - state.skipped) for k in sets})
    else:
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optim.update_ema(state.ema, optim.ema_params(objective, params), state.step, decays,
                           optim_config.ema_start_step, getattr(optim_config, "ema_every", 1))
    updated = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
                            extra=extra)
    kept = state.replace(step=state.step + 1, skipped=state.skipped + 1)
    new_state = jax.tree.map(lambda u, k: jnp.where(finite, u, k), updated, kept)
    # The optimizer's own count advances only on applied updates, so the rate it applies now is
    # the schedule at step - skipped.
    metrics = dict(metrics, loss=loss, error=error_of(objective, loss, metrics),
                   grad_norm=grad_norm,
                   lr=(lr_schedule[sets[0]] if sets else lr_schedule)(state.step - state.skipped),
                   nonfinite=(~finite).astype(jnp.int32), skipped=new_state.skipped)
    return new_state, metrics

  return train_step


def make_eval_step(objective, eval_rng: jax.Array, state_shardings=None):
  """Returns eval_step(params, view, batch, index) -> metrics, the objective's loss on a batch with
  a fixed key per batch index (so evaluations are comparable across steps). `state_shardings`:
  see make_gradient."""
  def eval_step(params, view, batch, index):
    params, view = gather_params_and_view(params, view, state_shardings)
    # An evaluation computes every term of the loss, also those an objective with parameter
    # sets computes only at some steps (DMD2's generator terms).
    view = dict(view, evaluating=True)
    loss, metrics = objective.loss(params, batch, jax.random.fold_in(eval_rng, index),
                                   view["step"], view)
    metrics = {k: v for k, v in metrics.items() if k != common.EXTRA_UPDATES}
    return dict(metrics, loss=loss, error=error_of(objective, loss, metrics))

  return eval_step
