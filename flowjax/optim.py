"""The optax chain from `config.optim`, its learning-rate schedule, and EMA updates."""

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


def build(optim_config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  c = optim_config
  lr = schedule(c, total_steps)
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
