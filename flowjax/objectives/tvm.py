"""Terminal Velocity Matching (Zhou, Parger, Haque and Song, arXiv:2511.19797): a one- and
few-step flow map trained from scratch by matching its velocity at the terminal time of a jump.

Conventions, which are the paper's and flowjax's alike (Sec. 2, Eq. 1): t = 0 is data, t = 1 is
noise, x_t = (1 - t) x + t eps with eps ~ N(0, I), conditional velocity v = eps - x; a jump goes
from t down to s <= t, so no time is translated.

Parameterisation (Eq. 4, with the scaled form of Sec. 4). One network F_theta(x_t, t, s, c, w)
gives both the displacement of a jump and the instantaneous velocity:
  f_theta(x_t, t, s) = (s - t) w F_theta(x_t, t, s, c, w),      x_s = x_t + f_theta(x_t, t, s),
  u_theta(x_s, s, c, w) = d/ds f_theta(x_s, s, r)|_{r = s} = w F_theta(x_s, s, s, c, w),
with w the classifier-free guidance weight (objective.scaled_param=False drops the factor w).
f_theta(x, t, t) = 0 for any network. The backbone receives the times (t, t - s) (t - s as the
second time, App. F.1) and, when class-conditional, beta = 1 / w as a third (App. F.1, after
Chen et al., arXiv:2501.15420), all in [0, 1] and, as in lumalabs/tvm, embedded raw
(model.time_scale = 1).

Terminal velocity (Eq. 17): d/ds f_theta = w (F_theta + (s - t) dF_theta/ds), dF/ds by one
forward-mode JVP along s in float32 (`scm.directional_derivative`: jax.jvp, or central
differences). Unlike MeanFlow's and sCM's, this derivative carries gradients: the loss is
differentiated through the JVP (Sec. 4); objective.detach_jvp=True stops them (the cheaper,
biased variant of Sec. 7.4).

Loss (Eqs. 12, 14, 15). theta^- is a stop-gradient EMA of theta (the "target EMA", rate 0.99 in
Table 6 and Table 4b; objective.target_ema names it) and sg stops gradients:
  L = E 1/w^2 [ 1_{t > s} || d/ds f_theta(x_t, t, s) - u_{theta^-}(x_hat_s, s, c, w) ||^2
                + || u_theta(x_s', s', c, w) - (w v + (1 - w) u_{theta^-}(x_s', s', null, 1)) ||^2 ]
with x_hat_s = x_t + sg f_theta(x_t, t, s) the model's own jump (the proxy of Eq. 8).
The first term matches the terminal velocity (Eqs. 6-8), the second is flow matching at s'
(Eq. 14; its minimiser is the CFG velocity w u(x, s, c) + (1 - w) u(x, s), App. A.6); with w = 1
the target is v and no extra network call is made. 1/w^2 keeps the loss of guided velocities,
which grow linearly in w, in scale. Squared norms are means over the D dimensions (lumalabs/tvm
`training/wrapper.py`). Where t = s the first term is dropped and the loss is flow matching's
(Eq. 12, App. A.5). Labels are dropped to the null label with probability label_dropout, and a
dropped label trains with w = 1 (Sec. 3).

Times (Sec. 7.3, Table 3; logit-normal LN(mu, sigma) = sigmoid(N(mu, sigma^2))):
  "gap" (the paper's choice): g = t - s ~ LN(gap_mean, gap_std), s ~ LN(s_mean, s_std) truncated
    to s <= 1 - g, t = min(s + g, 1);
  "trunc": t ~ LN(t_mean, t_std), s ~ LN(s_mean, s_std) truncated to s <= t;
  "clamp": t ~ LN(t_mean, t_std), s ~ LN(s_mean, s_std), s = min(s, t);
then s = t for each example with probability fraction_t_equals_s (Table 4d; 0 in Table 6). The
flow-matching time s' is s (fm_time="shared") or an independent LN(s_mean, s_std) draw
(fm_time="separate", the "gap*" sampler of Sec. 4 and 7.3, Table 6).

Guidance weights (App. F.1): "fixed" w = guidance_scale (Table 6: w = 2 and 1.75 on ImageNet-256);
"uniform_beta" beta = 1 / w ~ U(1 / guidance_max, 1 / guidance_min) (the paper's random CFG);
"uniform_w" w ~ U(guidance_min, guidance_max) (lumalabs/tvm `training/loss.py` with min_cfg and
max_cfg).

Sampling (Fig. 3; lumalabs/tvm `generate_images.py`): x <- x + (s - t) w F_theta(x, t, s, c, w)
along a grid from t = 1 (pure noise) to 0, uniform (sample.num_steps steps) or sample.times, with
w = sample.guidance: one step is x_0 = x_1 - w F_theta(x_1, 1, 0, c, w).

Architecture (Sec. 4, App. B, Table 6): the paper's DiT changes are options of the flowjax DiT
(model.norm='rms', qk_norm, modulation_norm, linear_init='spectral', time_init; see
flowjax/models/dit.py). The fused Flash-Attention JVP kernel of App. C is a CUDA/Triton kernel;
here the JVP runs through XLA's attention (model.attention_impl='xla').

Noise: objective.noise='student_t' draws eps from the multivariate Student-t of t-Flow (Pandey et
al., arXiv:2410.14171; `common.draw_noise`) in the loss and as the sampler's start at t = 1; the
terminal-velocity and flow-matching terms are unchanged (the flow map and the conditional
velocity eps - x are properties of the trajectories). flowjax's extension, not part of either
paper.

REPA (config.repa, arXiv:2410.06940; `repa`) aligns the hidden tokens of the jump's forward
F_theta(x_t, t, s, c, w), the primal of the terminal-velocity JVP, whose input x_t is the
noised data (the flow-matching term's forward at (x_s', s') is not aligned).
"""

import dataclasses
import logging
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from flowjax import paths
from flowjax.objectives import common, repa as repa_lib, scm
from flowjax.registry import OBJECTIVES, unknown_name_message
from flowjax.samplers import pushforward

TIME_SAMPLERS = ("gap", "trunc", "clamp")
FM_TIMES = ("separate", "shared")
GUIDANCE_SAMPLERS = ("fixed", "uniform_beta", "uniform_w")
JVP_METHODS = scm.JVP_METHODS
JVP_PRECISIONS = scm.JVP_PRECISIONS
SAMPLE_METHODS = ("uniform",)
# objective.target_ema: the current parameters under stop-gradient (EMA rate 0, Table 4b).
CURRENT_PARAMS = common.CURRENT_PARAMS


def _check_choice(key: str, value: str, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"objective.{key}: " + unknown_name_message(key, value, list(allowed)))


def logit_normal(rng, shape, mean: float, std: float, upper=None):
  """sigmoid(mean + std n), n ~ N(0, 1), truncated to values <= `upper` ([B] in [0, 1]) when it
  is given (inverse-CDF sampling of the normal in logit space). Returns float32 in [0, 1]."""
  if upper is None:
    return jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape, jnp.float32))
  upper = jnp.asarray(upper, jnp.float32)
  bound = (jnp.log(upper) - jnp.log1p(-upper) - mean) / std
  n = jax.random.truncated_normal(rng, -jnp.inf, bound, shape, jnp.float32)
  return jnp.minimum(jax.nn.sigmoid(mean + std * n), upper)


def terminal_velocity(F, x_t, t, s, scale, method: str = "autodiff", step: float = 1e-3,
                      precision: str = "float32", detach: bool = False, has_aux: bool = False):
  """(f, df/ds) of the flow map f(x_t, t, s) = (s - t) scale F(x_t, s) (Eqs. 4 and 17): float32.

  F: (x: [B, ...], s: [B]) -> [B, ...], the network at the fixed start time t; x_t: [B, ...];
  t, s: [B]; scale: [B] (w for the scaled parameterisation, else 1). df/ds = scale (F + (s - t)
  dF/ds) with dF/ds from `scm.directional_derivative` along (0, 1) in (x, s); f and df/ds carry
  gradients (through dF/ds too, unless `detach`). has_aux: F returns ([B, ...], aux), and aux of
  the primal call comes third.
  """
  x_t = jnp.asarray(x_t, jnp.float32)
  F_ts, dF_ds, *aux = scm.directional_derivative(F, x_t, s, jnp.zeros_like(x_t),
                                                 jnp.ones_like(s), method, step, precision,
                                                 has_aux)
  if detach:
    dF_ds = jax.lax.stop_gradient(dF_ds)
  gap = paths.expand(s - t, x_t)
  scale = paths.expand(scale, x_t)
  return (scale * gap * F_ts, scale * (F_ts + gap * dF_ds), *aux)


@OBJECTIVES.register("tvm")
@dataclasses.dataclass(frozen=True)
class TVM:
  """model: backbone F_theta(x, (t, t - s) or (t, t - s, 1 / w), cond); image_shape:
  per-example shape; num_classes: 0 for unconditional models. The other fields are the
  `objective` config keys (see DEFAULTS and the module docstring for the formulas):

  time_sampler ("gap" | "trunc" | "clamp"), gap_mean, gap_std, s_mean, s_std, t_mean, t_std:
    the (t, s) law (Sec. 7.3; gap with (-0.8, 1.0), (-0.4, 1.0) in Table 6; t_mean, t_std serve
    trunc and clamp only, whose best settings in Table 3 are (1.0, 1.0));
  fm_time: "separate" (gap*, s' drawn anew from LN(s_mean, s_std); Table 6) or "shared" (s' = s);
  fraction_t_equals_s: the fraction of examples with s set to t (Table 4d; 0 in Table 6);
  scaled_param: f = (s - t) w F (True, Table 6 for w = 2) or (s - t) F (Table 4c);
  guidance_sampler ("fixed" | "uniform_beta" | "uniform_w"), guidance_scale, guidance_min,
    guidance_max: p(w) (App. F.1); guidance_scale serves "fixed", guidance_min and guidance_max
    the random samplers; w = 1 everywhere (fixed, guidance_scale 1) is training without CFG;
  label_dropout: probability of the null label (index num_classes), trained with w = 1 (0.1);
  target_ema: the EMA of optim.ema_decays that gives theta^- (e.g. "0.99"; "" takes the only one
    kept, an error when there are several; "current": the current parameters under
    stop-gradient, rate 0 in Table 4b);
  jvp ("autodiff" | "finite_difference"), jvp_step, jvp_precision: how dF/ds is computed (see
    `scm.directional_derivative`); detach_jvp: stop the gradient through dF/ds (Sec. 7.4);
  noise, noise_nu: the noise law ("gaussian" or "student_t" with nu degrees of freedom).
  """
  # The unweighted error the trainer logs as "error": the per-dimension mean squared error of
  # the terminal-velocity term (where t > s) plus that of the flow-matching term, averaged over
  # the batch, before the 1/w^2 weight. Without guidance it is the loss itself.
  ERROR_METRIC: ClassVar[str] = "mse"
  model: nn.Module
  image_shape: tuple
  num_classes: int
  time_sampler: str = "gap"
  gap_mean: float = -0.8
  gap_std: float = 1.0
  s_mean: float = -0.4
  s_std: float = 1.0
  t_mean: float = 1.0
  t_std: float = 1.0
  fm_time: str = "separate"
  fraction_t_equals_s: float = 0.0
  scaled_param: bool = True
  guidance_sampler: str = "fixed"
  guidance_scale: float = 1.0
  guidance_min: float = 1.0
  guidance_max: float = 4.0
  label_dropout: float = 0.1
  target_ema: str = ""
  jvp: str = "autodiff"
  jvp_step: float = 1e-3
  jvp_precision: str = "float32"
  detach_jvp: bool = False
  noise: str = "gaussian"
  noise_nu: float = common.DEFAULT_NU
  repa: repa_lib.Alignment | None = None

  DEFAULTS: ClassVar[dict] = dict(
      time_sampler="gap", gap_mean=-0.8, gap_std=1.0, s_mean=-0.4, s_std=1.0, t_mean=1.0,
      t_std=1.0, fm_time="separate", fraction_t_equals_s=0.0, scaled_param=True,
      guidance_sampler="fixed", guidance_scale=1.0, guidance_min=1.0, guidance_max=4.0,
      label_dropout=0.1, target_ema="", jvp="autodiff", jvp_step=1e-3,
      jvp_precision="float32", detach_jvp=False, **common.NOISE_DEFAULTS)

  def __post_init__(self):
    common.check_noise(self.noise, self.noise_nu)
    _check_choice("time_sampler", self.time_sampler, TIME_SAMPLERS)
    _check_choice("fm_time", self.fm_time, FM_TIMES)
    _check_choice("guidance_sampler", self.guidance_sampler, GUIDANCE_SAMPLERS)
    _check_choice("jvp", self.jvp, JVP_METHODS)
    _check_choice("jvp_precision", self.jvp_precision, JVP_PRECISIONS)
    for key in ("gap_std", "s_std", "t_std", "jvp_step"):
      if not getattr(self, key) > 0:
        raise ValueError(f"objective.{key}={getattr(self, key)} must be positive (the paper's "
                         "standard deviations are 1.0; jvp_step defaults to 1e-3).")
    if not 0.0 <= self.fraction_t_equals_s <= 1.0:
      raise ValueError(f"objective.fraction_t_equals_s={self.fraction_t_equals_s} must be in "
                       "[0, 1] (0 in the paper, Table 6).")
    if not 0.0 <= self.label_dropout < 1.0:
      raise ValueError(f"objective.label_dropout={self.label_dropout} must be in [0, 1) (0.1 in "
                       "the paper).")
    if self.guidance_scale < 1.0:
      raise ValueError(f"objective.guidance_scale={self.guidance_scale} must be >= 1: the "
                       "network is given beta = 1 / w in (0, 1] (1 = no guidance; the paper "
                       "trains ImageNet-256 with w = 2 or 1.75).")
    if not 1.0 <= self.guidance_min <= self.guidance_max:
      raise ValueError(f"objective.guidance_min={self.guidance_min} and "
                       f"objective.guidance_max={self.guidance_max} must satisfy 1 <= "
                       "guidance_min <= guidance_max (the range of random w; unused by "
                       "guidance_sampler='fixed').")
    if self.guided and self.num_classes <= 0:
      raise ValueError(f"objective.guidance_sampler={self.guidance_sampler!r} with "
                       f"guidance_scale={self.guidance_scale} asks for classifier-free guidance, "
                       "which needs class labels (data.conditional=True); use "
                       "guidance_sampler='fixed' and guidance_scale=1.0 for an unconditional "
                       "model.")
    if getattr(self.model, "attention_impl", "xla") == "cudnn" and self.jvp == "autodiff":
      raise ValueError("objective 'tvm' differentiates the backbone with jax.jvp, and "
                       "model.attention_impl='cudnn' has no JVP rule; set "
                       "model.attention_impl='xla' (or objective.jvp='finite_difference').")
    if getattr(self.model, "time_scale", 1.0) > 10.0:
      logging.warning(
          "TVM with model.time_scale=%g: dF/ds runs through the embedding of t - s, so scaled "
          "times scale it (and its gradient) too. lumalabs/tvm embeds raw times: "
          "model.time_scale=1.", self.model.time_scale)

  @classmethod
  def build(cls, config, model, info):
    keys = {key: config[key] for key in cls.DEFAULTS}
    return cls(model=model, image_shape=tuple(info.image_shape), num_classes=info.num_classes,
               **keys)

  @property
  def guided(self) -> bool:
    """Whether any example trains with w != 1 (an extra target-network call); Python-level."""
    return self.guidance_sampler != "fixed" or self.guidance_scale != 1.0

  @property
  def num_times(self) -> int:
    """Time inputs of the backbone: (t, t - s), and beta = 1 / w for class-conditional models."""
    return 3 if self.num_classes > 0 else 2

  def init(self, rng, batch):
    x = batch["image"][:1]
    cond = common.labels(batch, self.num_classes)
    cond = None if cond is None else cond[:1]
    params = common.init_model(self.model, rng, x, self.num_times, cond)
    return params, repa_lib.init_extra(self.repa, {})

  def load_extra(self, abstract_extra):
    """REPA's encoder parameters (config.repa with online features), else {}."""
    return repa_lib.load_extra(self.repa, abstract_extra, {})

  # The parameterisation (Eq. 4, Sec. 4).

  def network(self, params, x, t, s, w, cond, rng=None, train=False, capture=False):
    """F_theta(x, (t, t - s[, 1 / w]), c): [B, ...] float32; x: [B, ...]; t, s, w: [B];
    cond: [B] labels or None. With capture, (F, REPA tokens) (`common.apply_model`)."""
    times = (t, t - s) if self.num_classes <= 0 else (t, t - s, 1.0 / w)
    out = common.apply_model(self.model, params, x, times, cond, rng, train, capture)
    if capture:
      return out[0].astype(jnp.float32), out[1]
    return out.astype(jnp.float32)

  def output_scale(self, w):
    """w for the scaled parameterisation, else 1: [B] float32."""
    w = jnp.asarray(w, jnp.float32)
    return w if self.scaled_param else jnp.ones_like(w)

  def flow_map(self, params, x_t, t, s, w, cond, rng=None, train=False):
    """x_s = x_t + (s - t) w F_theta(x_t, t, s, c, w): [B, ...] float32; t, s, w: [B]."""
    x_t = jnp.asarray(x_t, jnp.float32)
    F = self.network(params, x_t, t, s, w, cond, rng, train)
    return x_t + paths.expand((s - t) * self.output_scale(w), x_t) * F

  def velocity(self, params, x, s, w, cond, rng=None, train=False):
    """u_theta(x, s, c, w) = w F_theta(x, s, s, c, w): [B, ...] float32; s, w: [B]."""
    F = self.network(params, x, s, s, w, cond, rng, train)
    return paths.expand(self.output_scale(w), F) * F

  def target_params(self, params, view):
    """theta^-: the EMA named by objective.target_ema (or the current parameters), under
    stop-gradient."""
    return common.ema_target(params, view, self.target_ema, "tvm",
                             "(0.9999, 0.99) with objective.target_ema='0.99', as the paper")

  # Draws.

  def sample_times(self, rng, batch_size: int):
    """(t, s, s_fm): [B] each, 0 <= s <= t <= 1 and s_fm in (0, 1) (see the module docstring)."""
    first_key, second_key, equal_key, fm_key = jax.random.split(rng, 4)
    shape = (batch_size,)
    if self.time_sampler == "gap":
      gap = logit_normal(first_key, shape, self.gap_mean, self.gap_std)
      s = logit_normal(second_key, shape, self.s_mean, self.s_std, upper=1.0 - gap)
      t = jnp.minimum(s + gap, 1.0)
    else:
      t = logit_normal(first_key, shape, self.t_mean, self.t_std)
      upper = t if self.time_sampler == "trunc" else None
      s = jnp.minimum(logit_normal(second_key, shape, self.s_mean, self.s_std, upper), t)
    equal = jax.random.uniform(equal_key, shape) < self.fraction_t_equals_s
    s = jnp.where(equal, t, s)
    s_fm = s if self.fm_time == "shared" else logit_normal(fm_key, shape, self.s_mean, self.s_std)
    return t, s, s_fm

  def sample_guidance(self, rng, batch_size: int, cond):
    """w: [B] float32 >= 1 from p(w) (App. F.1); 1 where the label is null (or cond is None)."""
    shape = (batch_size,)
    if self.guidance_sampler == "fixed":
      w = jnp.full(shape, self.guidance_scale, jnp.float32)
    elif self.guidance_sampler == "uniform_beta":
      w = 1.0 / jax.random.uniform(rng, shape, minval=1.0 / self.guidance_max,
                                   maxval=1.0 / self.guidance_min)
    else:
      w = jax.random.uniform(rng, shape, minval=self.guidance_min, maxval=self.guidance_max)
    if cond is None:
      return jnp.ones(shape, jnp.float32)
    return jnp.where(cond == self.num_classes, 1.0, w).astype(jnp.float32)

  # The loss.

  def guided_target(self, target_params, x_s, s, v, w, cond):
    """w v + (1 - w) u_{theta^-}(x_s, s, null, 1) (Eq. 14): [B, ...] float32, no gradient; v
    itself (no network call) when training without guidance."""
    v = jnp.asarray(v, jnp.float32)
    if not self.guided:
      return v
    null = jnp.full_like(cond, self.num_classes)
    ones = jnp.ones_like(w)
    u_null = self.velocity(target_params, x_s, s, ones, null)
    w_x = paths.expand(w, v)
    return jax.lax.stop_gradient(w_x * v + (1.0 - w_x) * u_null)

  def loss(self, params, batch, rng, step, view):
    """TVM loss of a batch {'image': [B, ...], 'label': [B]}; view: {"ema", ...}."""
    del step
    x = batch["image"].astype(jnp.float32)
    repa_target = repa_lib.target(self.repa, batch, view)
    time_key, noise_key, drop_key, guidance_key, model_key = jax.random.split(rng, 5)
    t, s, s_fm = self.sample_times(time_key, x.shape[0])
    eps = common.draw_noise(noise_key, x.shape, self.noise, self.noise_nu, jnp.float32)
    cond = common.drop_labels(common.labels(batch, self.num_classes), drop_key,
                              self.label_dropout, self.num_classes)
    w = self.sample_guidance(guidance_key, x.shape[0], cond)
    return self.loss_at(params, self.target_params(params, view), x, eps, cond, t, s, s_fm, w,
                        model_key, repa_target)

  def loss_at(self, params, target_params, x, eps, cond, t, s, s_fm, w, rng, repa_target=None):
    """The TVM loss (Eq. 15) at given draws: (loss, metrics).

    params: theta (gradients flow into it); target_params: theta^- (used under stop-gradient);
    x, eps: [B, ...] data and noise; cond: [B] labels (dropped ones null) or None; t, s, s_fm, w:
    [B] with s <= t and w >= 1; rng: the dropout key of theta's calls; repa_target: REPA's
    encoder features of x ([B, h, w, D], `repa.Alignment.target`) or None; given, loss_REPA of
    the jump's forward F_theta(x_t, t, s) is added.
    """
    x, eps = jnp.asarray(x, jnp.float32), jnp.asarray(eps, jnp.float32)
    path = paths.get("ot")
    x_t = path.interpolate(x, eps, t)
    x_fm = path.interpolate(x, eps, s_fm)
    v = path.velocity(x, eps, s_fm)
    capture = repa_target is not None
    if capture:
      F = lambda y, s_: self.network(params, y, t, s_, w, cond, rng, train=True, capture=True)
    else:
      F = lambda y, s_: self.network(params, y, t, s_, w, cond, rng, train=True)
    f, df_ds, *tokens = terminal_velocity(F, x_t, t, s, self.output_scale(w), self.jvp,
                                          self.jvp_step, self.jvp_precision, self.detach_jvp,
                                          has_aux=capture)
    # theta^- and the end point x_t + f both enter under stop-gradient (Eq. 12).
    u_terminal = jax.lax.stop_gradient(self.velocity(target_params, x_t + f, s, w, cond))
    jump = (t > s).astype(jnp.float32)
    terminal = jump * common.mean_per_example(jnp.square(df_ds - u_terminal))
    u = self.velocity(params, x_fm, s_fm, w, cond, rng, train=True)
    target = self.guided_target(target_params, x_fm, s_fm, v, w, cond)
    fm = common.mean_per_example(jnp.square(u - target))
    error = terminal + fm
    loss = jnp.mean(error / jnp.square(w))
    metrics = {"mse": jnp.mean(error), "terminal_mse": jnp.mean(terminal),
               "fm_mse": jnp.mean(fm), "t_mean": jnp.mean(t), "s_mean": jnp.mean(s),
               "t_minus_s": jnp.mean(t - s), "t_equals_s": 1.0 - jnp.mean(jump),
               "w_mean": jnp.mean(w)}
    if capture:
      return self.repa.add(loss, metrics, tokens[0], repa_target)
    return loss, metrics

  # Sampling.

  def sampling_grid(self, num_steps: int, times=()):
    """[num_steps + 1] float32 times from 1 (or sample.times[0]) down to 0: uniform, or
    `times` (decreasing, ending at 0)."""
    if num_steps < 1:
      raise ValueError(f"sample.num_steps={num_steps}: a TVM sampler takes at least one step.")
    if times:
      return jnp.asarray(common.grid_times(times, num_steps, "data"), jnp.float32)
    return pushforward.time_grid("uniform", num_steps, paths.get("ot"), 1.0, 0.0)

  def sample(self, params, rng, num, cond=None, *, num_steps=1, method="uniform", guidance=1.0,
             times=()):
    """num samples: x ~ N(0, I) (or Student-t, objective.noise) at the grid's first time, then
    x <- x + (s - t) w F_theta(x, t, s, c, w) for consecutive grid times t > s (Fig. 3), one
    network call per step, with w = guidance (the network sees beta = 1 / w). cond: [num] labels
    or None. Returns [num, ...] float32."""
    if method not in SAMPLE_METHODS:
      raise ValueError("sample.method: " + unknown_name_message("TVM sampling method", method,
                                                                list(SAMPLE_METHODS)))
    if guidance != 1.0 and self.num_classes <= 0:
      raise ValueError(f"sample.guidance={guidance} needs a class-conditional model (the "
                       "network is trained with beta = 1 / w only then); use "
                       "sample.guidance=1.0.")
    if guidance < 1.0:
      raise ValueError(f"sample.guidance={guidance} must be >= 1 (TVM's network is trained "
                       "on beta = 1 / w in (0, 1]).")
    grid = self.sampling_grid(num_steps, times)
    x1 = common.draw_noise(rng, (num,) + self.image_shape, self.noise, self.noise_nu,
                           jnp.float32)
    w = jnp.full((num,), guidance, jnp.float32)
    flow_map = lambda x, t, s: self.flow_map(params, x, t, s, w, cond)
    return pushforward.pushforward(flow_map, x1, grid)
