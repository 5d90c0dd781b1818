"""MeanFlow (Geng, Deng, Bai, Kolter and He, 2025): a one-step average-velocity model.

The network u_theta(z_t, (t, h = t - r), y) estimates the average velocity
u(z_t, r, t) = 1 / (t - r) int_r^t v(z_tau, tau) dtau, which obeys the MeanFlow identity
u = v - (t - r) du/dt with du/dt = v . d_z u + d_t u (Geng et al., arXiv:2505.13447). Training
regresses u_theta on stop_gradient(v_g - clip(t - r, 0, 1) du_theta/dt), with du_theta/dt from
one forward-mode JVP (float32) along the tangent (v_g, 1, 0) of (z_t, t, r).
flowjax conventions: t = 0 is data, t = 1 is noise, z_t = (1 - t) x + t eps with
eps ~ N(0, I), v = eps - x; times go to the backbone in [0, 1] (its time_scale applies 1000).
"""

import contextlib
import dataclasses
import logging
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from flowjax import paths
from flowjax.objectives import common
from flowjax.registry import OBJECTIVES, unknown_name_message
from flowjax.samplers import mean_flow

TIME_SAMPLERS = ("logit_normal", "uniform")
PAIR_SAMPLERS = ("sorted", "separate")
ERROR_REDUCTIONS = ("mean", "sum")
JVP_PRECISIONS = ("float32", "default")


def _check_choice(key: str, value: str, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"objective.{key}: " + unknown_name_message(key, value, list(allowed)))


def meanflow_target(average_velocity, z_t, t, r, v_g, precision: str = "float32"):
  """(u, u_tgt) of the MeanFlow identity for an average-velocity function, all float32.

  average_velocity: (z: [B, ...], t: [B], r: [B]) -> [B, ...]; z_t, v_g: [B, ...]; t, r: [B]
  with r <= t. (u, du/dt) = jvp(average_velocity, (z_t, t, r), (v_g, 1, 0)) and
  u_tgt = stop_gradient(v_g - clip(t - r, 0, 1) du/dt). u carries gradients; u_tgt does not.
  precision: the matmul precision of the JVP pass ("float32": full float32 products for float32
  networks also where the backend would use TensorFloat-32 or bfloat16 passes; "default": the
  surrounding setting, train.matmul_precision).
  """
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  z_t, t, r, v_g = f32(z_t), f32(t), f32(r), f32(v_g)
  u_fn = lambda z, t_, r_: f32(average_velocity(z, t_, r_))
  with contextlib.ExitStack() as stack:
    if precision != "default":
      stack.enter_context(jax.default_matmul_precision(precision))
    u, du_dt = jax.jvp(u_fn, (z_t, t, r), (v_g, jnp.ones_like(t), jnp.zeros_like(r)))
  u_tgt = v_g - paths.expand(jnp.clip(t - r, 0.0, 1.0), z_t) * du_dt
  return u, jax.lax.stop_gradient(u_tgt)


@OBJECTIVES.register("meanflow")
@dataclasses.dataclass(frozen=True)
class MeanFlow:
  """model: backbone u_theta(z, (t, t - r), cond); image_shape: per-example shape; num_classes: 0
  for unconditional models. The other fields are the `objective` config keys (see DEFAULTS):

  time_sampler, time_mean, time_std, pair_sampler, r_mean, r_std: "sorted" pairs (the paper's,
    py-meanflow's "v0") take t and r as the max and min of two draws of
    sigmoid(time_mean + time_std n) ("logit_normal") or U(0, 1) ("uniform"); "separate" pairs
    (py-meanflow's "v1") draw t from that law and r_raw from sigmoid(r_mean + r_std n) (or
    U(0, 1)), r = min(t, r_raw);
  fraction_r_equals_t: the fraction of examples whose r is then set to t (plain flow matching
    examples); 0.75 is the paper's ImageNet setting (CIFAR-10 uses 0.25);
  error_reduction: the per-example error l is the "mean" (as in flow_matching, the default) or
    the "sum" (the paper) of (u - u_tgt)^2 over the example's D dims. The adaptive weight makes
    the two differ beyond scale: "mean" with adaptive_eps equals "sum" with D adaptive_eps;
  adaptive_p, adaptive_eps: loss = mean(l / stop_gradient((l + adaptive_eps)^adaptive_p)); p = 0
    is the plain squared error;
  guidance_w, guidance_kappa, guidance_t_min, guidance_t_max: training-time guidance,
    v_g = w v + (1 - w - kappa) u(z_t, t, 0, null) + kappa u(z_t, t, 0, y) for t in
    [t_min, t_max] and kept labels (effective scale w / (1 - kappa)); w = 1, kappa = 0 is off;
  label_dropout: probability of the null label (index num_classes) during training;
  jvp_precision: matmul precision of the JVP pass (see `meanflow_target`; "float32" by default, so
    the target's derivative is float32 on GPUs and TPUs too; "default" follows
    train.matmul_precision).
  """
  # The unweighted error the trainer logs as "error": the mean squared error of u against its
  # target per dimension, before the adaptive weight.
  ERROR_METRIC: ClassVar[str] = "mse"
  model: nn.Module
  image_shape: tuple
  num_classes: int
  time_sampler: str = "logit_normal"
  time_mean: float = -0.4
  time_std: float = 1.0
  pair_sampler: str = "sorted"
  r_mean: float = -0.4
  r_std: float = 1.0
  fraction_r_equals_t: float = 0.75
  error_reduction: str = "mean"
  adaptive_p: float = 1.0
  adaptive_eps: float = 0.01
  guidance_w: float = 1.0
  guidance_kappa: float = 0.0
  guidance_t_min: float = 0.0
  guidance_t_max: float = 1.0
  label_dropout: float = 0.1
  jvp_precision: str = "float32"

  DEFAULTS: ClassVar[dict] = dict(
      time_sampler="logit_normal", time_mean=-0.4, time_std=1.0, pair_sampler="sorted",
      r_mean=-0.4, r_std=1.0, fraction_r_equals_t=0.75,
      error_reduction="mean", adaptive_p=1.0, adaptive_eps=0.01, guidance_w=1.0,
      guidance_kappa=0.0, guidance_t_min=0.0, guidance_t_max=1.0, label_dropout=0.1,
      jvp_precision="float32")

  def __post_init__(self):
    _check_choice("time_sampler", self.time_sampler, TIME_SAMPLERS)
    _check_choice("pair_sampler", self.pair_sampler, PAIR_SAMPLERS)
    _check_choice("error_reduction", self.error_reduction, ERROR_REDUCTIONS)
    _check_choice("jvp_precision", self.jvp_precision, JVP_PRECISIONS)
    if getattr(self.model, "time_scale", 1.0) > 10.0:
      logging.warning(
          "MeanFlow with model.time_scale=%g: the target's du/dt runs through the time "
          "embedding, so scaled times scale it too, and training tends to diverge (the "
          "unweighted error grows while the adaptive weight keeps the loss near 1). The official "
          "MeanFlow networks embed raw times: model.time_scale=1.", self.model.time_scale)
    attention = getattr(self.model, "attention_impl", "xla")
    if attention == "cudnn":
      raise ValueError("objective 'meanflow' differentiates the backbone with jax.jvp, and "
                       "model.attention_impl='cudnn' has no JVP rule; set "
                       "model.attention_impl='xla'.")
    if not 0.0 <= self.fraction_r_equals_t <= 1.0:
      raise ValueError(f"objective.fraction_r_equals_t={self.fraction_r_equals_t} must be in "
                       "[0, 1] (0.75 on ImageNet, 0.25 on CIFAR-10).")
    if self.time_std <= 0 or self.r_std <= 0:
      raise ValueError(f"objective.time_std={self.time_std} and objective.r_std={self.r_std} "
                       "must be positive.")
    if self.adaptive_p < 0 or self.adaptive_eps <= 0:
      raise ValueError(f"objective.adaptive_p={self.adaptive_p} must be >= 0 and "
                       f"objective.adaptive_eps={self.adaptive_eps} > 0.")
    if not 0.0 <= self.guidance_kappa < 1.0:
      raise ValueError(f"objective.guidance_kappa={self.guidance_kappa} must be in [0, 1): the "
                       "effective guidance scale is guidance_w / (1 - guidance_kappa).")
    if not 0.0 <= self.guidance_t_min <= self.guidance_t_max <= 1.0:
      raise ValueError(f"objective.guidance_t_min={self.guidance_t_min} and "
                       f"objective.guidance_t_max={self.guidance_t_max} must satisfy "
                       "0 <= guidance_t_min <= guidance_t_max <= 1.")
    if self.guided and self.num_classes <= 0:
      raise ValueError(f"objective.guidance_w={self.guidance_w} and "
                       f"objective.guidance_kappa={self.guidance_kappa} ask for training-time "
                       "guidance, which needs class labels (data.conditional=True); use "
                       "guidance_w=1.0 and guidance_kappa=0.0 for an unconditional model.")

  @classmethod
  def build(cls, config, model, info):
    keys = {key: config[key] for key in cls.DEFAULTS}
    return cls(model=model, image_shape=tuple(info.image_shape), num_classes=info.num_classes,
               **keys)

  @property
  def guided(self) -> bool:
    """Whether training uses guidance (extra network calls); a Python-level switch."""
    return self.guidance_w != 1.0 or self.guidance_kappa != 0.0

  def init(self, rng, batch):
    x = batch["image"][:1]
    cond = common.labels(batch, self.num_classes)
    cond = None if cond is None else cond[:1]
    return common.init_model(self.model, rng, x, 2, cond), {}

  def network(self, params, z, t, h, cond, rng=None, train=False):
    """u_theta(z, (t, h), c): [B, ...] float32; z: [B, ...]; t, h = t - r: [B]; cond: [B] or
    None."""
    return common.apply_model(self.model, params, z, (t, h), cond, rng, train).astype(jnp.float32)

  def sample_time_pairs(self, rng, batch_size: int):
    """(t, r): [B] each, 0 < r <= t < 1; "sorted": t = max and r = min of two draws from the
    time sampler; "separate": t from it, r = min(t, a draw with r_mean, r_std); then r = t for
    each example with probability fraction_r_equals_t."""
    first_key, second_key, equal_key = jax.random.split(rng, 3)
    draw = lambda key, mean, std: common.sample_time(key, (batch_size,), self.time_sampler,
                                                     mean, std)
    a = draw(first_key, self.time_mean, self.time_std)
    if self.pair_sampler == "sorted":
      b = draw(second_key, self.time_mean, self.time_std)
      t, r = jnp.maximum(a, b), jnp.minimum(a, b)
    else:
      t, r = a, jnp.minimum(a, draw(second_key, self.r_mean, self.r_std))
    equal = jax.random.uniform(equal_key, (batch_size,)) < self.fraction_r_equals_t
    return t, jnp.where(equal, t, r)

  def guided_velocity(self, params, z_t, t, v, cond):
    """v_g: [B, ...] float32, no gradient.

    v_g = w v + (1 - w - kappa) u(z_t, t, 0, null) + kappa u(z_t, t, 0, cond) where t is in
    [guidance_t_min, guidance_t_max] and the label is kept; v elsewhere. The network calls run
    without dropout and only when guidance is on. z_t, v: [B, ...]; t: [B]; cond: [B] or None.
    """
    v = v.astype(jnp.float32)
    if not self.guided:
      return v
    zeros = jnp.zeros_like(t)
    null = jnp.full_like(cond, self.num_classes)
    w, kappa = self.guidance_w, self.guidance_kappa
    v_g = w * v + (1.0 - w - kappa) * self.network(params, z_t, t, zeros, null)
    if kappa != 0.0:
      v_g = v_g + kappa * self.network(params, z_t, t, zeros, cond)
    use = (t >= self.guidance_t_min) & (t <= self.guidance_t_max) & (cond != self.num_classes)
    return jax.lax.stop_gradient(jnp.where(paths.expand(use, v), v_g, v))

  def loss(self, params, batch, rng, step, view):
    """MeanFlow loss of a batch {'image': [B, ...], 'label': [B]}."""
    del step, view
    x = batch["image"].astype(jnp.float32)
    time_key, noise_key, drop_key, model_key = jax.random.split(rng, 4)
    t, r = self.sample_time_pairs(time_key, x.shape[0])
    eps = jax.random.normal(noise_key, x.shape, jnp.float32)
    cond = common.drop_labels(common.labels(batch, self.num_classes), drop_key,
                              self.label_dropout, self.num_classes)
    return self.loss_at(params, x, cond, t, r, eps, model_key)

  def loss_at(self, params, x, cond, t, r, eps, rng):
    """The MeanFlow loss at given times and noise.

    x, eps: [B, ...] data and noise; cond: [B] labels (dropped ones already null) or None;
    t, r: [B] with r <= t; rng: dropout key of the training call. z_t = (1 - t) x + t eps,
    v = eps - x, (u, u_tgt) = meanflow_target(u_theta, z_t, t, r, v_g),
    l = mean (or sum) over dims of (u - u_tgt)^2, loss = mean_B l / stop_gradient((l + eps)^p).
    With r = t, p = 0 and no guidance this is flow matching's loss mean_B mean_D (u - v)^2.
    """
    x, eps = x.astype(jnp.float32), eps.astype(jnp.float32)
    path = paths.get("ot")
    z_t = path.interpolate(x, eps, t)
    v = path.velocity(x, eps, t)
    v_g = self.guided_velocity(params, z_t, t, v, cond)
    u_fn = lambda z, t_, r_: self.network(params, z, t_, t_ - r_, cond, rng, train=True)
    u, u_tgt = meanflow_target(u_fn, z_t, t, r, v_g, self.jvp_precision)
    squared = jnp.reshape(jnp.square(u - u_tgt), (x.shape[0], -1))
    error = jnp.mean(squared, axis=1) if self.error_reduction == "mean" else jnp.sum(squared, 1)
    weight = jax.lax.stop_gradient(1.0 / (error + self.adaptive_eps) ** self.adaptive_p)
    metrics = {"mse": jnp.mean(jnp.mean(squared, axis=1)), "t_mean": jnp.mean(t),
               "t_minus_r": jnp.mean(t - r), "r_equals_t": jnp.mean((r == t).astype(jnp.float32))}
    return jnp.mean(weight * error), metrics

  def sample(self, params, rng, num, cond=None, *, num_steps=1, method="euler", guidance=1.0):
    """num samples from z_1 ~ N(0, I) by num_steps uniform steps z_r = z_t - (t - r) u(z_t, t,
    t - r); one step is z_0 = z_1 - u(z_1, 1, 1). cond: [num] labels or None. MeanFlow bakes
    guidance into training, so `guidance` must be 1.0."""
    if guidance != 1.0:
      raise ValueError(f"sample.guidance={guidance}: MeanFlow has no classifier-free guidance at "
                       "inference (it is trained in through objective.guidance_w and "
                       "objective.guidance_kappa); use sample.guidance=1.0.")
    z1 = jax.random.normal(rng, (num,) + self.image_shape, jnp.float32)
    u_fn = lambda z, t, h: self.network(params, z, t, h, cond)
    return mean_flow.solve(u_fn, z1, num_steps, method)
