"""DINOv2 (Oquab et al., arXiv:2304.07193), the ViT image encoder, in linen with its released
weights: the frozen feature encoder of REPA (Yu et al., arXiv:2410.06940), which aligns a
denoiser's early hidden tokens with DINOv2's normalized patch tokens.

The forward pass is that of HuggingFace transformers' `Dinov2Model` and
`Dinov2WithRegistersModel` (models/dinov2/modeling_dinov2.py,
models/dinov2_with_registers/modeling_dinov2_with_registers.py), which is facebookresearch/dinov2's
`DinoVisionTransformer.forward_features` (dinov2/models/vision_transformer.py): a patch
embedding (conv, stride = patch), the [CLS] token, learned position embeddings (resampled
bicubically for another patch grid), register tokens inserted after [CLS] (Darcet et al.,
arXiv:2309.16588), pre-norm blocks with LayerScale on both branches, a final LayerNorm.
`Dinov2.__call__` returns the final-norm sequence [CLS, registers, patches]; `patch_tokens` turns
flowjax images into the patch tokens REPA aligns to.

Position embeddings on another grid are torch's `F.interpolate(mode='bicubic',
align_corners=False)` of the [M, M] table, reproduced by `bicubic_matrix`. Which variant runs is
the checkpoint code's choice, recorded in the config:
- HF `Dinov2Model`: output size, no antialiasing;
- HF `Dinov2WithRegistersModel` and the official `*_reg` hub models: output size, antialiasing
  (interpolate_antialias=True);
- the official hub models without registers: scale factor (grid + 0.1) / M, no antialiasing
  (interpolate_offset=0.1, dinov2/hub/backbones.py).

`load` reads a HuggingFace checkpoint (config.json + model.safetensors, as `save_pretrained`
writes them, e.g. facebook/dinov2-base) or an official torch-hub state dict
(dinov2_vitb14_pretrain.pth and its kin, saved as .safetensors, .npz or .pth) with a preset.
"""

import dataclasses
import functools
import json
import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flowjax import state_dicts, storage
from flowjax.models import layers

Params = dict[str, Any]

# timm.data IMAGENET_DEFAULT_MEAN / IMAGENET_DEFAULT_STD, the normalization of REPA's
# `preprocess_raw_image` (sihyun-yu/REPA train.py) and of DINOv2's training.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# REPA resizes 256x256 images to 224x224 for DINOv2 (train.py `preprocess_raw_image`), a 16x16
# grid of 14-pixel patches: one token per 2x2 latent patch of a 32x32x4 SD-VAE latent.
REPA_RESOLUTION = 224
HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"

# HF `ACT2FN` names (transformers/activations.py) -> whether the GELU is the exact erf form
# ("gelu", nn.GELU of the official code) or the tanh approximation.
EXACT_GELU = {"gelu": True, "gelu_new": False, "gelu_pytorch_tanh": False}


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  """The architecture; fields named as in HF's `Dinov2Config` (config.json), the two
  interpolate_* fields as in facebookresearch/dinov2's `DinoVisionTransformer`.

  image_size: the resolution the position table was trained for (grid image_size // patch_size).
  layerscale_value: LayerScale's initial value (loaded weights replace it).
  interpolate_antialias, interpolate_offset: how the position table is resampled to another
  grid (module docstring); offset 0 = by output size, > 0 = by scale factor (grid + offset) / M.
  """
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  mlp_ratio: float
  patch_size: int
  image_size: int
  num_channels: int = 3
  layer_norm_eps: float = 1e-6
  layerscale_value: float = 1.0
  use_swiglu_ffn: bool = False
  num_register_tokens: int = 0
  qkv_bias: bool = True
  hidden_act: str = "gelu"
  interpolate_antialias: bool = False
  interpolate_offset: float = 0.0

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"DINOv2 hidden_size={self.hidden_size} is not divisible by "
                       f"num_attention_heads={self.num_attention_heads}; fix the config.")
    if self.image_size < self.patch_size:
      raise ValueError(f"DINOv2 image_size={self.image_size} is smaller than "
                       f"patch_size={self.patch_size}; fix the config.")
    if self.hidden_act not in EXACT_GELU:
      raise ValueError(f"DINOv2 hidden_act={self.hidden_act!r} is not supported; use one of "
                       f"{sorted(EXACT_GELU)}.")
    if not self.qkv_bias:
      raise ValueError("DINOv2 qkv_bias=False is not supported (every released DINOv2 has "
                       "query, key and value biases).")

  @property
  def grid_size(self) -> int:
    """M: the position table covers an M x M patch grid."""
    return self.image_size // self.patch_size

  @property
  def mlp_hidden_size(self) -> int:
    """The feed-forward width: int(D * mlp_ratio), or for SwiGLU two thirds of it rounded up to a
    multiple of 8 (dinov2/layers/swiglu_ffn.py `SwiGLUFFNFused`, HF `Dinov2SwiGLUFFN`)."""
    hidden = int(self.hidden_size * self.mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.use_swiglu_ffn else hidden

  @classmethod
  def from_hf_json(cls, config: Mapping[str, Any]) -> "Dinov2Config":
    """The config of a HF config.json (model_type 'dinov2' or 'dinov2_with_registers').

    The widths, depth, patch and image size must be present (`save_pretrained` writes them all);
    the other keys default as in HF's config classes. The registers model resamples its position
    table with antialiasing and has 4 registers unless num_register_tokens says otherwise.
    """
    model_type = config.get("model_type", "dinov2")
    if model_type not in ("dinov2", "dinov2_with_registers"):
      raise ValueError(f"config.json has model_type={model_type!r}; flowjax reads DINOv2 "
                       "('dinov2' or 'dinov2_with_registers') checkpoints only.")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                "image_size")
    missing = [key for key in required if key not in config]
    if missing:
      raise ValueError(f"config.json lacks {missing}; use the config.json written with the "
                       "checkpoint (save_pretrained writes every key).")
    registers = model_type == "dinov2_with_registers"

    def square(key):
      value = config[key]
      if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
          raise ValueError(f"config.json {key}={value}: only square sizes are supported.")
        value = value[0]
      return int(value)

    return cls(
        hidden_size=int(config["hidden_size"]),
        num_hidden_layers=int(config["num_hidden_layers"]),
        num_attention_heads=int(config["num_attention_heads"]),
        mlp_ratio=float(config.get("mlp_ratio", 4)),
        patch_size=square("patch_size"), image_size=square("image_size"),
        num_channels=int(config.get("num_channels", 3)),
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-6)),
        layerscale_value=float(config.get("layerscale_value", 1.0)),
        use_swiglu_ffn=bool(config.get("use_swiglu_ffn", False)),
        num_register_tokens=int(config.get("num_register_tokens", 4)) if registers else 0,
        qkv_bias=bool(config.get("qkv_bias", True)),
        hidden_act=str(config.get("hidden_act", "gelu")),
        interpolate_antialias=registers)


def _official(hidden_size: int, depth: int, heads: int, registers: bool = False,
              swiglu: bool = False) -> Dinov2Config:
  """An official hub model: patch 14 on 518 x 518 (37 x 37 grid), mlp_ratio 4, LayerScale
  (dinov2/hub/backbones.py `_make_dinov2_model`); with registers 4 of them, antialiased
  resampling without offset, else offset 0.1 without antialiasing."""
  return Dinov2Config(hidden_size, depth, heads, mlp_ratio=4.0, patch_size=14, image_size=518,
                      use_swiglu_ffn=swiglu, num_register_tokens=4 if registers else 0,
                      interpolate_antialias=registers,
                      interpolate_offset=0.0 if registers else 0.1)


# facebookresearch/dinov2: dinov2/models/vision_transformer.py (vit_small 384/12/6, vit_base
# 768/12/12, vit_large 1024/24/16, vit_giant2 1536/40/24) and dinov2/hub/backbones.py (patch 14,
# img_size 518, ViT-g with the fused SwiGLU FFN, the _reg models with 4 registers); the same
# sizes as HF's facebook/dinov2-{small,base,large,giant} and dinov2-with-registers-* configs.
PRESETS = {
    "dinov2_vits14": _official(384, 12, 6),
    "dinov2_vitb14": _official(768, 12, 12),
    "dinov2_vitl14": _official(1024, 24, 16),
    "dinov2_vitg14": _official(1536, 40, 24, swiglu=True),
    "dinov2_vits14_reg": _official(384, 12, 6, registers=True),
    "dinov2_vitb14_reg": _official(768, 12, 12, registers=True),
    "dinov2_vitl14_reg": _official(1024, 24, 16, registers=True),
    "dinov2_vitg14_reg": _official(1536, 40, 24, registers=True, swiglu=True),
}


def _cubic(x: np.float32, a: np.float32) -> np.float32:
  """Keys' cubic convolution kernel W_a(|x|) (torch's cubic_convolution1/2)."""
  x = abs(x)
  if x <= 1:
    return ((a + 2) * x - (a + 3)) * x * x + 1
  if x < 2:
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.float32(0)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int, antialias: bool = False,
                   scale: float | None = None) -> np.ndarray:
  """[out_size, in_size] float32: torch `F.interpolate(mode='bicubic', align_corners=False)`
  along one axis (aten/src/ATen/native/cpu/UpSampleKernel.cpp), in torch's float32 arithmetic.

  scale: input pixels per output pixel (None = in_size / out_size, as `size=` gives; torch uses
  1 / scale_factor when `scale_factor=` is given). antialias=False: source x = scale (i + 0.5) -
  0.5, Keys' kernel with a = -0.75 on the 4 nearest inputs, indices clamped to the border.
  antialias=True: the a = -0.5 kernel (PIL's), stretched by the scale when downsampling, cut at
  the border and renormalized; an axis whose size does not change is copied.
  """
  f32 = np.float32
  if antialias and in_size == out_size:
    return np.eye(in_size, dtype=np.float32)
  matrix = np.zeros((out_size, in_size), np.float32)
  scale = f32(in_size) / f32(out_size) if scale is None else f32(scale)
  for i in range(out_size):
    if not antialias:
      x = scale * (f32(i) + f32(0.5)) - f32(0.5)
      left = min(math.floor(x), in_size - 1)
      t = f32(min(max(x - f32(left), f32(0)), f32(1)))
      for j, offset in enumerate((t + 1, t, 1 - t, 2 - t)):
        matrix[i, min(max(left - 1 + j, 0), in_size - 1)] += _cubic(f32(offset), f32(-0.75))
    else:
      stretch = scale if scale >= 1 else f32(1)
      inverse = f32(1) / stretch
      support = f32(2) * stretch
      center = scale * (f32(i) + f32(0.5))
      low = max(int(center - support + f32(0.5)), 0)
      high = min(int(center + support + f32(0.5)), in_size)
      weights = [_cubic((f32(j) - center + f32(0.5)) * inverse, f32(-0.5))
                 for j in range(low, high)]
      total = f32(0)
      for weight in weights:
        total = f32(total + weight)
      matrix[i, low:high] = np.asarray(weights, np.float32) / (total if total else f32(1))
  return matrix


def resize_bicubic(x: jax.Array, size: tuple[int, int], antialias: bool = False,
                   scale: tuple[float, float] | None = None) -> jax.Array:
  """x: [..., H, W, C] -> [..., size[0], size[1], C], torch's bicubic resampling
  (`bicubic_matrix`) along H then W, in float32."""
  height, width = x.shape[-3], x.shape[-2]
  scale = scale or (None, None)
  rows = bicubic_matrix(height, size[0], antialias, scale[0])
  columns = bicubic_matrix(width, size[1], antialias, scale[1])
  return jnp.einsum("ij,kl,...jlc->...ikc", rows, columns, x.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def position_embeddings(table: jax.Array, config: Dinov2Config, height: int,
                        width: int) -> jax.Array:
  """table: [1, 1 + M*M, D] -> [1, 1 + h*w, D] for an image of height x width pixels, h = height
  // patch, w = width // patch: the table itself when h*w = M*M and the image is square,
  otherwise [CLS] followed by the bicubically resampled M x M grid (module docstring)."""
  size = config.grid_size
  rows, columns = height // config.patch_size, width // config.patch_size
  if rows * columns == size * size and height == width:
    return table
  grid = table[0, 1:].reshape(size, size, table.shape[-1])
  scale = None
  if config.interpolate_offset:
    scale = (size / (rows + config.interpolate_offset),
             size / (columns + config.interpolate_offset))
  grid = resize_bicubic(grid, (rows, columns), config.interpolate_antialias, scale)
  return jnp.concatenate([table[:, :1], grid.reshape(1, rows * columns, -1)], axis=1)


class Dinov2Embeddings(nn.Module):
  """Patch embedding + [CLS], plus the (resampled) position table, then the registers after
  [CLS] (HF `Dinov2Embeddings` / `Dinov2WithRegistersEmbeddings`): [B, H, W, C] ->
  [B, 1 + R + h*w, D] float32."""
  config: Dinov2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    config = self.config
    width = config.hidden_size
    init = nn.initializers.truncated_normal(0.02)
    patch = config.patch_size
    tokens = nn.Conv(width, (patch, patch), strides=(patch, patch), padding="VALID",
                     dtype=self.dtype, name="patch_embeddings")(pixel_values)
    batch = tokens.shape[0]
    tokens = tokens.reshape(batch, -1, width).astype(jnp.float32)
    cls_token = self.param("cls_token", init, (1, 1, width))
    table = self.param("position_embeddings", init, (1, 1 + config.grid_size ** 2, width))
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (batch, 1, width)), tokens], axis=1)
    x = x + position_embeddings(table, config, pixel_values.shape[1], pixel_values.shape[2])
    if config.num_register_tokens:
      registers = self.param("register_tokens", nn.initializers.zeros,
                             (1, config.num_register_tokens, width))
      registers = jnp.broadcast_to(registers, (batch, config.num_register_tokens, width))
      x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)
    return x


class SwiGLUFeedForward(nn.Module):
  """weights_in (D -> 2F) -> silu(first half) * second half -> weights_out (F -> D)
  (HF `Dinov2SwiGLUFFN`; dinov2/layers/swiglu_ffn.py `SwiGLUFFN` names them w12 and w3)."""
  hidden_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.dense(2 * self.hidden_features, ("embed", "mlp"), dtype=self.dtype,
                     name="weights_in")(x)
    gate, value = jnp.split(h, 2, axis=-1)
    return layers.dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype,
                        name="weights_out")(nn.silu(gate) * value)


class Dinov2Layer(nn.Module):
  """x + ls1 * attention(norm1(x)), then + ls2 * mlp(norm2(x)) (HF `Dinov2Layer`, the official
  `Block`): [B, L, D] float32 -> [B, L, D] float32."""
  config: Dinov2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    config = self.config
    width = config.hidden_size
    norm = functools.partial(nn.LayerNorm, epsilon=config.layer_norm_eps, dtype=jnp.float32,
                             use_fast_variance=False)

    def layer_scale(name):
      return self.param(name, nn.initializers.constant(config.layerscale_value), (width,))

    h = layers.Attention(config.num_attention_heads, dtype=self.dtype,
                         name="attention")(norm(name="norm1")(x))
    x = x + layer_scale("layer_scale1") * h.astype(jnp.float32)
    h = norm(name="norm2")(x)
    if config.use_swiglu_ffn:
      h = SwiGLUFeedForward(config.mlp_hidden_size, dtype=self.dtype, name="mlp")(h)
    else:
      h = layers.FeedForward(config.mlp_hidden_size, exact_gelu=EXACT_GELU[config.hidden_act],
                             dtype=self.dtype, name="mlp")(h, train=False)
    return x + layer_scale("layer_scale2") * h.astype(jnp.float32)


class Dinov2(nn.Module):
  """DINOv2 ViT: pixel_values [B, H, W, C] (NHWC, already normalized; H, W multiples of the
  patch or cropped to them as a stride-patch conv does) -> last_hidden_state
  [B, 1 + R + h*w, D] float32, [CLS, R registers, h*w patches row-major], after the final
  LayerNorm: HF `Dinov2Model(...).last_hidden_state`, the official `forward_features`'
  x_norm_clstoken / x_norm_regtokens / x_norm_patchtokens in one sequence.

  dtype: the compute dtype of the projections and attention (the residual stream and the norms
  stay float32).
  """
  config: Dinov2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    config = self.config
    _, height, width, channels = pixel_values.shape
    if channels != config.num_channels:
      raise ValueError(f"DINOv2 takes {config.num_channels}-channel NHWC images; got shape "
                       f"{pixel_values.shape}.")
    if height < config.patch_size or width < config.patch_size:
      raise ValueError(f"DINOv2 images must be at least one patch ({config.patch_size} pixels) "
                       f"high and wide; got {height}x{width}.")
    x = Dinov2Embeddings(config, self.dtype, name="embeddings")(pixel_values)
    for index in range(config.num_hidden_layers):
      x = Dinov2Layer(config, self.dtype, name=f"layer_{index}")(x)
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=jnp.float32,
                        use_fast_variance=False, name="layernorm")(x)


def abstract_params(module: Dinov2) -> Params:
  """The parameter tree of `module` as ShapeDtypeStructs (nothing allocated)."""
  config = module.config
  shape = (1, config.image_size, config.image_size, config.num_channels)
  variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape, jnp.float32))
  return nn.meta.unbox(variables["params"])


def _hf_targets(config: Dinov2Config) -> dict:
  """flowjax path -> (HF state-dict key, transform) for `Dinov2Model` /
  `Dinov2WithRegistersModel` weights."""
  same = np.asarray
  targets = {
      ("embeddings", "cls_token"): ("embeddings.cls_token", same),
      ("embeddings", "position_embeddings"): ("embeddings.position_embeddings", same),
      ("embeddings", "register_tokens"): ("embeddings.register_tokens", same),
      ("embeddings", "patch_embeddings", "kernel"):
          ("embeddings.patch_embeddings.projection.weight", state_dicts.conv_kernel),
      ("embeddings", "patch_embeddings", "bias"):
          ("embeddings.patch_embeddings.projection.bias", same),
      ("layernorm", "scale"): ("layernorm.weight", same),
      ("layernorm", "bias"): ("layernorm.bias", same),
  }
  mlp = (("weights_in", "weights_in"), ("weights_out", "weights_out")) if config.use_swiglu_ffn \
      else (("fc1", "fc1"), ("fc2", "fc2"))
  for index in range(config.num_hidden_layers):
    ours, theirs = f"layer_{index}", f"encoder.layer.{index}"
    dense = {("attention", "query"): "attention.attention.query",
             ("attention", "key"): "attention.attention.key",
             ("attention", "value"): "attention.attention.value",
             ("attention", "out"): "attention.output.dense"}
    dense.update({("mlp", name): f"mlp.{key}" for name, key in mlp})
    for path, key in dense.items():
      targets[(ours, *path, "kernel")] = (f"{theirs}.{key}.weight", state_dicts.linear)
      targets[(ours, *path, "bias")] = (f"{theirs}.{key}.bias", same)
    for norm in ("norm1", "norm2"):
      targets[(ours, norm, "scale")] = (f"{theirs}.{norm}.weight", same)
      targets[(ours, norm, "bias")] = (f"{theirs}.{norm}.bias", same)
    for scale in ("layer_scale1", "layer_scale2"):
      targets[(ours, scale)] = (f"{theirs}.{scale}.lambda1", same)
  return targets


def _hub_targets(config: Dinov2Config) -> dict:
  """flowjax path -> (official key, transform) for facebookresearch/dinov2 hub state dicts
  (the names HF's convert_dinov2*_to_hf.py renames: qkv split in thirds q, k, v; ls{1,2}.gamma;
  SwiGLU w12 / w3; norm)."""
  same = np.asarray
  width = config.hidden_size
  targets = {
      ("embeddings", "cls_token"): ("cls_token", same),
      ("embeddings", "position_embeddings"): ("pos_embed", same),
      ("embeddings", "register_tokens"): ("register_tokens", same),
      ("embeddings", "patch_embeddings", "kernel"): ("patch_embed.proj.weight",
                                                     state_dicts.conv_kernel),
      ("embeddings", "patch_embeddings", "bias"): ("patch_embed.proj.bias", same),
      ("layernorm", "scale"): ("norm.weight", same),
      ("layernorm", "bias"): ("norm.bias", same),
  }
  mlp = (("weights_in", "w12"), ("weights_out", "w3")) if config.use_swiglu_ffn \
      else (("fc1", "fc1"), ("fc2", "fc2"))
  for index in range(config.num_hidden_layers):
    ours, theirs = f"layer_{index}", f"blocks.{index}"
    for part, name in enumerate(("query", "key", "value")):
      rows = slice(part * width, (part + 1) * width)
      targets[(ours, "attention", name, "kernel")] = (
          f"{theirs}.attn.qkv.weight",
          lambda w, rows=rows: state_dicts.linear(np.asarray(w)[rows]))
      targets[(ours, "attention", name, "bias")] = (
          f"{theirs}.attn.qkv.bias", lambda b, rows=rows: np.asarray(b)[rows])
    dense = {("attention", "out"): "attn.proj"}
    dense.update({("mlp", name): f"mlp.{key}" for name, key in mlp})
    for path, key in dense.items():
      targets[(ours, *path, "kernel")] = (f"{theirs}.{key}.weight", state_dicts.linear)
      targets[(ours, *path, "bias")] = (f"{theirs}.{key}.bias", same)
    for norm in ("norm1", "norm2"):
      targets[(ours, norm, "scale")] = (f"{theirs}.{norm}.weight", same)
      targets[(ours, norm, "bias")] = (f"{theirs}.{norm}.bias", same)
    for number in (1, 2):
      targets[(ours, f"layer_scale{number}")] = (f"{theirs}.ls{number}.gamma", same)
  return targets


def _ignored(name: str) -> bool:
  """State-dict entries without a parameter here: the mask token (masked pre-training only) and
  an image-classification head."""
  return name in ("mask_token", "embeddings.mask_token") or name.startswith(("classifier.",
                                                                               "head."))


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], module: Dinov2,
                           source: str = "the checkpoint") -> Params:
  """flowjax parameters of `module` from a HF (`embeddings.*`, `encoder.layer.{i}.*`) or an
  official hub (`pos_embed`, `blocks.{i}.*`) state dict of NumPy arrays.

  Raises ValueError listing every missing, extra and mis-shaped key.
  """
  prefixes = ("dinov2_with_registers.", "dinov2.")
  tensors = {}
  for name, value in state_dict.items():
    for prefix in prefixes:
      if name.startswith(prefix):
        name = name[len(prefix):]
    tensors[name] = value
  hub = "pos_embed" in tensors or any(name.startswith("blocks.") for name in tensors)
  targets = (_hub_targets if hub else _hf_targets)(module.config)
  expected = {path: leaf.shape for path, leaf in
              traverse_util.flatten_dict(abstract_params(module)).items()}
  try:
    return state_dicts.assemble(tensors, targets, expected, _ignored,
                            f"DINOv2 {'hub' if hub else 'HF'} state dict in {source}")
  except state_dicts.ConversionError as error:
    raise ValueError(
        f"{error}\nFor DINOv2 the config must be the checkpoint's: its config.json (HF), or for an "
        f"official hub state dict the preset of the same name (one of {sorted(PRESETS)}); "
        f"it was {module.config}.") from error


def _resolve(path: str, config) -> tuple[str, Dinov2Config]:
  """(weights file, config) for `load`."""
  weights = os.path.join(path, HF_WEIGHTS) if os.path.isdir(path) else path
  if not os.path.isfile(weights):
    raise FileNotFoundError(
        f"No DINOv2 weights at {weights!r}; give a HF checkpoint folder (config.json + "
        f"{HF_WEIGHTS}, as save_pretrained writes it) or a .safetensors / .npz / .pth file.")
  if isinstance(config, Dinov2Config):
    return weights, config
  if isinstance(config, str) and not config.endswith(".json"):
    if config not in PRESETS:
      raise ValueError(f"DINOv2 config {config!r} is neither a preset ({sorted(PRESETS)}) nor a "
                       "config.json path.")
    return weights, PRESETS[config]
  config_path = config or os.path.join(os.path.dirname(os.path.abspath(weights)), HF_CONFIG)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(
        f"No DINOv2 config at {config_path!r}; pass config= a HF config.json, a preset "
        f"({sorted(PRESETS)}; e.g. 'dinov2_vitb14' for dinov2_vitb14_pretrain.pth) or a "
        "Dinov2Config.")
  with open(config_path) as f:
    return weights, Dinov2Config.from_hf_json(json.load(f))


def load(path: str, config: "Dinov2Config | str | None" = None,
         dtype: Any = jnp.float32) -> tuple[Dinov2Config, Dinov2, Params]:
  """(config, module, params) of a DINOv2 checkpoint; params are float32 jax.Arrays.

  Args:
    path: a HF checkpoint folder (config.json and model.safetensors), or a weights file
      (.safetensors, .npz, or .pt/.pth with torch installed) with HF or official hub key names.
    config: None = the config.json in the folder or beside the file; a HF config.json path; a
      PRESETS name (the official hub state dicts carry no config: 'dinov2_vitb14' for
      dinov2_vitb14_pretrain.pth); or a Dinov2Config.
    dtype: the module's compute dtype.
  A folder or file (with the config beside it) on object storage (gs://...) is read through a
  local copy (`storage.local_weights`).
  """
  local, config = storage.local_weights(path, config, HF_CONFIG)
  with storage.naming_copy(local, path):
    weights, config = _resolve(local, config)
    module = Dinov2(config, dtype=dtype)
    try:
      state_dict = state_dicts.read_state_dict(weights)
    except state_dicts.ConversionError as error:
      raise ValueError(f"DINOv2 weights {weights}: {error}") from error
    return config, module, params_from_state_dict(state_dict, module, weights)


def for_resolution(config: Dinov2Config, params: Params, resolution: int,
                   dtype: Any = jnp.float32) -> tuple[Dinov2Config, Dinov2, Params]:
  """The encoder as REPA runs it at `resolution` (224 for 256 x 256 images): REPA's
  `load_encoders` (sihyun-yu/REPA utils.py) replaces the position table by timm's
  `resample_abs_pos_embed(pos_embed, [g, g])` (timm/layers/pos_embed.py: bicubic by output size,
  antialias=True), g = resolution // patch_size, so inputs at `resolution` use the new table as
  it is. Returns (config with image_size = resolution, module, params with the new table)."""
  grid = resolution // config.patch_size
  if grid < 1:
    raise ValueError(f"resolution={resolution} is smaller than one DINOv2 patch "
                     f"({config.patch_size} pixels).")
  table = params["embeddings"]["position_embeddings"]
  size = config.grid_size
  resampled = resize_bicubic(table[0, 1:].reshape(size, size, -1), (grid, grid), antialias=True)
  table = jnp.concatenate([table[:, :1], resampled.reshape(1, grid * grid, -1)], axis=1)
  new_config = dataclasses.replace(config, image_size=resolution)
  new_params = dict(params, embeddings=dict(params["embeddings"], position_embeddings=table))
  return new_config, Dinov2(new_config, dtype=dtype), new_params


def preprocess(images: jax.Array, resolution: int = REPA_RESOLUTION) -> jax.Array:
  """images [B, H, W, C] in [-1, 1], C = 1 or 3 -> [B, resolution, resolution, 3] DINOv2 input:
  REPA's `preprocess_raw_image` for DINOv2 (sihyun-yu/REPA train.py): x / 255 of the uint8 image
  (here (x + 1) / 2), ImageNet mean/std normalization, then torch bicubic resizing to
  resolution x resolution (align_corners=False, no antialiasing). One channel is repeated."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"DINOv2 takes [B, H, W, 1 or 3] images in [-1, 1]; got shape "
                     f"{images.shape}.")
  x = (images.astype(jnp.float32) + 1) / 2
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  if x.shape[1:3] != (resolution, resolution):
    x = resize_bicubic(x, (resolution, resolution))
  return x


def patch_tokens(module: Dinov2, params: Params, images: jax.Array,
                 resolution: int = REPA_RESOLUTION) -> jax.Array:
  """What REPA aligns to: images [B, H, W, C] in [-1, 1] -> the final-norm patch tokens
  [B, (resolution // patch)^2, D] float32 (the official forward_features' x_norm_patchtokens,
  [CLS] and registers dropped), after `preprocess`. For REPA's exact encoder at `resolution`,
  build the module with `for_resolution`; otherwise the position table is resampled as the
  checkpoint's own code does."""
  hidden = module.apply({"params": params}, preprocess(images, resolution))
  return hidden[:, 1 + module.config.num_register_tokens:]
