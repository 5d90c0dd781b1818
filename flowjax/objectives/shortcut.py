"""Shortcut models (Frans, Hafner, Levine and Abbeel, 2024): one network for 1 to M sampling steps.

The network s_theta(x_t, t, level, y) predicts the average velocity over a step of size
d = 2^-level that starts at t and ends at t - d, so x_{t - d} = x_t - d s_theta(x_t, t, level).
The finest level L = log2(M) (M = finest_steps = 128) is trained by flow matching on the
instantaneous velocity (the reference treats its d as 0), and used with d = 1/M when sampling
with M steps. A fraction of each batch (bootstrap_fraction, 1/8) trains the coarser levels
l = 0 .. L - 1 by self-consistency: with d = 2^-l and t on the grid {d, 2d, ..., 1},
  s_1 = s(x_t, t, l + 1),  x' = clip(x_t - (d/2) s_1),  s_2 = s(x', t - d/2, l + 1),
  target = clip((s_1 + s_2) / 2)  to [-target_clip, target_clip],
from a stop-gradient copy of the EMA parameters (Frans et al., arXiv:2410.12557).

Time convention. The reference runs time the other way, t_ref = 0 noise and t_ref = 1 data, with
x = (1 - (1 - sigma_min) t_ref) eps + t_ref x and velocity x - (1 - sigma_min) eps. flowjax uses
t = 1 - t_ref (`from_reference_time`), so
  x_t = (1 - t) x + (sigma_min + (1 - sigma_min) t) eps,  v = dx_t/dt = (1 - sigma_min) eps - x,
the reference's path and its velocity negated; sigma_min = 1e-5 as in the reference (0 gives the
OT path of flow_matching). The reference's grid times t_ref = k d (k = 0 .. 2^l - 1) become
t = 1 - k d.

Backbone times: (t, code). With level_code='fraction' (flowjax's default) the code is level / L
in [0, 1], 0 for the one-step shortcut (d = 1) and 1 for the flow-matching level, and a backbone
time_scale of 1000 spreads the L + 1 codes over its sinusoidal embedding. With 'log2_steps' the
code is the level itself, log2 of the step count (0 .. L), as the reference's DiT embeds its
dt_base beside a raw time in [0, 1] (time_scale 1); its time runs the other way, which a
sinusoidal embedding's first Dense absorbs (the features of 1 - t are a fixed rotation of each
sin/cos pair of t's).

Guidance: with `guidance` != 1 the self-consistency targets of level L - 1 (whose two half steps
are flow-matching evaluations) use s_u + guidance (s_c - s_u) in both half steps, as the
reference bakes its CFG scale into that level; coarser levels inherit it by bootstrapping. Labels
are never dropped in the self-consistency part; the flow-matching part drops them with
probability label_dropout (null label = num_classes).

Noise: objective.noise='student_t' draws eps from the multivariate Student-t of t-Flow (Pandey
et al., arXiv:2410.14171; `common.draw_noise`) in both parts of the loss and as the sampler's
start; flowjax's extension, not part of either paper. The targets are unchanged (they are
properties of the trajectories), but target_clip, set for Gaussian noise and data in [-1, 1],
clips x' and the targets of heavy-tailed points: raise it with heavy-tailed noise or data.

REPA (config.repa, arXiv:2410.06940; `repa`) aligns the hidden tokens of the training forward
s_theta(x_t, t, level, c) on the whole batch (flow-matching and self-consistency examples; each
example's features are those of its own clean image).
"""

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from flowjax import paths
from flowjax.objectives import common, repa as repa_lib
from flowjax.registry import OBJECTIVES
from flowjax.samplers import ode
from flowjax.samplers import shortcut as shortcut_sampler

CURRENT_PARAMS = common.CURRENT_PARAMS


def from_reference_time(t_ref):
  """flowjax time t = 1 - t_ref of the reference's t_ref (0 = noise, 1 = data)."""
  return 1.0 - t_ref


def self_consistency_target(shortcut, x_t, t, level, clip: float):
  """The 2d-shortcut built from two d-shortcuts, in flowjax time (float32, no gradient).

  shortcut: (x: [B, ...], t: [B], level: [B] int32) -> [B, ...], the average velocity over a step
  of 2^-level ending at t - 2^-level. x_t: [B, ...]; t: [B] with t >= d; level: [B] int32, the
  level of the target, d = 2^-level. Returns clip((s_1 + s_2) / 2) with s_1 = s(x_t, t, level + 1),
  x' = clip(x_t - (d/2) s_1), s_2 = s(x', t - d/2, level + 1), clip = clipping to [-clip, clip].
  For the exact shortcut of a flow (and no clipping) this is the exact shortcut at `level`.
  """
  half = paths.expand(0.5 * jnp.exp2(-level.astype(jnp.float32)), x_t)
  finer = level + 1
  s_1 = shortcut(x_t, t, finer).astype(jnp.float32)
  x_mid = jnp.clip(x_t - half * s_1, -clip, clip)
  s_2 = shortcut(x_mid, t - half.reshape(t.shape), finer).astype(jnp.float32)
  return jax.lax.stop_gradient(jnp.clip(0.5 * (s_1 + s_2), -clip, clip))


LEVEL_CODES = ("fraction", "log2_steps")


@OBJECTIVES.register("shortcut")
@dataclasses.dataclass(frozen=True)
class Shortcut:
  """model: backbone s_theta(x, (t, level / L), cond); image_shape: per-example shape;
  num_classes: 0 for unconditional models. The other fields are the `objective` config keys:

  finest_steps: M, the finest number of steps (a power of two; 128 in the paper), L = log2(M);
  bootstrap_fraction: the fraction of each batch trained by self-consistency (1/8); the rest is
    flow matching at level L. The count is floor(B * bootstrap_fraction);
  target_ema: which EMA tree of the trainer (view["ema"], keyed by decay string such as "0.999")
    builds the targets; "" takes the only one (an error when several are kept), "current" the
    current parameters (stop-gradient);
  target_clip: self-consistency targets and their intermediate point are clipped to
    [-target_clip, target_clip] (4 in the reference, for data in [-1, 1]);
  guidance: classifier-free guidance scale baked into the level-(L - 1) targets (1 = off; the
    reference uses 1.5 on ImageNet);
  label_dropout: probability of the null label in the flow-matching part;
  sigma_min: noise left at the data end of the reference path (1e-5);
  level_code: the level's input to the backbone, 'fraction' (level / L) or 'log2_steps' (the
    level, log2 of the step count, as the reference feeds it);
  noise, noise_nu: the noise law ("gaussian" or "student_t" with nu degrees of freedom).
  """
  model: nn.Module
  image_shape: tuple
  num_classes: int
  finest_steps: int = 128
  bootstrap_fraction: float = 0.125
  target_ema: str = ""
  target_clip: float = 4.0
  guidance: float = 1.0
  label_dropout: float = 0.1
  sigma_min: float = 1e-5
  level_code: str = "fraction"
  noise: str = "gaussian"
  noise_nu: float = common.DEFAULT_NU
  repa: repa_lib.Alignment | None = None

  DEFAULTS: ClassVar[dict] = dict(finest_steps=128, bootstrap_fraction=0.125, target_ema="",
                                  target_clip=4.0, guidance=1.0, label_dropout=0.1,
                                  sigma_min=1e-5, level_code="fraction",
                                  **common.NOISE_DEFAULTS)

  def __post_init__(self):
    common.check_noise(self.noise, self.noise_nu)
    steps = self.finest_steps
    if steps < 2 or steps & (steps - 1):
      raise ValueError(f"objective.finest_steps={steps} must be a power of two >= 2 (128 in the "
                       "paper).")
    if not 0.0 <= self.bootstrap_fraction < 1.0:
      raise ValueError(f"objective.bootstrap_fraction={self.bootstrap_fraction} must be in "
                       "[0, 1) (the paper uses 1/8 = 0.125).")
    if self.target_clip <= 0:
      raise ValueError(f"objective.target_clip={self.target_clip} must be positive (4.0 for data "
                       "in [-1, 1]; larger for data of larger scale).")
    if not 0.0 <= self.sigma_min < 1.0:
      raise ValueError(f"objective.sigma_min={self.sigma_min} must be in [0, 1) (1e-5 in the "
                       "reference).")
    if self.level_code not in LEVEL_CODES:
      raise ValueError(f"objective.level_code={self.level_code!r}; use one of {LEVEL_CODES}.")
    if self.guidance != 1.0 and self.num_classes <= 0:
      raise ValueError(f"objective.guidance={self.guidance} needs class labels "
                       "(data.conditional=True); use objective.guidance=1.0 for an "
                       "unconditional model.")

  @classmethod
  def build(cls, config, model, info):
    keys = {key: config[key] for key in cls.DEFAULTS}
    return cls(model=model, image_shape=tuple(info.image_shape), num_classes=info.num_classes,
               **keys)

  @property
  def num_levels(self) -> int:
    """L = log2(finest_steps): levels 0 .. L - 1 are shortcuts, level L is flow matching."""
    return int(round(math.log2(self.finest_steps)))

  def init(self, rng, batch):
    x = batch["image"][:1]
    cond = common.labels(batch, self.num_classes)
    cond = None if cond is None else cond[:1]
    return common.init_model(self.model, rng, x, 2, cond), repa_lib.init_extra(self.repa, {})

  def load_extra(self, abstract_extra):
    """REPA's encoder parameters (config.repa with online features), else {}."""
    return repa_lib.load_extra(self.repa, abstract_extra, {})

  def network(self, params, x, t, level, cond, rng=None, train=False, capture=False):
    """s_theta(x, t, level, c): [B, ...] float32; x: [B, ...]; t: [B] flowjax time; level: [B]
    int in 0 .. L, fed to the backbone as `level_input`; cond: [B] labels or None. With capture,
    (s, REPA tokens) (`common.apply_model`)."""
    out = common.apply_model(self.model, params, x, (t, self.level_input(level)), cond, rng,
                             train, capture)
    if capture:
      return out[0].astype(jnp.float32), out[1]
    return out.astype(jnp.float32)

  def level_input(self, level):
    """The backbone's second time input for levels [B] int: level / L or the level."""
    code = level.astype(jnp.float32)
    return code if self.level_code == "log2_steps" else code / self.num_levels

  def interpolate(self, x, eps, t):
    """x_t = (1 - t) x + (sigma_min + (1 - sigma_min) t) eps; x, eps: [B, ...]; t: [B]."""
    t = paths.expand(t, x)
    return (1.0 - t) * x + (self.sigma_min + (1.0 - self.sigma_min) * t) * eps

  def velocity(self, x, eps):
    """dx_t/dt = (1 - sigma_min) eps - x: [B, ...]."""
    return (1.0 - self.sigma_min) * eps - x

  def target_params(self, params, view):
    """The parameters that build the self-consistency targets (no gradient flows into them)."""
    return common.ema_target(params, view, self.target_ema, "shortcut", "(0.999,)")

  def bootstrap_levels(self, rng, count: int):
    """[count] int32 levels in 0 .. L - 1: the levels L - 1, L - 2, ..., 0 in turn from a random
    offset, so every level gets floor or ceil of count / L examples."""
    offset = jax.random.randint(rng, (), 0, self.num_levels)
    return (self.num_levels - 1 - (jnp.arange(count) + offset) % self.num_levels).astype(
        jnp.int32)

  def grid_times(self, rng, level):
    """t = 1 - k 2^-level, k uniform in 0 .. 2^level - 1: [B] float32 in [2^-level, 1]."""
    sections = jnp.exp2(level.astype(jnp.float32))
    k = jnp.floor(jax.random.uniform(rng, level.shape) * sections)
    return from_reference_time(k / sections)

  def guided_shortcut(self, params, cond):
    """(x, t, level) -> s with guidance s_u + w (s_c - s_u) at the flow-matching level L and the
    plain conditional output elsewhere; no dropout."""
    plain = lambda x, t, level: self.network(params, x, t, level, cond)
    if cond is None or self.guidance == 1.0:
      return plain

    def call(x, t, level):
      null = jnp.full_like(cond, self.num_classes)
      both = common.apply_model(
          self.model, params, jnp.concatenate([x, x]), (jnp.concatenate([t, t]),
          self.level_input(jnp.concatenate([level, level]))),
          jnp.concatenate([cond, null])).astype(jnp.float32)
      s_c, s_u = jnp.split(both, 2)
      guided = s_u + self.guidance * (s_c - s_u)
      return jnp.where(paths.expand(level == self.num_levels, s_c), guided, s_c)

    return call

  def bootstrap_batch(self, target_params, x, eps, cond, rng):
    """Self-consistency examples: (x_t, t, level, target) for data x: [n, ...] and noise eps."""
    level_key, time_key = jax.random.split(rng)
    level = self.bootstrap_levels(level_key, x.shape[0])
    t = self.grid_times(time_key, level)
    x_t = self.interpolate(x, eps, t)
    shortcut = self.guided_shortcut(target_params, cond)
    target = self_consistency_target(shortcut, x_t, t, level, self.target_clip)
    return x_t, t, level, target

  def flow_batch(self, x, eps, rng):
    """Flow-matching examples at level L: (x_t, t, level, v) with t = 1 - k / M, k uniform in
    0 .. M - 1, as on the reference's grid."""
    level = jnp.full((x.shape[0],), self.num_levels, jnp.int32)
    t = self.grid_times(rng, level)
    return self.interpolate(x, eps, t), t, level, self.velocity(x, eps)

  def loss(self, params, batch, rng, step, view):
    """Shortcut loss of a batch {'image': [B, ...], 'label': [B]}: the first
    floor(B bootstrap_fraction) examples are self-consistency examples, the rest flow matching."""
    del step
    x = batch["image"].astype(jnp.float32)
    repa_target = repa_lib.target(self.repa, batch, view)
    count = int(x.shape[0] * self.bootstrap_fraction)
    noise_key, boot_key, time_key, drop_key, model_key = jax.random.split(rng, 5)
    eps = common.draw_noise(noise_key, x.shape, self.noise, self.noise_nu, jnp.float32)
    labels = common.labels(batch, self.num_classes)
    parts = [self.flow_batch(x[count:], eps[count:], time_key)]
    if count:
      boot_cond = None if labels is None else labels[:count]
      boot = self.bootstrap_batch(self.target_params(params, view), x[:count], eps[:count],
                                  boot_cond, boot_key)
      parts.insert(0, boot)
    x_t, t, level, target = (jnp.concatenate(p) for p in zip(*parts))
    cond = labels
    if labels is not None:
      dropped = common.drop_labels(labels[count:], drop_key, self.label_dropout, self.num_classes)
      cond = jnp.concatenate([labels[:count], dropped])
    if repa_target is None:
      loss, per_example = self.loss_at(params, x_t, t, level, cond, target, model_key)
    else:
      loss, per_example, tokens = self.loss_at(params, x_t, t, level, cond, target, model_key,
                                               capture=True)
    boot_error = jnp.mean(per_example[:count]) if count else jnp.zeros(())
    metrics = {"flow_mse": jnp.mean(per_example[count:]), "bootstrap_mse": boot_error,
               "bootstrap_fraction": jnp.mean((level < self.num_levels).astype(jnp.float32))}
    if repa_target is None:
      return loss, metrics
    return self.repa.add(loss, metrics, tokens, repa_target)

  def loss_at(self, params, x_t, t, level, cond, target, rng, capture=False):
    """mean_B mean_D (s_theta(x_t, t, level, c) - target)^2 and its per-example terms [B] (and
    with capture the forward's REPA tokens third).

    x_t, target: [B, ...]; t: [B]; level: [B] int; cond: [B] labels (dropped ones null) or None;
    rng: dropout key. At level L with target v this is flow matching's loss.
    """
    if capture:
      s, tokens = self.network(params, x_t, t, level, cond, rng, train=True, capture=True)
    else:
      s = self.network(params, x_t, t, level, cond, rng, train=True)
    per_example = common.mean_per_example(jnp.square(s - target))
    if capture:
      return jnp.mean(per_example), per_example, tokens
    return jnp.mean(per_example), per_example

  def sample(self, params, rng, num, cond=None, *, num_steps=1, method="euler", guidance=1.0):
    """num samples from the noise law (N(0, I) by default) at t = 1 in num_steps (a power of
    two up to finest_steps) steps x_{t - d} = x_t - d s(x_t, t, log2(num_steps)); cond: [num]
    labels or None; guidance: CFG scale applied at every step (1 = off, the usual choice when
    guidance is trained in)."""
    x1 = common.draw_noise(rng, (num,) + self.image_shape, self.noise, self.noise_nu,
                           jnp.float32)
    level = shortcut_sampler.level_of(num_steps, self.finest_steps)

    def velocity(x, t, c):
      return self.network(params, x, t, jnp.full(t.shape, level, jnp.int32), c)

    guided = ode.guided(velocity, cond, guidance, self.num_classes)
    return shortcut_sampler.solve(lambda x, t, _: guided(x, t), x1, num_steps, self.finest_steps,
                                  method)
