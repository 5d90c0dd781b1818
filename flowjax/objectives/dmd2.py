"""DMD2: distribution matching distillation of a flow-matching teacher into a few-step generator.

Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis"
(arXiv:2405.14867), after DMD (Yin et al., arXiv:2311.18828). Three networks, all of the
teacher's architecture: the frozen teacher v_real (the "real" score, in state.extra), the generator
G and the "fake" score v_fake that tracks the generator's distribution, both started from the
teacher's weights and trained here (parameter sets "generator" and "fake_score", each with its own
optimizer: config.optim.sets.<name>; see flowjax.optim).

flowjax conventions: t = 0 data, t = 1 noise, x_t = (1 - t) x + t eps, a velocity network v
denoises as x0(x_t, t) = x_t - t v(x_t, t).

Generator. G(x_{t_k}, t_k) = x_{t_k} - t_k v_G(x_{t_k}, t_k) at the times t_k = 1 - k / K
(k = 0 .. K - 1, K = objective.generator_steps; DMD2's 4-step ImageNet/SDXL generators use
999, 749, 499, 249 of 1000 DDPM steps). Sampling starts from eps ~ N(0, I) at t_0 = 1 and re-noises
each prediction to the next time with fresh noise. With K > 1 the generator trains at a step k
drawn uniformly per batch, on inputs x_{t_k} produced by running its own (stop-gradient) chain
from noise for k steps: DMD2's backward simulation (objective.generator_inputs='backward'), or on
real data noised to t_k ('data', DMD2's ablation).

Noise levels (objective.noise_levels): 'karras', as the official EDM code (tianweiy/DMD2,
main/edm/edm_guidance.py): an index uniform over a 1000-point (num_train_timesteps) Karras grid of
sigma (sigma_min 0.002, sigma_max 80, rho 7), within [min_step_percent, max_step_percent] x 1000
(0.02, 0.98) for the distribution-matching term and over the whole grid for the fake score, as OT
time t = sigma / (1 + sigma); or 'uniform': t ~ U[min_step_percent, max_step_percent] and, for the
fake score, U[0, 1]. objective.fake_score_levels='dm_range' draws the fake score's and the GAN's
levels from the distribution-matching term's range too, as NVlabs/FastGen's DMD2 does (its
"polynomial" time distribution: an index uniform over 2 .. 998 of the same 1000-point grid, i.e.
min_step_percent 0.002 and max_step_percent 0.998).

Distribution matching (DMD2 Eq. 2; the official `compute_distribution_matching_loss`): at such a
t and x_t = (1 - t) G + t eps,
  grad = (x0_fake(x_t, t) - x0_real(x_t, t)) / mean_dims |G - x0_real(x_t, t)|,
the real score guided by classifier-free guidance w = objective.teacher_guidance on its velocity,
and the generator loss 0.5 mean (G - stop_gradient(G - grad))^2, whose gradient with respect to G
is grad / (number of elements). DMD's regression loss (arXiv:2311.18828, Eq. 6), with weight
objective.regression_weight (0 = off, as DMD2), pairs each noise with the teacher's ODE solution
from it (objective.regression_steps Heun steps, guided, computed online) under a mean squared error
(DMD uses LPIPS on precomputed pairs).

Fake score: the teacher's flow-matching loss on stop_gradient(G), conditional like the teacher
(no label dropout, no guidance). The official EDM code regresses the fake x0 with the Karras
weight 1 / sigma^2 + 1 / sigma_d^2; the velocity error is the x0 error times
1 / t^2 = 1 / sigma^2 + 2 / sigma + 1, a weight of the same shape. Labels come from the batch
(the official code draws them uniformly; the law is the data's).

Two time-scale update rule (DMD2 Sec. 4.1): the fake score updates every step, the generator once
in every objective.generator_update_every (5) steps, at the last step of each cycle (steps
n - 1, 2n - 1, ...: the official code takes the first, a phase that changes nothing but which
step's metrics the trainer logs; here a logged step that is a multiple of n shows the
generator's terms). At the other steps the generator's forward runs without its backward and its
distribution-matching terms are not computed.

GAN (DMD2 Sec. 4.3; the official `compute_cls_logits` with --gan_classifier --diffusion_gan):
with objective.gan_weight > 0 a discriminator head (objective.gan_head: 'mean', GanHead: the mean
over positions of the features, then Dense, SiLU, Dense to one logit; 'conv', ConvGanHead: the
official convolutional head on an 8x8 bottleneck) reads the output of one module of the fake
score network (objective.gan_feature_layer; '' = the middle block, block_{(depth - 1) // 2}, of a
DiT or MLP, or an EDM U-Net's bottleneck, its last encoder block at the lowest resolution, as the
official `return_bottleneck`) at images noised to a level drawn as the fake score's (over the
whole grid, or the distribution-matching range with fake_score_levels='dm_range'). The fake
score's loss adds gan_discriminator_weight (1e-2) x mean[softplus(D(fake)) + softplus(-D(real))]
on the batch's real images, trained into the head and the fake score network; the generator's
adds gan_weight (3e-3 on ImageNet-64) x mean softplus(-D(G)) through the frozen fake score.
The head's parameters sit beside the fake score network's, under `dmd2_gan_head`, in the
fake_score set.

The official ImageNet-64 run (tianweiy/DMD2, experiments/imagenet/
imagenet_gan_classifier_genloss3e-3_diffusion1000_lr2e-6_scratch.sh and main/edm/train_edm.py):
generator and fake-score lr 2e-6, AdamW (0.9, 0.999) with weight decay 0.01, a warm-up of 500
scheduler steps (about 72 iterations on 7 GPUs), gradient norms clipped at 10 per network, batch
40 x 7 GPUs, generator_update_every 5, gan_weight 3e-3, gan_discriminator_weight 1e-2, bfloat16
(its --use_fp16), no EMA: experiments/dmd2_imagenet64.py.
"""

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from flowjax import paths
from flowjax.models import layers
from flowjax.objectives import common, ctm, scm
from flowjax.registry import OBJECTIVES, unknown_name_message
from flowjax.samplers import ode

TEACHER_WEIGHTS = ("ema", "params")
GENERATOR_INPUTS = ("backward", "data")
NOISE_LEVELS = ("karras", "uniform")
# Where the fake score's loss and the GAN draw their noise levels: "all", the whole grid (DMD2's
# official EDM code); "dm_range", the distribution-matching term's [min_step_percent,
# max_step_percent] (NVlabs/FastGen, whose DMD2 draws every noise level from one sample_t_cfg).
FAKE_SCORE_LEVELS = ("all", "dm_range")
SAMPLE_METHODS = ("generator",)
GENERATOR, FAKE_SCORE = "generator", "fake_score"
GAN_HEAD = "dmd2_gan_head"


class GanHead(nn.Module):
  """DMD2's realism classifier on a network's features: [B, ..., C] -> mean over the positions
  -> Dense(C) -> SiLU -> Dense(1): [B] float32 logits."""

  @nn.compact
  def __call__(self, features):
    h = features.astype(jnp.float32)
    if h.ndim > 2:
      h = jnp.mean(h, axis=tuple(range(1, h.ndim - 1)))
    h = nn.silu(layers.dense(h.shape[-1], ("embed", "mlp"), name="fc1")(h))
    return layers.dense(1, ("mlp", "embed"), name="fc2")(h)[:, 0]


class ConvGanHead(nn.Module):
  """DMD2's realism classifier for an EDM U-Net's bottleneck (the official `cls_pred_branch`,
  tianweiy/DMD2 main/edm/edm_guidance.py): [B, H, W, C] -> Conv(C, 4x4, stride 2, padding 1) ->
  GroupNorm -> SiLU -> Conv(C, 4x4, stride 4) -> GroupNorm -> SiLU -> Conv(1, 1x1), then the mean
  over the positions left (one at 8x8, the official ImageNet-64 bottleneck): [B] float32 logits.
  GroupNorm has gcd(32, C) groups (32 at the official 768 channels); kernels start as PyTorch's
  Conv2d (uniform within 1 / sqrt(fan_in)), biases at zero, and shard like the U-Net's."""

  @nn.compact
  def __call__(self, features):
    h = features.astype(jnp.float32)
    channels = h.shape[-1]
    groups = math.gcd(32, channels)
    init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

    def conv(features, size, stride, padding, names, name):
      return nn.Conv(features, (size, size), strides=(stride, stride), padding=padding,
                     kernel_init=nn.with_logical_partitioning(init, (None, None) + names),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]),
                     name=name)

    h = conv(channels, 4, 2, ((1, 1), (1, 1)), ("embed", "mlp"), "conv0")(h)
    h = nn.silu(nn.GroupNorm(num_groups=groups, epsilon=1e-5, name="norm0")(h))
    h = conv(channels, 4, 4, "VALID", ("mlp", "embed"), "conv1")(h)
    h = nn.silu(nn.GroupNorm(num_groups=groups, epsilon=1e-5, name="norm1")(h))
    h = conv(1, 1, 1, "VALID", ("embed", None), "conv2")(h)
    return jnp.mean(h[..., 0], axis=(1, 2))


GAN_HEADS = {"mean": GanHead, "conv": ConvGanHead}
RATIO_MEANS = "ratio_running_means"


def _check_choice(key: str, value: str, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"objective.{key}: " + unknown_name_message(key, value, list(allowed)))


def generator_times(num_steps: int) -> jax.Array:
  """[K] float32: t_k = 1 - k / K, the times at which a K-step generator is evaluated."""
  return 1.0 - jnp.arange(num_steps, dtype=jnp.float32) / num_steps


def distribution_matching_grad(x, x0_real, x0_fake):
  """DMD's gradient at generator samples x: (x0_fake - x0_real) / mean_dims |x - x0_real| per
  example (non-finite entries zeroed, as the official code does). All [B, ...] float32."""
  axes = tuple(range(1, x.ndim))
  norm = jnp.mean(jnp.abs(x - x0_real), axis=axes, keepdims=True)
  return jnp.nan_to_num((x0_fake - x0_real) / norm)


@OBJECTIVES.register("dmd2")
@dataclasses.dataclass(frozen=True)
class DMD2:
  """model: the teacher's backbone (config.model must equal the teacher's); teacher_model,
  teacher_key: the flow-matching teacher's backbone and the subtree of its saved state to load.
  The other fields are the `objective` config keys (see DEFAULTS):
  teacher_workdir, teacher_weights ('ema' | 'params'), teacher_guidance (the real score's
  classifier-free guidance scale; 1 = none); generator_steps K; generator_inputs ('backward' |
  'data'); generator_update_every (the two time-scale rule's ratio); regression_weight and
  regression_steps (DMD's regression loss; 0 = off); noise_levels, min_step_percent,
  max_step_percent, num_train_timesteps, sigma_min, sigma_max, rho, fake_score_levels: the noise
  levels (module docstring); gan_weight (0 = no GAN), gan_discriminator_weight,
  gan_feature_layer: the GAN."""
  PARAM_SETS: ClassVar[tuple] = (GENERATOR, FAKE_SCORE)
  EMA_SETS: ClassVar[tuple] = (GENERATOR,)
  # The unweighted error the trainer logs as "error": the fake score's flow-matching MSE on the
  # generator's samples (the distribution-matching loss only carries a gradient).
  ERROR_METRIC: ClassVar[str] = "fake_score_mse"
  model: nn.Module
  image_shape: tuple
  num_classes: int
  teacher_model: Any = None
  teacher_key: tuple = ("params",)
  teacher_workdir: str = ""
  teacher_weights: str = "ema"
  teacher_guidance: float = 1.0
  generator_steps: int = 1
  generator_inputs: str = "backward"
  generator_update_every: int = 5
  noise_levels: str = "karras"
  min_step_percent: float = 0.02
  max_step_percent: float = 0.98
  num_train_timesteps: int = 1000
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0
  fake_score_levels: str = "all"
  regression_weight: float = 0.0
  regression_steps: int = 16
  gan_weight: float = 0.0
  gan_discriminator_weight: float = 1e-2
  gan_feature_layer: str = ""
  gan_head: str = "mean"

  DEFAULTS: ClassVar[dict] = dict(
      teacher_workdir="", teacher_weights="ema", teacher_guidance=1.0, generator_steps=1,
      generator_inputs="backward", generator_update_every=5, noise_levels="karras",
      min_step_percent=0.02, max_step_percent=0.98, num_train_timesteps=1000, sigma_min=0.002,
      sigma_max=80.0, rho=7.0, fake_score_levels="all", regression_weight=0.0,
      regression_steps=16, gan_weight=0.0, gan_discriminator_weight=1e-2, gan_feature_layer="",
      gan_head="mean")

  def __post_init__(self):
    _check_choice("teacher_weights", self.teacher_weights, TEACHER_WEIGHTS)
    _check_choice("generator_inputs", self.generator_inputs, GENERATOR_INPUTS)
    if self.generator_steps < 1:
      raise ValueError(f"objective.generator_steps={self.generator_steps} must be >= 1 "
                       "(1: a one-step generator; DMD2's multi-step generators use 4).")
    if self.generator_update_every < 1:
      raise ValueError(f"objective.generator_update_every={self.generator_update_every} must be "
                       ">= 1 (1: generator and fake score update together; DMD2: 5).")
    _check_choice("noise_levels", self.noise_levels, NOISE_LEVELS)
    _check_choice("fake_score_levels", self.fake_score_levels, FAKE_SCORE_LEVELS)
    if not 0.0 <= self.min_step_percent < self.max_step_percent <= 1.0:
      raise ValueError(f"objective.min_step_percent={self.min_step_percent} and "
                       f"objective.max_step_percent={self.max_step_percent} must satisfy "
                       "0 <= min < max <= 1 (DMD2: 0.02 and 0.98).")
    if self.num_train_timesteps < 2 or not 0 < self.sigma_min < self.sigma_max:
      raise ValueError(f"objective.num_train_timesteps={self.num_train_timesteps} must be >= 2 "
                       f"and 0 < sigma_min={self.sigma_min} < sigma_max={self.sigma_max}.")
    if self.regression_weight < 0 or self.regression_steps < 1:
      raise ValueError(f"objective.regression_weight={self.regression_weight} must be >= 0 and "
                       f"objective.regression_steps={self.regression_steps} >= 1.")
    if self.gan_weight < 0 or self.gan_discriminator_weight < 0:
      raise ValueError(f"objective.gan_weight={self.gan_weight} and "
                       f"objective.gan_discriminator_weight={self.gan_discriminator_weight} must "
                       "be >= 0 (0 = no GAN; DMD2 ImageNet-64: 3e-3 and 1e-2).")
    _check_choice("gan_head", self.gan_head, list(GAN_HEADS))
    if self.gan_weight > 0 and not self.gan_layer():
      raise ValueError(f"objective.gan_weight={self.gan_weight}: name the fake score module whose "
                       "output the discriminator reads with objective.gan_feature_layer (the "
                       f"{type(self.model).__name__} backbone has no block_<i> layers).")
    if self.teacher_guidance != 1.0 and self.num_classes <= 0:
      raise ValueError(f"objective.teacher_guidance={self.teacher_guidance} needs class labels "
                       "(data.conditional=True); use teacher_guidance=1.0.")
    if self.teacher_model is not None:
      differences = scm.architecture_differences(self.model, self.teacher_model)
      if differences:
        raise ValueError(
            "DMD2's generator and fake score are the teacher's network started from its "
            "weights, so config.model must equal the teacher's model section "
            "(objective.teacher_workdir's config.json; model.attention_impl, remat and dropout "
            "may differ):\n  " + "\n  ".join(differences)
            + "\nSet them to the teacher's values (e.g. --config.model.KEY=VALUE).")

  @classmethod
  def build(cls, config, model, info):
    keys = {key: config[key] for key in cls.DEFAULTS}
    teacher_model, teacher_key = ctm.read_teacher(config.teacher_workdir, info,
                                                  config.teacher_weights, method="DMD2")
    ctm.check_teacher_noise(config.teacher_workdir, "gaussian", common.DEFAULT_NU, "DMD2")
    return cls(model=model, image_shape=tuple(info.image_shape), num_classes=info.num_classes,
               teacher_model=teacher_model, teacher_key=teacher_key, **keys)

  # State: {"generator", "fake_score"} parameters; the teacher in `extra`.

  def init(self, rng, batch):
    """({"generator": ..., "fake_score": ...}, {"teacher": ...}): random weights and teacher
    placeholders; `load_extra` reads the teacher, `initial_params` copies it into both sets."""
    if self.teacher_model is None:
      raise ctm.TeacherError("The DMD2 objective has no teacher model; build it with "
                             "flowjax.objectives.build from a config whose "
                             "objective.teacher_workdir names a flow-matching run.")
    x = batch["image"][:1]
    cond = common.labels(batch, self.num_classes)
    cond = None if cond is None else cond[:1]
    g_key, f_key, t_key = jax.random.split(rng, 3)
    params = {GENERATOR: common.init_model(self.model, g_key, x, 1, cond),
              FAKE_SCORE: common.init_model(self.model, f_key, x, 1, cond)}
    if self.gan_weight > 0:
      if GAN_HEAD in params[FAKE_SCORE]:
        raise ValueError(f"The backbone has a parameter named {GAN_HEAD!r}, the key DMD2 keeps "
                         "its GAN head under; rename that layer.")
      features = jax.eval_shape(lambda p: self.features(nn.meta.unbox(p), x,
                                                        jnp.ones((1,)), cond),
                                params[FAKE_SCORE])
      if self.gan_head == "conv" and (len(features.shape) != 4
                                      or min(features.shape[1:3]) < 8):
        raise ValueError(f"objective.gan_head='conv' reads [B, H, W, C] features of at least "
                         f"8x8 positions (the official head takes an EDM U-Net's 8x8 "
                         f"bottleneck), but objective.gan_feature_layer={self.gan_layer()!r} "
                         f"gives {list(features.shape)}; use gan_head='mean' or another layer.")
      head = GAN_HEADS[self.gan_head]().init(jax.random.fold_in(f_key, 1),
                                             jnp.zeros(features.shape, jnp.float32))["params"]
      params[FAKE_SCORE] = {**params[FAKE_SCORE], GAN_HEAD: head}
    return params, {"teacher": common.init_model(self.teacher_model, t_key, x, 1, cond),
                    **self.kept_state()}

  def load_extra(self, abstract_extra):
    """{"teacher": the teacher's saved weights} (fresh starts only; see train.py)."""
    return {"teacher": ctm.load_teacher(self, abstract_extra, type(self).__name__)}

  def initial_params(self, params, extra):
    """Generator and fake score both start as copies of the teacher (DMD2 Sec. 5), on the
    shardings of `params`; the GAN head keeps its initialisation."""
    teacher = extra["teacher"]
    describe = lambda tree: jax.tree.map(lambda leaf: (leaf.shape, str(leaf.dtype)), tree)
    if describe(teacher) != describe(params[GENERATOR]):
      raise ValueError("DMD2: the teacher's parameters do not have the generator's names, shapes "
                       "and dtypes; use this run's config.model for the teacher.")
    copy = lambda tree: jax.device_put(
        teacher, jax.tree.map(lambda leaf: leaf.sharding, tree), may_alias=False)
    fake = params[FAKE_SCORE]
    head = {GAN_HEAD: fake[GAN_HEAD]} if GAN_HEAD in fake else {}
    return {GENERATOR: copy(params[GENERATOR]),
            FAKE_SCORE: {**copy(self.network_params(fake)), **head}}

  def active_sets(self, step):
    """Which sets apply their update at `step` (0-based): the fake score always, the generator
    when (step + 1) % generator_update_every == 0 (DMD2's two time-scale rule)."""
    return {GENERATOR: (step + 1) % self.generator_update_every == 0,
            FAKE_SCORE: jnp.asarray(True)}

  # Noise levels.

  def karras_times(self):
    """[num_train_timesteps] float32: OT times sigma / (1 + sigma) of the Karras grid, smallest
    sigma first."""
    ramp = jnp.linspace(0.0, 1.0, self.num_train_timesteps)
    lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
    sigma = (lo + ramp * (hi - lo)) ** self.rho
    return sigma / (1.0 + sigma)

  def noise_times(self, rng, batch_size: int, full: bool):
    """[B] OT times of the distribution-matching term (full=False: within
    [min_step_percent, max_step_percent]) or of the fake score's loss and the GAN (full=True:
    over the whole grid, or that range too with fake_score_levels='dm_range')."""
    full = full and self.fake_score_levels == "all"
    if self.noise_levels == "uniform":
      lo, hi = (0.0, 1.0) if full else (self.min_step_percent, self.max_step_percent)
      return jax.random.uniform(rng, (batch_size,), jnp.float32, lo, hi)
    n = self.num_train_timesteps
    lo, hi = (0, n) if full else (int(self.min_step_percent * n),
                                  min(int(self.max_step_percent * n) + 1, n))
    return self.karras_times()[jax.random.randint(rng, (batch_size,), lo, hi)]

  def sample_weights(self, fake_params, x_t, t, cond, kept):
    """(per-example weights of the distribution-matching gradient ([B]) or None, new values of
    the state.extra entries `kept` (those of `kept_state`)). DMD2: none; f-distill's h(r) below."""
    del fake_params, x_t, t, cond
    return None, kept

  def kept_state(self) -> dict:
    """Entries of state.extra this objective carries from one step to the next (their initial
    values), updated through common.EXTRA_UPDATES. DMD2: none."""
    return {}

  # Networks.

  @staticmethod
  def network_params(params):
    """A fake score's network parameters: `params` without the GAN head's."""
    return {key: value for key, value in params.items() if key != GAN_HEAD}

  def velocity(self, params, x, t, cond):
    return common.apply_model(self.model, self.network_params(params), x, (t,),
                              cond).astype(jnp.float32)

  def gan_layer(self) -> str:
    """The fake score module the discriminator reads: objective.gan_feature_layer, or the
    middle block of a DiT or MLP ('' when the backbone has no depth)."""
    if self.gan_feature_layer:
      return self.gan_feature_layer
    depth = getattr(self.model, "depth", 0)
    if depth:
      return f"block_{(depth - 1) // 2}"
    mults, blocks = getattr(self.model, "channel_mult", ()), getattr(self.model, "num_blocks", 0)
    if mults and blocks and len(self.image_shape) == 3:
      # An EDM U-Net: the encoder's last block, at the lowest resolution (the official
      # `return_bottleneck` of tianweiy/DMD2's EDM networks).
      res = self.image_shape[0] >> (len(mults) - 1)
      return f"enc_{res}x{res}_block{blocks - 1}"
    return ""

  def features(self, params, x_t, t, cond):
    """The output of gan_layer() in the fake score network at (x_t, t): [B, ..., C]."""
    name = self.gan_layer()
    _, state = self.model.apply(
        {"params": self.network_params(params)}, x_t, (t,), cond, train=False,
        capture_intermediates=lambda module, method: (module.name == name
                                                      and method == "__call__"),
        mutable=["intermediates"])
    def find(tree):
      for key, value in tree.items():
        if key == name and "__call__" in value:
          return value["__call__"][0]
        if isinstance(value, dict) and key != "__call__":
          out = find(value)
          if out is not None:
            return out
      return None

    found = find(dict(state.get("intermediates", {})))
    if found is None:
      raise ValueError(f"objective.gan_feature_layer={name!r} is not a module of the "
                       f"{type(self.model).__name__} backbone; name one of its layers (e.g. "
                       "block_<i>).")
    return found

  def discriminator(self, params, x, cond, rng):
    """D(x): [B] logits of the head on the fake score's features at x noised to a level drawn
    as the fake score's (DMD2's diffusion GAN: over the whole grid)."""
    t_key, e_key = jax.random.split(rng)
    t = self.noise_times(t_key, x.shape[0], full=True)
    te = paths.expand(t, x)
    x_t = (1.0 - te) * x.astype(jnp.float32) + te * jax.random.normal(e_key, x.shape)
    return self.head_logits(params, self.features(params, x_t, t, cond))

  def head_logits(self, params, features):
    """[B] logits of the GAN head (objective.gan_head) in the fake score's `params`."""
    return GAN_HEADS[self.gan_head]().apply({"params": params[GAN_HEAD]}, features)

  def generate(self, params, x_t, t, cond):
    """G(x_t, t) = x_t - t v_G(x_t, t): [B, ...] float32; t: [B]."""
    return x_t - paths.expand(t, x_t) * self.velocity(params, x_t, t, cond)

  def real_x0(self, teacher, x_t, t, cond):
    """The teacher's guided denoised estimate x_t - t v_real(x_t, t), float32."""
    fn = lambda x, s, c: common.apply_model(self.teacher_model, teacher, x, (s,), c)
    v = ode.guided(fn, cond, self.teacher_guidance, self.num_classes)(x_t, t)
    return x_t - paths.expand(t, x_t) * v.astype(jnp.float32)

  def teacher_solution(self, teacher, z, cond):
    """The teacher's guided PF-ODE from z at t = 1 to t = 0 (regression_steps Heun steps)."""
    fn = lambda x, s, c: common.apply_model(self.teacher_model, teacher, x, (s,), c)
    return ode.solve(ode.guided(fn, cond, self.teacher_guidance, self.num_classes),
                     z.astype(jnp.float32), self.regression_steps, "heun")

  def chain(self, params, z, cond, rng, num_steps: int, times):
    """Runs the generator from z at times[0] through num_steps (a Python int or int32 scalar)
    steps, re-noising each prediction to the next time; returns x at times[num_steps]."""
    def body(k, x):
      x0 = self.generate(params, x, jnp.full((x.shape[0],), times[k]), cond)
      eps = jax.random.normal(jax.random.fold_in(rng, k), x.shape, jnp.float32)
      t_next = times[k + 1]
      return (1.0 - t_next) * x0 + t_next * eps
    return jax.lax.fori_loop(0, num_steps, body, z.astype(jnp.float32))

  # The loss.

  def generator_inputs_of(self, params, x, cond, rng):
    """(x_{t_k}: [B, ...] float32, t_k: [B]) for the generator's training forward: k uniform in
    0 .. K - 1 for the batch; x_{t_k} from noise through k stop-gradient generator steps
    ('backward') or the data noised to t_k ('data')."""
    k_key, z_key, chain_key = jax.random.split(rng, 3)
    z = jax.random.normal(z_key, x.shape, jnp.float32)
    times = jnp.concatenate([generator_times(self.generator_steps), jnp.zeros((1,))])
    if self.generator_steps == 1:
      return z, jnp.ones((x.shape[0],), jnp.float32)
    k = jax.random.randint(k_key, (), 0, self.generator_steps)
    t_k = jnp.full((x.shape[0],), times[k])
    if self.generator_inputs == "data":
      return (1.0 - paths.expand(t_k, x)) * x.astype(jnp.float32) + paths.expand(t_k, x) * z, t_k
    frozen = jax.lax.stop_gradient(params)
    return self.chain(frozen, z, cond, chain_key, k, times), t_k

  def loss(self, params, batch, rng, step, view):
    x = batch["image"]
    cond = common.labels(batch, self.num_classes)
    teacher = jax.lax.stop_gradient(view["extra"]["teacher"])
    input_key, dm_key, fake_key = jax.random.split(rng, 3)
    x_in, t_in = self.generator_inputs_of(params[GENERATOR], x, cond, input_key)
    batch_size = x.shape[0]
    fake_params = jax.lax.stop_gradient(params[FAKE_SCORE])

    def generator_terms(gen_params):
      sample = self.generate(gen_params, x_in, t_in, cond)
      t_key, e_key, z_key = jax.random.split(dm_key, 3)
      t = self.noise_times(t_key, batch_size, full=False)
      eps = jax.random.normal(e_key, sample.shape, jnp.float32)
      te = paths.expand(t, sample)
      x_t = jax.lax.stop_gradient((1.0 - te) * sample + te * eps)
      x0_real = self.real_x0(teacher, x_t, t, cond)
      x0_fake = x_t - te * self.velocity(fake_params, x_t, t, cond)
      grad = jax.lax.stop_gradient(distribution_matching_grad(sample, x0_real, x0_fake))
      weights, new_kept = self.sample_weights(fake_params, x_t, t, cond, kept)
      metrics = {}
      if weights is not None:
        grad = paths.expand(weights, grad) * grad
        metrics = {"weight_min": jnp.min(weights), "weight_max": jnp.max(weights)}
      dm = 0.5 * jnp.mean(jnp.square(sample - jax.lax.stop_gradient(sample - grad)))
      total = dm
      metrics.update(dm_loss=dm, dm_grad_norm=jnp.sqrt(jnp.mean(jnp.square(grad))))
      if self.regression_weight > 0:
        # DMD's regression pairs: the one-step generator from pure noise against the teacher's
        # ODE solution from the same noise.
        if self.generator_steps == 1:
          z, target_of = x_in, sample
        else:
          z = jax.random.normal(z_key, sample.shape, jnp.float32)
          target_of = self.generate(gen_params, z, jnp.ones((batch_size,)), cond)
        target = jax.lax.stop_gradient(self.teacher_solution(teacher, z, cond))
        regression = jnp.mean(jnp.square(target_of - target))
        total = total + self.regression_weight * regression
        metrics["regression_loss"] = regression
      else:
        metrics["regression_loss"] = jnp.zeros(())
      if self.gan_weight > 0:
        logits = self.discriminator(fake_params, sample, cond, jax.random.fold_in(dm_key, 1))
        gan = jnp.mean(jax.nn.softplus(-logits))
        total = total + self.gan_weight * gan
        metrics["gan_generator_loss"] = gan
      return total, sample, metrics, new_kept

    def skipped(gen_params):
      # Zeros in place of every metric the generator's terms log (eval_shape traces, never runs);
      # the kept state unchanged.
      shapes = jax.eval_shape(generator_terms, gen_params)[2]
      metrics = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), shapes)
      sample = self.generate(jax.lax.stop_gradient(gen_params), x_in, t_in, cond)
      return jnp.zeros(()), sample, metrics, kept

    kept = {k: view["extra"][k] for k in self.kept_state()}
    # An evaluation (view["evaluating"]) computes the generator's terms at every step.
    active = jnp.logical_or(self.active_sets(step)[GENERATOR], view.get("evaluating", False))
    generator_loss, sample, metrics, kept = jax.lax.cond(active, generator_terms, skipped,
                                                         params[GENERATOR])
    if kept:
      metrics[common.EXTRA_UPDATES] = kept

    # The fake score: flow matching on the generator's (stop-gradient) samples.
    sample = jax.lax.stop_gradient(sample)
    t_key, e_key = jax.random.split(fake_key)
    t = self.noise_times(t_key, batch_size, full=True)
    eps = jax.random.normal(e_key, sample.shape, jnp.float32)
    te = paths.expand(t, sample)
    v = self.velocity(params[FAKE_SCORE], (1.0 - te) * sample + te * eps, t, cond)
    fake_mse = jnp.mean(jnp.square(v - (eps - sample)))
    fake_loss = fake_mse
    if self.gan_weight > 0:
      # The discriminator (head and fake score network) on the batch's real images against the
      # generator's samples.
      real_key, gen_key = jax.random.split(jax.random.fold_in(fake_key, 1))
      on_fake = self.discriminator(params[FAKE_SCORE], sample, cond, gen_key)
      on_real = self.discriminator(params[FAKE_SCORE], x, cond, real_key)
      gan = jnp.mean(jax.nn.softplus(on_fake) + jax.nn.softplus(-on_real))
      fake_loss = fake_loss + self.gan_discriminator_weight * gan
      metrics = dict(metrics, gan_discriminator_loss=gan,
                     d_real=jnp.mean(jax.nn.sigmoid(on_real)),
                     d_fake=jnp.mean(jax.nn.sigmoid(on_fake)))
    return generator_loss + fake_loss, dict(metrics, fake_score_mse=fake_mse,
                                            generator_loss=generator_loss,
                                            generator_active=active.astype(jnp.float32))

  def sample(self, params, rng, num, cond=None, *, num_steps=None, method="generator",
             guidance=1.0):
    """num samples: K generator steps (num_steps None or K) from N(0, I) at t = 1; guidance
    is distilled into the generator (the real score's), so sampling takes guidance = 1."""
    _check_choice("sample.method", method, SAMPLE_METHODS)
    if guidance != 1.0:
      raise ValueError(f"sample.guidance={guidance}: DMD2's generator has the teacher's guidance "
                       f"(objective.teacher_guidance={self.teacher_guidance}) distilled in; "
                       "sample with guidance 1.0.")
    steps = self.generator_steps if num_steps is None else int(num_steps)
    if steps < 1:
      raise ValueError(f"sample.num_steps={steps} must be >= 1.")
    noise_key, chain_key = jax.random.split(rng)
    z = jax.random.normal(noise_key, (num,) + self.image_shape, jnp.float32)
    times = generator_times(steps)
    gen = params[GENERATOR]
    x = self.chain(gen, z, cond, chain_key, steps - 1, jnp.concatenate([times, jnp.zeros((1,))]))
    return self.generate(gen, x, jnp.full((num,), times[steps - 1]), cond)


# f-distill (Xu et al., "One-step Diffusion Models with f-Divergence Distribution Matching",
# arXiv:2502.15681): the distribution-matching gradient of each sample weighted by
# h(r) = f''(r) r^2, r = p_data / p_generator at the noised sample, read from the GAN head as
# r = exp(logit). The weights as NVlabs/FastGen's `all_f_div_weighting_function`.
F_DIVERGENCES = {
    "reverse_kl": lambda r: jnp.ones_like(r),   # DMD
    "kl": lambda r: r,
    "js": lambda r: 1.0 - 1.0 / (1.0 + r),
    "squared_hellinger": jnp.sqrt,
    "jeffreys": lambda r: 1.0 + r,
    "softened_rkl": lambda r: 1.0 / (1.0 + r),
    "pearson": lambda r: 1.0 / jnp.maximum(r, 1e-8),
}


def f_divergence_weights(logits, t, divergence: str, lower: float, upper: float, bins: int,
                         running=None, ema_rate: float = 0.0):
  """(h(r) per example, normalised to mean 1 over the batch (stop-gradient), the new running
  per-bin means (None without `running`)).

  logits: [B] discriminator logits at the noised generator samples; t: [B] their OT times.
  r = exp(clip(logits, -10, 10)) clipped to [lower, upper]; with bins > 0, r is divided by the
  mean of r within its bin of t (bins equal bins of [0, 1]): the batch's mean m_b, or, with
  `running` ([bins], FastGen's ratio_ema_rate > 0), the running mean updated first,
  running_b <- ema_rate running_b + (1 - ema_rate) m_b in every bin the batch reaches (ema_rate 0
  is the batch mean, FastGen's default); then h = F_DIVERGENCES[divergence](r) / (mean h + 1e-6).
  """
  r = jnp.clip(jnp.exp(jnp.clip(logits.astype(jnp.float32), -10.0, 10.0)), lower, upper)
  if bins > 0:
    index = jnp.clip(jnp.floor(t * bins).astype(jnp.int32), 0, bins - 1)
    one_hot = jax.nn.one_hot(index, bins, dtype=jnp.float32)
    count = jnp.sum(one_hot, axis=0)
    mean = (one_hot.T @ r) / (count + 1e-6)
    if running is not None:
      mean = jnp.where(count > 0, ema_rate * running + (1.0 - ema_rate) * mean, running)
      running = jax.lax.stop_gradient(mean)
    r = r / (mean[index] + 1e-6)
  h = F_DIVERGENCES[divergence](r)
  return jax.lax.stop_gradient(h / (jnp.mean(h) + 1e-6)), running


@OBJECTIVES.register("fdistill")
@dataclasses.dataclass(frozen=True)
class FDistill(DMD2):
  """f-distill: DMD2 with the GAN (gan_weight > 0, required) whose head also estimates the
  density ratio r at the distribution-matching samples (the head on the fake score's features at
  x_t; FastGen reads the teacher's), and the gradient of each sample weighted by
  `f_divergence_weights` (objective.f_divergence: js (FastGen's default), kl, reverse_kl = DMD,
  squared_hellinger, jeffreys, softened_rkl, pearson; ratio_lower 0.1, ratio_upper 20,
  ratio_bins 10; ratio_ema_rate: FastGen's running mean of the ratio per bin, kept in
  state.extra["ratio_running_means"] and checkpointed, 0 = each batch's own mean)."""
  f_divergence: str = "js"
  ratio_lower: float = 0.1
  ratio_upper: float = 20.0
  ratio_bins: int = 10
  ratio_ema_rate: float = 0.0

  DEFAULTS: ClassVar[dict] = dict(DMD2.DEFAULTS, gan_weight=3e-3, f_divergence="js",
                                  ratio_lower=0.1, ratio_upper=20.0, ratio_bins=10,
                                  ratio_ema_rate=0.0)

  def __post_init__(self):
    super().__post_init__()
    _check_choice("f_divergence", self.f_divergence, list(F_DIVERGENCES))
    if self.gan_weight <= 0:
      raise ValueError(f"objective.gan_weight={self.gan_weight}: f-distill reads the density ratio "
                       "from the GAN head, so it needs gan_weight > 0 (3e-3 on ImageNet-64).")
    if not 0.0 <= self.ratio_ema_rate < 1.0:
      raise ValueError(f"objective.ratio_ema_rate={self.ratio_ema_rate} must be in [0, 1) (0: each "
                       "batch's own per-bin mean, FastGen's default; its ImageNet-64 run: 0.5).")
    if not 0 < self.ratio_lower < self.ratio_upper or self.ratio_bins < 0:
      raise ValueError(f"objective.ratio_lower={self.ratio_lower}, ratio_upper={self.ratio_upper} "
                       f"and ratio_bins={self.ratio_bins} must satisfy 0 < lower < upper, "
                       "bins >= 0 (FastGen: 0.1, 20, 10).")

  def kept_state(self) -> dict:
    """{"ratio_running_means": ones} (FastGen's `bins` buffer) with ratio_ema_rate > 0 and bins."""
    if self.ratio_ema_rate > 0 and self.ratio_bins > 0:
      return {RATIO_MEANS: jnp.ones((self.ratio_bins,), jnp.float32)}
    return {}

  def sample_weights(self, fake_params, x_t, t, cond, kept):
    logits = self.head_logits(fake_params, self.features(fake_params, x_t, t, cond))
    weights, running = f_divergence_weights(
        logits, t, self.f_divergence, self.ratio_lower, self.ratio_upper, self.ratio_bins,
        running=kept.get(RATIO_MEANS), ema_rate=self.ratio_ema_rate)
    return weights, ({RATIO_MEANS: running} if RATIO_MEANS in kept else kept)
