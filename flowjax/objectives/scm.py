"""Continuous-time consistency models, sCM (Lu and Song, arXiv:2410.11081): sCT and sCD.

TrigFlow (arXiv:2410.11081, Sec. 3): x_t = cos(t) x_0 + sin(t) z with z ~ N(0, sigma_d^2 I) and
t in [0, pi/2] (t = 0 data, t = pi/2 noise, as flowjax's convention runs). The network
F_theta(x_t / sigma_d, c_noise(t)) gives the consistency function
  f_theta(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t / sigma_d, t),
so f_theta(x, 0) = x for any network; the probability-flow ODE of a diffusion model in the same
parameterisation is dx_t / dt = sigma_d F(x_t / sigma_d, t). The paper uses the identity time
transformation c_noise(t) = t (Sec. 4.1); flowjax hands the backbone u = t / (pi / 2) in [0, 1]
(its time convention), so model.time_scale = pi / 2 embeds exactly c_noise = t, and any other
time_scale is a fixed rescaling of it.

Training (arXiv:2410.11081, Algorithm 1 and Sec. 4.2): draw tau ~ N(P_mean, P_std^2),
t = arctan(e^tau / sigma_d), x_t = cos(t) x_0 + sin(t) z, and
  dx_t / dt = cos(t) z - sin(t) x_0                                  (sCT, from the data),
  dx_t / dt = sigma_d F_teacher(x_t / sigma_d, t)                     (sCD, from a teacher);
then, with F^- = stop_gradient(F_theta) and its time derivative along the trajectory
dF^-/dt = d_x F^- dx_t/dt / sigma_d + d_t F^- (one forward-mode JVP in float32, or central
finite differences), the tangent
  g = -cos^2(t) (sigma_d F^- - dx_t / dt) - r cos(t) sin(t) (x_t + sigma_d dF^-/dt),
which is cos(t) df^-/dt with its second part scaled by the tangent warm-up r = min(1, step / H);
tangent normalisation g <- g / (||g|| + c) (c = 0.1); and the loss with the learned adaptive
weight w_phi(t),
  L = e^{w_phi(t)} / D ||F_theta - F^- - g||^2 - w_phi(t),
whose gradient in theta is that of the continuous-time consistency objective (Sec. 4.2).

The JVP is of F_theta(x / sigma_d, t) in the direction (cos(t) sin(t) dx_t/dt / sigma_d,
cos(t) sin(t)), which gives cos(t) sin(t) dF^-/dt, a quantity bounded as t -> pi/2 (the paper's
"JVP rearrangement": it scales the tangent by cos(t) sin(t) before the JVP rather than after).

The adaptive weight w_phi is a small MLP on a sinusoidal embedding of t, trained jointly with
theta. flowjax's trainer updates one parameter tree with one optimizer, so w_phi's parameters sit
beside the backbone's in that tree under the key `scm_weighting` (WEIGHTING_KEY): the backbone's
own parameter paths stay those of every other objective (sharding rules and conversions apply
unchanged); the key is removed before the backbone is applied.

sCD distils a flowjax flow-matching teacher (objective.teacher_workdir, the OT path
x_s = (1 - s) x_0 + s eps with eps ~ N(0, I) on the data as they are, velocity v = eps - x_0). With
z = sigma_d eps, x_t / (cos t + sigma_d sin t) = (1 - s) x_0 + s eps for
  s = sigma_d sin(t) / (cos(t) + sigma_d sin(t)),     x_ot = x_t / (cos(t) + sigma_d sin(t)),
and the teacher's TrigFlow output is
  F = ((sigma_d cos t - sin t) / sigma_d) x_ot + v(x_ot, s) / (cos t + sigma_d sin t)
(`ot_velocity_to_trigflow`; `trigflow_to_ot_velocity` inverts it). Teacher guidance is
v_u + w (v_c - v_u) of the teacher network (objective.teacher_guidance), so the student learns the
guided flow and samples without guidance.

Initialisation from the teacher (objective.init_from_teacher; arXiv:2410.11081, App. G.2: the
paper starts sCT and sCD from the pretrained diffusion model's EMA weights). The student's
backbone is then the teacher's architecture run as the teacher runs it: a velocity network
v_theta on the OT path, converted exactly as the teacher's is,
  F_theta(x_t / sigma_d, t) = ot_velocity_to_trigflow(v_theta(x_ot, s, cond), x_t, t, sigma_d)
with x_ot = ot_point(x_t, t) and s = ot_time(t) (`SCM.network`, the one place F_theta is
computed for the loss, its JVP or finite differences, `consistency_fn` and the sampler), and on
a fresh start `SCM.initial_params` sets v_theta's weights to the teacher's (train.py re-copies
every EMA from them; w_phi stays freshly initialised; a resumed run keeps its trained weights).
At initialisation the student's F is the teacher's unguided TrigFlow F, and its one-step map
f(x_t, t) = x_ot - s v(x_ot, s) is the teacher's one-step Euler jump to the data; f(x, 0) = x
still holds exactly. config.model must equal the teacher's model section, except
model.attention_impl, model.remat and model.dropout (NON_ARCHITECTURE_FIELDS: they change
neither the weights nor the function outside training).

Sampling (arXiv:2410.11081, Sec. 5): x = f(sigma_d z, t_max) with t_max = arctan(sigma_max /
sigma_d) (sigma_max = 80); each further step re-noises x_t = cos(t) x + sin(t) sigma_d z' and
applies f(x_t, t); two steps go through t_mid = 1.1.

Noise: objective.noise='student_t' draws z = sigma_d eps with eps from the multivariate Student-t
t_D(0, I_D, nu) of Pandey et al. (arXiv:2410.14171; `common.draw_noise`) in the loss, the
sampler's start and its re-noising; sCD then needs a t-Flow teacher with the same noise
(`ctm.check_teacher_noise`), and the TrigFlow <-> OT conversions above hold unchanged (they relate
the two paths of one noise draw). This is flowjax's extension, not in either paper: TrigFlow's
x_t = cos(t) x_0 + sin(t) z keeps the variance sigma_d^2 only for noise of variance sigma_d^2,
and the network's input x_t / sigma_d, the time law and the sampler's t_max = arctan(sigma_max /
sigma_d) are kept as they are although Student-t z has variance sigma_d^2 nu / (nu - 2); sCT's
target velocity cos(t) z - sin(t) x_0 and the consistency tangent are the same formulas with the
Student-t z.

REPA (config.repa, arXiv:2410.06940; `repa`) aligns the hidden tokens of the forward F_theta(x_t /
sigma_d, t) that carries the gradients, the primal of the tangent's JVP (or of its central
differences). With init_from_teacher, REPA's projector starts fresh beside the teacher's weights.
"""

import contextlib
import dataclasses
import logging
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from flowjax import checkpoint, paths
from flowjax.models import layers
from flowjax.objectives import common, ctm, repa as repa_lib
from flowjax.registry import OBJECTIVES, unknown_name_message
from flowjax.samplers import ode

MODES = ("sct", "scd")
JVP_METHODS = ("autodiff", "finite_difference")
JVP_PRECISIONS = ("float32", "default")
TANGENT_NORMALIZATIONS = ("norm", "none")
WEIGHTINGS = ("adaptive", "none")
PRIOR_WEIGHTINGS = ("none", "inverse_tan")
TEACHER_WEIGHTS = ("ema", "params")
SAMPLE_METHODS = ("trigflow",)
# The parameter subtree of the adaptive weight w_phi, beside the backbone's parameters.
WEIGHTING_KEY = "scm_weighting"
HALF_PI = 0.5 * math.pi
# Backbone fields that change neither the parameters nor the function the network computes
# outside training (how attention runs, rematerialisation, the dropout rate): they may differ
# between the teacher and a student initialised from it (the paper's sCD drops the teacher's
# dropout; sCM's JVP needs attention_impl='xla' where a teacher may have trained with cuDNN).
NON_ARCHITECTURE_FIELDS = ("attention_impl", "remat", "dropout")


def _check_choice(key: str, value: str, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"objective.{key}: " + unknown_name_message(key, value, list(allowed)))


def _field_text(value) -> str:
  """A backbone field for messages: dtypes by name, the rest as repr."""
  try:
    if isinstance(value, type) or isinstance(value, jnp.dtype):
      return repr(jnp.dtype(value).name)
  except TypeError:
    pass
  return repr(value)


def architecture_differences(model, teacher_model) -> list[str]:
  """["model.KEY: this run's value -> the teacher's", ...] for the backbone fields (the
  config.model keys) in which `model` differs from `teacher_model`, NON_ARCHITECTURE_FIELDS and
  REPA's fields (its projector sits beside the network, `layers.REPA_FIELDS`) aside; [] when
  they are the same network."""
  if type(model) is not type(teacher_model):
    return [f"model.name: {type(model).__name__} -> {type(teacher_model).__name__} (the "
            "backbone)"]
  out = []
  for field in dataclasses.fields(model):
    name = field.name
    if name in ("parent", "name") + NON_ARCHITECTURE_FIELDS + layers.REPA_FIELDS:
      continue
    mine, theirs = getattr(model, name, None), getattr(teacher_model, name, None)
    if mine != theirs:
      out.append(f"model.{name}: {_field_text(mine)} -> {_field_text(theirs)}")
  return out


# TrigFlow <-> flowjax's OT path (data x_0 as they are, eps ~ N(0, I), z = sigma_d eps).

def ot_time(t, sigma_d: float):
  """s = sigma_d sin(t) / (cos(t) + sigma_d sin(t)): the OT time of TrigFlow time t in [0, pi/2]."""
  return sigma_d * jnp.sin(t) / (jnp.cos(t) + sigma_d * jnp.sin(t))


def trigflow_time(s, sigma_d: float):
  """t = arctan(s / (sigma_d (1 - s))) in [0, pi/2]: the inverse of `ot_time` for s in [0, 1]."""
  return jnp.arctan2(s, sigma_d * (1.0 - s))


def ot_point(x_t, t, sigma_d: float):
  """x_ot = x_t / (cos(t) + sigma_d sin(t)): [B, ...], the OT-path point of TrigFlow's x_t."""
  return x_t / paths.expand(jnp.cos(t) + sigma_d * jnp.sin(t), x_t)


def ot_velocity_to_trigflow(v, x_t, t, sigma_d: float):
  """TrigFlow's F at (x_t, t) from the OT velocity v at (x_ot, s): [B, ...] float32.

  dx_t / dt = sigma_d F with x_t = k(t) x_ot(s(t)), k = cos t + sigma_d sin t and
  ds / dt = sigma_d / k^2, so F = (k' / sigma_d) x_ot + v / k with k' = sigma_d cos t - sin t.
  v, x_t: [B, ...]; t: [B].
  """
  k = paths.expand(jnp.cos(t) + sigma_d * jnp.sin(t), x_t)
  dk = paths.expand(sigma_d * jnp.cos(t) - jnp.sin(t), x_t)
  return dk / sigma_d * (x_t / k) + v / k


def trigflow_to_ot_velocity(F, x_ot, s, sigma_d: float):
  """The OT velocity at (x_ot, s) from TrigFlow's F at the matching (x_t, t): the inverse of
  `ot_velocity_to_trigflow`, v = k (F - (k' / sigma_d) x_ot). F, x_ot: [B, ...]; s: [B]."""
  t = trigflow_time(s, sigma_d)
  k = paths.expand(jnp.cos(t) + sigma_d * jnp.sin(t), x_ot)
  dk = paths.expand(sigma_d * jnp.cos(t) - jnp.sin(t), x_ot)
  return k * (F - dk / sigma_d * x_ot)


# The tangent and its helpers (arXiv:2410.11081, Algorithm 1).

def tangent_warmup(step, warmup_steps: int):
  """r = min(1, step / warmup_steps) (1 when warmup_steps = 0): float32 scalar."""
  if warmup_steps <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)


def tangent(F_minus, cos_sin_dF_dt, x_t, dx_dt, t, sigma_d: float, r):
  """g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r (cos(t) sin(t) x_t + sigma_d cos(t) sin(t) dF^-/dt).

  F_minus, cos_sin_dF_dt, x_t, dx_dt: [B, ...]; t: [B]; r: scalar. Returns [B, ...].
  """
  cos, sin = paths.expand(jnp.cos(t), x_t), paths.expand(jnp.sin(t), x_t)
  return (-cos * cos * (sigma_d * F_minus - dx_dt)
          - r * (cos * sin * x_t + sigma_d * cos_sin_dF_dt))


def normalize_tangent(g, c: float):
  """g / (||g|| + c) per example (arXiv:2410.11081, Sec. 4.2); g: [B, ...]."""
  norm = jnp.sqrt(jnp.sum(jnp.reshape(jnp.square(g), (g.shape[0], -1)), axis=1))
  return g / paths.expand(norm + c, g)


def directional_derivative(fn, y, t, dy, dt, method: str, step: float, precision: str,
                           has_aux: bool = False):
  """(fn(y, t), d/de fn(y + e dy, t + e dt) at e = 0): float32, by forward-mode autodiff
  ("autodiff") or central differences with step `step` ("finite_difference"; the primal is then a
  separate call). y, dy: [B, ...]; t, dt: [B]. The primal carries gradients; the derivative is
  meant to be used under stop_gradient. has_aux: fn returns ([B, ...], aux), and aux of the
  primal call comes third."""
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y, t, dy, dt = f32(y), f32(t), f32(dy), f32(dt)
  if has_aux:
    call = lambda a, b: (lambda out: (f32(out[0]), out[1]))(fn(a, b))
  else:
    call = lambda a, b: f32(fn(a, b))
  with contextlib.ExitStack() as stack:
    if precision != "default":
      stack.enter_context(jax.default_matmul_precision(precision))
    if method == "autodiff":
      return jax.jvp(call, (y, t), (dy, dt), has_aux=has_aux)
    value = lambda out: out[0] if has_aux else out
    plus = value(call(y + step * dy, t + step * dt))
    minus = value(call(y - step * dy, t - step * dt))
    primal = call(y, t)
    derivative = (plus - minus) / (2.0 * step)
    return (primal[0], derivative, primal[1]) if has_aux else (primal, derivative)


class AdaptiveWeight(nn.Module):
  """w_phi(t): [B] -> [B] float32, a two-layer MLP on a sinusoidal embedding of u = t / (pi/2)
  (scaled by 1000 as DiT embeds its times); the output layer starts at zero, so w = 0 at
  initialisation."""
  hidden_size: int = 128
  frequency_size: int = 64

  @nn.compact
  def __call__(self, t):
    u = jnp.asarray(t, jnp.float32) / HALF_PI
    h = layers.timestep_embedding(1000.0 * u, self.frequency_size)
    h = nn.silu(nn.Dense(self.hidden_size, name="hidden")(h))
    return nn.Dense(1, kernel_init=nn.initializers.zeros, name="out")(h)[:, 0]


@OBJECTIVES.register("scm")
@dataclasses.dataclass(frozen=True)
class SCM:
  """model: backbone F_theta(x_t / sigma_d, (t / (pi/2),), cond), or with init_from_teacher the
  velocity v_theta(x_ot, (s,), cond) of `network`; image_shape: per-example shape; num_classes: 0
  for unconditional models; teacher_model, teacher_key: the flow-matching teacher's backbone and
  the subtree of its saved state to load (sCD, or init_from_teacher). The other fields are the
  `objective` config keys:

  mode: "sct" (consistency training: dx_t/dt from the data) or "scd" (distillation from the
    flow-matching run objective.teacher_workdir);
  teacher_workdir, teacher_weights ("ema": its first EMA, or "params"), teacher_guidance: the
    sCD teacher and the classifier-free guidance scale of its velocity (1 = none);
  init_from_teacher: False (default) starts from random weights; True runs the student as the
    teacher (its velocity network through the OT -> TrigFlow conversion, see the module
    docstring) and starts it, on a fresh start only, from the teacher's weights
    (teacher_weights: its EMA or params), as the paper does (App. G.2). config.model must equal
    the teacher's model section (model.attention_impl, remat and dropout aside). sCD and sCT both
    take it; under sCT the teacher_workdir then serves only this initialisation;
  sigma_data: sigma_d, the noise scale (0.5 for images in [-1, 1]);
  p_mean, p_std: tan(t) = e^tau / sigma_d with tau ~ N(p_mean, p_std^2);
  tangent_warmup_steps: H of the warm-up r = min(1, step / H) (0: r = 1 from the start);
  tangent_normalization, tangent_norm_c: "norm" divides g by ||g|| + c per example, "none" keeps
    g;
  weighting, weighting_hidden: "adaptive" learns w_phi (an MLP of that width), "none" fixes
    w = 0;
  prior_weighting: "none", or "inverse_tan" multiplies the weighted term by
    1 / (sigma_d tan t) (the EDM noise level's inverse; an option, not in Algorithm 1);
  jvp ("autodiff" | "finite_difference"), jvp_step: how dF^-/dt is computed, and the central
    difference step along the unit-scaled tangent; jvp_precision: matmul precision of that pass;
  sigma_max, mid_time: the sampler's start t_max = arctan(sigma_max / sigma_d) and the second
    step's time (1.1);
  label_dropout: probability of the null label for the student (the teacher sees true labels);
  noise, noise_nu: the noise law ("gaussian" or "student_t" with nu degrees of freedom; sCD's
    teacher must have the same).
  """
  # The unweighted error the trainer logs as "error": the mean norm of the tangent g before its
  # normalisation, cos(t) df^-/dt (zero at the exact consistency function under sCD; under sCT
  # the one-sample velocity keeps it at the data's spread). The loss and its "mse" (of the
  # normalised tangent, below 1 / D) cannot show a run that drifts away; the raw tangent grows.
  ERROR_METRIC: ClassVar[str] = "tangent_norm"
  model: nn.Module
  image_shape: tuple
  num_classes: int
  teacher_model: Any = None
  teacher_key: tuple = ("params",)
  mode: str = "sct"
  teacher_workdir: str = ""
  teacher_weights: str = "ema"
  teacher_guidance: float = 1.0
  init_from_teacher: bool = False
  sigma_data: float = 0.5
  p_mean: float = -1.0
  p_std: float = 1.4
  tangent_warmup_steps: int = 10_000
  tangent_normalization: str = "norm"
  tangent_norm_c: float = 0.1
  weighting: str = "adaptive"
  weighting_hidden: int = 128
  prior_weighting: str = "none"
  jvp: str = "autodiff"
  jvp_step: float = 1e-3
  jvp_precision: str = "float32"
  sigma_max: float = 80.0
  mid_time: float = 1.1
  label_dropout: float = 0.0
  noise: str = "gaussian"
  noise_nu: float = common.DEFAULT_NU
  repa: repa_lib.Alignment | None = None

  DEFAULTS: ClassVar[dict] = dict(
      mode="sct", teacher_workdir="", teacher_weights="ema", teacher_guidance=1.0,
      init_from_teacher=False, sigma_data=0.5, p_mean=-1.0, p_std=1.4, tangent_warmup_steps=10_000,
      tangent_normalization="norm", tangent_norm_c=0.1, weighting="adaptive",
      weighting_hidden=128, prior_weighting="none", jvp="autodiff", jvp_step=1e-3,
      jvp_precision="float32", sigma_max=80.0, mid_time=1.1, label_dropout=0.0,
      **common.NOISE_DEFAULTS)

  def __post_init__(self):
    common.check_noise(self.noise, self.noise_nu)
    _check_choice("mode", self.mode, MODES)
    _check_choice("teacher_weights", self.teacher_weights, TEACHER_WEIGHTS)
    _check_choice("tangent_normalization", self.tangent_normalization, TANGENT_NORMALIZATIONS)
    _check_choice("weighting", self.weighting, WEIGHTINGS)
    _check_choice("prior_weighting", self.prior_weighting, PRIOR_WEIGHTINGS)
    _check_choice("jvp", self.jvp, JVP_METHODS)
    _check_choice("jvp_precision", self.jvp_precision, JVP_PRECISIONS)
    for key in ("sigma_data", "p_std", "sigma_max", "jvp_step"):
      if getattr(self, key) <= 0:
        raise ValueError(f"objective.{key}={getattr(self, key)} must be positive.")
    if self.tangent_warmup_steps < 0 or self.tangent_norm_c < 0:
      raise ValueError(f"objective.tangent_warmup_steps={self.tangent_warmup_steps} and "
                       f"objective.tangent_norm_c={self.tangent_norm_c} must be >= 0 (paper: "
                       "10000 and 0.1).")
    if not 0.0 < self.mid_time < self.t_max:
      raise ValueError(f"objective.mid_time={self.mid_time} must be in (0, t_max = "
                       f"{self.t_max:.4f}) (paper: 1.1).")
    if self.weighting_hidden < 1:
      raise ValueError(f"objective.weighting_hidden={self.weighting_hidden} must be >= 1.")
    if self.teacher_guidance != 1.0 and self.mode != "scd":
      raise ValueError(f"objective.teacher_guidance={self.teacher_guidance} guides the sCD "
                       "teacher; sCT has none: set objective.mode='scd' or teacher_guidance=1.0.")
    if self.teacher_guidance != 1.0 and self.num_classes <= 0:
      raise ValueError(f"objective.teacher_guidance={self.teacher_guidance} needs class labels "
                       "(data.conditional=True); use teacher_guidance=1.0.")
    if self.init_from_teacher and self.teacher_model is not None:
      differences = architecture_differences(self.model, self.teacher_model)
      if differences:
        raise ValueError(
            "objective.init_from_teacher=True runs the student as the teacher's network and "
            "starts it from the teacher's weights, so config.model must equal the teacher's "
            "model section (objective.teacher_workdir's config.json; model.attention_impl, "
            "model.remat and model.dropout may differ). These keys differ (this run -> the "
            "teacher):\n  "
            + "\n  ".join(differences) + "\nSet them to the teacher's values (e.g. "
            "--config.model.KEY=VALUE), or set objective.init_from_teacher=False to train the "
            "student from random weights.")
    if getattr(self.model, "attention_impl", "xla") == "cudnn" and self.jvp == "autodiff":
      raise ValueError("objective 'scm' differentiates the backbone with jax.jvp, and "
                       "model.attention_impl='cudnn' has no JVP rule; set "
                       "model.attention_impl='xla' (or objective.jvp='finite_difference').")

  @classmethod
  def build(cls, config, model, info):
    keys = {key: config[key] for key in cls.DEFAULTS}
    teacher_model, teacher_key = None, ("params",)
    if config.mode == "scd" or config.init_from_teacher:
      method = "sCD" if config.mode == "scd" else "objective.init_from_teacher"
      teacher_model, teacher_key = ctm.read_teacher(config.teacher_workdir, info,
                                                    config.teacher_weights, method=method)
      if config.mode == "scd":
        ctm.check_teacher_noise(config.teacher_workdir, config.noise, config.noise_nu, "sCD")
    elif config.teacher_workdir:
      logging.warning("objective.teacher_workdir=%r is unused: objective.mode='sct' trains "
                      "without a teacher (objective.init_from_teacher=True would start from "
                      "it).", config.teacher_workdir)
    return cls(model=model, image_shape=tuple(info.image_shape), num_classes=info.num_classes,
               teacher_model=teacher_model, teacher_key=teacher_key, **keys)

  @property
  def t_max(self) -> float:
    """arctan(sigma_max / sigma_d): the sampler's first time."""
    return math.atan(self.sigma_max / self.sigma_data)

  # State: backbone and w_phi parameters in one tree; the sCD teacher in `extra`.

  def init(self, rng, batch):
    """(params, extra): params are the backbone's with w_phi's under WEIGHTING_KEY (when
    objective.weighting='adaptive'); extra is {"teacher": placeholders} for sCD, filled by
    `load_extra` from objective.teacher_workdir, else {}. With init_from_teacher,
    `initial_params` then replaces the backbone's random weights by the teacher's."""
    if (self.mode == "scd" or self.init_from_teacher) and self.teacher_model is None:
      why = "objective.mode='scd'" if self.mode == "scd" else "objective.init_from_teacher=True"
      raise ctm.TeacherError(f"{why} has no teacher model; build the objective "
                             "with flowjax.objectives.build from a config whose "
                             "objective.teacher_workdir names a flow-matching run.")
    x = batch["image"][:1]
    cond = common.labels(batch, self.num_classes)
    cond = None if cond is None else cond[:1]
    model_key, weight_key, teacher_key = jax.random.split(rng, 3)
    params = common.init_model(self.model, model_key, x, 1, cond)
    if WEIGHTING_KEY in params:
      raise ValueError(f"The backbone has a parameter named {WEIGHTING_KEY!r}, the key sCM keeps "
                       "its adaptive weight under; rename that layer.")
    if self.weighting == "adaptive":
      params = {**params, WEIGHTING_KEY: self.weight_module().init(
          weight_key, jnp.zeros((1,), jnp.float32))["params"]}
    extra = {}
    if self.mode == "scd":
      extra = {"teacher": common.init_model(self.teacher_model, teacher_key, x, 1, cond)}
    return params, repa_lib.init_extra(self.repa, extra)

  def load_extra(self, abstract_extra):
    """{"teacher": the teacher's saved weights} for sCD (fresh starts only; see train.py), with
    REPA's encoder parameters (config.repa with online features)."""
    if self.mode != "scd":
      return repa_lib.load_extra(self.repa, abstract_extra, {})
    teacher = ctm.load_teacher(self, abstract_extra, "sCD")
    return repa_lib.load_extra(self.repa, abstract_extra, {"teacher": teacher})

  def initial_params(self, params, extra):
    """The parameters of a fresh start: `params` unchanged, or with objective.init_from_teacher
    the backbone's replaced by the teacher's weights (sCD: the ones `load_extra` put in
    extra["teacher"]; sCT: read from objective.teacher_workdir), w_phi's and REPA's projector's
    kept as initialised.
    New arrays with `params`' shardings. train.restore_or_init calls this after `load_extra` on
    fresh starts only (a resumed run keeps its trained weights) and copies the result into every
    EMA."""
    if not self.init_from_teacher:
      return params
    kept = (WEIGHTING_KEY, layers.REPA_PROJECTOR)
    backbone = {key: value for key, value in params.items() if key not in kept}
    shardings = jax.tree.map(lambda leaf: leaf.sharding, backbone)
    if self.mode == "scd":
      teacher, where = extra["teacher"], "the loaded sCD teacher"
    else:
      abstract = jax.tree.map(
          lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding),
          backbone)
      teacher, step = checkpoint.restore_params(self.teacher_workdir, abstract,
                                                key=self.teacher_key,
                                                source="objective.teacher_workdir",
                                                skip=(layers.REPA_PROJECTOR,))
      where = f"step {step}"
    describe = lambda tree: jax.tree.map(lambda leaf: (leaf.shape, str(leaf.dtype)), tree)
    if describe(teacher) != describe(backbone):
      raise ValueError("objective.init_from_teacher: the teacher's parameters (from "
                       f"{self.teacher_workdir!r}) do not have the student backbone's names, "
                       "shapes and dtypes; use a teacher of this run's config.model.")
    copied = jax.device_put(teacher, shardings, may_alias=False)
    logging.info("Initialised the sCM student from the teacher's %s in %s (%s).",
                 "/".join(self.teacher_key), self.teacher_workdir, where)
    return {**copied, **{k: v for k, v in params.items() if k in kept}}

  def weight_module(self) -> AdaptiveWeight:
    return AdaptiveWeight(hidden_size=self.weighting_hidden)

  @staticmethod
  def backbone_params(params):
    """The backbone's parameters: `params` without w_phi's."""
    return {key: value for key, value in params.items() if key != WEIGHTING_KEY}

  def adaptive_weight(self, params, t):
    """w_phi(t): [B] float32 (zeros when objective.weighting='none')."""
    if self.weighting == "none":
      return jnp.zeros_like(t, dtype=jnp.float32)
    return self.weight_module().apply({"params": params[WEIGHTING_KEY]}, t)

  # The TrigFlow parameterisation.

  def network(self, params, x_scaled, t, cond, rng=None, train=False, capture=False):
    """F_theta(x_t / sigma_d, t): [B, ...] float32; x_scaled = x_t / sigma_d: [B, ...]; t: [B] in
    [0, pi/2], handed to the backbone as u = t / (pi/2). With objective.init_from_teacher the
    backbone is a velocity network run as the teacher is, on (ot_point(x_t, t), ot_time(t)),
    and F is its velocity through `ot_velocity_to_trigflow`. Every F_theta of the loss, its
    tangent, `consistency_fn` and the sampler comes from here. With capture, (F, REPA tokens)
    (`common.apply_model`)."""
    backbone = self.backbone_params(params)
    tokens = None
    if not self.init_from_teacher:
      out = common.apply_model(self.model, backbone, x_scaled, (t / HALF_PI,), cond, rng, train,
                               capture)
      if capture:
        out, tokens = out
      out = out.astype(jnp.float32)
    else:
      x_t = self.sigma_data * jnp.asarray(x_scaled, jnp.float32)
      v = common.apply_model(self.model, backbone, ot_point(x_t, t, self.sigma_data),
                             (ot_time(t, self.sigma_data),), cond, rng, train, capture)
      if capture:
        v, tokens = v
      out = ot_velocity_to_trigflow(v.astype(jnp.float32), x_t, t, self.sigma_data)
    return (out, tokens) if capture else out

  def parameterize(self, x_t, F, t):
    """f = cos(t) x_t - sin(t) sigma_d F: [B, ...]; f(x, 0) = x exactly."""
    x_t = x_t.astype(jnp.float32)
    return (paths.expand(jnp.cos(t), x_t) * x_t
            - paths.expand(jnp.sin(t), x_t) * self.sigma_data * F)

  def consistency_fn(self, params, x_t, t, cond, rng=None, train=False):
    """f_theta(x_t, t): [B, ...] float32, the data end of x_t's PF-ODE trajectory."""
    F = self.network(params, x_t.astype(jnp.float32) / self.sigma_data, t, cond, rng, train)
    return self.parameterize(x_t, F, t)

  # The teacher (sCD).

  def teacher_trigflow(self, teacher_params, x_t, t, cond):
    """The teacher's (guided) TrigFlow output F(x_t / sigma_d, t) from its OT velocity:
    [B, ...] float32; x_t: [B, ...]; t: [B]; cond: true labels or None."""
    fn = lambda x, s, c: common.apply_model(self.teacher_model, teacher_params, x, (s,), c)
    velocity = ode.guided(fn, cond, self.teacher_guidance, self.num_classes)
    x_t = x_t.astype(jnp.float32)
    v = velocity(ot_point(x_t, t, self.sigma_data), ot_time(t, self.sigma_data))
    return ot_velocity_to_trigflow(v.astype(jnp.float32), x_t, t, self.sigma_data)

  # Training.

  def sample_times(self, rng, batch_size: int):
    """t = arctan(e^tau / sigma_d), tau ~ N(p_mean, p_std^2): [B] in (0, pi/2)."""
    tau = self.p_mean + self.p_std * jax.random.normal(rng, (batch_size,), jnp.float32)
    return jnp.arctan(jnp.exp(tau) / self.sigma_data)

  def loss(self, params, batch, rng, step, view):
    """sCM loss of a batch {'image': [B, ...], 'label': [B]}; view: {"extra", ...}."""
    x = batch["image"].astype(jnp.float32)
    repa_target = repa_lib.target(self.repa, batch, view)
    time_key, noise_key, drop_key, model_key = jax.random.split(rng, 4)
    t = self.sample_times(time_key, x.shape[0])
    z = self.sigma_data * common.draw_noise(noise_key, x.shape, self.noise, self.noise_nu,
                                            jnp.float32)
    labels = common.labels(batch, self.num_classes)
    cond = common.drop_labels(labels, drop_key, self.label_dropout, self.num_classes)
    teacher = view["extra"]["teacher"] if self.mode == "scd" else None
    return self.loss_at(params, x, z, t, cond, labels, teacher, step, model_key, repa_target)

  def trajectory_velocity(self, teacher_params, x0, z, x_t, t, teacher_cond):
    """dx_t/dt: cos(t) z - sin(t) x_0 (sCT) or sigma_d F_teacher(x_t / sigma_d, t) (sCD), no
    gradient. x0, z, x_t: [B, ...]; t: [B]."""
    if self.mode == "sct":
      return paths.expand(jnp.cos(t), x0) * z - paths.expand(jnp.sin(t), x0) * x0
    F = self.teacher_trigflow(jax.lax.stop_gradient(teacher_params), x_t, t, teacher_cond)
    return jax.lax.stop_gradient(self.sigma_data * F)

  def tangent_at(self, params, x0, z, t, cond, teacher_cond, teacher_params, step, rng,
                 capture=False):
    """(F_theta, g) at given data x0, noise z ~ N(0, sigma_d^2 I) ([B, ...] each) and times t
    ([B] in (0, pi/2)): F_theta(x_t / sigma_d, t) with gradients and the tangent g before its
    normalisation (`tangent`, with cos(t) sin(t) dF^-/dt from `directional_derivative` along
    (cos(t) sin(t) dx_t/dt / sigma_d, cos(t) sin(t))), both float32 [B, ...]. cond: student
    labels (dropped ones null) or None; teacher_cond: true labels or None; rng: dropout key
    shared by F_theta and its derivative. With capture, F_theta's REPA tokens come third."""
    x0, z = x0.astype(jnp.float32), z.astype(jnp.float32)
    cos, sin = paths.expand(jnp.cos(t), x0), paths.expand(jnp.sin(t), x0)
    x_t = cos * x0 + sin * z
    dx_dt = self.trajectory_velocity(teacher_params, x0, z, x_t, t, teacher_cond)
    cos_sin = jnp.cos(t) * jnp.sin(t)
    if capture:
      F_fn = lambda y, tt: self.network(params, y, tt, cond, rng, train=True, capture=True)
    else:
      F_fn = lambda y, tt: self.network(params, y, tt, cond, rng, train=True)
    F, cos_sin_dF_dt, *tokens = directional_derivative(
        F_fn, x_t / self.sigma_data, t, paths.expand(cos_sin, x0) * dx_dt / self.sigma_data,
        cos_sin, self.jvp, self.jvp_step, self.jvp_precision, has_aux=capture)
    r = tangent_warmup(step, self.tangent_warmup_steps)
    g = tangent(jax.lax.stop_gradient(F), jax.lax.stop_gradient(cos_sin_dF_dt), x_t, dx_dt, t,
                self.sigma_data, r)
    return (F, g, *tokens)

  def loss_at(self, params, x0, z, t, cond, teacher_cond, teacher_params, step, rng,
              repa_target=None):
    """The sCM loss mean_B [lambda(t) e^{w_phi(t)} / D ||F_theta - F^- - g||^2 - w_phi(t)] at given
    draws (see `tangent_at`), lambda = 1 or 1 / (sigma_d tan t) (objective.prior_weighting), g
    normalised when objective.tangent_normalization='norm'. Returns (loss, metrics).
    repa_target: REPA's encoder features of x0 ([B, h, w, D], `repa.Alignment.target`) or None;
    given, loss_REPA of F_theta's forward (the primal of the JVP) is added."""
    F, g, *tokens = self.tangent_at(params, x0, z, t, cond, teacher_cond, teacher_params, step,
                                    rng, capture=repa_target is not None)
    g_norm = jnp.sqrt(jnp.sum(jnp.reshape(jnp.square(g), (g.shape[0], -1)), axis=1))
    if self.tangent_normalization == "norm":
      g = normalize_tangent(g, self.tangent_norm_c)
    error = common.mean_per_example(jnp.square(F - jax.lax.stop_gradient(F) - g))
    w = self.adaptive_weight(params, t)
    prior = jnp.ones_like(t)
    if self.prior_weighting == "inverse_tan":
      prior = 1.0 / (self.sigma_data * jnp.tan(t))
    loss = jnp.mean(prior * jnp.exp(w) * error - w)
    metrics = {"mse": jnp.mean(error), "tangent_norm": jnp.mean(g_norm),
               "tangent_warmup": tangent_warmup(step, self.tangent_warmup_steps),
               "weight_mean": jnp.mean(w), "t_mean": jnp.mean(t)}
    if repa_target is None:
      return loss, metrics
    return self.repa.add(loss, metrics, tokens[0], repa_target)

  # Sampling.

  def sampling_times(self, num_steps: int, times=()):
    """[num_steps] TrigFlow times of the evaluations: from `times` (num_steps + 1 decreasing
    flowjax times u in [0, 1] ending at 0, t = u pi/2), else t_max then, for two or more steps,
    num_steps - 1 times evenly spaced from mid_time down (exclusive of 0): two steps are
    (t_max, 1.1)."""
    if times:
      times = common.grid_times(times, num_steps, "u = t / (pi/2)")
      return [HALF_PI * u for u in times[:-1]]
    rest = [self.mid_time * (num_steps - 1 - i) / (num_steps - 1) for i in range(num_steps - 1)]
    return [self.t_max] + rest

  def sample(self, params, rng, num, cond=None, *, num_steps=1, method="trigflow", guidance=1.0,
             times=()):
    """num samples: x = f(sigma_d z, t_0), then x = f(cos(t_i) x + sin(t_i) sigma_d z_i, t_i) for
    the later times of `sampling_times` (one network call per step). cond: [num] labels or None.
    sCD distils the teacher's guidance, so `guidance` must be 1.0. Returns [num, ...] float32."""
    if method not in SAMPLE_METHODS:
      raise ValueError("sample.method: " + unknown_name_message("sCM sampling method", method,
                                                                list(SAMPLE_METHODS)))
    if guidance != 1.0:
      raise ValueError(f"sample.guidance={guidance}: sCM samples without classifier-free "
                       "guidance (sCD distils the teacher's, objective.teacher_guidance); use "
                       "sample.guidance=1.0.")
    if num_steps < 1:
      raise ValueError(f"sample.num_steps={num_steps}: sCM sampling takes at least one step.")
    shape = (num,) + self.image_shape
    keys = jax.random.split(rng, num_steps)
    t = jnp.asarray(self.sampling_times(num_steps, times), jnp.float32)
    noise = lambda key: self.sigma_data * common.draw_noise(key, shape, self.noise,
                                                            self.noise_nu, jnp.float32)
    x = self.consistency_fn(params, noise(keys[0]), jnp.full((num,), t[0]), cond)

    def step(x, key_and_time):  # the later steps: one compiled network call in a scan
      key, t_i = key_and_time
      x_t = jnp.cos(t_i) * x + jnp.sin(t_i) * noise(key)
      return self.consistency_fn(params, x_t, jnp.full((num,), t_i), cond), None

    return jax.lax.scan(step, x, (keys[1:], t[1:]))[0]
