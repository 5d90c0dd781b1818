"""Inductive Moment Matching (Zhou, Ermon and Song, 2025): a few-step flow map f_theta(x_t, t, s).

Per group of M particles sharing times s <= r < t, IMM matches the distribution of
f_theta(x_t, t, s) with that of the bootstrapped target stop_gradient f_theta(x_r, r, s), where
x_r is the DDIM step of x_t to r with the same noise, by a kernel MMD^2 (Zhou et al.,
arXiv:2503.07565).
flowjax conventions: t = 0 is data, t = 1 is noise, x_t = alpha_t x + sigma_t eps with
eps ~ N(0, sigma_d^2 I); times are fed to the backbone in [0, 1], whose time_scale (1000) applies
IMM's 1000 t scaling.

objective.noise='student_t' draws eps = sigma_d eps' with eps' the multivariate Student-t of
Pandey et al. (arXiv:2410.14171; `common.draw_noise`) in the loss, the sampler's start x_T and the
restart samplers' re-noising. This is flowjax's extension, not part of either paper: IMM's DDIM
step x_r = ddim(x_t, x, t, r) keeps the same noise, so x_r is on the Student-t path whatever the
noise law, but c_in = 1 / (sigma_d sqrt(alpha_t^2 + sigma_t^2)) and the kernel bandwidth still
assume noise of variance sigma_d^2 (Student-t noise has sigma_d^2 nu / (nu - 2)).

REPA (config.repa, arXiv:2410.06940; `repa`) aligns the hidden tokens of the forward that carries
gradients, f_theta(x_t, t, s) (not the stop-gradient target f_theta(x_r, r, s)).
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from flowjax import paths
from flowjax.objectives import common, repa as repa_lib
from flowjax.registry import OBJECTIVES, unknown_name_message
from flowjax.samplers import ode, pushforward

F_TYPES = ("euler_fm", "simple_edm")
TIME_EMBEDDINGS = ("identity", "stride")
TIME_SAMPLERS = ("uniform", "lognormal_eta")
KERNELS = ("laplace", "rbf")
WEIGHTINGS = ("sigmoid", "none")
# How a class-conditional batch forms its groups of particles. "mixed": consecutive examples, so a
# group mixes labels and its MMD matches the groups' label mixtures (the unconditional estimator
# applied to conditional data). "by_label": the batch is sorted by its (dropped) labels before
# grouping and only pairs of particles with equal labels enter the MMD, so each group matches
# each label's conditional distribution; a particle alone with its label keeps its own term.
LABEL_GROUPS = ("mixed", "by_label")
SAMPLE_METHODS = ("uniform", "edm", "restart", "restart_edm")

# Floor of the Laplace kernel's distance: sqrt is not differentiable at 0, which every diagonal
# entry of the M x M kernel matrices hits.
DISTANCE_FLOOR = 1e-8
# Floor of |c_out(s, t)| in the kernel bandwidth, so that s = t (where f = x_t and the MMD is 0)
# gives a finite bandwidth and finite gradients.
C_OUT_FLOOR = 1e-6


def kernel_matrix(a, b, bandwidth, kernel: str = "laplace"):
  """Per-group kernel matrices K[g, i, j] = k(a[g, i], b[g, j]).

  laplace: k = exp(-w ||a - b||_2 / D) with ||.||_2 = sqrt(max(||.||^2, DISTANCE_FLOOR^2));
  rbf: k = exp(-(w ||a - b||_2)^2 / D). a, b: [G, M, D] float32; bandwidth w: [G]. Returns
  [G, M, M]. The squared distance is summed from differences (not ||a||^2 + ||b||^2 - 2 a.b) to
  avoid cancellation between nearby particles.
  """
  dims = a.shape[-1]
  squared = jnp.sum(jnp.square(a[:, :, None, :] - b[:, None, :, :]), axis=-1)
  w = bandwidth[:, None, None]
  if kernel == "laplace":
    distance = jnp.sqrt(jnp.maximum(squared, DISTANCE_FLOOR ** 2))
    return jnp.exp(-w * distance / dims)
  if kernel == "rbf":
    return jnp.exp(-jnp.square(w) * squared / dims)
  raise ValueError(unknown_name_message("kernel", kernel, list(KERNELS)))


def mmd2(y_a, y_b, bandwidth, kernel: str = "laplace", pairs=None):
  """V-statistic MMD^2 per group, diagonals included (Zhou et al., arXiv:2503.07565).

  mean_ij [k(a_i, a_j) + k(b_i, b_j) - 2 k(a_i, b_j)]; y_a, y_b: [G, M, D]; bandwidth: [G].
  pairs: None (every pair), or [G, M, M] bool with a true diagonal: the mean is over the pairs
  marked, which for a same-label mask is the average of the per-label V-statistics weighted by
  n_c^2 (zero if and only if every label's distributions match). Returns [G] >= 0 for a
  positive-definite kernel.
  """
  k_aa = kernel_matrix(y_a, y_a, bandwidth, kernel)
  k_bb = kernel_matrix(y_b, y_b, bandwidth, kernel)
  k_ab = kernel_matrix(y_a, y_b, bandwidth, kernel)
  terms = k_aa + k_bb - 2.0 * k_ab
  if pairs is None:
    return jnp.mean(terms, axis=(1, 2))
  pairs = pairs.astype(terms.dtype)
  return jnp.sum(terms * pairs, axis=(1, 2)) / jnp.sum(pairs, axis=(1, 2))


def _check_choice(key: str, value: str, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"objective.{key}: " + unknown_name_message(key, value, list(allowed)))


@OBJECTIVES.register("imm")
@dataclasses.dataclass(frozen=True)
class IMM:
  """model: backbone F_theta(c_in x_t, (t, s or t - s), cond); image_shape: per-example shape;
  num_classes: 0 for unconditional models. The other fields are the `objective` config keys
  (see DEFAULTS)."""
  # The unweighted error the trainer logs as "error": the MMD^2 per group, before the time
  # weighting w(t).
  ERROR_METRIC: ClassVar[str] = "mmd"
  model: nn.Module
  image_shape: tuple
  num_classes: int
  path: str = "ot"
  f_type: str = "euler_fm"
  time_embedding: str = "stride"
  sigma_d: float = 0.5
  t_max: float = 0.994
  t_min: float = 1e-3
  time_sampler: str = "uniform"
  eta_mean: float = -1.1
  eta_std: float = 2.0
  mapping_k: int = 12
  mapping_eta_max: float = -1.0
  mapping_eta_min: float = -1.0
  mapping_min_gap: float = 0.0
  group_size: int = 4
  kernel: str = "laplace"
  weighting: str = "sigmoid"
  weight_a: float = 2.0
  weight_b: float = 4.0
  label_dropout: float = 0.1
  label_groups: str = "mixed"
  noise: str = "gaussian"
  noise_nu: float = common.DEFAULT_NU
  repa: repa_lib.Alignment | None = None

  DEFAULTS: ClassVar[dict] = dict(
      path="ot", f_type="euler_fm", time_embedding="stride", sigma_d=0.5, t_max=0.994,
      t_min=1e-3, time_sampler="uniform", eta_mean=-1.1, eta_std=2.0, mapping_k=12,
      mapping_eta_max=-1.0, mapping_eta_min=-1.0, mapping_min_gap=0.0, group_size=4,
      kernel="laplace", weighting="sigmoid", weight_a=2.0, weight_b=4.0, label_dropout=0.1,
      label_groups="mixed", **common.NOISE_DEFAULTS)

  def __post_init__(self):
    common.check_noise(self.noise, self.noise_nu)
    _check_choice("path", self.path, paths.PATHS)
    _check_choice("f_type", self.f_type, F_TYPES)
    _check_choice("time_embedding", self.time_embedding, TIME_EMBEDDINGS)
    _check_choice("time_sampler", self.time_sampler, TIME_SAMPLERS)
    _check_choice("kernel", self.kernel, KERNELS)
    _check_choice("weighting", self.weighting, WEIGHTINGS)
    _check_choice("label_groups", self.label_groups, LABEL_GROUPS)
    if self.f_type == "euler_fm" and self.path != "ot":
      raise ValueError(f"objective.f_type='euler_fm' is the Euler step of the OT path but "
                       f"objective.path={self.path!r}; use path='ot' or f_type='simple_edm'.")
    if not 0.0 <= self.t_min < self.t_max < 1.0:
      raise ValueError(f"objective.t_min={self.t_min} and objective.t_max={self.t_max} must "
                       "satisfy 0 <= t_min < t_max < 1 (eta = sigma / alpha is infinite at "
                       "t = 1); the defaults are 1e-3 and 0.994.")
    if self.sigma_d <= 0 or self.eta_std <= 0:
      raise ValueError(f"objective.sigma_d={self.sigma_d} and objective.eta_std={self.eta_std} "
                       "must be positive.")
    if not 0.0 <= self.mapping_min_gap < self.t_max - self.t_min:
      raise ValueError(f"objective.mapping_min_gap={self.mapping_min_gap} must be in [0, t_max - "
                       "t_min); 0 turns the guard r <= t - gap off.")
    if self.mapping_eta_max != -1.0 and self.mapping_eta_max <= max(self.mapping_eta_min, 0.0):
      raise ValueError(f"objective.mapping_eta_max={self.mapping_eta_max} must exceed "
                       f"mapping_eta_min={self.mapping_eta_min} (-1 for eta(t_max)).")
    if self.group_size < 1 or self.mapping_k < 0:
      raise ValueError(f"objective.group_size={self.group_size} must be >= 1 and "
                       f"objective.mapping_k={self.mapping_k} >= 0.")

  @classmethod
  def build(cls, config, model, info):
    keys = {key: config[key] for key in cls.DEFAULTS}
    return cls(model=model, image_shape=tuple(info.image_shape), num_classes=info.num_classes,
               **keys)

  @property
  def schedule(self) -> paths.Path:
    return paths.get(self.path)

  def init(self, rng, batch):
    x = batch["image"][:1]
    cond = common.labels(batch, self.num_classes)
    cond = None if cond is None else cond[:1]
    return common.init_model(self.model, rng, x, 2, cond), repa_lib.init_extra(self.repa, {})

  def load_extra(self, abstract_extra):
    """REPA's encoder parameters (config.repa with online features), else {}."""
    return repa_lib.load_extra(self.repa, abstract_extra, {})

  # The flow map.

  def network(self, params, x_t, t, s, cond, rng=None, train=False, capture=False):
    """Raw output F_theta(c_in x_t, (t, s) or (t, t - s), c): [B, ...] float32 (with capture,
    and the REPA tokens: `common.apply_model`).

    c_in = 1 / (sigma_d sqrt(alpha_t^2 + sigma_t^2)); x_t: [B, ...]; t, s: [B] with s <= t;
    cond: [B] labels or None.
    """
    path = self.schedule
    t_x = paths.expand(t, x_t)
    c_in = 1.0 / (self.sigma_d * jnp.sqrt(path.alpha(t_x) ** 2 + path.sigma(t_x) ** 2))
    second = s if self.time_embedding == "identity" else t - s
    out = common.apply_model(self.model, params, c_in * x_t, (t, second), cond, rng, train,
                             capture)
    if capture:
      return out[0].astype(jnp.float32), out[1]
    return out.astype(jnp.float32)

  def parameterize(self, x_t, out, t, s):
    """f(x_t, t, s) from the raw output F; x_t, out: [B, ...]; t, s: [B].

    euler_fm: f = x_t - (t - s) sigma_d F. simple_edm: f = c_skip x_t + c_out F with
    c_skip = (alpha_t alpha_s + sigma_t sigma_s) / (alpha_t^2 + sigma_t^2),
    c_out = -(alpha_s sigma_t - alpha_t sigma_s) sigma_d / sqrt(alpha_t^2 + sigma_t^2).
    Both give f(x, t, t) = x for any F.
    """
    t, s = paths.expand(t, x_t), paths.expand(s, x_t)
    x_t = x_t.astype(jnp.float32)
    if self.f_type == "euler_fm":
      return x_t - (t - s) * self.sigma_d * out
    path = self.schedule
    alpha_t, sigma_t, alpha_s, sigma_s = path.alpha(t), path.sigma(t), path.alpha(s), path.sigma(s)
    norm = alpha_t ** 2 + sigma_t ** 2
    c_skip = (alpha_t * alpha_s + sigma_t * sigma_s) / norm
    c_out = -(alpha_s * sigma_t - alpha_t * sigma_s) * self.sigma_d / jnp.sqrt(norm)
    return c_skip * x_t + c_out * out

  def flow_map(self, params, x_t, t, s, cond, rng=None, train=False, capture=False):
    """f_theta(x_t, t, s): [B, ...] float32, an estimate of x_s given x_t (with capture, and the
    REPA tokens)."""
    if capture:
      out, tokens = self.network(params, x_t, t, s, cond, rng, train, capture=True)
      return self.parameterize(x_t, out, t, s), tokens
    return self.parameterize(x_t, self.network(params, x_t, t, s, cond, rng, train), t, s)

  # Times, mapping and weights (float32, guarded).

  def eta_bounds(self):
    """(eta_min, eta_max) = (eta(t_min), eta(t_max)) as float32 scalars."""
    path = self.schedule
    return path.eta(jnp.float32(self.t_min)), path.eta(jnp.float32(self.t_max))

  def sample_times(self, rng, num_groups: int):
    """(t, s): [G] each with t_min <= s <= t <= t_max.

    "uniform": t ~ U(t_min, t_max), s ~ U(t_min, t). "lognormal_eta": log eta_t ~
    N(eta_mean, eta_std^2) truncated to [eta_min, eta_max], eta_s from the same law truncated to
    [eta_min, eta_t]; t = t(eta_t), s = t(eta_s).
    """
    t_key, s_key = jax.random.split(rng)
    path = self.schedule
    if self.time_sampler == "uniform":
      t = jax.random.uniform(t_key, (num_groups,), minval=self.t_min, maxval=self.t_max)
      s = self.t_min + jax.random.uniform(s_key, (num_groups,)) * (t - self.t_min)
    else:
      eta_min, eta_max = self.eta_bounds()
      lower = (jnp.log(eta_min) - self.eta_mean) / self.eta_std
      upper = (jnp.log(eta_max) - self.eta_mean) / self.eta_std
      z_t = jax.random.truncated_normal(t_key, lower, upper, (num_groups,))
      z_s = jax.random.truncated_normal(s_key, lower, z_t, (num_groups,))
      t = path.t_of_eta(jnp.exp(self.eta_mean + self.eta_std * z_t))
      s = path.t_of_eta(jnp.exp(self.eta_mean + self.eta_std * z_s))
    t = jnp.clip(t, self.t_min, self.t_max)
    return t, jnp.clip(s, self.t_min, t)

  def mapping_bounds(self):
    """(eta_min, eta_max) of the mapping's step: mapping_eta_min / mapping_eta_max where set
    (a public replication fixes 0 and 160), else eta(t_min) and eta(t_max) as in the paper's
    r(s, t) with a constant decrement in eta (Zhou et al., arXiv:2503.07565, Sec. 4 and App.)."""
    eta_min, eta_max = self.eta_bounds()
    if self.mapping_eta_min != -1.0:
      eta_min = jnp.float32(self.mapping_eta_min)
    if self.mapping_eta_max != -1.0:
      eta_max = jnp.float32(self.mapping_eta_max)
    return eta_min, eta_max

  def mapping(self, t, s):
    """r(s, t): eta_r = clip(eta_t - (eta_max - eta_min) / 2^k, eta_min, eta_max), r =
    min(t(eta_r), t - mapping_min_gap), then max(r, s); the final clip to [s, t] also absorbs
    float32 rounding, so s <= r <= t. t, s: [G] float32.

    r is a float32 time: near t = 1 its spacing (6e-8) is no longer small against t - r
    (1.5e-6 at t = 0.994 for the CIFAR-10 bounds, so t - r is off by up to 2% there);
    mapping_min_gap (e.g. 1e-4) keeps every step far above that spacing."""
    path = self.schedule
    eta_min, eta_max = self.mapping_bounds()
    eta_r = jnp.clip(path.eta(t) - (eta_max - eta_min) / 2.0 ** self.mapping_k, eta_min, eta_max)
    r = path.t_of_eta(eta_r)
    if self.mapping_min_gap > 0:
      r = jnp.minimum(r, t - self.mapping_min_gap)
    return jnp.clip(r, s, t)

  def loss_weight(self, t):
    """w(t) = 0.5 sigmoid(b - lambda_t) (-d lambda_t / dt) alpha_t^a / (alpha_t^2 + sigma_t^2),
    lambda_t = 2 log(alpha_t / sigma_t), a = weight_a, b = weight_b; 1 for weighting='none'.
    t: [G] in [0, 1); w(0) = 0, its limit (sigmoid(b - lambda_t) ~ sigma_t^2 vanishes faster
    than -d lambda_t / dt grows)."""
    if self.weighting == "none":
      return jnp.ones_like(t)
    path = self.schedule
    positive = jnp.maximum(t, jnp.finfo(jnp.float32).tiny)
    alpha, sigma = path.alpha(positive), path.sigma(positive)
    weight = (0.5 * jax.nn.sigmoid(self.weight_b - path.log_snr(positive))
              * path.neg_d_log_snr(positive) * alpha ** self.weight_a / (alpha ** 2 + sigma ** 2))
    return jnp.where(t > 0, weight, 0.0)

  def kernel_bandwidth(self, t, s):
    """w~(s, t) = 1 / |c_out(s, t)|: 1 / ((t - s) sigma_d) for euler_fm,
    sqrt(alpha_t^2 + sigma_t^2) / (|alpha_s sigma_t - alpha_t sigma_s| sigma_d) for simple_edm;
    |c_out| is floored at C_OUT_FLOOR. t, s: [G]."""
    if self.f_type == "euler_fm":
      c_out = (t - s) * self.sigma_d
    else:
      path = self.schedule
      alpha_t, sigma_t = path.alpha(t), path.sigma(t)
      alpha_s, sigma_s = path.alpha(s), path.sigma(s)
      c_out = (jnp.abs(alpha_s * sigma_t - alpha_t * sigma_s) * self.sigma_d /
               jnp.sqrt(alpha_t ** 2 + sigma_t ** 2))
    return 1.0 / jnp.maximum(jnp.abs(c_out), C_OUT_FLOOR)

  # The loss.

  def num_groups(self, batch_size: int) -> int:
    """B / M; raises a ValueError naming the keys to change when M does not divide B."""
    if batch_size % self.group_size:
      raise ValueError(
          f"objective.group_size={self.group_size} does not divide the batch of {batch_size} "
          "examples the IMM loss received (train.batch_size / train.grad_accum_steps): each "
          "group of group_size particles shares its times. Use a train.batch_size that is a "
          "multiple of group_size x grad_accum_steps; to keep every group on one device, also "
          "make batch_size / (group_size x grad_accum_steps) a multiple of the number of batch "
          "shards (mesh.data x mesh.fsdp).")
    return batch_size // self.group_size

  def loss(self, params, batch, rng, step, view):
    """IMM loss of a batch {'image': [B, ...], 'label': [B]}: B / M groups of M particles."""
    del step
    x = batch["image"].astype(jnp.float32)
    repa_target = repa_lib.target(self.repa, batch, view)
    num_groups = self.num_groups(x.shape[0])
    time_key, noise_key, drop_key, model_key = jax.random.split(rng, 4)
    t, s = self.sample_times(time_key, num_groups)
    r = self.mapping(t, s)
    eps = self.sigma_d * common.draw_noise(noise_key, x.shape, self.noise, self.noise_nu,
                                           jnp.float32)
    cond = common.drop_labels(common.labels(batch, self.num_classes), drop_key,
                              self.label_dropout, self.num_classes)
    if self.label_groups == "by_label" and cond is not None:
      order = jnp.argsort(cond, stable=True)
      x, cond = x[order], cond[order]
      if repa_target is not None:
        repa_target = repa_target[order]
    return self.loss_at(params, x, cond, t, r, s, eps, model_key, repa_target)

  def loss_at(self, params, x, cond, t, r, s, eps, rng, repa_target=None):
    """The IMM loss at given times and noise (Zhou et al., arXiv:2503.07565).

    x: [B, ...] data; cond: [B] labels or None; t, r, s: [G] group times with s <= r <= t;
    eps: [B, ...] noise with std sigma_d; rng: dropout key, shared by both network calls.
    Particles g M .. g M + M - 1 form group g. x_t = alpha_t x + sigma_t eps,
    x_r = ddim(x_t, x, t, r), y_st = f(x_t, t, s), y_sr = stop_gradient(f(x_r, r, s)), and
    loss = mean_g w(t_g) MMD^2_g(y_st, y_sr). repa_target: REPA's encoder features of x
    ([B, h, w, D], `repa.Alignment.target`) or None; given, loss_REPA of y_st's forward is added.
    """
    num_groups = self.num_groups(x.shape[0])
    path = self.schedule
    t_b, r_b, s_b = (jnp.repeat(v, self.group_size) for v in (t, r, s))
    x_t = path.interpolate(x, eps, t_b)
    x_r = path.ddim(x_t, x, t_b, r_b)
    if repa_target is None:
      y_st = self.flow_map(params, x_t, t_b, s_b, cond, rng, train=True)
    else:
      y_st, tokens = self.flow_map(params, x_t, t_b, s_b, cond, rng, train=True, capture=True)
    y_sr = jax.lax.stop_gradient(self.flow_map(params, x_r, r_b, s_b, cond, rng, train=True))
    grouped = lambda y: y.reshape(num_groups, self.group_size, -1)
    pairs = None
    if self.label_groups == "by_label" and cond is not None:
      labels = cond.reshape(num_groups, self.group_size)
      pairs = labels[:, :, None] == labels[:, None, :]
    mmd = mmd2(grouped(y_st), grouped(y_sr), self.kernel_bandwidth(t, s), self.kernel, pairs)
    weight = self.loss_weight(t)
    metrics = {"mmd": jnp.mean(mmd), "weight_mean": jnp.mean(weight), "t_mean": jnp.mean(t),
               "s_mean": jnp.mean(s), "t_minus_r": jnp.mean(t - r)}
    if repa_target is None:
      return jnp.mean(weight * mmd), metrics
    return self.repa.add(jnp.mean(weight * mmd), metrics, tokens, repa_target)

  # Sampling.

  def initial_noise(self, rng, num: int):
    """x_T = sigma_d eps, eps ~ N(0, I) (or Student-t, objective.noise): [num, *image_shape]
    float32."""
    return self.sigma_d * common.draw_noise(rng, (num,) + self.image_shape, self.noise,
                                            self.noise_nu, jnp.float32)

  def sample(self, params, rng, num, cond=None, *, num_steps=1, method="uniform",
             guidance=1.0, times=()):
    """num samples by pushforward from x_T ~ N(0, sigma_d^2 I) (`initial_noise`) at t_max down to
    t_min.

    method: "uniform" (grid uniform in t), "edm" (EDM-like in eta, rho = 7), "restart" and
    "restart_edm" (jump to t_min at every grid time, re-noise to the next one); `times`, when
    given, replaces the grid: num_steps + 1 decreasing times in [t_min, t_max], pure noise placed
    at the first (e.g. IMM's two-step CIFAR-10 sampler with its intermediate eta = 1.4, t =
    1.4 / 2.4 on the OT path: times (0.994, 0.58333, 0.006)). Classifier-free
    guidance acts on the raw output, F = F_u + w (F_c - F_u); w = 1 is the conditional model.
    rng is split into (noise key, restart key); cond: [num] labels or None.
    """
    if method not in SAMPLE_METHODS:
      raise ValueError("sample.method: " + unknown_name_message("IMM sampling method", method,
                                                                list(SAMPLE_METHODS)))
    noise_key, restart_key = jax.random.split(rng)
    return self.sample_from(params, self.initial_noise(noise_key, num), cond,
                            num_steps=num_steps, method=method, guidance=guidance,
                            rng=restart_key, times=times)

  def time_grid(self, num_steps, method="uniform", times=()):
    """[num_steps + 1] float32 sampling times from noise to data: `times` when given (checked
    to lie in [t_min, t_max] and decrease), else the method's grid from t_max to t_min."""
    if not times:
      schedule = "edm" if method.endswith("edm") else "uniform"
      return pushforward.time_grid(schedule, num_steps, self.schedule, self.t_max, self.t_min)
    times = tuple(float(t) for t in times)
    if len(times) != num_steps + 1:
      raise ValueError(f"sample.times has {len(times)} times for sample.num_steps={num_steps}; "
                       f"give num_steps + 1 = {num_steps + 1}.")
    if not (self.t_min - 1e-6 <= min(times) and max(times) <= self.t_max + 1e-6
            and all(a > b for a, b in zip(times, times[1:]))):
      raise ValueError(f"sample.times={times}: IMM's map was trained on [t_min, t_max] = "
                       f"[{self.t_min}, {self.t_max}]; give decreasing times inside it.")
    return jnp.asarray(times, jnp.float32)

  def sample_from(self, params, x_start, cond=None, *, num_steps=1, method="uniform",
                  guidance=1.0, rng=None, times=()):
    """`sample` from given x_T [B, ...] at t_max (rng: the restart methods' re-noising key)."""
    path = self.schedule
    # Times travel as one [B, 2] array so that the guidance helper batches them like x.
    raw = lambda x, times, c: self.network(params, x, times[:, 0], times[:, 1], c)
    guided = ode.guided(raw, cond, guidance, self.num_classes)
    flow_map = lambda x, t, s: self.parameterize(x, guided(x, jnp.stack([t, s], axis=1)), t, s)
    grid = self.time_grid(num_steps, method, times)
    if method.startswith("restart"):
      renoise = lambda x0, t, key: path.interpolate(
          x0, self.sigma_d * common.draw_noise(key, x0.shape, self.noise, self.noise_nu,
                                               jnp.float32), t)
      return pushforward.restart(flow_map, x_start, grid, rng, renoise)
    return pushforward.pushforward(flow_map, x_start, grid)
