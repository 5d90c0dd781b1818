"""STARFlow / TarFlow: maximum likelihood of an autoregressive normalizing flow.

The flow (`flowjax.models.tarflow`) maps data to noise, z = f(y), with an exact per-dimension
log-determinant. Training minimises the per-dimension negative log-likelihood
  loss = 0.5 mean(z^2) - sum_blocks logdet  (+ intermediate_weight sum_k mean(z_k^2))
where z_k are the outputs of the inner blocks (STARFlow's 1e-4 regulariser), dropping the
constant 0.5 log(2 pi) (Zhai et al., arXiv:2412.06329; Gu et al., arXiv:2506.06276). The data
y are either
- "dequantize": x in [-1, 1] with `data_levels` K values, x = k / (K - 1) * 2 - 1 (K = 256 for
  8-bit images, 17 for flowjax's digits), dequantised as y = (k + u) / K * 2 - 1 with
  u ~ U[0, 1); then -log P(k) <= -log p(y) + D log(K / 2), and
  bits/dim = (-log p(y) / D + log(K / 2)) / ln 2 (for K = 256 this is the log 128 formula); or
- "gaussian": y = x + noise_std n, n ~ N(0, I) (noise augmentation); samples then get the
  Tweedie step y + noise_std^2 grad log p(y) when `denoise`.
Labels are replaced by the null label with probability label_dropout (classifier-free guidance).
A text model (model.text_dim > 0) reads the batch's caption features 'text' [B, T, D] instead
(`flowjax.data.captions`), replaced by the null (empty) caption's features with probability
label_dropout; guided sampling contrasts the prompt with that null caption.
Metrics: `nll` (nats per dimension of y, with the 0.5 log(2 pi)), `bits_per_dim` (dequantize),
`prior` (0.5 mean z^2), `logdet`, `intermediate`.

Sampling (`flowjax.samplers.autoregressive`): z ~ N(0, I), the blocks inverted in reverse order by
"kv_cache" (default), "jacobi" or "naive" decoding. `sample.guidance` g is the usual CFG scale:
g = 1 is the plain conditional model and the guidance weight of the per-token rule is w = g - 1
(STARFlow's cfg=w, TarFlow's guidance=w).
"""

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from flowjax.objectives import common
from flowjax.registry import OBJECTIVES, unknown_name_message
from flowjax.samplers import autoregressive

NOISES = ("dequantize", "gaussian")
LOG_2PI = math.log(2.0 * math.pi)


@OBJECTIVES.register("starflow")
@dataclasses.dataclass(frozen=True)
class StarFlow(common.Conditioned):
  """model: a flow with the contract of flowjax.models.tarflow; image_shape: per-example shape;
  num_classes: 0 for unconditional models. The other fields are the `objective` config keys:

  noise: "dequantize" (uniform, with data_levels K) or "gaussian" (std noise_std);
  intermediate_weight: weight of sum_k mean(z_k^2) over the inner block outputs (STARFlow 1e-4);
  label_dropout: probability of the null label (a text model's null caption) in training;
  denoise: apply the Tweedie step to samples of a "gaussian" model;
  guidance_rule: "starflow" (product of Gaussians), "tarflow" (linear in mu and log sigma) or
    "tarflow_shift" (linear in mu only);
  guidance_anneal: raise the guidance weight linearly over the tokens;
  jacobi_chunk, jacobi_tolerance, jacobi_max_iterations: Jacobi decoding settings;
  attention_temperature: sampling attention temperature (every pass with the "starflow" rule,
    the unconditional pass with the TarFlow rules), 1 = off.
  """
  # The unweighted error the trainer logs as "error": the negative log-likelihood per dimension,
  # without the latent-norm regulariser.
  ERROR_METRIC: ClassVar[str] = "nll"
  model: nn.Module
  image_shape: tuple
  num_classes: int
  noise: str = "dequantize"
  data_levels: int = 256
  noise_std: float = 0.05
  intermediate_weight: float = 1e-4
  label_dropout: float = 0.1
  denoise: bool = True
  guidance_rule: str = "starflow"
  guidance_anneal: bool = False
  jacobi_chunk: int = 16
  jacobi_tolerance: float = 1e-3
  jacobi_max_iterations: int = 32
  attention_temperature: float = 1.0
  null_text: Any = dataclasses.field(default=None, compare=False, repr=False)

  DEFAULTS: ClassVar[dict] = dict(
      noise="dequantize", data_levels=256, noise_std=0.05, intermediate_weight=1e-4,
      label_dropout=0.1, denoise=True, guidance_rule="starflow", guidance_anneal=False,
      jacobi_chunk=16, jacobi_tolerance=1e-3, jacobi_max_iterations=32,
      attention_temperature=1.0)

  def __post_init__(self):
    if self.noise not in NOISES:
      raise ValueError("objective.noise: " + unknown_name_message("noise", self.noise, NOISES))
    if self.guidance_rule not in autoregressive.RULES:
      raise ValueError("objective.guidance_rule: " + unknown_name_message(
          "guidance rule", self.guidance_rule, list(autoregressive.RULES)))
    if self.noise == "dequantize" and self.data_levels < 2:
      raise ValueError(f"objective.data_levels={self.data_levels}: dequantisation needs the "
                       "number of data values, at least 2 (256 for 8-bit images, 17 for digits).")
    if self.noise_std < 0:
      raise ValueError(f"objective.noise_std={self.noise_std} must be >= 0.")
    if self.intermediate_weight < 0:
      raise ValueError(f"objective.intermediate_weight={self.intermediate_weight} must be >= 0.")
    if not 0.0 <= self.label_dropout < 1.0:
      raise ValueError(f"objective.label_dropout={self.label_dropout} must be in [0, 1).")
    if self.attention_temperature <= 0:
      raise ValueError(f"objective.attention_temperature={self.attention_temperature} must be "
                       "> 0 (1 = off).")
    if self.jacobi_chunk < 1 or self.jacobi_max_iterations < 1 or self.jacobi_tolerance < 0:
      raise ValueError(f"objective.jacobi_chunk={self.jacobi_chunk} and "
                       f"objective.jacobi_max_iterations={self.jacobi_max_iterations} must be "
                       f">= 1 and objective.jacobi_tolerance={self.jacobi_tolerance} >= 0.")
    for method in ("block_chunk", "block_sequence", "init_cache", "to_tokens"):
      if not hasattr(self.model, method):
        raise ValueError(f"objective 'starflow' needs an autoregressive flow model (model.name="
                         f"'tarflow'); {type(self.model).__name__} has no {method!r}.")

  @classmethod
  def build(cls, config, model, info):
    keys = {key: config[key] for key in cls.DEFAULTS}
    null_text = common.text_null(model, info)
    return cls(model=model, image_shape=tuple(info.image_shape), num_classes=info.num_classes,
               null_text=null_text, **keys)

  @property
  def num_dims(self) -> int:
    return math.prod(self.image_shape)

  def init(self, rng, batch):
    x = batch["image"][:1].astype(jnp.float32)
    cond = self.condition(batch)
    cond = None if cond is None else cond[:1]
    return self.model.init(rng, x, cond)["params"], {}

  def forward(self, params, y, cond):
    """(z [B, ...], logdet [B] per dimension, intermediates) of the flow at y [B, ...]."""
    return self.model.apply({"params": params}, y, cond)

  def dequantize(self, x, rng):
    """x [B, ...] in [-1, 1] on the K-level grid -> y = (k + u) / K * 2 - 1, u ~ U[0, 1)."""
    levels = self.data_levels
    k = jnp.clip(jnp.round((x + 1.0) * 0.5 * (levels - 1)), 0, levels - 1)
    u = jax.random.uniform(rng, x.shape, jnp.float32)
    return (k + u) / levels * 2.0 - 1.0

  def perturb(self, x, rng):
    """The training data y of clean x [B, ...]: dequantised, or x + noise_std n."""
    x = x.astype(jnp.float32)
    if self.noise == "dequantize":
      return self.dequantize(x, rng)
    return x + self.noise_std * jax.random.normal(rng, x.shape, jnp.float32)

  def nll_per_dim(self, z, logdet):
    """-log p(y) / D [B] in nats: 0.5 mean(z^2) + 0.5 log(2 pi) - logdet."""
    return 0.5 * common.mean_per_example(jnp.square(z)) + 0.5 * LOG_2PI - logdet

  def bits_per_dim(self, nll):
    """Discrete bits/dim of dequantised data from -log p(y) / D in nats: (nll + log(K/2)) / ln 2."""
    return (nll + math.log(self.data_levels / 2.0)) / math.log(2.0)

  def training_loss(self, z, logdet, intermediates):
    """(loss, prior, intermediate) of a forward pass: prior = 0.5 mean(z^2), intermediate =
    sum_k mean(z_k^2) over the inner block outputs, loss = prior - mean(logdet) +
    intermediate_weight * intermediate. (apple/ml-starflow's train.py also counts the data
    itself in that sum, a constant without gradient.)"""
    prior = 0.5 * jnp.mean(jnp.square(z))
    intermediate = sum((jnp.mean(jnp.square(h)) for h in intermediates), jnp.float32(0.0))
    return prior - jnp.mean(logdet) + self.intermediate_weight * intermediate, prior, intermediate

  def loss(self, params, batch, rng, step, view):
    """Per-dimension NLL of a batch {'image': [B, ...], 'label': [B]}."""
    del step, view
    noise_key, drop_key = jax.random.split(rng)
    y = self.perturb(batch["image"], noise_key)
    cond = self.drop_condition(self.condition(batch), drop_key)
    z, logdet, intermediates = self.forward(params, y, cond)
    loss, prior, intermediate = self.training_loss(z, logdet, intermediates)
    nll = jnp.mean(self.nll_per_dim(z, logdet))
    metrics = {"nll": nll, "prior": prior, "logdet": jnp.mean(logdet),
               "intermediate": intermediate}
    if self.noise == "dequantize":
      metrics["bits_per_dim"] = self.bits_per_dim(nll)
    return loss, metrics

  def nll(self, params, batch, rng):
    """Mean bits/dim of a batch with its true labels: discrete bits/dim of the dequantised data,
    or, for a "gaussian" model, -log2 p(y) / D of the noise-augmented data y."""
    y = self.perturb(batch["image"], rng)
    z, logdet, _ = self.forward(params, y, self.condition(batch))
    nll = jnp.mean(self.nll_per_dim(z, logdet))
    if self.noise == "dequantize":
      return self.bits_per_dim(nll)
    return nll / math.log(2.0)

  def log_density(self, params, y, cond):
    """log p(y) [B] in nats (summed over the D dimensions)."""
    z, logdet, _ = self.forward(params, y, cond)
    return -self.num_dims * self.nll_per_dim(z, logdet)

  def sample_with_steps(self, params, rng, num, cond=None, *, method="kv_cache",
                        guidance=1.0):
    """(samples [num, ...] float32, sequential network evaluations int32): see `sample`."""
    if guidance < 1.0:
      raise ValueError(f"sample.guidance={guidance} must be >= 1 (1 = the conditional model; "
                       "the guidance weight is w = guidance - 1).")
    z = jax.random.normal(rng, (num,) + self.image_shape, jnp.float32)
    x, steps = autoregressive.invert(
        self.model, params, z, cond, method=method,
        guidance=None if guidance == 1.0 else guidance - 1.0,
        rule=self.guidance_rule, anneal=self.guidance_anneal, null_label=self.null,
        chunk_size=self.jacobi_chunk, tolerance=self.jacobi_tolerance,
        max_iterations=self.jacobi_max_iterations,
        attention_temperature=self.attention_temperature)
    if self.noise == "gaussian" and self.denoise and self.noise_std > 0:
      x = autoregressive.tweedie_denoise(lambda y: self.log_density(params, y, cond), x,
                                         self.noise_std)
    return x, steps

  def sample(self, params, rng, num, cond=None, *, num_steps=1, method="kv_cache",
             guidance=1.0):
    """num samples: z ~ N(0, I) inverted through the flow by `method` ("kv_cache", "jacobi" or
    "naive"; all exact), with CFG weight w = guidance - 1 on the label-reading blocks, then the
    Tweedie denoising step for noise-augmented models. cond: [num] labels, caption features
    [num, T, D] of a text model, or None. num_steps is
    not used (the number of steps is set by the token count)."""
    del num_steps
    return self.sample_with_steps(params, rng, num, cond, method=method, guidance=guidance)[0]
