"""SongUNet: the DDPM++ and NCSN++ U-Nets of Song et al. (2021) with the options of EDM
(Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", 2022).

mapping network (time, label, augmentation embeddings) -> encoder (3x3 conv, then per level
`num_blocks` residual blocks and a downsampling block) -> decoder (two bottleneck blocks, then per
level `num_blocks + 1` blocks fed with the encoder's skips and an upsampling block) -> GroupNorm,
SiLU, zero-initialised 3x3 conv. Residual blocks add the embedding to the normalised features
(no adaptive scale), scale their sum by sqrt(1/2), and may end with single-head self-attention.

Variants (see UNET_PRESETS):
- DDPM++: positional time embedding, box resampling filter (1, 1), 'standard' encoder.
- NCSN++: random Fourier time embedding (frequencies N(0, fourier_scale^2), fixed), FIR filter
  (1, 3, 3, 1), 'residual' encoder with an auxiliary image path, twice as wide a time embedding.
Several time inputs (IMM's (t, s), MeanFlow's (t, t - r)) either get one mapping network each,
whose outputs are summed before their last SiLU (time_mapping='sum', the official IMM network:
emb = SiLU(L1(SiLU(L0(e_t + label))) + L1_s(SiLU(L0_s(e_s))))) or after it ('separate'), or share
one mapping network that reads their concatenated embeddings (time_mapping='concat', py-meanflow),
or keep one embedding vector each, with the label added to each, that every block maps through
its own Dense and adds (time_mapping='per_block', sony/ctm's CTM network: a block's shift is
affine(emb_t) + affine_s(emb_s)).

REPA (Yu et al., arXiv:2410.06940): with repa_depth > 0 the encoder's feature map after its
repa_depth-th residual block (1-based, counting the downsampling blocks; the map the encoder keeps
as a skip there, so with encoder_type 'skip' or 'residual' it includes the auxiliary image path
of that level), [B, H >> level, W >> level, C] read as H W / 4^level tokens of width C, goes through
the projector h_phi (`layers.RepaProjector`) and is sown as intermediates/repa,
[B, H >> level, W >> level, repa_dim] (`layers.sow_repa_tokens`). The encoder has
len(channel_mult) num_blocks + len(channel_mult) - 1 such blocks (EDM's CIFAR-10 networks: 14;
blocks 5 to 9 are the 16x16 level of a 32x32 input, the grid of DINOv2 at 224x224).

Every parameter carries logical axis names: feature-map channels are 'embed' (sharded over fsdp)
or 'mlp' (tensor), the embedding vector is 'embed' then 'mlp'; the image channels are
'conv_in' / 'conv_out'.
"""

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowjax.models import layers
from flowjax.registry import MODELS

# Feature maps [B, H, W, C]: the batch is split over (data, fsdp), channels follow 'embed' only
# where a mesh axis is left.
FEATURES = ("batch", None, None, "embed")

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")
TIME_MAPPINGS = ("separate", "sum", "concat", "per_block")
FOURIER_SEED = 0

# Published CIFAR-10 (32x32x3) networks. Parameter counts (unconditional, 3 channels):
# ddpmpp_cifar10 55,733,891 (EDM's DDPM++; 55,735,299 with 10 classes); ncsnpp_cifar10
# 56,397,827 (EDM's NCSN++); imm_cifar10 56,061,443 (DDPM++ with a second mapping network for s,
# no augmentation input); meanflow_cifar10 55,929,347 (DDPM++ with NCSN++'s embedding width and
# FIR filter, the two time embeddings concatenated into one mapping network, no augmentation
# input).
UNET_PRESETS = {
    "ddpmpp_cifar10": dict(
        model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, channel_mult_noise=1,
        num_blocks=4, attn_resolutions=(16,), dropout=0.13, embedding_type="positional",
        encoder_type="standard", decoder_type="standard", resample_filter=(1, 1),
        time_mapping="separate", augment_dim=9),
    "ncsnpp_cifar10": dict(
        model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, channel_mult_noise=2,
        num_blocks=4, attn_resolutions=(16,), dropout=0.13, embedding_type="fourier",
        fourier_scale=16.0, encoder_type="residual", decoder_type="standard",
        resample_filter=(1, 3, 3, 1), time_mapping="separate", augment_dim=9),
    "imm_cifar10": dict(
        model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, channel_mult_noise=1,
        num_blocks=4, attn_resolutions=(16,), embedding_type="positional",
        encoder_type="standard", decoder_type="standard", resample_filter=(1, 1),
        time_mapping="sum", augment_dim=0),
    "meanflow_cifar10": dict(
        model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, channel_mult_noise=2,
        num_blocks=4, attn_resolutions=(16,), dropout=0.2, embedding_type="positional",
        encoder_type="standard", decoder_type="standard", resample_filter=(1, 3, 3, 1),
        time_mapping="concat", augment_dim=0),
}

xavier_uniform = nn.initializers.xavier_uniform()


def scaled_xavier_uniform(weight_scale: float) -> layers.Initializer:
  """Xavier-uniform weights multiplied by weight_scale (EDM's `init_weight`); 0 gives zeros."""
  if weight_scale == 0:
    return nn.initializers.zeros
  return nn.initializers.variance_scaling(weight_scale**2, "fan_avg", "uniform")


def resample_matrix(taps: Sequence[int], size: int, up: bool,
                    padding: int | None = None) -> np.ndarray:
  """EDM's resampling along one axis of `size` pixels as a [size_out, size] matrix (float64).

  f = taps / sum(taps). Down (size_out = (size + 2 padding - k) // 2 + 1, k = len(taps),
  padding (k - 1) // 2 by default): output i = sum_k f[k] x[2i + k - padding], zero outside.
  Up (size_out = 2 size): zero insertion, padding k - 1 - (k - 1) // 2, then the filter 2 f, so
  output i = sum_k 2 f[k] u[i + k - padding] with u[2j] = x[j] and zeros between. The 2D filter
  is outer(f, f) (x4 up): the same matrix along H and W.
  """
  f = np.asarray(taps, np.float64) / np.sum(taps)
  k = len(f)
  if up:
    pad = k - 1 - (k - 1) // 2
    matrix = np.zeros((2 * size, size))
    for i in range(2 * size):
      for tap in range(k):
        u = i + tap - pad
        if u % 2 == 0 and 0 <= u // 2 < size:
          matrix[i, u // 2] += 2 * f[tap]
    return matrix
  pad = (k - 1) // 2 if padding is None else padding
  matrix = np.zeros(((size + 2 * pad - k) // 2 + 1, size))
  for i in range(matrix.shape[0]):
    for tap in range(k):
      if 0 <= 2 * i + tap - pad < size:
        matrix[i, 2 * i + tap - pad] += f[tap]
  return matrix


def _resample(x: jax.Array, taps: Sequence[int], up: bool, padding: int | None) -> jax.Array:
  """The separable resampling filter as a matmul along H, then along W (full float32 precision).

  Replaces EDM's (transposed) depthwise convolution with stride 2: the same sums in another
  order, equal to float rounding, and on XLA:CPU 5-20x cheaper with its gradient.
  """
  rows = resample_matrix(taps, x.shape[1], up, padding)
  cols = resample_matrix(taps, x.shape[2], up, padding)
  highest = jax.lax.Precision.HIGHEST
  x = jnp.einsum("ih,bhwc->biwc", jnp.asarray(rows, x.dtype), x, precision=highest)
  return jnp.einsum("jw,bhwc->bhjc", jnp.asarray(cols, x.dtype), x, precision=highest)


def downsample(x: jax.Array, taps: Sequence[int], padding: int | None = None) -> jax.Array:
  """Filter with outer(taps, taps) / sum(taps)^2, then keep every second pixel:
  [B, H, W, C] -> [B, (H + 2 padding - k) // 2 + 1, (same for W), C], k = len(taps).

  padding: pixels of zero padding on each side; (len(taps) - 1) // 2 by default. The box filter
  (1, 1) is a 2x2 mean; other filters go through `resample_matrix`.
  """
  pad = (len(taps) - 1) // 2 if padding is None else padding
  batch, height, width, channels = x.shape
  if tuple(taps) == (1, 1) and pad == 0 and height % 2 == 0 and width % 2 == 0:
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))
  return _resample(x, taps, up=False, padding=pad)


def upsample(x: jax.Array, taps: Sequence[int]) -> jax.Array:
  """Zero-insertion upsampling by 2 followed by the filter (x4 to keep the mean):
  [B, H, W, C] -> [B, 2H, 2W, C], EDM's transposed depthwise convolution with stride 2.

  The box filter (1, 1) repeats every pixel 2x2 (exactly); other filters go through
  `resample_matrix`.
  """
  if tuple(taps) == (1, 1):
    batch, height, width, channels = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
    return x.reshape(batch, 2 * height, 2 * width, channels)
  return _resample(x, taps, up=True, padding=None)


def conv(features: int, kernel: int, names: tuple[str | None, str | None], *,
         weight_scale: float = 1.0, padding: int | None = None, dtype=jnp.float32,
         param_dtype=jnp.float32, name: str | None = None) -> nn.Conv:
  """A kernel x kernel convolution, xavier-uniform weights times weight_scale, zero bias.

  names: logical names of the kernel's (input channel, output channel) dims; the spatial dims
    are not sharded. padding: pixels on each side; kernel // 2 ('same') by default.
  """
  pad = kernel // 2 if padding is None else padding
  return nn.Conv(
      features, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(scaled_xavier_uniform(weight_scale),
                                               (None, None) + tuple(names)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)),
      name=name)


class GroupNorm(nn.Module):
  """flax's nn.GroupNorm on [B, H, W, C] (the same parameters 'scale' and 'bias' [C], statistics
  in float32, var = max(E[x^2] - E[x]^2, 0), y = (x - mean) * rsqrt(var + eps) * scale + bias),
  with the group sums taken in two stages: over H and W per channel, then over the channels of
  each group. The same sums in another order, equal to float rounding; on XLA:CPU the forward
  pass takes 0.4x the time of flax's single reduction over [H, W, C / groups] and forward plus
  backward 0.8x ([16, 32, 32, 64], 16 groups)."""
  num_groups: int
  epsilon: float = 1e-6
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    per_group = channels // self.num_groups
    init = lambda f: nn.with_logical_partitioning(f, ("embed",))
    scale = self.param("scale", init(nn.initializers.ones), (channels,), self.param_dtype)
    bias = self.param("bias", init(nn.initializers.zeros), (channels,), self.param_dtype)
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    count = height * width * per_group

    def group_mean(values):  # [B, H, W, C] -> [B, 1, 1, C], each channel its group's mean
      sums = jnp.sum(values, axis=(1, 2)).reshape(batch, self.num_groups, per_group).sum(-1)
      return jnp.repeat(sums / count, per_group, axis=1)[:, None, None, :]

    mean = group_mean(xf)
    var = jnp.maximum(group_mean(xf * xf) - mean * mean, 0.0)
    y = (xf - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype)


def group_norm(channels: int, *, dtype, param_dtype, name: str) -> GroupNorm:
  """EDM's GroupNorm: min(32, channels // 4) groups, eps 1e-6, per-channel scale and bias."""
  return GroupNorm(num_groups=min(32, channels // 4), epsilon=1e-6, dtype=dtype,
                   param_dtype=param_dtype, name=name)


def positional_embedding(x: jax.Array, channels: int) -> jax.Array:
  """DDPM++ embedding: [B] -> [B, channels] float32, [sin(x f_k) ..., cos(x f_k) ...] with
  f_k = 10000^(-k / (channels/2 - 1)), k = 0 .. channels/2 - 1 (both ends included)."""
  half = channels // 2
  freqs = (1.0 / 10000.0) ** (np.arange(half, dtype=np.float64) / max(half - 1, 1))
  args = x.astype(jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def fourier_embedding(x: jax.Array, channels: int, scale: float) -> jax.Array:
  """NCSN++ embedding: [B] -> [B, channels] float32, [sin(2 pi x f_k) ..., cos(2 pi x f_k) ...]
  with channels/2 fixed frequencies f_k ~ N(0, scale^2) drawn once from seed FOURIER_SEED
  (constants, not trained)."""
  freqs = np.random.default_rng(FOURIER_SEED).standard_normal(channels // 2) * scale
  args = x.astype(jnp.float32)[:, None] * jnp.asarray(2 * np.pi * freqs, jnp.float32)[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class MappingNetwork(nn.Module):
  """Dense -> SiLU -> Dense (-> SiLU with final_silu): [B, in] -> [B, width] float32."""
  width: int
  final_silu: bool = True
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, e: jax.Array) -> jax.Array:
    e = layers.dense(self.width, (None, "embed"), param_dtype=self.param_dtype, name="layer0")(e)
    e = nn.silu(e)
    e = layers.dense(self.width, ("embed", "mlp"), param_dtype=self.param_dtype,
                     name="layer1")(e)
    return nn.silu(e) if self.final_silu else e


AFFINE_NAMES = ("affine", "affine_s", "affine_2")


class UNetBlock(nn.Module):
  """Residual block of SongUNet: [B, H, W, Cin], emb [B, E] -> [B, H', W', out_channels].

  h = conv0(SiLU(GN(x))) (resampled first when up/down); h = SiLU(GN(h + Dense(emb)));
  h = conv1(dropout(h)) (initialised at zero_init_scale); x' = (h + skip(x)) sqrt(1/2) with a
  1x1 projection (resampled) when the shape changes; with attention, x'' = (proj(attn(GN(x')))
  + x') sqrt(1/2) with one head and a zero_init_scale output projection.
  """
  out_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  dropout: float = 0.0
  resample_filter: tuple[int, ...] = (1, 1)
  zero_init_scale: float = 1e-5
  attention_impl: str = "xla"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array | tuple[jax.Array, ...],
               train: bool) -> jax.Array:
    in_channels = x.shape[-1]
    skip_scale = math.sqrt(0.5)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def resample(h):
      if self.up:
        return upsample(h, self.resample_filter)
      if self.down:
        return downsample(h, self.resample_filter)
      return h

    h = nn.silu(group_norm(in_channels, name="norm0", **kw)(x))
    h = conv(self.out_channels, 3, ("embed", "mlp"), name="conv0", **kw)(resample(h))
    # One embedding vector, or one per time (time_mapping='per_block'), each with its own Dense.
    embs = emb if isinstance(emb, tuple) else (emb,)
    shift = sum(layers.dense(self.out_channels, ("mlp", "embed"), param_dtype=self.param_dtype,
                             name=AFFINE_NAMES[i])(e) for i, e in enumerate(embs))
    h = h + shift.astype(h.dtype)[:, None, None, :]
    h = nn.silu(group_norm(self.out_channels, name="norm1", **kw)(h))
    h = layers.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(self.out_channels, 3, ("mlp", "embed"), weight_scale=self.zero_init_scale,
             name="conv1", **kw)(h)
    skip = x
    if self.out_channels != in_channels or self.up or self.down:
      skip = conv(self.out_channels, 1, ("embed", "mlp"), name="skip", **kw)(resample(x))
    x = nn.with_logical_constraint((h + skip.astype(h.dtype)) * skip_scale, FEATURES)

    if self.attention:
      batch, height, width, channels = x.shape
      h = group_norm(channels, name="norm2", **kw)(x).reshape(batch, height * width, channels)
      # EDM's qkv is one [C, 3C] 1x1 conv with xavier-uniform(fan_in=C, fan_out=3C) * sqrt(0.2);
      # variance scaling 0.2 * 2 / (C + 3C) = 0.1 / C on each [C, C] part gives the same spread.
      qkv_init = nn.initializers.variance_scaling(0.2 * 0.5, "fan_avg", "uniform")
      projections = []
      for name in ("query", "key", "value"):
        y = layers.dense(channels, ("embed", "heads"), kernel_init=qkv_init, name=name, **kw)(h)
        projections.append(y.reshape(batch, height * width, 1, channels))
      q, k, v = projections
      y = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
      y = y.reshape(batch, height * width, channels)
      y = layers.dense(channels, ("heads", "embed"),
                       kernel_init=scaled_xavier_uniform(self.zero_init_scale), name="proj",
                       **kw)(y)
      x = (y.reshape(batch, height, width, channels) + x) * skip_scale
      x = nn.with_logical_constraint(x, FEATURES)
    return x


class SongUNet(nn.Module):
  """DDPM++ / NCSN++ U-Net backbone (the flowjax Backbone contract).

  Attributes:
    model_channels: base width; level i has model_channels * channel_mult[i] channels.
    channel_mult: per-resolution width multipliers; len(channel_mult) levels, the image halves
      between levels (H and W must be divisible by 2^(levels - 1)).
    channel_mult_emb: the embedding vector has model_channels * channel_mult_emb channels.
    channel_mult_noise: each time embedding has model_channels * channel_mult_noise channels
      (1 for DDPM++, 2 for NCSN++).
    num_blocks: residual blocks per resolution in the encoder (num_blocks + 1 in the decoder).
    attn_resolutions: resolutions (H >> level) whose blocks end with self-attention; the first
      bottleneck block always has attention.
    dropout: dropout rate inside the residual blocks when train=True.
    embedding_type: 'positional' (DDPM++) or 'fourier' (NCSN++).
    fourier_scale: standard deviation of the Fourier frequencies.
    encoder_type: 'standard', 'skip' (image pyramid added at each level) or 'residual' (NCSN++).
    decoder_type: 'standard' or 'skip' (an output at every level, upsampled and summed).
    resample_filter: 1D taps of the resampling filter, (1, 1) box or (1, 3, 3, 1) FIR.
    time_mapping: 'sum' (one mapping network per time, summed before the last SiLU: IMM),
      'separate' (summed after it), 'concat' (one network on the concatenated embeddings) or
      'per_block' (one network per time, each block with its own Dense per time: CTM).
    augment_dim: width of EDM's augmentation labels (0 = none); they enter through a bias-free
      Dense and are zero unless passed as `augment_labels`.
    zero_init_scale: weight multiplier of the layers EDM initialises near zero (each block's
      second conv, the attention output and the output conv): 1e-5 in EDM, 0 for exact zeros.
    num_classes: 0 = unconditional; otherwise labels 0 .. num_classes - 1 enter as scaled one-hot
      vectors through a Dense, and the null label num_classes is the all-zero vector.
    out_channels: output channels (0 = as many as the input).
    time_scale: times are multiplied by this before the embedding.
    attention_impl: 'xla' (reference, supports jax.jvp) or 'cudnn'.
    dtype: compute dtype of convolutions and attention; param_dtype: parameter dtype.
    repa_depth: 0, or the encoder block (1-based) whose feature map REPA aligns (module
      docstring); repa_dim: the encoder's feature width; repa_projector_dim: the projector's
      hidden width. Set from config.repa by `flowjax.objectives.repa`, not from config.model.
  """
  model_channels: int = 128
  channel_mult: tuple[int, ...] = (2, 2, 2)
  channel_mult_emb: int = 4
  channel_mult_noise: int = 1
  num_blocks: int = 4
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.1
  embedding_type: str = "positional"
  fourier_scale: float = 16.0
  encoder_type: str = "standard"
  decoder_type: str = "standard"
  resample_filter: tuple[int, ...] = (1, 1)
  time_mapping: str = "separate"
  augment_dim: int = 0
  zero_init_scale: float = 1e-5
  num_classes: int = 0
  out_channels: int = 0
  time_scale: float = 1000.0
  attention_impl: str = "xla"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  repa_depth: int = 0
  repa_dim: int = 0
  repa_projector_dim: int = 2048

  @property
  def repa_blocks(self) -> int:
    """The blocks whose output REPA can align (repa_depth in 1 .. repa_blocks): the encoder's
    residual blocks, downsampling blocks included."""
    levels = len(self.channel_mult)
    return levels * self.num_blocks + levels - 1

  def check(self, height: int, width: int) -> None:
    """Raises ValueError naming the model.* key of an invalid setting."""
    for key, value, allowed in (("embedding_type", self.embedding_type, EMBEDDING_TYPES),
                                ("encoder_type", self.encoder_type, ENCODER_TYPES),
                                ("decoder_type", self.decoder_type, DECODER_TYPES),
                                ("time_mapping", self.time_mapping, TIME_MAPPINGS)):
      if value not in allowed:
        raise ValueError(f"model.{key}={value!r}; use one of {allowed}.")
    if self.attention_impl not in ("xla", "cudnn"):
      raise ValueError(f"model.attention_impl={self.attention_impl!r}; use 'xla' or 'cudnn'.")
    if not self.channel_mult or min(self.channel_mult) < 1:
      raise ValueError(f"model.channel_mult={tuple(self.channel_mult)} must be a non-empty "
                       "tuple of positive ints, e.g. (2, 2, 2).")
    if self.model_channels * min(self.channel_mult) < 4:
      raise ValueError(f"model.model_channels={self.model_channels} is too small: GroupNorm needs "
                       "at least 4 channels per group; use model_channels >= 4.")
    if self.model_channels * self.channel_mult_noise < 4:
      raise ValueError(f"model.model_channels * model.channel_mult_noise = "
                       f"{self.model_channels * self.channel_mult_noise} is too narrow a time "
                       "embedding; use at least 4.")
    factor = 2 ** (len(self.channel_mult) - 1)
    if height % factor or width % factor:
      raise ValueError(f"model.channel_mult has {len(self.channel_mult)} levels, so the image "
                       f"size must be divisible by {factor}; got {height}x{width}. Use fewer "
                       "levels or another image size.")
    if len(self.resample_filter) < 2 or len(self.resample_filter) % 2:
      raise ValueError(f"model.resample_filter={tuple(self.resample_filter)} needs an even "
                       "number of taps, e.g. (1, 1) or (1, 3, 3, 1).")
    layers.check_repa_depth(self.repa_depth, self.repa_blocks)

  def embed(self, times, cond, augment_labels, batch: int) -> jax.Array | tuple[jax.Array, ...]:
    """The embedding vector [B, model_channels * channel_mult_emb] float32 (one per time with
    time_mapping='per_block')."""
    if not isinstance(times, (tuple, list)) or not 1 <= len(times) <= 3:
      raise ValueError(f"times must be a tuple of 1, 2 or 3 arrays of shape [B]; got {times!r}.")
    for t in times:
      if jnp.shape(t) != (batch,):
        raise ValueError(f"every time input must have shape ({batch},); got "
                         f"{list(jnp.shape(t))}.")
    if self.num_classes == 0 and cond is not None:
      raise ValueError("This model is unconditional (num_classes=0) but received class labels "
                       "(cond is not None); pass cond=None or build it for a labelled dataset.")
    if cond is not None and (jnp.shape(cond) != (batch,)
                             or not jnp.issubdtype(jnp.asarray(cond).dtype, jnp.integer)):
      raise ValueError(f"cond must be integer class labels of shape ({batch},); got "
                       f"{jnp.asarray(cond).dtype}{list(jnp.shape(cond))}.")
    noise_width = self.model_channels * self.channel_mult_noise
    emb_width = self.model_channels * self.channel_mult_emb

    def time_embedding(t):
      t = self.time_scale * jnp.asarray(t, jnp.float32)
      if self.embedding_type == "fourier":
        return fourier_embedding(t, noise_width, self.fourier_scale)
      return positional_embedding(t, noise_width)

    embeddings = [time_embedding(t) for t in times]
    if self.time_mapping == "concat":
      embeddings = [jnp.concatenate(embeddings, axis=-1)]
    per_block = self.time_mapping == "per_block"
    if self.num_classes > 0:
      labels = jnp.full((batch,), self.num_classes, jnp.int32) if cond is None else cond
      one_hot = jax.nn.one_hot(labels, self.num_classes, dtype=jnp.float32)  # null -> zeros
      label = layers.dense(embeddings[0].shape[-1], ("vocab", "embed"),
                           param_dtype=self.param_dtype,
                           name="map_label")(one_hot * math.sqrt(self.num_classes))
      # CTM's network adds the label to the embedding of each time; the others to the first.
      for i in range(len(embeddings) if per_block else 1):
        embeddings[i] = embeddings[i] + label
    if self.augment_dim > 0:
      if augment_labels is None:
        augment_labels = jnp.zeros((batch, self.augment_dim), jnp.float32)
      embeddings[0] = embeddings[0] + layers.dense(
          embeddings[0].shape[-1], (None, "embed"), use_bias=False, param_dtype=self.param_dtype,
          name="map_augment")(augment_labels.astype(jnp.float32))
    final_silu = self.time_mapping != "sum"
    mapped = [MappingNetwork(emb_width, final_silu, param_dtype=self.param_dtype,
                             name=f"map_{i}")(e) for i, e in enumerate(embeddings)]
    if per_block:
      return tuple(mapped)
    out = sum(mapped)
    return out if final_silu else nn.silu(out)

  @nn.compact
  def __call__(self, x: jax.Array, times: tuple[jax.Array, ...], cond: jax.Array | None, *,
               train: bool, augment_labels: jax.Array | None = None) -> jax.Array:
    """Predicts a field of the same shape as the input.

    Args:
      x: [B, H, W, C] float.
      times: tuple of 1 to 3 arrays [B] in [0, 1].
      cond: int labels [B] (num_classes = null label) or None (all null).
      train: enables dropout (rng collection 'dropout').
      augment_labels: [B, augment_dim] EDM augmentation labels, or None (zeros).
    Returns:
      [B, H, W, out_channels or C] float32.
    """
    if x.ndim != 4:
      raise ValueError(f"SongUNet expects images [B, H, W, C]; got shape {list(x.shape)}.")
    batch, height, width, channels = x.shape
    self.check(height, width)
    out_channels = self.out_channels or channels
    emb = self.embed(times, cond, augment_labels, batch)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = lambda out, name, **options: UNetBlock(
        out, dropout=self.dropout, resample_filter=tuple(self.resample_filter),
        zero_init_scale=self.zero_init_scale, attention_impl=self.attention_impl, name=name,
        **options, **kw)
    mc, levels = self.model_channels, len(self.channel_mult)

    # Encoder.
    x = nn.with_logical_constraint(x.astype(self.dtype), FEATURES)
    aux = x
    skips = []
    encoder_blocks = 0

    def repa_tokens(x):
      if encoder_blocks == self.repa_depth:
        batch_, height_, width_, channels_ = x.shape
        layers.sow_repa_tokens(self, x.reshape(batch_, height_ * width_, channels_),
                               (height_, width_), self.repa_dim, self.repa_projector_dim,
                               self.dtype, self.param_dtype)

    for level, mult in enumerate(self.channel_mult):
      res = height >> level
      prefix = f"enc_{res}x{res}"
      if level == 0:
        x = conv(mc, 3, ("conv_in", "embed"), name=f"{prefix}_conv", **kw)(x)
      else:
        cout = x.shape[-1]
        x = block(cout, f"{prefix}_down", down=True)(x, emb, train)
        if self.encoder_type == "skip":
          aux = downsample(aux, self.resample_filter)
          x = x + conv(cout, 1, ("conv_in", "embed"), name=f"{prefix}_aux_skip", **kw)(aux)
        elif self.encoder_type == "residual":
          # A 3x3 conv padded by 1 + the filter's padding, then the filter with stride 2.
          pad = 1 + (len(self.resample_filter) - 1) // 2
          y = conv(cout, 3, ("embed", "mlp"), padding=pad, name=f"{prefix}_aux_residual",
                   **kw)(aux)
          x = aux = (x + downsample(y, self.resample_filter, padding=0)) / math.sqrt(2)
        encoder_blocks += 1
        repa_tokens(x)
      skips.append(x)
      for idx in range(self.num_blocks):
        x = block(mc * mult, f"{prefix}_block{idx}",
                  attention=res in self.attn_resolutions)(x, emb, train)
        encoder_blocks += 1
        repa_tokens(x)
        skips.append(x)

    # Decoder.
    out = None
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = height >> level
      prefix = f"dec_{res}x{res}"
      cout = x.shape[-1]
      if level == levels - 1:
        x = block(cout, f"{prefix}_in0", attention=True)(x, emb, train)
        x = block(cout, f"{prefix}_in1")(x, emb, train)
      else:
        x = block(cout, f"{prefix}_up", up=True)(x, emb, train)
      for idx in range(self.num_blocks + 1):
        x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
        x = block(mc * mult, f"{prefix}_block{idx}",
                  attention=idx == self.num_blocks and res in self.attn_resolutions)(
                      x, emb, train)
      if self.decoder_type == "skip" or level == 0:
        if out is not None:
          out = upsample(out, self.resample_filter)
        y = nn.silu(group_norm(x.shape[-1], name=f"{prefix}_aux_norm", **kw)(x))
        y = conv(out_channels, 3, ("embed", "conv_out"), weight_scale=self.zero_init_scale,
                 name=f"{prefix}_aux_conv", **kw)(y).astype(jnp.float32)
        out = y if out is None else y + out
    return out


@MODELS.register("unet")
def build(model_config: ml_collections.ConfigDict, info) -> SongUNet:
  """SongUNet from config.model (keys and defaults: DEFAULTS['unet'] in flowjax/models)."""
  if len(info.image_shape) != 3:
    raise ValueError(f"model.name='unet' needs image data [H, W, C]; got per-example shape "
                     f"{tuple(info.image_shape)}. Use model.name='mlp' for flat vectors.")
  get = model_config.get
  return SongUNet(
      model_channels=int(model_config.model_channels),
      channel_mult=tuple(int(m) for m in model_config.channel_mult),
      channel_mult_emb=int(get("channel_mult_emb", 4)),
      channel_mult_noise=int(get("channel_mult_noise", 1)),
      num_blocks=int(model_config.num_blocks),
      attn_resolutions=tuple(int(r) for r in get("attn_resolutions", (16,))),
      dropout=float(get("dropout", 0.1)),
      embedding_type=str(get("embedding_type", "positional")),
      fourier_scale=float(get("fourier_scale", 16.0)),
      encoder_type=str(get("encoder_type", "standard")),
      decoder_type=str(get("decoder_type", "standard")),
      resample_filter=tuple(int(f) for f in get("resample_filter", (1, 1))),
      time_mapping=str(get("time_mapping", "separate")),
      augment_dim=int(get("augment_dim", 0)),
      zero_init_scale=float(get("zero_init_scale", 1e-5)),
      num_classes=int(info.num_classes),
      time_scale=float(get("time_scale", 1000.0)),
      attention_impl=str(get("attention_impl", "xla")),
      dtype=layers.dtype_from_name(get("dtype", "float32"), "dtype"),
      param_dtype=layers.dtype_from_name(get("param_dtype", "float32"), "param_dtype"))
