"""MeanFlow (Geng, Deng, Bai, Kolter and He, 2025): a one-step average-velocity model.

The network u_theta(z_t, (t, h = t - r), y) estimates the average velocity
u(z_t, r, t) = 1 / (t - r) int_r^t v(z_tau, tau) dtau, which obeys the MeanFlow identity
u = v - (t - r) du/dt with du/dt = v . d_z u + d_t u (Geng et al., arXiv:2505.13447). Training
regresses u_theta on stop_gradient(v_g - clip(t - r, 0, 1) du_theta/dt), with du_theta/dt from
one forward-mode JVP (float32) along the tangent (v_g, 1, 0) of (z_t, t, r).
objective.variant='imf' is improved MeanFlow (Geng, Lu, Wu, Shechtman, Kolter and He,
arXiv:2512.02012): the same identity read as a regression on the velocity, the network's own
velocity as the JVP tangent, and the guidance scale (and interval) as network inputs; see
`MeanFlow` and `imf_prediction`.
flowjax conventions: t = 0 is data, t = 1 is noise, z_t = (1 - t) x + t eps with
eps ~ N(0, I), v = eps - x; times go to the backbone in [0, 1] (its time_scale applies 1000).
objective.noise='student_t' draws eps, for both variants, from the multivariate Student-t of
t-Flow (Pandey et al., arXiv:2410.14171; `common.draw_noise`) in the loss and as the sampler's
z_1. The MeanFlow identity holds for any noise law (it is a property of the trajectories z_t), so
the targets are unchanged; pairing it with Student-t noise is flowjax's extension, not part of
either paper.

REPA (config.repa, arXiv:2410.06940; `repa`) aligns the hidden tokens of the training forward
u_theta(z_t, t, r, c) whose JVP gives the target (MeanFlow) or the compound prediction (iMF): the
function differentiated returns them beside u, and the primal tokens enter the REPA term.
"""

import contextlib
import dataclasses
import logging
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from flowjax import paths
from flowjax.objectives import common, repa as repa_lib
from flowjax.registry import OBJECTIVES, unknown_name_message
from flowjax.samplers import mean_flow

TIME_SAMPLERS = ("logit_normal", "uniform")
PAIR_SAMPLERS = ("sorted", "separate")
ERROR_REDUCTIONS = ("mean", "sum")
JVP_PRECISIONS = ("float32", "default")
VARIANTS = ("meanflow", "imf")
IMF_VELOCITIES = ("boundary", "head")
# The keys only objective.variant='imf' reads, at their defaults.
IMF_DEFAULTS = dict(imf_velocity="boundary", guidance_scale_max=1.0, guidance_scale_beta=1.0,
                    guidance_interval=True)
# iMF's training guidance intervals: t_min ~ U[0, 0.5], t_max ~ U[0.5, 1] (arXiv:2512.02012;
# Lyy-iiis/imeanflow `imf.py` `sample_cfg_interval`); examples with r = t keep [0, 1].
GUIDANCE_T_MIN_RANGE = (0.0, 0.5)
GUIDANCE_T_MAX_RANGE = (0.5, 1.0)


def _check_choice(key: str, value: str, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"objective.{key}: " + unknown_name_message(key, value, list(allowed)))


def _jvp(fn, primals, tangents, precision: str, has_aux: bool = False):
  """jax.jvp under the matmul precision `precision` ("default": the surrounding one)."""
  with contextlib.ExitStack() as stack:
    if precision != "default":
      stack.enter_context(jax.default_matmul_precision(precision))
    return jax.jvp(fn, primals, tangents, has_aux=has_aux)


def meanflow_target(average_velocity, z_t, t, r, v_g, precision: str = "float32",
                    has_aux: bool = False):
  """(u, u_tgt) of the MeanFlow identity for an average-velocity function, all float32.

  average_velocity: (z: [B, ...], t: [B], r: [B]) -> [B, ...]; z_t, v_g: [B, ...]; t, r: [B]
  with r <= t. (u, du/dt) = jvp(average_velocity, (z_t, t, r), (v_g, 1, 0)) and
  u_tgt = stop_gradient(v_g - clip(t - r, 0, 1) du/dt). u carries gradients; u_tgt does not.
  precision: the matmul precision of the JVP pass ("float32": full float32 products for float32
  networks also where the backend would use TensorFloat-32 or bfloat16 passes; "default": the
  surrounding setting, train.matmul_precision).
  has_aux: average_velocity returns ([B, ...], aux) and this returns (u, u_tgt, aux), aux at the
  primal point.
  """
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  z_t, t, r, v_g = f32(z_t), f32(t), f32(r), f32(v_g)
  tangents = (v_g, jnp.ones_like(t), jnp.zeros_like(r))
  if has_aux:
    u_fn = lambda z, t_, r_: (lambda out: (f32(out[0]), out[1]))(average_velocity(z, t_, r_))
    u, du_dt, aux = _jvp(u_fn, (z_t, t, r), tangents, precision, has_aux=True)
  else:
    u_fn = lambda z, t_, r_: f32(average_velocity(z, t_, r_))
    u, du_dt = _jvp(u_fn, (z_t, t, r), tangents, precision)
  u_tgt = v_g - paths.expand(jnp.clip(t - r, 0.0, 1.0), z_t) * du_dt
  if has_aux:
    return u, jax.lax.stop_gradient(u_tgt), aux
  return u, jax.lax.stop_gradient(u_tgt)


def imf_prediction(average_velocity, z_t, t, r, v_theta, precision: str = "float32",
                   has_aux: bool = False):
  """(V, aux): improved MeanFlow's compound velocity prediction, float32.

  V = u(z_t, t, r) + (t - r) stop_gradient(du/dt) with (u, du/dt) = jvp(average_velocity,
  (z_t, t, r), (v_theta, 1, 0)) (arXiv:2512.02012; Lyy-iiis/imeanflow `imf.py`
  `iMeanFlow.forward`): the MeanFlow identity solved for the instantaneous velocity,
  v = u + (t - r) du/dt, whose total derivative runs along the network's own velocity
  v_theta(z_t) rather than the sample's e - x (MeanFlow's tangent), so V depends on z_t alone.
  V carries gradients through u only.
  average_velocity: (z: [B, ...], t: [B], r: [B]) -> [B, ...], or with has_aux ([B, ...], aux)
  whose aux (at the primal point) is returned; z_t, v_theta: [B, ...]; t, r: [B], r <= t.
  precision: as `meanflow_target`. Without has_aux, aux is None.
  """
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  z_t, t, r = f32(z_t), f32(t), f32(r)
  v_theta = jax.lax.stop_gradient(f32(v_theta))
  if has_aux:
    u_fn = lambda z, t_, r_: (lambda out: (f32(out[0]), out[1]))(average_velocity(z, t_, r_))
  else:
    u_fn = lambda z, t_, r_: (f32(average_velocity(z, t_, r_)), None)
  u, du_dt, aux = _jvp(u_fn, (z_t, t, r), (v_theta, jnp.ones_like(t), jnp.zeros_like(r)),
                       precision, has_aux=True)
  return u + paths.expand(t - r, z_t) * jax.lax.stop_gradient(du_dt), aux


def sample_guidance_scale(rng, shape, scale_max: float, beta: float):
  """omega in [1, scale_max] with density proportional to omega^-beta (arXiv:2512.02012;
  Lyy-iiis/imeanflow `imf.py` `sample_cfg_scale`, which draws s in [0, scale_max - 1] and sets
  omega = 1 + s), float32: the inverse CDF at u ~ U(0, 1), omega = scale_max^u for beta = 1 and
  (1 + u (scale_max^(1 - beta) - 1))^(1 / (1 - beta)) otherwise."""
  u = jax.random.uniform(rng, shape, jnp.float32)
  if beta == 1.0:
    return jnp.exp(u * jnp.log(jnp.float32(scale_max)))
  exponent = 1.0 - beta
  return (1.0 + u * (scale_max ** exponent - 1.0)) ** (1.0 / exponent)


@OBJECTIVES.register("meanflow")
@dataclasses.dataclass(frozen=True)
class MeanFlow(common.Conditioned):
  """model: backbone u_theta(z, (t, t - r), cond), with iMF's guidance conditioning
  u_theta(z, (t, t - r, 1 - 1/omega, t_min, t_max), cond) (arXiv:2512.02012; the official
  network, Lyy-iiis/imeanflow `models/mit.py` `_build_sequence`, conditions on h = t - r, not on
  t, with 1 - 1/omega, t_min and t_max; flowjax also passes t);
  image_shape: per-example shape; num_classes: 0 for unconditional models. The other fields are
  the `objective` config keys (see DEFAULTS):

  time_sampler, time_mean, time_std, pair_sampler, r_mean, r_std: "sorted" pairs (MeanFlow's,
    py-meanflow's "v0") take t and r as the max and min of two draws of
    sigmoid(time_mean + time_std n) ("logit_normal") or U(0, 1) ("uniform"); "separate" pairs
    (py-meanflow's "v1") draw t from that law and r_raw from sigmoid(r_mean + r_std n) (or
    U(0, 1)), r = min(t, r_raw);
  fraction_r_equals_t: the fraction of examples whose r is then set to t (plain flow matching
    examples); 0.75 is MeanFlow's ImageNet setting (CIFAR-10 uses 0.25). iMF's official code
    uses 0.5 (Lyy-iiis/imeanflow `imf.py` `sample_tr`, `configs/default.py` data_proportion)
    and sets r = t for exactly the first half of each batch; flowjax draws r = t per example
    with probability fraction_r_equals_t in both variants;
  error_reduction: the per-example error l is the "mean" (as in flow_matching, the default) or
    the "sum" (MeanFlow, and iMF's `imf.py`) of (u - u_tgt)^2 over the example's D dims. The
    adaptive weight makes the two differ beyond scale: "mean" with adaptive_eps equals "sum"
    with D adaptive_eps;
  adaptive_p, adaptive_eps: loss = mean(l / stop_gradient((l + adaptive_eps)^adaptive_p)); p = 0
    is the plain squared error;
  guidance_w, guidance_kappa, guidance_t_min, guidance_t_max: training-time guidance,
    v_g = w v + (1 - w - kappa) u(z_t, t, 0, null) + kappa u(z_t, t, 0, y) for t in
    [t_min, t_max] and kept labels (effective scale w / (1 - kappa)); w = 1, kappa = 0 is off.
    With variant="imf", guidance_w and guidance_kappa stay 1 and 0, and [guidance_t_min,
    guidance_t_max] is the guidance interval the sampler passes to the network (below);
  label_dropout: probability of the null label (index num_classes; a text model: the null
    caption) during training;
  jvp_precision: matmul precision of the JVP pass (see `meanflow_target`; "float32" by default, so
    the target's derivative is float32 on GPUs and TPUs too; "default" follows
    train.matmul_precision);
  variant: "meanflow" (arXiv:2505.13447, the default) or "imf", improved MeanFlow (official
    code Lyy-iiis/imeanflow). iMF regresses the compound prediction V = u + (t - r) sg(du/dt) on
    the (guided) velocity, l = |V - v_g|^2 (`imf.py` `iMeanFlow.forward`; see
    `imf_prediction`), with du/dt the JVP along the network's own instantaneous velocity
    v_theta(z_t, t) instead of e - x. The adaptive weight applies to l as above (`imf.py`: sums
    over dims, p = 1, eps 0.01). u - u_tgt of MeanFlow is V - v_g with the tangent v_g, so the
    logged "mse" means the same in both variants: the mean squared residual of the MeanFlow
    identity against the velocity target, before any weight;
  imf_velocity: where iMF's v_theta comes from: "boundary", the boundary condition
    v_theta(z_t, t) = u_theta(z_t, t, t) (no extra parameters), or "head", the backbone's
    auxiliary velocity head at h = 0 (model.name='imf_dit' with model.aux_head_depth > 0), itself
    trained by the same weighted loss on |v_theta - v_g|^2 with its own adaptive weight (both:
    `imf.py` `iMeanFlow.forward`);
  guidance_scale_max, guidance_scale_beta: iMF's guidance as a network input (the guidance
    scale as an explicit conditioning variable): with guidance_scale_max > 1 each example draws
    omega in [1, guidance_scale_max] with density proportional to omega^-guidance_scale_beta
    (`imf.py` `sample_cfg_scale`: [1, 8]) and the backbone receives 1 - 1/omega as an extra
    time-like input (`models/mit.py` `_build_sequence`); the target (`imf.py` `guidance_fn`) is
    v_g = v + (1 - 1/omega') (v_theta(z_t, t | y, omega') - v_theta(z_t, t | null, 1)), whose fixed
    point is the guided field omega v(.|y) + (1 - omega) v(.), for kept labels (v for null ones),
    where omega' = omega for t in the example's guidance interval and 1 outside it.
    guidance_scale_max = 1 trains no guidance (the network gets no guidance input);
  guidance_interval: with guidance_scale_max > 1, also draw the guidance interval, t_min ~
    U[0, 0.5] and t_max ~ U[0.5, 1] ([0, 1] for examples with r = t), and pass t_min, t_max to
    the backbone (the conditions omega, t_min, t_max; `imf.py` `sample_cfg_interval`); False
    conditions on omega alone.
  iMF samples with sample.guidance as omega and [guidance_t_min, guidance_t_max] as the interval,
  both network inputs, still one network call per step.
  """
  # The unweighted error the trainer logs as "error": the mean squared error per dimension of
  # the MeanFlow identity's residual u + (t - r) du/dt - v_g (u - u_tgt in MeanFlow's form, V - v_g
  # in iMF's), before the adaptive weight.
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
  variant: str = "meanflow"
  imf_velocity: str = "boundary"
  guidance_scale_max: float = 1.0
  guidance_scale_beta: float = 1.0
  guidance_interval: bool = True
  noise: str = "gaussian"
  noise_nu: float = common.DEFAULT_NU
  repa: repa_lib.Alignment | None = None
  null_text: Any = dataclasses.field(default=None, compare=False, repr=False)

  DEFAULTS: ClassVar[dict] = dict(
      time_sampler="logit_normal", time_mean=-0.4, time_std=1.0, pair_sampler="sorted",
      r_mean=-0.4, r_std=1.0, fraction_r_equals_t=0.75,
      error_reduction="mean", adaptive_p=1.0, adaptive_eps=0.01, guidance_w=1.0,
      guidance_kappa=0.0, guidance_t_min=0.0, guidance_t_max=1.0, label_dropout=0.1,
      jvp_precision="float32", variant="meanflow", **IMF_DEFAULTS, **common.NOISE_DEFAULTS)

  def __post_init__(self):
    common.check_noise(self.noise, self.noise_nu)
    _check_choice("time_sampler", self.time_sampler, TIME_SAMPLERS)
    _check_choice("pair_sampler", self.pair_sampler, PAIR_SAMPLERS)
    _check_choice("error_reduction", self.error_reduction, ERROR_REDUCTIONS)
    _check_choice("jvp_precision", self.jvp_precision, JVP_PRECISIONS)
    _check_choice("variant", self.variant, VARIANTS)
    _check_choice("imf_velocity", self.imf_velocity, IMF_VELOCITIES)
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
    if self.guided and not self.conditional:
      raise ValueError(f"objective.guidance_w={self.guidance_w} and "
                       f"objective.guidance_kappa={self.guidance_kappa} ask for training-time "
                       "guidance, which needs class labels (data.conditional=True) or captions; "
                       "use "
                       "guidance_w=1.0 and guidance_kappa=0.0 for an unconditional model.")
    self._check_imf_keys()

  def _check_imf_keys(self):
    if not isinstance(self.guidance_interval, bool):
      raise ValueError(f"objective.guidance_interval={self.guidance_interval!r} must be True or "
                       "False.")
    if not self.guidance_scale_max >= 1.0:
      raise ValueError(f"objective.guidance_scale_max={self.guidance_scale_max} must be >= 1 "
                       "(iMF draws omega in [1, guidance_scale_max]: 8.0 in the official "
                       "code; 1.0 trains no guidance).")
    if not self.guidance_scale_beta >= 0.0:
      raise ValueError(f"objective.guidance_scale_beta={self.guidance_scale_beta} must be >= 0 "
                       "(the density of omega is proportional to omega^-beta; "
                       "experiments/imf_imagenet.py uses 1).")
    if self.variant == "meanflow":
      changed = [key for key, default in IMF_DEFAULTS.items() if getattr(self, key) != default]
      if changed:
        raise ValueError(f"objective.{changed[0]}={getattr(self, changed[0])!r} applies to "
                         "improved MeanFlow only: set objective.variant='imf', or leave it at "
                         f"{IMF_DEFAULTS[changed[0]]!r} for MeanFlow.")
    has_head = getattr(self.model, "aux_head_depth", 0) > 0
    if self.imf_velocity == "head" and not has_head:
      raise ValueError("objective.imf_velocity='head' takes v_theta from the backbone's "
                       "auxiliary velocity head, which this model has not: use "
                       "model.name='imf_dit' with model.aux_head_depth > 0 (8 in iMF), or "
                       "objective.imf_velocity='boundary' (v_theta = u_theta(z_t, t, t)).")
    if has_head and not self.aux_head:
      raise ValueError(f"model.aux_head_depth={self.model.aux_head_depth} gives the backbone an "
                       "auxiliary velocity head, which only objective.variant='imf' with "
                       "objective.imf_velocity='head' trains; set that, or model.aux_head_depth=0.")
    if self.variant != "imf":
      return
    if self.guided:
      raise ValueError(f"objective.variant='imf' takes the guidance scale as a network input "
                       f"(objective.guidance_scale_max), not MeanFlow's fixed guidance_w="
                       f"{self.guidance_w} and guidance_kappa={self.guidance_kappa}: set "
                       "guidance_w=1.0, guidance_kappa=0.0 and e.g. guidance_scale_max=8.0.")
    if self.guidance_scale_max > 1.0 and not self.conditional:
      raise ValueError(f"objective.guidance_scale_max={self.guidance_scale_max} trains "
                       "classifier-free guidance, which needs class labels "
                       "(data.conditional=True) or captions; use guidance_scale_max=1.0 for an "
                       "unconditional model.")
    interval = (self.guidance_t_min, self.guidance_t_max)
    if interval != (0.0, 1.0) and not (self.guidance_conditioned and self.guidance_interval):
      raise ValueError(f"objective.guidance_t_min={interval[0]} and guidance_t_max={interval[1]}"
                       ": with variant='imf' they are the guidance interval passed to the "
                       "network at sampling, which needs guidance_scale_max > 1 and "
                       "guidance_interval=True; otherwise leave them at 0.0 and 1.0.")

  @classmethod
  def build(cls, config, model, info):
    keys = {key: config[key] for key in cls.DEFAULTS}
    return cls(model=model, image_shape=tuple(info.image_shape), num_classes=info.num_classes,
               null_text=common.text_null(model, info), **keys)

  @property
  def guided(self) -> bool:
    """Whether training uses guidance (extra network calls); a Python-level switch."""
    return self.guidance_w != 1.0 or self.guidance_kappa != 0.0

  @property
  def guidance_conditioned(self) -> bool:
    """Whether the backbone takes iMF's guidance inputs (omega, and the interval)."""
    return self.variant == "imf" and self.guidance_scale_max > 1.0

  @property
  def aux_head(self) -> bool:
    """Whether v_theta comes from the backbone's auxiliary head (its output has 2C channels)."""
    return self.variant == "imf" and self.imf_velocity == "head"

  @property
  def num_guidance_inputs(self) -> int:
    if not self.guidance_conditioned:
      return 0
    return 3 if self.guidance_interval else 1

  def guidance_inputs(self, omega, t_min, t_max) -> tuple:
    """The backbone's guidance inputs: () without guidance conditioning, else (1 - 1/omega,) and
    with the interval (1 - 1/omega, t_min, t_max) (the official network embeds 1 - 1/omega, in
    [0, 1) for omega >= 1). omega, t_min, t_max: [B] arrays or floats."""
    if not self.guidance_conditioned:
      return ()
    scale = 1.0 - 1.0 / omega
    return (scale, t_min, t_max) if self.guidance_interval else (scale,)

  def init(self, rng, batch):
    x = batch["image"][:1]
    cond = self.condition(batch)
    cond = None if cond is None else cond[:1]
    params = common.init_model(self.model, rng, x, 2 + self.num_guidance_inputs, cond)
    return params, repa_lib.init_extra(self.repa, {})

  def load_extra(self, abstract_extra):
    """REPA's encoder parameters (config.repa with online features), else {}."""
    return repa_lib.load_extra(self.repa, abstract_extra, {})

  def fields(self, params, z, t, h, cond, guidance=(), rng=None, train=False, capture=False):
    """(u_theta, v_theta of the auxiliary head or None): [B, ...] float32 each, and with
    capture the REPA tokens third (`common.apply_model`). z: [B, ...]; t, h = t - r: [B]; cond:
    [B] or None; guidance: `guidance_inputs(...)`, [B] each."""
    out = common.apply_model(self.model, params, z, (t, h, *guidance), cond, rng, train, capture)
    tokens = None
    if capture:
      out, tokens = out
    out = out.astype(jnp.float32)
    u, v = jnp.split(out, 2, axis=-1) if self.aux_head else (out, None)
    return (u, v, tokens) if capture else (u, v)

  def network(self, params, z, t, h, cond, rng=None, train=False, guidance=()):
    """u_theta(z, (t, h), c): [B, ...] float32; z: [B, ...]; t, h = t - r: [B]; cond: [B] or
    None; guidance: `guidance_inputs(...)` (iMF with guidance conditioning)."""
    return self.fields(params, z, t, h, cond, guidance, rng, train)[0]

  def velocity(self, params, z, t, cond, guidance=()):
    """iMF's v_theta(z, t | cond, guidance): [B, ...] float32, without dropout; u_theta(z, t, t)
    ("boundary") or the auxiliary head at h = 0 ("head")."""
    u, v = self.fields(params, z, t, jnp.zeros_like(t), cond, guidance)
    return v if self.aux_head else u

  def sample_time_pairs(self, rng, batch_size: int):
    """(t, r): [B] each, 0 < r <= t < 1; "sorted": t = max and r = min of two draws from the
    time sampler; "separate": t from it, r = min(t, a draw with r_mean, r_std); then r = t for
    each example with probability fraction_r_equals_t (iMF's official code instead sets r = t
    for exactly the first half of each batch, Lyy-iiis/imeanflow `imf.py` `sample_tr`)."""
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

  def sample_guidance(self, rng, r_equals_t):
    """(omega, t_min, t_max): [B] float32 each, iMF's guidance conditions of a batch whose
    examples with r = t are marked by r_equals_t: [B] bool. omega from `sample_guidance_scale`
    (1 without guidance conditioning); with guidance_interval, t_min ~ U[0, 0.5] and t_max ~
    U[0.5, 1], [0, 1] where r = t (Lyy-iiis/imeanflow `imf.py` `sample_cfg_interval`); else
    [0, 1]."""
    shape = r_equals_t.shape
    scale_key, min_key, max_key = jax.random.split(rng, 3)
    t_min, t_max = jnp.zeros(shape, jnp.float32), jnp.ones(shape, jnp.float32)
    if not self.guidance_conditioned:
      return jnp.ones(shape, jnp.float32), t_min, t_max
    omega = sample_guidance_scale(scale_key, shape, self.guidance_scale_max,
                                  self.guidance_scale_beta)
    if self.guidance_interval:
      t_min = jnp.where(r_equals_t, 0.0, jax.random.uniform(
          min_key, shape, jnp.float32, *GUIDANCE_T_MIN_RANGE))
      t_max = jnp.where(r_equals_t, 1.0, jax.random.uniform(
          max_key, shape, jnp.float32, *GUIDANCE_T_MAX_RANGE))
    return omega, t_min, t_max

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
    null = common.null_like(cond, self.null)
    w, kappa = self.guidance_w, self.guidance_kappa
    v_g = w * v + (1.0 - w - kappa) * self.network(params, z_t, t, zeros, null)
    if kappa != 0.0:
      v_g = v_g + kappa * self.network(params, z_t, t, zeros, cond)
    use = ((t >= self.guidance_t_min) & (t <= self.guidance_t_max)
           & ~common.is_null(cond, self.null))
    return jax.lax.stop_gradient(jnp.where(paths.expand(use, v), v_g, v))

  def imf_target(self, params, z_t, t, v, cond, omega, t_min, t_max):
    """(v_g, v_theta): iMF's regression target and JVP tangent, [B, ...] float32, no gradient.

    omega' = omega where t_min <= t <= t_max, else 1 (guidance off outside the interval);
    v_theta = v_theta(z_t, t | cond, omega', interval [0, 1]); v_g = v + (1 - 1/omega')
    (v_theta - v_theta(z_t, t | null, 1, [0, 1])) for kept labels and v for null ones
    (Lyy-iiis/imeanflow `imf.py` `guidance_fn`); v_g = v without guidance conditioning. The
    network calls run without dropout. z_t, v: [B, ...]; t, omega, t_min, t_max: [B]; cond: [B]
    or None (the labels after dropout, so that a dropped example's tangent is the null-label
    velocity of the null-label u_theta it differentiates; `guidance_fn` uses the label before
    dropout there).
    """
    v = v.astype(jnp.float32)
    zeros, ones = jnp.zeros_like(t), jnp.ones_like(t)
    omega = jnp.where((t >= t_min) & (t <= t_max), omega, 1.0)
    v_theta = self.velocity(params, z_t, t, cond, self.guidance_inputs(omega, zeros, ones))
    if not self.guidance_conditioned:
      return v, jax.lax.stop_gradient(v_theta)
    null = common.null_like(cond, self.null)
    v_null = self.velocity(params, z_t, t, null, self.guidance_inputs(ones, zeros, ones))
    guided = v + paths.expand(1.0 - 1.0 / omega, v) * (v_theta - v_null)
    v_g = jnp.where(paths.expand(~common.is_null(cond, self.null), v), guided, v)
    return jax.lax.stop_gradient(v_g), jax.lax.stop_gradient(v_theta)

  def imf_compound(self, params, z_t, t, r, cond, v_theta, guidance=(), rng=None, train=False,
                   capture=False):
    """(V, v_theta of the auxiliary head or None) at (z_t, t, r): `imf_prediction` of u_theta
    with the tangent v_theta; with capture, (V, (v_theta of the head or None, REPA tokens)).
    z_t, v_theta: [B, ...]; t, r: [B]; cond: [B] or None; guidance: `guidance_inputs(omega,
    t_min, t_max)`; rng: dropout key when train."""
    def fn(z, t_, r_):
      if capture:
        u, v, tokens = self.fields(params, z, t_, t_ - r_, cond, guidance, rng, train,
                                   capture=True)
        return u, (v, tokens)
      return self.fields(params, z, t_, t_ - r_, cond, guidance, rng, train)
    return imf_prediction(fn, z_t, t, r, v_theta, self.jvp_precision, has_aux=True)

  def loss(self, params, batch, rng, step, view):
    """MeanFlow (or iMF) loss of a batch {'image': [B, ...], 'label': [B]}."""
    del step
    x = batch["image"].astype(jnp.float32)
    repa_target = repa_lib.target(self.repa, batch, view)
    keys = jax.random.split(rng, 5 if self.variant == "imf" else 4)
    time_key, noise_key, drop_key, model_key = keys[:4]
    t, r = self.sample_time_pairs(time_key, x.shape[0])
    eps = common.draw_noise(noise_key, x.shape, self.noise, self.noise_nu, jnp.float32)
    cond = self.drop_condition(self.condition(batch), drop_key)
    guidance = self.sample_guidance(keys[4], r == t) if self.variant == "imf" else None
    return self.loss_at(params, x, cond, t, r, eps, model_key, guidance, repa_target)

  def weighted(self, squared):
    """(mean_B l / stop_gradient((l + adaptive_eps)^adaptive_p), mean squared error) of
    squared: [B, ...], l its per-example mean (or sum)."""
    squared = jnp.reshape(squared, (squared.shape[0], -1))
    error = jnp.mean(squared, axis=1) if self.error_reduction == "mean" else jnp.sum(squared, 1)
    weight = jax.lax.stop_gradient(1.0 / (error + self.adaptive_eps) ** self.adaptive_p)
    return jnp.mean(weight * error), jnp.mean(jnp.mean(squared, axis=1))

  def loss_at(self, params, x, cond, t, r, eps, rng, guidance=None, repa_target=None):
    """The MeanFlow (or iMF) loss at given times and noise.

    x, eps: [B, ...] data and noise; cond: [B] labels (dropped ones already null) or None;
    t, r: [B] with r <= t; rng: dropout key of the training call; guidance: iMF's (omega, t_min,
    t_max), [B] each (None: 1, 0, 1). z_t = (1 - t) x + t eps, v = eps - x.
    MeanFlow: (u, u_tgt) = meanflow_target(u_theta, z_t, t, r, v_g), l = mean (or sum) over dims
    of (u - u_tgt)^2, loss = mean_B l / stop_gradient((l + eps)^p). With r = t, p = 0 and no
    guidance this is flow matching's loss mean_B mean_D (u - v)^2.
    iMF: (v_g, v_theta) = imf_target(...), V = imf_compound(..., v_theta), l over (V - v_g)^2
    with the same weight, plus the auxiliary head's weighted |v_theta - v_g|^2 (at (t, h = t - r)
    and the example's conditions) with imf_velocity='head'. With r = t, p = 0 and no guidance it
    is flow matching's loss too.
    repa_target: REPA's encoder features of x ([B, h, w, D], `repa.Alignment.target`) or None;
    given, loss_REPA of the differentiated forward's tokens is added (config.repa).
    """
    x, eps = x.astype(jnp.float32), eps.astype(jnp.float32)
    path = paths.get("ot")
    z_t = path.interpolate(x, eps, t)
    v = path.velocity(x, eps, t)
    metrics = {"t_mean": jnp.mean(t), "t_minus_r": jnp.mean(t - r),
               "r_equals_t": jnp.mean((r == t).astype(jnp.float32))}
    if self.variant == "imf":
      return self._imf_loss_at(params, z_t, v, cond, t, r, rng, guidance, metrics, repa_target)
    v_g = self.guided_velocity(params, z_t, t, v, cond)
    if repa_target is None:
      u_fn = lambda z, t_, r_: self.network(params, z, t_, t_ - r_, cond, rng, train=True)
      u, u_tgt = meanflow_target(u_fn, z_t, t, r, v_g, self.jvp_precision)
    else:
      def u_fn(z, t_, r_):
        u, _, tokens = self.fields(params, z, t_, t_ - r_, cond, (), rng, True, capture=True)
        return u, tokens
      u, u_tgt, tokens = meanflow_target(u_fn, z_t, t, r, v_g, self.jvp_precision,
                                         has_aux=True)
    loss, metrics["mse"] = self.weighted(jnp.square(u - u_tgt))
    if repa_target is None:
      return loss, metrics
    return self.repa.add(loss, metrics, tokens, repa_target)

  def _imf_loss_at(self, params, z_t, v, cond, t, r, rng, guidance, metrics, repa_target=None):
    if guidance is None:
      guidance = (jnp.ones_like(t), jnp.zeros_like(t), jnp.ones_like(t))
    omega, t_min, t_max = guidance
    v_g, v_theta = self.imf_target(params, z_t, t, v, cond, omega, t_min, t_max)
    capture = repa_target is not None
    compound, aux = self.imf_compound(params, z_t, t, r, cond, v_theta,
                                      self.guidance_inputs(omega, t_min, t_max), rng, True,
                                      capture)
    v_head, tokens = aux if capture else (aux, None)
    loss, metrics["mse"] = self.weighted(jnp.square(compound - v_g))
    if v_head is not None:
      head_loss, metrics["mse_velocity_head"] = self.weighted(jnp.square(v_head - v_g))
      loss = loss + head_loss
    if self.guidance_conditioned:
      metrics["guidance_scale_mean"] = jnp.mean(omega)
    if capture:
      return self.repa.add(loss, metrics, tokens, repa_target)
    return loss, metrics

  def sample(self, params, rng, num, cond=None, *, num_steps=1, method="euler", guidance=1.0):
    """num samples from z_1 ~ N(0, I) (or Student-t, objective.noise) by num_steps uniform
    steps z_r = z_t - (t - r) u(z_t, t, t - r); one step is z_0 = z_1 - u(z_1, 1, 1). cond:
    [num] labels or None. MeanFlow bakes guidance into training, so `guidance` must be 1.0; iMF
    with guidance conditioning passes it as omega (> 0; trained on [1, guidance_scale_max]) with
    the interval [guidance_t_min, guidance_t_max] to the network."""
    z1 = common.draw_noise(rng, (num,) + self.image_shape, self.noise, self.noise_nu,
                           jnp.float32)
    if self.guidance_conditioned:
      if not guidance > 0:
        raise ValueError(f"sample.guidance={guidance}: iMF's guidance scale omega must be "
                         f"positive (trained on [1, {self.guidance_scale_max}]; 1 is no "
                         "guidance).")
      conditions = self.guidance_inputs(guidance, self.guidance_t_min, self.guidance_t_max)
      u_fn = lambda z, t, h, *g: self.network(params, z, t, h, cond, guidance=g)
      return mean_flow.solve(u_fn, z1, num_steps, method, conditions)
    if guidance != 1.0:
      if self.variant == "imf":
        raise ValueError(f"sample.guidance={guidance}: this iMF model was trained without "
                         "guidance conditioning (objective.guidance_scale_max=1.0); use "
                         "sample.guidance=1.0, or train with guidance_scale_max > 1.")
      raise ValueError(f"sample.guidance={guidance}: MeanFlow has no classifier-free guidance at "
                       "inference (it is trained in through objective.guidance_w and "
                       "objective.guidance_kappa); use sample.guidance=1.0.")
    u_fn = lambda z, t, h: self.network(params, z, t, h, cond)
    return mean_flow.solve(u_fn, z1, num_steps, method)
