"""Consistency training, iCT style (Song and Dhariwal, 2023): a one-step model without a teacher.

The consistency function f_theta(x, sigma) maps a point x = x_0 + sigma n of the EDM path
(sigma from sigma_min = 0.002 to sigma_max = 80) to the data end of its probability-flow ODE
trajectory. EDM parameterisation (Song and Dhariwal, arXiv:2310.14189, openai/consistency_models):
  f(x, sigma) = c_skip(sigma) x + c_out(sigma) F_theta(c_in(sigma) x, u(sigma)),
  c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2),
  c_out = sigma_data (sigma - sigma_min) / sqrt(sigma^2 + sigma_data^2),
  c_in = 1 / sqrt(sigma^2 + sigma_data^2),
so f(x, sigma_min) = x exactly (c_skip = 1, c_out = 0).

Loss at training step k: the discretisation sigma_1 < ... < sigma_N(k) (Karras, rho = 7) has
N(k) = min(s0 2^floor(k / K'), s1) + 1 points, K' = floor(K / (log2 floor(s1 / s0) + 1)),
K = total_steps (iCT's exponential curriculum, s0 = 10, s1 = 1280). An index i is drawn with
p(i) proportional to erf((ln sigma_{i+1} - P_mean) / (sqrt(2) P_std)) - erf((ln sigma_i -
P_mean) / (sqrt(2) P_std)) (P_mean = -1.1, P_std = 2), and
  loss = mean_B lambda(sigma_i) d(f_theta(x + sigma_{i+1} n, sigma_{i+1}),
                                  stop_gradient(f_theta(x + sigma_i n, sigma_i))),
lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i), with the pseudo-Huber distance
d(a, b) = sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(D) for D dims per example. The teacher is
the current network (no EMA) under the same dropout key.

Time given to the backbone (flowjax convention: 0 = data end, 1 = noise end):
  u(sigma) = (ln sigma - ln sigma_min) / (ln sigma_max - ln sigma_min) in [0, 1],
an affine map of EDM's c_noise = ln(sigma) / 4; the backbone's time_scale (1000) spreads it over
the sinusoidal embedding. sigma_data (0.5 for data in [-1, 1]) is a config key for data of other
scales (toy 2D data).

Noise: objective.noise='student_t' draws n (the loss's shared noise), the sampler's start z and
every re-noising z' from the multivariate Student-t t_D(0, I_D, nu) of Pandey et al.
(arXiv:2410.14171; `common.draw_noise`), one chi^2 scale per example. That is flowjax's
extension: neither paper trains consistency models with it. The preconditioning follows the noise
law as in t-EDM: with Student-t noise every coefficient above is evaluated at the noise's standard
deviation sigma_eff = sigma sqrt(nu / (nu - 2)) in place of sigma (`common.effective_sigma`;
NVIDIA/physicsnemo's tEDMPrecondSuperRes.forward rescales sigma so before EDM's c_skip, c_out,
c_in and c_noise = ln(sigma) / 4): c_in and the backbone's time u(sigma_eff) (the map u itself is
unchanged) and c_skip, c_out with both sigma and sigma_min scaled, sigma_eff - sigma_min_eff =
(sigma - sigma_min) sqrt(nu / (nu - 2)). So f(x, sigma_min) = x still holds exactly, c_in x has
the variance c_in^2 (sigma_data^2 + sigma_eff^2) = 1 of EDM's design for data of variance
sigma_data^2, and u(sigma_eff) = u(sigma) + ln sqrt(nu / (nu - 2)) / ln(sigma_max / sigma_min)
(0.05 more for nu = 3 and the default range). The noisy point x + sigma n (t-EDM's
perturbation), the Karras grid and its interval probabilities, the weight 1 / (sigma_{i+1} -
sigma_i) (iCT's; EDM's loss weight has no part here) and the sampler's noise levels and
re-noising stay in sigma. With noise='gaussian' sigma_eff = sigma and all of this is the iCT
parameterisation above, bitwise.

REPA (config.repa, arXiv:2410.06940; `repa`) aligns the hidden tokens of the student forward
f_theta(x + sigma_{i+1} n, sigma_{i+1}), the one that carries gradients.
"""

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import jax.scipy.special as jsp
from flax import linen as nn

from flowjax import paths
from flowjax.objectives import common, repa as repa_lib
from flowjax.registry import OBJECTIVES, unknown_name_message

METHODS = ("multistep",)
HUBER_SCALE = 0.00054


def pseudo_huber(a, b, c):
  """sqrt(||a - b||^2 + c^2) - c per example: [B]; a, b: [B, ...]; c > 0.

  ~ ||a - b||^2 / (2c) for ||a - b|| << c and ~ ||a - b|| - c for ||a - b|| >> c."""
  squared = jnp.sum(jnp.reshape(jnp.square(a - b), (a.shape[0], -1)), axis=1)
  return jnp.sqrt(squared + c * c) - c


@OBJECTIVES.register("consistency")
@dataclasses.dataclass(frozen=True)
class Consistency:
  """model: backbone F_theta(c_in x, (u(sigma_eff),), cond); image_shape: per-example shape;
  num_classes: 0 for unconditional models. The other fields are the `objective` config keys:

  sigma_data, sigma_min, sigma_max, rho: EDM scalings and the Karras discretisation
    (0.5, 0.002, 80, 7);
  p_mean, p_std: the lognormal over sigma that weights the discretisation intervals (-1.1, 2.0);
  initial_steps, final_steps: s0 and s1 of the curriculum (10, 1280);
  total_steps: K, the training steps over which the curriculum runs (experiments tie it to
    train.steps);
  huber_c: the pseudo-Huber constant; 0 picks 0.00054 sqrt(D);
  label_dropout: probability of the null label (index num_classes) during training;
  noise, noise_nu: the noise law ("gaussian" or "student_t" with nu degrees of freedom).
  """
  # The unweighted error the trainer logs as "error": the mean squared distance per dimension
  # between the student and the teacher, before the pseudo-Huber distance and the 1 /
  # (sigma_{i+1} - sigma_i) weight.
  ERROR_METRIC: ClassVar[str] = "mse"
  model: nn.Module
  image_shape: tuple
  num_classes: int
  sigma_data: float = 0.5
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0
  p_mean: float = -1.1
  p_std: float = 2.0
  initial_steps: int = 10
  final_steps: int = 1280
  total_steps: int = 400_000
  huber_c: float = 0.0
  label_dropout: float = 0.0
  noise: str = "gaussian"
  noise_nu: float = common.DEFAULT_NU
  repa: repa_lib.Alignment | None = None

  DEFAULTS: ClassVar[dict] = dict(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                                  p_mean=-1.1, p_std=2.0, initial_steps=10, final_steps=1280,
                                  total_steps=400_000, huber_c=0.0, label_dropout=0.0,
                                  **common.NOISE_DEFAULTS)

  def __post_init__(self):
    common.check_noise(self.noise, self.noise_nu)
    if not 0.0 < self.sigma_min < self.sigma_max:
      raise ValueError(f"objective.sigma_min={self.sigma_min} and objective.sigma_max="
                       f"{self.sigma_max} must satisfy 0 < sigma_min < sigma_max (0.002, 80).")
    for key in ("sigma_data", "rho", "p_std"):
      if getattr(self, key) <= 0:
        raise ValueError(f"objective.{key}={getattr(self, key)} must be positive.")
    if not 1 <= self.initial_steps <= self.final_steps:
      raise ValueError(f"objective.initial_steps={self.initial_steps} and "
                       f"objective.final_steps={self.final_steps} must satisfy "
                       "1 <= initial_steps <= final_steps (iCT: 10 and 1280).")
    if self.total_steps < 1:
      raise ValueError(f"objective.total_steps={self.total_steps} must be positive; set it to "
                       "train.steps.")
    if self.huber_c < 0:
      raise ValueError(f"objective.huber_c={self.huber_c} must be >= 0 (0 = 0.00054 sqrt(D)).")

  @classmethod
  def build(cls, config, model, info):
    keys = {key: config[key] for key in cls.DEFAULTS}
    return cls(model=model, image_shape=tuple(info.image_shape), num_classes=info.num_classes,
               **keys)

  @property
  def distance_c(self) -> float:
    return self.huber_c or HUBER_SCALE * math.sqrt(math.prod(self.image_shape))

  def init(self, rng, batch):
    x = batch["image"][:1]
    cond = common.labels(batch, self.num_classes)
    cond = None if cond is None else cond[:1]
    return common.init_model(self.model, rng, x, 1, cond), repa_lib.init_extra(self.repa, {})

  def load_extra(self, abstract_extra):
    """REPA's encoder parameters (config.repa with online features), else {}."""
    return repa_lib.load_extra(self.repa, abstract_extra, {})

  # The EDM parameterisation.

  def backbone_time(self, sigma):
    """u(sigma) = (ln sigma - ln sigma_min) / (ln sigma_max - ln sigma_min): [B], in [0, 1] for
    sigma in [sigma_min, sigma_max]."""
    low, high = math.log(self.sigma_min), math.log(self.sigma_max)
    return (jnp.log(sigma) - low) / (high - low)

  def effective_sigma(self, sigma):
    """sigma_eff: sigma for Gaussian noise, sigma sqrt(nu / (nu - 2)) for Student-t noise
    (`common.effective_sigma`)."""
    return common.effective_sigma(sigma, self.noise, self.noise_nu)

  def scalings(self, sigma):
    """(c_skip, c_out, c_in), each shaped like sigma: the formulas of the module docstring at
    sigma_eff, with sigma_eff - sigma_min_eff = (sigma - sigma_min) sqrt(nu / (nu - 2)) exactly 0
    at sigma = sigma_min."""
    data2 = self.sigma_data**2
    offset = self.effective_sigma(sigma - self.sigma_min)
    sigma = self.effective_sigma(sigma)
    c_skip = data2 / (offset ** 2 + data2)
    c_out = self.sigma_data * offset / jnp.sqrt(sigma**2 + data2)
    c_in = 1.0 / jnp.sqrt(sigma**2 + data2)
    return c_skip, c_out, c_in

  def consistency_fn(self, params, x, sigma, cond, rng=None, train=False, capture=False):
    """f_theta(x, sigma): [B, ...] float32; x: [B, ...]; sigma: [B] in [sigma_min, sigma_max].
    The backbone sees c_in x and u(sigma_eff). With capture, (f, REPA tokens)
    (`common.apply_model`)."""
    c_skip, c_out, c_in = (paths.expand(c, x) for c in self.scalings(sigma))
    time = self.backbone_time(self.effective_sigma(sigma))
    out = common.apply_model(self.model, params, c_in * x, (time,), cond, rng, train, capture)
    if capture:
      return c_skip * x + c_out * out[0].astype(jnp.float32), out[1]
    return c_skip * x + c_out * out.astype(jnp.float32)

  # The discretisation curriculum.

  def num_points(self, step):
    """N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = max(1, floor(K / (log2 floor(s1 / s0)
    + 1))): int32 (traced or concrete) for a training step k."""
    doublings = math.log2(math.floor(self.final_steps / self.initial_steps)) + 1
    stage_length = max(1, math.floor(self.total_steps / doublings))
    last_stage = math.ceil(math.log2(self.final_steps / self.initial_steps))
    stage = jnp.minimum(jnp.asarray(step, jnp.int32) // stage_length, last_stage)
    return jnp.minimum(self.initial_steps * 2**stage, self.final_steps).astype(jnp.int32) + 1

  def karras_sigmas(self, num_points):
    """[final_steps + 1] float32: sigma_i = (sigma_min^(1/rho) + i / (N - 1) (sigma_max^(1/rho)
    - sigma_min^(1/rho)))^rho for i = 0 .. N - 1 (ascending), sigma_max beyond; N = num_points."""
    i = jnp.arange(self.final_steps + 1, dtype=jnp.float32)
    fraction = jnp.minimum(i / (jnp.asarray(num_points, jnp.float32) - 1.0), 1.0)
    low, high = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
    sigmas = (low + fraction * (high - low)) ** self.rho
    return sigmas.at[0].set(self.sigma_min)

  def interval_probabilities(self, num_points):
    """[final_steps] float32, p(i) of the interval [sigma_i, sigma_{i+1}] for i < N - 1 (0 beyond):
    proportional to erf((ln sigma_{i+1} - P_mean) / (sqrt(2) P_std)) - erf((ln sigma_i - P_mean) /
    (sqrt(2) P_std))."""
    sigmas = self.karras_sigmas(num_points)
    cdf = jsp.erf((jnp.log(sigmas) - self.p_mean) / (math.sqrt(2.0) * self.p_std))
    mass = jnp.where(jnp.arange(self.final_steps) < num_points - 1, cdf[1:] - cdf[:-1], 0.0)
    return mass / jnp.sum(mass)

  def sample_sigma_pairs(self, rng, batch_size: int, step):
    """(sigma_i, sigma_{i+1}): [B] each, adjacent points of the step's discretisation, i drawn
    with `interval_probabilities` (by inverting their cumulative sum at uniform draws)."""
    num_points = self.num_points(step)
    sigmas = self.karras_sigmas(num_points)
    cumulative = jnp.cumsum(self.interval_probabilities(num_points))
    uniform = jax.random.uniform(rng, (batch_size,)) * cumulative[-1]
    index = jnp.minimum(jnp.searchsorted(cumulative, uniform, side="right"), num_points - 2)
    return sigmas[index], sigmas[index + 1]

  # Training.

  def loss(self, params, batch, rng, step, view):
    """iCT loss of a batch {'image': [B, ...], 'label': [B]} at training step `step`."""
    x = batch["image"].astype(jnp.float32)
    repa_target = repa_lib.target(self.repa, batch, view)
    sigma_key, noise_key, drop_key, model_key = jax.random.split(rng, 4)
    sigma, sigma_next = self.sample_sigma_pairs(sigma_key, x.shape[0], step)
    noise = common.draw_noise(noise_key, x.shape, self.noise, self.noise_nu, jnp.float32)
    cond = common.drop_labels(common.labels(batch, self.num_classes), drop_key,
                              self.label_dropout, self.num_classes)
    loss, metrics = self.loss_at(params, x, cond, sigma, sigma_next, noise, model_key,
                                 repa_target)
    metrics["num_points"] = self.num_points(step).astype(jnp.float32)
    return loss, metrics

  def loss_at(self, params, x, cond, sigma, sigma_next, noise, rng, repa_target=None):
    """mean_B d(f(x + sigma_next n, sigma_next), stop_gradient(f(x + sigma n, sigma))) /
    (sigma_next - sigma) at given sigma < sigma_next: [B] each; x, noise: [B, ...]; rng: dropout
    key shared by both evaluations. repa_target: REPA's encoder features of x ([B, h, w, D],
    `repa.Alignment.target`) or None; given, loss_REPA of the student forward is added."""
    x_next = x + paths.expand(sigma_next, x) * noise
    if repa_target is None:
      student = self.consistency_fn(params, x_next, sigma_next, cond, rng, train=True)
    else:
      student, tokens = self.consistency_fn(params, x_next, sigma_next, cond, rng, train=True,
                                            capture=True)
    teacher = jax.lax.stop_gradient(self.consistency_fn(
        params, x + paths.expand(sigma, x) * noise, sigma, cond, rng, train=True))
    distance = pseudo_huber(student, teacher, self.distance_c)
    weight = 1.0 / (sigma_next - sigma)
    metrics = {"distance": jnp.mean(distance), "sigma_mean": jnp.mean(sigma_next),
               "mse": jnp.mean(jnp.square(student - teacher))}
    if repa_target is None:
      return jnp.mean(weight * distance), metrics
    return self.repa.add(jnp.mean(weight * distance), metrics, tokens, repa_target)

  # Sampling.

  def sampling_sigmas(self, num_steps: int):
    """[num_steps] descending: the first num_steps points of the (num_steps + 1)-point Karras
    grid from sigma_max to sigma_min (one step: sigma_max alone)."""
    fraction = jnp.arange(num_steps, dtype=jnp.float32) / num_steps
    low, high = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
    return ((high + fraction * (low - high)) ** self.rho).at[0].set(self.sigma_max)

  def sigma_of_time(self, u):
    """The inverse of backbone_time: sigma = sigma_min (sigma_max / sigma_min)^u (the noise level
    of the path, before `effective_sigma`)."""
    low, high = math.log(self.sigma_min), math.log(self.sigma_max)
    return jnp.exp(low + jnp.asarray(u, jnp.float32) * (high - low))

  def karras_times(self, indices, num_points: int) -> tuple:
    """Times u of points `indices` of the num_points-point Karras grid from sigma_max (index 0)
    to sigma_min (index num_points - 1), as openai/consistency_models' multistep sampler picks
    them (its `ts` and `steps`; e.g. indices (0, 22, 39) of 40). Python floats, for
    config.sample.times."""
    low, high = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
    log_low, log_high = math.log(self.sigma_min), math.log(self.sigma_max)

    def time(i):
      if i <= 0 or i >= num_points - 1:  # the grid's ends, exactly
        return 1.0 if i <= 0 else 0.0
      sigma = (high + i / (num_points - 1) * (low - high)) ** self.rho
      return (math.log(sigma) - log_low) / (log_high - log_low)

    return tuple(time(i) for i in indices)

  def sample(self, params, rng, num, cond=None, *, num_steps=1, method="multistep",
             guidance=1.0, times=()):
    """Consistency sampling: x = f(sigma_max z, sigma_max), then for each later sigma of
    `sampling_sigmas`, x = f(x + sqrt(sigma^2 - sigma_min^2) z', sigma) with fresh z'.
    `times`, when given, replaces the sigmas: num_steps + 1 decreasing backbone times u (1 =
    sigma_max, 0 = sigma_min; see karras_times) whose first num_steps are the evaluations and
    whose last must be 0 (the data end); the start is sigma(u_0) z.
    cond: [num] labels or None. Returns [num, ...] float32."""
    if method not in METHODS:
      raise ValueError("sample.method: " + unknown_name_message(
          "consistency sampling method", method, list(METHODS)))
    if guidance != 1.0:
      raise ValueError(f"sample.guidance={guidance}: consistency sampling has no classifier-free "
                       "guidance; use sample.guidance=1.0.")
    if num_steps < 1:
      raise ValueError(f"sample.num_steps={num_steps}: consistency sampling takes at least one "
                       "step.")
    if times:
      times = common.grid_times(times, num_steps, "sigma_min")
      sigmas = self.sigma_of_time(jnp.asarray(times[:-1], jnp.float32))
      start_sigma = sigmas[0]
    else:
      sigmas = self.sampling_sigmas(num_steps)
      start_sigma = self.sigma_max
    first_key, rest_key = jax.random.split(rng)
    shape = (num,) + self.image_shape
    f = lambda x, sigma: self.consistency_fn(params, x, jnp.full((num,), sigma), cond)
    noise = lambda key: common.draw_noise(key, shape, self.noise, self.noise_nu, jnp.float32)
    x = f(start_sigma * noise(first_key), sigmas[0])

    def step(x, inputs):
      sigma, key = inputs
      noise_scale = jnp.sqrt(sigma**2 - self.sigma_min**2)
      return f(x + noise_scale * noise(key), sigma), None

    x, _ = jax.lax.scan(step, x, (sigmas[1:], jax.random.split(rest_key, num_steps - 1)))
    return x
