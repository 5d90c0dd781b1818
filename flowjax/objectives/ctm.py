"""Consistency Trajectory Models (Kim et al., 2024): a trajectory map G_theta(x_t, t, s) distilled
from a flow-matching teacher (Kim et al., arXiv:2310.02279).

CTM works in EDM sigma space, x_sigma = x + sigma eps, with noise levels sigma in
[sigma_min, sigma_max]:
  G_theta(x_t, t, s) = (s / t) x_t + (1 - s / t) g_theta(x_t, t, s),
  g_theta(x_t, t, s) = c_skip(t) x_t + c_out(t) F_theta(c_in(t) x_t, (ln(t) / 4, ln(s) / 4), c),
with EDM's c_skip = sd^2 / (t^2 + sd^2), c_out = t sd / sqrt(t^2 + sd^2),
c_in = 1 / sqrt(t^2 + sd^2) (sd = sigma_data); CTM's U-Net embeds EDM's c_noise = ln(sigma) / 4
itself (model.time_scale = 1; the 250 ln(sigma) of sony/ctm's karras_diffusion.py reaches only
its EDMPrecond_CTM wrapper, which converts it back). G(x, t, t) = x for any network.

The loss on the Karras grid sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min: pick k teacher
steps and grid indices t < u = t + k <= s, then with stop-gradient target parameters theta^- (an
EMA of theta)
  estimate = G_{theta^-}(G_theta(x_t, t, s), s, sigma_min),
  target = G_{theta^-}(G_{theta^-}(Heun_teacher(x_t, t -> u), u, s), s, sigma_min),
  loss = d(estimate, target)
         + lambda dsm_weight E w(sigma) ||g_theta(x_sigma, sigma, sigma) - x||^2,
where d is L2 or pseudo-Huber (LPIPS needs weights that are not available offline) and lambda is
1 or the adaptive ratio ||grad_L d|| / ||grad_L DSM|| over the output layer L.

The teacher is a flow-matching velocity v(x_t, t) in flowjax time (t = 0 data, t = 1 noise,
x_t = (1 - t) x + t eps). Its probability-flow ODE in sigma space follows from
x_t / (1 - t) = x + sigma eps with sigma = t / (1 - t): dx_sigma / dsigma = (x_sigma + v) /
(1 + sigma) at x_t = x_sigma / (1 + sigma), t = sigma / (1 + sigma). Its parameters live in
TrainState.extra["teacher"] (sharded and checkpointed with the state); `load_extra` reads them
from the teacher's workdir on a fresh start.

Noise: objective.noise='student_t' draws eps (of x_t and of the DSM term), the sampler's start
and gamma-sampling's re-noising from the multivariate Student-t t_D(0, I_D, nu) of Pandey et al.
(arXiv:2410.14171; `common.draw_noise`), and the teacher must be a t-Flow teacher with the same
noise (`check_teacher_noise`), whose PF-ODE then carries x + sigma eps of that law. This is
flowjax's extension: neither paper distils CTM with it. The perturbation x + sigma eps and the
DSM term's ||g - x||^2 are t-EDM's, and so is the preconditioning, which follows the noise law:
with Student-t noise g's c_skip, c_out, c_in, both times ln(t) / 4 and ln(s) / 4, and the "karras"
DSM weight are EDM's formulas evaluated at the noise's standard deviation, t, s and sigma times
sqrt(nu / (nu - 2)) (`common.effective_sigma`; NVIDIA/physicsnemo's
tEDMPrecondSuperRes.forward rescales sigma so before EDM's preconditioner, and its
tEDMResidualLoss evaluates EDM's loss weight at the rescaled sigma, so the weight stays
1 / c_out^2). The noisy points, the Karras grid, the DSM noise levels, the ratio s / t of G (the
PF-ODE's, so G(x, t, t) = x still holds exactly) and the teacher, a flow-matching velocity with its
own parameterisation integrated in sigma, stay in sigma. With noise='gaussian' all of this is
EDM's and CTM's, bitwise. Re-noising adds independent
Student-t noise: with gamma = 1 (a jump to sigma_min first) the re-noised point is a Student-t
perturbation of the jump's data estimate, as in training; with gamma < 1 the jump's remaining
noise plus the added noise is not Student-t.

REPA (config.repa, arXiv:2410.06940; `repa`) aligns the hidden tokens of the student's trajectory
map G_theta(x_t, t, s) of the CTM term (present whatever dsm_weight; the DSM term's forward is
not aligned).
"""

import dataclasses
import json
import logging
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from flowjax import checkpoint, data, models, optim, paths, storage
from flowjax.models import layers
from flowjax.objectives import common, repa as repa_lib
from flowjax.registry import OBJECTIVES, unknown_name_message
from flowjax.samplers import ctm as ctm_sampler
from flowjax.samplers import ode

HEUN_STEP_STRATEGIES = ("weighted", "uniform", "fixed")
TARGET_INNER = ("ema", "model_sg")
DISTANCES = ("l2", "pseudo_huber")
DSM_BALANCES = ("adaptive", "fixed")
DSM_SIGMA_SAMPLERS = ("halflognormal", "lognormal")
DSM_WEIGHTINGS = ("karras", "uniform")
TEACHER_WEIGHTS = ("ema", "params")
SAMPLE_METHODS = ("karras",)
# Output layers looked for (in this order) when objective.adaptive_layer is empty.
OUTPUT_LAYER_NAMES = ("out", "final", "final_layer", "conv_out", "out_conv", "output")
# Added to the DSM gradient norm of the adaptive weight, and the weight's upper clip (CTM's).
BALANCE_EPS = 1e-4
BALANCE_MAX = 1e4


class TeacherError(ValueError):
  """objective.teacher_workdir does not hold a usable flow-matching teacher."""


def _check_choice(key: str, value: str, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"objective.{key}: " + unknown_name_message(key, value, list(allowed)))


def teacher_command() -> str:
  """The commands that train a teacher and hand it to the distilling objective, for errors."""
  return ("`python -m flowjax.main --config=experiments/<the flow-matching experiment of this "
          "data: fm_toy2d.py for toy2d, quickstart.py for digits> --workdir=TEACHER_DIR`, then "
          "pass --config.objective.teacher_workdir=TEACHER_DIR")


def edm_derivative(velocity, x_sigma, sigma):
  """dx_sigma / dsigma of the teacher's PF-ODE in EDM sigma space, from a flowjax OT velocity.

  velocity: (x_t: [B, ...], t: [B]) -> [B, ...] with t = 0 data, x_t = (1 - t) x + t eps;
  x_sigma: [B, ...] = x + sigma eps; sigma: [B] > 0. With t = sigma / (1 + sigma) and
  x_t = x_sigma / (1 + sigma) (so x_t / (1 - t) = x_sigma), returns (x_sigma + v) / (1 + sigma),
  which equals EDM's (x_sigma - D(x_sigma, sigma)) / sigma for the denoiser D = x_t - t v.
  float32 [B, ...].
  """
  x_sigma = x_sigma.astype(jnp.float32)
  one_plus = paths.expand(1.0 + sigma, x_sigma)
  v = velocity(x_sigma / one_plus, sigma / (1.0 + sigma)).astype(jnp.float32)
  return (x_sigma + v) / one_plus


def heun_step(derivative, x, sigma, sigma_next):
  """One Heun step of dx/dsigma = derivative(x, sigma) from sigma to sigma_next (EDM Alg. 1).

  x: [B, ...]; sigma, sigma_next: [B] > 0.
  """
  h = paths.expand(sigma_next - sigma, x)
  d = derivative(x, sigma)
  x_euler = x + h * d
  return x + 0.5 * h * (d + derivative(x_euler, sigma_next))


def read_teacher(workdir: str, info, weights: str, method: str = "CTM"):
  """(teacher backbone, state key of its weights) from a flowjax flow-matching workdir; `method`
  names the distilling objective in the errors.

  Raises TeacherError naming the command that trains the teacher when `workdir` is empty or is
  not a trained flow-matching run, and naming the mismatch when its data differ from `info`.
  """
  if not workdir:
    raise TeacherError(f"objective.teacher_workdir is empty: {method} distils a flow-matching "
                       "teacher trained by flowjax. Train one with " + teacher_command() + ".")
  # The teacher's workdir may be local or on object storage, like any workdir.
  config_path = storage.join(workdir, "config.json")
  checkpoints = storage.join(workdir, "checkpoints")
  if not storage.exists(config_path) or not storage.isdir(checkpoints):
    raise TeacherError(f"objective.teacher_workdir={workdir!r} has no config.json and "
                       "checkpoints/ of a flowjax run. Train the teacher with "
                       + teacher_command() + ".")
  teacher = json.loads(storage.read_text(config_path))
  objective = teacher.get("objective", {})
  if objective.get("name") != "flow_matching" or objective.get("path", "ot") != "ot":
    raise TeacherError(f"objective.teacher_workdir={workdir!r} was trained with objective "
                       f"{objective.get('name')!r} (path {objective.get('path')!r}); {method} "
                       "needs a flow_matching teacher on the 'ot' path. Train one with "
                       + teacher_command() + ".")
  teacher_info = data.data_info(ml_collections.ConfigDict(teacher["data"]), split="train")
  if (tuple(teacher_info.image_shape) != tuple(info.image_shape)
      or teacher_info.num_classes != info.num_classes):
    raise TeacherError(
        f"objective.teacher_workdir={workdir!r} was trained on data.name="
        f"{teacher['data'].get('name')!r} with per-example shape "
        f"{tuple(teacher_info.image_shape)} and {teacher_info.num_classes} classes, but this run's "
        f"data have shape {tuple(info.image_shape)} and {info.num_classes} classes; use a teacher "
        "trained on the same data (and data.conditional setting).")
  model = models.build(ml_collections.ConfigDict(teacher["model"]), teacher_info)
  decays = teacher.get("optim", {}).get("ema_decays", [])
  if weights == "ema" and decays:
    return model, ("ema", optim.ema_key(decays[0]))
  return model, ("params",)


def load_teacher(objective, abstract_extra, method: str):
  """The teacher's saved weights (objective.teacher_workdir / teacher_key) placed on the
  shardings of abstract_extra["teacher"]; a REPA projector in the teacher's state is skipped."""
  teacher, step = checkpoint.restore_params(objective.teacher_workdir, abstract_extra["teacher"],
                                            key=objective.teacher_key,
                                            source="objective.teacher_workdir",
                                            skip=(layers.REPA_PROJECTOR,))
  logging.info("Loaded the %s teacher %s from %s (step %d).", method,
               "/".join(objective.teacher_key), objective.teacher_workdir, step)
  return teacher


def check_teacher_noise(workdir: str, noise: str, nu: float, method: str = "CTM") -> None:
  """Raises TeacherError when the teacher in `workdir` was trained with another noise law than
  objective.noise / objective.noise_nu: a distilled PF-ODE is that of the teacher's noise. A
  teacher config without the keys predates them and was trained with Gaussian noise."""
  objective = json.loads(storage.read_text(storage.join(workdir, "config.json"))).get(
      "objective", {})
  teacher = (objective.get("noise", "gaussian"), float(objective.get("noise_nu", nu)))
  if teacher[0] != noise or (noise == "student_t" and teacher[1] != float(nu)):
    described = lambda law, dof: law if law == "gaussian" else f"{law} with nu={dof:g}"
    raise TeacherError(
        f"objective.teacher_workdir={workdir!r} was trained with {described(*teacher)} noise, "
        f"but this {method} run has objective.noise={noise!r}, objective.noise_nu={nu:g}: the "
        "student's noisy points must follow the teacher's noise law. Set objective.noise and "
        "objective.noise_nu to the teacher's, or train a teacher with this run's.")


@OBJECTIVES.register("ctm")
@dataclasses.dataclass(frozen=True)
class CTM:
  """model: backbone F_theta(c_in x, (ln(t) / 4, ln(s) / 4), cond) at `effective_sigma` of t and
  s; image_shape: per-example shape; num_classes: 0 for unconditional models; teacher_model: the
  flow-matching teacher's backbone v(x_t, (t,), cond); teacher_key: the subtree of the teacher's
  saved state to load (("ema", "0.999") or ("params",)). The other fields are the `objective`
  config keys:

  teacher_workdir: the flow-matching run to distil; teacher_weights: its "ema" (first decay) or
    raw "params"; teacher_guidance: classifier-free guidance scale of the teacher velocity;
  sigma_min, sigma_max, rho, sigma_data: EDM noise range, Karras grid exponent, data std;
  num_scales: N points of the Karras training grid (18 for CIFAR-10);
  max_heun_steps, heun_step_strategy: the teacher takes k in [1, max_heun_steps] Heun steps per
    batch, k drawn with probability proportional to k ("weighted"), uniformly, or k =
    max_heun_steps ("fixed");
  target_inner: parameters of the inner target map G(x_u, u, s): the EMA ("ema") or the current
    parameters with stop-gradient ("model_sg", CTM's code default); the maps to sigma_min
    always use the EMA; target_decay: which EMA (optim.ema_decays entry, "" = the only one);
  distance: "l2" (mean squared error) or "pseudo_huber" (sqrt(||a - b||^2 + c^2) - c with
    c = huber_c, or 0.00054 sqrt(D) when huber_c = 0);
  dsm_weight, dsm_balance: weight of the denoising term, times the adaptive ratio ("adaptive") or
    1 ("fixed"); adaptive_layer: top-level parameter name of the output layer ("" = the first of
    OUTPUT_LAYER_NAMES present), or a '/'-separated path to one weight in it; the ratio uses
    that layer's weight (kernel) only, not its bias, as CTM's code takes the gradient norms on
    the last layer's weight (Kim et al., arXiv:2310.02279; the VQGAN adaptive weight);
  dsm_sigma_sampler, dsm_p_mean, dsm_p_std, dsm_uniform_fraction: DSM noise levels: lognormal,
    or half lognormal and half on the Karras ramp at a uniform position in
    [0, dsm_uniform_fraction] ("halflognormal");
  dsm_weighting: "karras" (sigma^2 + sd^2) / (sigma sd)^2 (at sigma_eff) or "uniform";
  label_dropout: probability of the null label for the student (the teacher sees true labels);
  sample_gamma: gamma of gamma-sampling (0 deterministic, 1 consistency-model multistep);
  noise, noise_nu: the noise law ("gaussian" or "student_t" with nu degrees of freedom), which
    must be the teacher's.
  """
  # The unweighted error the trainer logs as "error": the CTM distance, without the DSM term and
  # its adaptive balance.
  ERROR_METRIC: ClassVar[str] = "ctm"
  model: nn.Module
  image_shape: tuple
  num_classes: int
  teacher_model: Any = None
  teacher_key: tuple = ("params",)
  teacher_workdir: str = ""
  teacher_weights: str = "ema"
  teacher_guidance: float = 1.0
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0
  sigma_data: float = 0.5
  num_scales: int = 18
  max_heun_steps: int = 17
  heun_step_strategy: str = "weighted"
  target_inner: str = "ema"
  target_decay: str = ""
  distance: str = "l2"
  huber_c: float = 0.0
  dsm_weight: float = 1.0
  dsm_balance: str = "adaptive"
  adaptive_layer: str = ""
  dsm_sigma_sampler: str = "halflognormal"
  dsm_p_mean: float = -1.2
  dsm_p_std: float = 1.2
  dsm_uniform_fraction: float = 0.7
  dsm_weighting: str = "karras"
  label_dropout: float = 0.0
  sample_gamma: float = 0.0
  noise: str = "gaussian"
  noise_nu: float = common.DEFAULT_NU
  repa: repa_lib.Alignment | None = None

  DEFAULTS: ClassVar[dict] = dict(
      teacher_workdir="", teacher_weights="ema", teacher_guidance=1.0, sigma_min=0.002,
      sigma_max=80.0, rho=7.0, sigma_data=0.5, num_scales=18, max_heun_steps=17,
      heun_step_strategy="weighted", target_inner="ema", target_decay="", distance="l2",
      huber_c=0.0, dsm_weight=1.0, dsm_balance="adaptive", adaptive_layer="",
      dsm_sigma_sampler="halflognormal", dsm_p_mean=-1.2, dsm_p_std=1.2,
      dsm_uniform_fraction=0.7, dsm_weighting="karras", label_dropout=0.0, sample_gamma=0.0,
      **common.NOISE_DEFAULTS)

  def __post_init__(self):
    common.check_noise(self.noise, self.noise_nu)
    _check_choice("teacher_weights", self.teacher_weights, TEACHER_WEIGHTS)
    _check_choice("heun_step_strategy", self.heun_step_strategy, HEUN_STEP_STRATEGIES)
    _check_choice("target_inner", self.target_inner, TARGET_INNER)
    _check_choice("distance", self.distance, DISTANCES)
    _check_choice("dsm_balance", self.dsm_balance, DSM_BALANCES)
    _check_choice("dsm_sigma_sampler", self.dsm_sigma_sampler, DSM_SIGMA_SAMPLERS)
    _check_choice("dsm_weighting", self.dsm_weighting, DSM_WEIGHTINGS)
    if not 0.0 < self.sigma_min < self.sigma_max:
      raise ValueError(f"objective.sigma_min={self.sigma_min} and objective.sigma_max="
                       f"{self.sigma_max} must satisfy 0 < sigma_min < sigma_max (CTM: 0.002, 80).")
    if self.sigma_data <= 0 or self.rho <= 0:
      raise ValueError(f"objective.sigma_data={self.sigma_data} and objective.rho={self.rho} "
                       "must be positive (0.5 and 7).")
    if not 1 <= self.max_heun_steps < self.num_scales:
      raise ValueError(f"objective.max_heun_steps={self.max_heun_steps} must be in [1, "
                       f"num_scales - 1] with objective.num_scales={self.num_scales}: the teacher "
                       "steps from grid index t to t + k <= num_scales - 1 (CIFAR-10: 17 of 18).")
    if self.dsm_weight < 0 or self.huber_c < 0:
      raise ValueError(f"objective.dsm_weight={self.dsm_weight} and objective.huber_c="
                       f"{self.huber_c} must be >= 0.")
    if not 0.0 <= self.sample_gamma <= 1.0:
      raise ValueError(f"objective.sample_gamma={self.sample_gamma} must be in [0, 1].")

  @classmethod
  def build(cls, config, model, info):
    keys = {key: config[key] for key in cls.DEFAULTS}
    teacher_model, teacher_key = read_teacher(config.teacher_workdir, info,
                                              config.teacher_weights)
    check_teacher_noise(config.teacher_workdir, config.noise, config.noise_nu)
    return cls(model=model, image_shape=tuple(info.image_shape), num_classes=info.num_classes,
               teacher_model=teacher_model, teacher_key=teacher_key, **keys)

  # State: student parameters, teacher parameters in `extra`.

  def init(self, rng, batch):
    """(student parameters, {"teacher": teacher parameters}); the teacher's are placeholders of
    the right shapes until `load_extra` reads them from objective.teacher_workdir."""
    if self.teacher_model is None:
      raise TeacherError("The CTM objective has no teacher model; build it with "
                         "flowjax.objectives.build from a config whose "
                         "objective.teacher_workdir names a flow-matching run.")
    x = batch["image"][:1]
    cond = common.labels(batch, self.num_classes)
    cond = None if cond is None else cond[:1]
    student_key, teacher_key = jax.random.split(rng)
    params = common.init_model(self.model, student_key, x, 2, cond)
    teacher = common.init_model(self.teacher_model, teacher_key, x, 1, cond)
    return params, repa_lib.init_extra(self.repa, {"teacher": teacher})

  def load_extra(self, abstract_extra):
    """{"teacher": the teacher's saved weights}, placed on the shardings of `abstract_extra`."""
    teacher = load_teacher(self, abstract_extra, "CTM")
    return repa_lib.load_extra(self.repa, abstract_extra, {"teacher": teacher})

  def target_params(self, view):
    """The stop-gradient target parameters theta^-: the EMA named by objective.target_decay."""
    ema = view["ema"]
    if not ema:
      raise ValueError("CTM's target network is an EMA of the parameters, but optim.ema_decays "
                       "is empty; set e.g. --config.optim.ema_decays='(0.999,)'.")
    if self.target_decay:
      if self.target_decay not in ema:
        raise ValueError(f"objective.target_decay={self.target_decay!r} is not one of the EMA "
                         f"decays {sorted(ema)}; use one of them (optim.ema_decays).")
      return jax.lax.stop_gradient(ema[self.target_decay])
    if len(ema) > 1:
      raise ValueError(f"optim.ema_decays has several decays {sorted(ema)}; set "
                       "objective.target_decay to the one CTM's target network uses.")
    return jax.lax.stop_gradient(next(iter(ema.values())))

  # The trajectory map in sigma space.

  def noise_level(self, n):
    """sigma_n = (sigma_max^(1/rho) + n / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho of
    the Karras training grid; n: [...] grid indices in [0, N - 1] (float or int)."""
    high, low = self.sigma_max ** (1.0 / self.rho), self.sigma_min ** (1.0 / self.rho)
    fraction = jnp.asarray(n, jnp.float32) / (self.num_scales - 1)
    return (high + fraction * (low - high)) ** self.rho

  def effective_sigma(self, sigma):
    """sigma_eff: sigma for Gaussian noise, sigma sqrt(nu / (nu - 2)) for Student-t noise
    (`common.effective_sigma`), where EDM's preconditioning and DSM weight are evaluated."""
    return common.effective_sigma(sigma, self.noise, self.noise_nu)

  def network(self, params, x_t, t, s, cond, rng=None, train=False, capture=False):
    """Raw output F_theta(c_in(t) x_t, (ln(t) / 4, ln(s) / 4), c) at t, s -> t_eff, s_eff
    (`effective_sigma`): [B, ...] float32 (with capture, and the REPA tokens:
    `common.apply_model`).

    x_t: [B, ...] = x + t eps; t, s: [B] noise levels (sigma units) with sigma_min <= s <= t.
    """
    t, s = self.effective_sigma(t), self.effective_sigma(s)
    c_in = 1.0 / jnp.sqrt(paths.expand(t, x_t) ** 2 + self.sigma_data ** 2)
    times = (0.25 * jnp.log(t), 0.25 * jnp.log(s))
    out = common.apply_model(self.model, params, c_in * x_t, times, cond, rng, train, capture)
    if capture:
      return out[0].astype(jnp.float32), out[1]
    return out.astype(jnp.float32)

  def denoise_output(self, x_t, out, t):
    """g = c_skip(t_eff) x_t + c_out(t_eff) F with EDM's scalings; x_t, out: [B, ...]; t: [B]."""
    t = paths.expand(self.effective_sigma(t), x_t)
    norm = t ** 2 + self.sigma_data ** 2
    return (self.sigma_data ** 2 / norm) * x_t + (t * self.sigma_data / jnp.sqrt(norm)) * out

  def parameterize(self, x_t, g, t, s):
    """G = (s / t) x_t + (1 - s / t) g; x_t, g: [B, ...]; t, s: [B]. G(x, t, t) = x exactly."""
    # s == t gives exactly x_t, also where a backend divides approximately.
    ratio = paths.expand(jnp.where(s == t, 1.0, s / t), x_t)
    return ratio * x_t.astype(jnp.float32) + (1.0 - ratio) * g

  def g_fn(self, params, x_t, t, s, cond, rng=None, train=False, capture=False):
    """g_theta(x_t, t, s): [B, ...] float32, CTM's estimate of the data behind x_t (with
    capture, and the REPA tokens)."""
    x_t = x_t.astype(jnp.float32)
    if capture:
      out, tokens = self.network(params, x_t, t, s, cond, rng, train, capture=True)
      return self.denoise_output(x_t, out, t), tokens
    return self.denoise_output(x_t, self.network(params, x_t, t, s, cond, rng, train), t)

  def trajectory_map(self, params, x_t, t, s, cond, rng=None, train=False, capture=False):
    """G_theta(x_t, t, s): [B, ...] float32, an estimate of x_s on x_t's PF-ODE trajectory
    (with capture, and the REPA tokens)."""
    if capture:
      g, tokens = self.g_fn(params, x_t, t, s, cond, rng, train, capture=True)
      return self.parameterize(x_t, g, t, s), tokens
    return self.parameterize(x_t, self.g_fn(params, x_t, t, s, cond, rng, train), t, s)

  # The teacher.

  def teacher_velocity(self, teacher_params, cond):
    """(x_t: [B, ...], t: [B]) -> the teacher's (guided) flowjax velocity, float32."""
    fn = lambda x, t, c: common.apply_model(self.teacher_model, teacher_params, x, (t,), c)
    return ode.guided(fn, cond, self.teacher_guidance, self.num_classes)

  def teacher_solve(self, teacher_params, x_t, n_t, num_steps, cond):
    """Teacher Heun steps along the Karras grid from index n_t to n_t + num_steps.

    x_t: [B, ...] at sigma_{n_t}; n_t: [B] int32; num_steps: a Python int or an int32 scalar
    (the same for the whole batch). Returns [B, ...] float32 at sigma_{n_t + num_steps}.
    """
    derivative = lambda x, sigma: edm_derivative(self.teacher_velocity(teacher_params, cond),
                                                 x, sigma)

    def body(m, x):
      return heun_step(derivative, x, self.noise_level(n_t + m), self.noise_level(n_t + m + 1))

    return jax.lax.fori_loop(0, num_steps, body, x_t.astype(jnp.float32))

  # Times, distances and the loss.

  def sample_heun_steps(self, rng):
    """k teacher steps for the batch: int32 scalar in [1, max_heun_steps] (a Python int when
    "fixed")."""
    if self.heun_step_strategy == "fixed":
      return self.max_heun_steps
    ks = jnp.arange(1, self.max_heun_steps + 1, dtype=jnp.float32)
    logits = jnp.log(ks) if self.heun_step_strategy == "weighted" else jnp.zeros_like(ks)
    return 1 + jax.random.categorical(rng, logits).astype(jnp.int32)

  def sample_indices(self, rng, batch_size: int, num_steps):
    """(n_t, n_s): [B] int32 with n_t ~ U{0 .. N - 1 - k} and n_s ~ U{n_t + k .. N - 1}."""
    u = jax.random.uniform(rng, (2, batch_size))
    last = self.num_scales - 1
    n_t = jnp.minimum(jnp.floor(u[0] * (self.num_scales - num_steps)), last - num_steps)
    n_t = n_t.astype(jnp.int32)
    n_s = n_t + num_steps + jnp.floor(u[1] * (self.num_scales - n_t - num_steps)).astype(jnp.int32)
    return n_t, jnp.minimum(n_s, last)

  def dsm_noise_levels(self, rng, batch_size: int):
    """[B] noise levels of the denoising term (see the class docstring)."""
    normal_key, uniform_key = jax.random.split(rng)
    lognormal = jnp.exp(self.dsm_p_mean + self.dsm_p_std *
                        jax.random.normal(normal_key, (batch_size,)))
    if self.dsm_sigma_sampler == "lognormal":
      return lognormal
    position = self.dsm_uniform_fraction * jax.random.uniform(uniform_key, (batch_size,))
    on_ramp = self.noise_level(position * (self.num_scales - 1))
    return jnp.where(jnp.arange(batch_size) < batch_size // 2, lognormal, on_ramp)

  def dsm_weights(self, sigma):
    """[B] weights w(sigma) of the DSM term at its noise levels sigma: [B]: "karras" EDM's
    (sigma_eff^2 + sd^2) / (sigma_eff sd)^2 = 1 / c_out(sigma)^2, or "uniform" ones."""
    if self.dsm_weighting != "karras":
      return jnp.ones_like(sigma)
    sigma = self.effective_sigma(sigma)
    return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

  def distance_fn(self, a, b):
    """[B] distances between a, b: [B, ...]: mean squared error ("l2") or pseudo-Huber."""
    diff = jnp.reshape(a - b, (a.shape[0], -1))
    if self.distance == "l2":
      return jnp.mean(jnp.square(diff), axis=1)
    c = self.huber_c or 0.00054 * diff.shape[1] ** 0.5
    return jnp.sqrt(jnp.sum(jnp.square(diff), axis=1) + c ** 2) - c

  def output_layer(self, params) -> tuple:
    """The path (a tuple of keys) of the output layer's weight, for the adaptive DSM weight: the
    `kernel` of the layer objective.adaptive_layer names (or of the first OUTPUT_LAYER_NAMES
    present), or of its `linear` sublayer (DiT's final layer)."""
    if self.adaptive_layer:
      names = [tuple(self.adaptive_layer.split("/"))]
    else:
      names = [(name,) for name in OUTPUT_LAYER_NAMES if name in params]
    node = params
    for key in (names[0] if names else ("",)):
      node = node.get(key) if isinstance(node, dict) else None
    path = names[0] if names else ()
    if isinstance(node, dict):
      if "kernel" in node:
        path, node = path + ("kernel",), node["kernel"]
      elif isinstance(node.get("linear"), dict) and "kernel" in node["linear"]:
        path, node = path + ("linear", "kernel"), node["linear"]["kernel"]
      else:
        node = None
    if node is None or isinstance(node, dict):
      raise ValueError(f"objective.adaptive_layer={self.adaptive_layer!r}: the adaptive DSM weight "
                       "needs the weight of the backbone's output layer, a layer among the "
                       f"top-level parameters {sorted(params)} (or a '/'-separated path to a "
                       "weight in one); set objective.adaptive_layer to it, or use "
                       "objective.dsm_balance='fixed'.")
    return path

  def loss(self, params, batch, rng, step, view):
    """CTM loss of a batch {'image': [B, ...], 'label': [B]}; view: {"ema", "extra", "step"}."""
    del step
    x = batch["image"].astype(jnp.float32)
    repa_target = repa_lib.target(self.repa, batch, view)
    heun_key, index_key, noise_key, dsm_key, drop_key, model_key = jax.random.split(rng, 6)
    num_steps = self.sample_heun_steps(heun_key)
    n_t, n_s = self.sample_indices(index_key, x.shape[0], num_steps)
    eps = common.draw_noise(noise_key, x.shape, self.noise, self.noise_nu, jnp.float32)
    labels = common.labels(batch, self.num_classes)
    cond = common.drop_labels(labels, drop_key, self.label_dropout, self.num_classes)
    return self.loss_at(params, self.target_params(view), view["extra"]["teacher"], x, cond,
                        labels, n_t, num_steps, n_s, eps, dsm_key, model_key, repa_target)

  def targets(self, params, target_params, teacher_params, x_t, n_t, num_steps, n_s, cond,
              teacher_cond):
    """The stop-gradient CTM target G^-(G^-(Heun(x_t, t -> u), u, s), s, sigma_min): [B, ...].

    target_params: theta^- (EMA); the inner map uses params under stop-gradient instead when
    target_inner='model_sg'. x_t: [B, ...] at sigma_{n_t}; n_t, n_s: [B]; num_steps: k.
    """
    sigma_u, sigma_s = self.noise_level(n_t + num_steps), self.noise_level(n_s)
    x_u = self.teacher_solve(teacher_params, x_t, n_t, num_steps, teacher_cond)
    inner = target_params if self.target_inner == "ema" else jax.lax.stop_gradient(params)
    y = self.trajectory_map(inner, x_u, sigma_u, sigma_s, cond)
    floor = jnp.full_like(sigma_s, self.sigma_min)
    return jax.lax.stop_gradient(self.trajectory_map(target_params, y, sigma_s, floor, cond))

  def loss_at(self, params, target_params, teacher_params, x, cond, teacher_cond, n_t, num_steps,
              n_s, eps, dsm_key, rng, repa_target=None):
    """The CTM loss at given grid indices and noise.

    x, eps: [B, ...]; cond: student labels (dropped ones null) or None; teacher_cond: true labels
    or None; n_t, n_s: [B] int32 grid indices, n_t + num_steps <= n_s; num_steps: k; dsm_key:
    draws of the DSM term; rng: dropout key of the student's calls; repa_target: REPA's encoder
    features of x ([B, h, w, D], `repa.Alignment.target`) or None; given, loss_REPA of the
    student's G_theta(x_t, t, s) is added.
    """
    x, eps = x.astype(jnp.float32), eps.astype(jnp.float32)
    sigma_t, sigma_s = self.noise_level(n_t), self.noise_level(n_s)
    x_t = x + paths.expand(sigma_t, x) * eps
    target = self.targets(params, target_params, teacher_params, x_t, n_t, num_steps, n_s, cond,
                          teacher_cond)
    floor = jnp.full_like(sigma_s, self.sigma_min)
    sigma_key, dsm_noise_key = jax.random.split(dsm_key)
    sigma_dsm = self.dsm_noise_levels(sigma_key, x.shape[0])
    dsm_noise = self.draw_noise(dsm_noise_key, x.shape, jnp.float32)
    x_dsm = x + paths.expand(sigma_dsm, x) * dsm_noise
    dsm_w = self.dsm_weights(sigma_dsm)
    use_dsm = self.dsm_weight > 0

    def terms(p, capture=False):
      """(ctm, dsm), and with capture the student's REPA tokens third."""
      tokens = None
      if capture:
        estimate, tokens = self.trajectory_map(p, x_t, sigma_t, sigma_s, cond, rng, train=True,
                                               capture=True)
      else:
        estimate = self.trajectory_map(p, x_t, sigma_t, sigma_s, cond, rng, train=True)
      estimate = self.trajectory_map(target_params, estimate, sigma_s, floor, cond)
      ctm = jnp.mean(self.distance_fn(estimate, target))
      if not use_dsm:
        dsm = jnp.zeros((), jnp.float32)
      else:
        denoised = self.g_fn(p, x_dsm, sigma_dsm, sigma_dsm, cond, rng, train=True)
        dsm = jnp.mean(dsm_w * common.mean_per_example(jnp.square(denoised - x)))
      return (ctm, dsm, tokens) if capture else (ctm, dsm)

    if repa_target is None:
      ctm, dsm = terms(params)
    else:
      ctm, dsm, tokens = terms(params, capture=True)
    balance = jnp.ones((), jnp.float32)
    if use_dsm and self.dsm_balance == "adaptive":
      balance = self.adaptive_balance(terms, params)
    metrics = {"ctm": ctm, "dsm": dsm, "dsm_balance": balance,
               "heun_steps": jnp.asarray(num_steps, jnp.float32),
               "sigma_t_mean": jnp.mean(sigma_t), "sigma_s_mean": jnp.mean(sigma_s)}
    loss = ctm + self.dsm_weight * balance * dsm
    if repa_target is None:
      return loss, metrics
    return self.repa.add(loss, metrics, tokens, repa_target)

  def adaptive_balance(self, terms, params):
    """lambda = clip(||grad_W ctm|| / (||grad_W dsm|| + 1e-4), 0, 1e4) over the output layer's
    weight W, with no gradient. terms: params -> (ctm, dsm) scalars."""
    frozen = jax.lax.stop_gradient(params)
    path = self.output_layer(frozen)

    def replaced(tree, keys, value):
      if not keys:
        return value
      return {**tree, keys[0]: replaced(tree[keys[0]], keys[1:], value)}

    weight = frozen
    for key in path:
      weight = weight[key]
    layer_terms = lambda w: terms(replaced(frozen, path, w))
    _, pullback = jax.vjp(layer_terms, weight)
    one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
    (grad_ctm,) = pullback((one, zero))
    (grad_dsm,) = pullback((zero, one))
    ratio = optax.global_norm(grad_ctm) / (optax.global_norm(grad_dsm) + BALANCE_EPS)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, BALANCE_MAX))

  # Sampling.

  def draw_noise(self, rng, shape, dtype=None):
    """Noise of objective.noise's law (`common.draw_noise`): [shape] with shape[0] examples."""
    return common.draw_noise(rng, shape, self.noise, self.noise_nu, dtype)

  def sample(self, params, rng, num, cond=None, *, num_steps=1, method="karras", guidance=1.0):
    """num samples by gamma-sampling (objective.sample_gamma) from x = sigma_max z (z ~ N(0, I),
    or Student-t with objective.noise) along
    a Karras grid of num_steps steps to sigma_min. cond: [num] labels or None. The teacher's
    guidance is distilled in (objective.teacher_guidance), so `guidance` must be 1.0."""
    if method not in SAMPLE_METHODS:
      raise ValueError("sample.method: " + unknown_name_message("CTM sampling method", method,
                                                                list(SAMPLE_METHODS)))
    if guidance != 1.0:
      raise ValueError(f"sample.guidance={guidance}: CTM distils the teacher's guidance "
                       "(objective.teacher_guidance); use sample.guidance=1.0.")
    noise_key, gamma_key = jax.random.split(rng)
    x = self.sigma_max * self.draw_noise(noise_key, (num,) + self.image_shape, jnp.float32)
    grid = ctm_sampler.karras_grid(num_steps, self.sigma_max, self.sigma_min, self.rho)
    fn = lambda x, t, s: self.trajectory_map(params, x, t, s, cond)
    return ctm_sampler.gamma_sample(fn, x, grid, gamma_key, self.sample_gamma, self.draw_noise)
