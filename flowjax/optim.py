"""The optax chain from `config.optim`, its learning-rate schedule, and EMA updates."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def schedule(optim_config, total_steps: int) -> optax.Schedule:
  """Linear warm-up to `lr`, then constant, cosine or linear decay to `final_lr`."""
  c = optim_config
  warmup = min(c.warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  if c.schedule == "constant":
    main = optax.constant_schedule(c.lr)
  elif c.schedule == "cosine":
    main = optax.cosine_decay_schedule(c.lr, decay_steps, alpha=c.final_lr / max(c.lr, 1e-30))
  else:
    main = optax.linear_schedule(c.lr, c.final_lr, decay_steps)
  if warmup == 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, c.lr, warmup), main], boundaries=[warmup])


def decay_mask(params):
  """Weight decay on matrices and tensors only: no decay for biases, norms and embeddings' 1-D
  leaves."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def build(optim_config, total_steps: int, learning_rate=None
          ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer of `optim_config` and its schedule; learning_rate replaces the schedule inside
  the optimizer (by_set builds at 1.0 and scales each update by the schedule itself)."""
  c = optim_config
  lr = schedule(c, total_steps) if learning_rate is None else learning_rate
  parts = []
  if c.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(c.grad_clip))
  if c.name == "adamw":
    mask = None if c.decay_norms_and_biases else decay_mask
    parts.append(optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                             mask=mask))
  elif c.name == "adam":
    parts.append(optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps))
  elif c.name == "radam":
    # Rectified Adam (Liu et al., arXiv:1908.03265), as CTM and iCT train with; weight decay is
    # added to the gradient (L2), as torch.optim.RAdam does.
    if c.weight_decay:
      parts.append(optax.add_decayed_weights(c.weight_decay))
    parts.append(optax.radam(lr, b1=c.b1, b2=c.b2, eps=c.eps))
  else:
    parts.append(optax.sgd(lr, momentum=c.b1 or None))
  return optax.chain(*parts), lr


def ema_key(decay: float) -> str:
  return f"{decay:g}"


def init_ema(params, decays) -> dict:
  return {ema_key(d): jax.tree.map(jnp.copy, params) for d in decays}


def update_ema(ema: dict, params, step, decays, start_step: int, every: int = 1) -> dict:
  """ema <- d^k ema + (1 - d^k) params for each decay d after every k-th step (k = `every`,
  counting `step` + 1 updates), ema unchanged after the others; a copy of params before
  `start_step`.

  In float32 a single update with d close to 1 is lost to rounding whenever (1 - d) |params -
  ema| is below half an ulp of ema (d = 0.99995 tracking 1.001 from 1.0 never moves); k steps
  folded into one apply the same average with a k times larger increment.
  """
  out = {}
  apply = (step + 1) % every == 0
  for d in decays:
    decay = jnp.where(step < start_step, 0.0, jnp.where(apply, d ** every, 1.0))
    out[ema_key(d)] = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                                   ema[ema_key(d)], params)
  return out


# Several networks in one state (e.g. DMD2's generator and fake score): an objective that
# declares PARAM_SETS = ("a", "b", ...) keeps params = {"a": tree, "b": tree, ...}. Each set has
# its own optimizer, built from config.optim with the entries of config.optim.sets.<name>
# replacing its keys (e.g. optim.sets.fake_score.lr; `config.parameter_sets` lists every key for
# each set, so that each can be set from the command line), and applies its update only at the
# steps the objective's active_sets(step) marks: elsewhere its parameters and optimizer state
# stay as they were (its Adam moments and bias correction count its own updates). Learning-rate
# schedules run on the global step (step - skipped) for every set, as the schedulers of DMD2's
# official code step at every iteration. The EMA (optim.ema_decays) covers the sets named by the
# objective's EMA_SETS (default: all) and is updated at every step.
SET_KEYS = ("name", "lr", "b1", "b2", "eps", "weight_decay", "decay_norms_and_biases",
            "schedule", "warmup_steps", "final_lr", "grad_clip")
NAMES = ("adamw", "adam", "radam", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


def param_sets(objective) -> tuple[str, ...]:
  """The named parameter sets of `objective` (() for a single network)."""
  return tuple(getattr(objective, "PARAM_SETS", ()))


def set_config(optim_config, name: str):
  """config.optim with the overrides of config.optim.sets.<name> applied (a copy)."""
  merged = optim_config.copy_and_resolve_references()
  overrides = optim_config.get("sets", {}).get(name, {})
  with merged.unlocked():
    for key, value in dict(overrides).items():
      merged[key] = value
  return merged


def check_sets(optim_config, names) -> None:
  """Raises ValueError when config.optim.sets names a set the objective lacks, a key that a
  set's optimizer does not take, or a value out of range."""
  from flowjax.registry import unknown_name_message
  for name, overrides in dict(optim_config.get("sets", {})).items():
    if name not in names:
      raise ValueError("config.optim.sets: " + unknown_name_message(
          "parameter set", name, list(names)) if names else
          f"config.optim.sets names {name!r}, but this objective trains one network and has "
          "no parameter sets; remove config.optim.sets.")
    for key in dict(overrides):
      if key not in SET_KEYS:
        raise ValueError(f"config.optim.sets.{name}.{key}: " + unknown_name_message(
            "per-set optimizer key", key, list(SET_KEYS)))
    merged = set_config(optim_config, name)
    for key, allowed in (("name", NAMES), ("schedule", SCHEDULES)):
      if merged[key] not in allowed:
        raise ValueError(f"config.optim.sets.{name}.{key}: " + unknown_name_message(
            key, str(merged[key]), list(allowed)))
    for key in ("lr", "weight_decay", "warmup_steps", "final_lr", "grad_clip", "eps"):
      if merged[key] < 0:
        raise ValueError(f"config.optim.sets.{name}.{key}={merged[key]} must be >= 0.")


class SetsState(NamedTuple):
  """{set: inner optimizer state} and {set: updates applied so far (int32 [])}."""
  inner: dict
  count: dict


def by_set(transforms: dict, schedules: dict) -> optax.GradientTransformationExtraArgs:
  """One optimizer per parameter set: params, grads and updates are {set: tree}. Each transform
  is built at unit learning rate and its update is scaled by schedules[set](step); update takes
  active = {set: bool []} (None: every set) and step (the schedules' step, int32 []). An inactive
  set's updates are zero and its state is left unchanged."""

  def init(params):
    return SetsState({k: tx.init(params[k]) for k, tx in transforms.items()},
                     {k: jnp.zeros((), jnp.int32) for k in transforms})

  def update(updates, state, params=None, *, active=None, step=None, **extra):
    del extra
    new_updates, inner, count = {}, {}, {}
    for k, tx in transforms.items():
      u, s = tx.update(updates[k], state.inner[k], None if params is None else params[k])
      rate = schedules[k](state.count[k] if step is None else step)
      on = jnp.asarray(True) if active is None else active[k]
      new_updates[k] = jax.tree.map(
          lambda x, on=on, rate=rate: jnp.where(on, rate * x, jnp.zeros_like(x)), u)
      inner[k] = jax.tree.map(lambda n, o, on=on: jnp.where(on, n, o), s, state.inner[k])
      count[k] = state.count[k] + on.astype(jnp.int32)
    return new_updates, SetsState(inner, count)

  return optax.GradientTransformationExtraArgs(init, update)


def build_for(objective, optim_config, total_steps: int):
  """(tx, lr_schedule): `build`'s for a single network; for an objective with PARAM_SETS, the
  `by_set` optimizer and {set: schedule}."""
  names = param_sets(objective)
  check_sets(optim_config, names)
  if not names:
    return build(optim_config, total_steps)
  transforms, schedules = {}, {}
  for name in names:
    c = set_config(optim_config, name)
    schedules[name] = schedule(c, total_steps)
    transforms[name], _ = build(c, total_steps, learning_rate=1.0)
  return by_set(transforms, schedules), schedules


def ema_params(objective, params):
  """The part of `params` the EMA follows: all of it, or the objective's EMA_SETS."""
  sets = getattr(objective, "EMA_SETS", None)
  if not param_sets(objective) or sets is None:
    return params
  return {k: params[k] for k in sets}
