"""The KL autoencoder of Stable Diffusion (diffusers `AutoencoderKL`) in linen, and its weights.

Encoder: conv_in -> per level [resnet x layers_per_block, downsample (not on the last level)]
-> mid block (resnet, single-head self-attention, resnet) -> GroupNorm, SiLU, conv_out to
2 x latent channels -> quant_conv (1x1): the mean and log-variance of a diagonal Gaussian.
Decoder: post_quant_conv (1x1) -> conv_in -> mid block -> per level, widest first,
[resnet x (layers_per_block + 1), nearest 2x upsample + conv (not on the last level)]
-> GroupNorm, SiLU, conv_out. With block_out_channels (128, 256, 512, 512) this is the
SD-VAE (stabilityai/sd-vae-ft-ema and ft-mse): 8x downsampling, 4 latent channels,
83,653,863 parameters, latents multiplied by scaling_factor 0.18215 for diffusion.

Module names mirror the diffusers state dict ("down_blocks_0/resnets_1/conv1" is
"down_blocks.0.resnets.1.conv1"), so the key mapping below is one rule plus the kernel
transposes; `load_params` reads a diffusers `diffusion_pytorch_model.safetensors` (with the
current to_q/to_k/to_v/to_out.0 or the older query/key/value/proj_attn attention names) or a
flowjax workdir that trained this model with the "autoencoder" objective.

`python -m flowjax.main --config=experiments/autoencoder_digits.py --workdir=DIR` trains a
small one on the embedded digits.
"""

import math
import os
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowjax import storage
from flowjax.models import layers
from flowjax.registry import MODELS

SD_VAE_SCALING_FACTOR = 0.18215
DIFFUSERS_FILENAME = "diffusion_pytorch_model.safetensors"
NORM_EPSILON = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)
# Attention projection names: current diffusers -> diffusers before 0.14 ("deprecated attn block").
LEGACY_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

Params = dict[str, Any]


def _conv(features: int, kernel: int, stride: int, padding, dtype, param_dtype, name: str):
  """nn.Conv with a [kh, kw, in, out] kernel partitioned as (-, -, conv_in, conv_out)."""
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                               (None, None, "conv_in", "conv_out")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)), name=name)


def _group_norm(groups: int, param_dtype, name: str) -> nn.GroupNorm:
  """float32 GroupNorm over the channels of [B, H, W, C], eps 1e-6 as in the SD-VAE."""
  return nn.GroupNorm(
      num_groups=groups, epsilon=NORM_EPSILON, dtype=jnp.float32, param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)), name=name)


class ResnetBlock(nn.Module):
  """x + conv2(SiLU(GN(conv1(SiLU(GN(x)))))), with a 1x1 conv_shortcut when widths differ.

  [B, H, W, C_in] -> [B, H, W, features].
  """
  features: int
  groups: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = ((1, 1), (1, 1))
    h = nn.silu(_group_norm(self.groups, self.param_dtype, "norm1")(x))
    h = _conv(self.features, 3, 1, pad, self.dtype, self.param_dtype, "conv1")(h)
    h = nn.silu(_group_norm(self.groups, self.param_dtype, "norm2")(h))
    h = _conv(self.features, 3, 1, pad, self.dtype, self.param_dtype, "conv2")(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, 1, "VALID", self.dtype, self.param_dtype, "conv_shortcut")(x)
    return (x + h).astype(jnp.float32)


class AttentionBlock(nn.Module):
  """Single-head self-attention over the H x W positions, with a residual connection.

  [B, H, W, C] -> [B, H, W, C]; softmax(q k^T / sqrt(C)) in float32.
  """
  groups: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    h = _group_norm(self.groups, self.param_dtype, "group_norm")(x)
    h = h.reshape(batch, height * width, channels).astype(self.dtype)

    def project(name):
      return layers.dense(channels, ("conv_in", "conv_out"),
                          kernel_init=nn.initializers.lecun_normal(), dtype=self.dtype,
                          param_dtype=self.param_dtype, name=name)

    q, k, v = project("to_q")(h), project("to_k")(h), project("to_v")(h)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits / math.sqrt(channels), axis=-1)
    h = jnp.einsum("bqk,bkc->bqc", weights.astype(self.dtype), v)
    h = project("to_out_0")(h)
    return x + h.reshape(batch, height, width, channels).astype(jnp.float32)


class MidBlock(nn.Module):
  """resnet -> attention -> resnet at constant width: [B, H, W, C] -> [B, H, W, C]."""
  groups: int
  attention: bool = True
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    args = dict(groups=self.groups, dtype=self.dtype, param_dtype=self.param_dtype)
    x = ResnetBlock(channels, name="resnets_0", **args)(x)
    if self.attention:
      x = AttentionBlock(name="attentions_0", **args)(x)
    return ResnetBlock(channels, name="resnets_1", **args)(x)


class Resample(nn.Module):
  """2x down (stride-2 conv) or up (nearest repeat, then conv) at constant width."""
  direction: str
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.direction == "down":
      # diffusers pads only the bottom and right before its stride-2, padding-0 conv.
      return _conv(x.shape[-1], 3, 2, ((0, 1), (0, 1)), self.dtype, self.param_dtype, "conv")(x)
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, 1, ((1, 1), (1, 1)), self.dtype, self.param_dtype, "conv")(x)


class LevelBlock(nn.Module):
  """`num_resnets` resnets to width `features`, then an optional 2x resample.

  diffusers DownEncoderBlock2D (resample 'down') / UpDecoderBlock2D (resample 'up').
  """
  features: int
  num_resnets: int
  resample: str
  groups: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    for j in range(self.num_resnets):
      h = ResnetBlock(self.features, self.groups, self.dtype, self.param_dtype,
                      name=f"resnets_{j}")(h)
    if self.resample == "none":
      return h
    name = "downsamplers_0" if self.resample == "down" else "upsamplers_0"
    return Resample(self.resample, self.dtype, self.param_dtype, name=name)(h)


class Encoder(nn.Module):
  """[B, H, W, C] images -> [B, H / f, W / f, 2 * latent_channels], f = 2^(levels - 1)."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  groups: int
  mid_attention: bool = True
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    args = dict(groups=self.groups, dtype=self.dtype, param_dtype=self.param_dtype)
    h = _conv(self.block_out_channels[0], 3, 1, ((1, 1), (1, 1)), self.dtype, self.param_dtype,
              "conv_in")(x.astype(self.dtype))
    levels = len(self.block_out_channels)
    for level, features in enumerate(self.block_out_channels):
      h = LevelBlock(features, self.layers_per_block, resample="down" if level < levels - 1
                     else "none", name=f"down_blocks_{level}", **args)(h)
    h = MidBlock(attention=self.mid_attention, name="mid_block", **args)(h)
    h = nn.silu(_group_norm(self.groups, self.param_dtype, "conv_norm_out")(h))
    return _conv(2 * self.latent_channels, 3, 1, ((1, 1), (1, 1)), self.dtype, self.param_dtype,
                 "conv_out")(h).astype(jnp.float32)


class Decoder(nn.Module):
  """[B, h, w, latent_channels] -> [B, h f, w f, out_channels], f = 2^(levels - 1)."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  groups: int
  mid_attention: bool = True
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    args = dict(groups=self.groups, dtype=self.dtype, param_dtype=self.param_dtype)
    pad = ((1, 1), (1, 1))
    widths = tuple(reversed(self.block_out_channels))
    h = _conv(widths[0], 3, 1, pad, self.dtype, self.param_dtype, "conv_in")(z.astype(self.dtype))
    h = MidBlock(attention=self.mid_attention, name="mid_block", **args)(h)
    for level, features in enumerate(widths):
      h = LevelBlock(features, self.layers_per_block + 1, resample="up" if level < len(widths) - 1
                     else "none", name=f"up_blocks_{level}", **args)(h)
    h = nn.silu(_group_norm(self.groups, self.param_dtype, "conv_norm_out")(h))
    return _conv(self.out_channels, 3, 1, pad, self.dtype, self.param_dtype,
                 "conv_out")(h).astype(jnp.float32)


class AutoencoderKL(nn.Module):
  """KL-regularised convolutional autoencoder (the SD-VAE at the default widths).

  Attributes:
    block_out_channels: width of each resolution level; levels - 1 downsamplings.
    layers_per_block: resnets per encoder level (the decoder has one more per level).
    latent_channels: channels of the latent z.
    image_channels: channels of the images (in and out).
    norm_groups: GroupNorm groups; must divide every width.
    mid_attention: the self-attention layer in both mid blocks.
    dtype: compute dtype of the convolutions and projections (norms run in float32).
    param_dtype: parameter dtype.
  """
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  image_channels: int = 3
  norm_groups: int = 32
  mid_attention: bool = True
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @property
  def downsampling(self) -> int:
    """f, the ratio of image to latent height and width."""
    return 2 ** (len(self.block_out_channels) - 1)

  def setup(self):
    args = dict(block_out_channels=tuple(self.block_out_channels),
                layers_per_block=self.layers_per_block, groups=self.norm_groups,
                mid_attention=self.mid_attention, dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(latent_channels=self.latent_channels, **args)
    self.decoder = Decoder(out_channels=self.image_channels, **args)
    self.quant_conv = _conv(2 * self.latent_channels, 1, 1, "VALID", jnp.float32,
                            self.param_dtype, "quant_conv")
    self.post_quant_conv = _conv(self.latent_channels, 1, 1, "VALID", jnp.float32,
                                 self.param_dtype, "post_quant_conv")

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Gaussian posterior q(z | x).

    Args:
      x: [B, H, W, image_channels] in [-1, 1]; H and W divisible by `downsampling`.
    Returns:
      mean, logvar: [B, H / f, W / f, latent_channels] float32 (unscaled latent units;
      logvar clipped to [-30, 20]).
    """
    moments = self.quant_conv(self.encoder(x))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: jax.Array) -> jax.Array:
    """z: [B, h, w, latent_channels] unscaled latents -> [B, h f, w f, image_channels] float32."""
    return self.decoder(self.post_quant_conv(z.astype(jnp.float32)))

  def __call__(self, x: jax.Array, rng: jax.Array | None = None):
    """Reconstruction of x through a posterior sample (rng given) or the posterior mean.

    Returns:
      (reconstruction [B, H, W, image_channels], mean, logvar [B, H / f, W / f, latent]).
    """
    mean, logvar = self.encode(x)
    z = mean
    if rng is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return self.decode(z), mean, logvar


def check_image_shape(model: AutoencoderKL, image_shape: Sequence[int]) -> None:
  """Raises a ValueError unless [H, W, C] fits the model (C channels, H and W divisible by f)."""
  if len(image_shape) != 3:
    raise ValueError(f"The autoencoder needs [H, W, C] images; the data have per-example shape "
                     f"{tuple(image_shape)}.")
  height, width, channels = image_shape
  factor = model.downsampling
  if height % factor or width % factor:
    raise ValueError(
        f"Images of {height}x{width} cannot be downsampled {factor}x by "
        f"{len(model.block_out_channels)} levels (block_out_channels="
        f"{tuple(model.block_out_channels)}); use an image size divisible by {factor} "
        "(data.image_size) or fewer levels.")
  if channels != model.image_channels:
    raise ValueError(f"The autoencoder has {model.image_channels} image channels but the data "
                     f"have {channels}.")


def latent_shape(model: AutoencoderKL, image_shape: Sequence[int]) -> tuple[int, int, int]:
  """(H / f, W / f, latent_channels) of images of shape [H, W, C]."""
  check_image_shape(model, image_shape)
  factor = model.downsampling
  return image_shape[0] // factor, image_shape[1] // factor, model.latent_channels


def abstract_params(model: AutoencoderKL, image_shape: Sequence[int]) -> Params:
  """The unboxed parameter tree as jax.ShapeDtypeStruct leaves (nothing is allocated)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  boxed = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]
  return nn.meta.unbox(boxed)


# diffusers weights: key mapping, shape checks, conversion.

def _diffusers_name(path: Sequence[str], legacy_attention: bool) -> str:
  """("encoder", "down_blocks_0", "resnets_1", "conv1", "kernel") ->
  "encoder.down_blocks.0.resnets.1.conv1.weight"."""
  *modules, leaf = path
  name = ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in modules)
  if legacy_attention:
    for new, old in LEGACY_ATTENTION_NAMES.items():
      name = re.sub(rf"\.attentions\.0\.{re.escape(new)}$", f".attentions.0.{old}", name)
  return name + "." + {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]


def _torch_shape(flax_shape: Sequence[int]) -> tuple[int, ...]:
  """Flax conv [kh, kw, I, O] -> torch [O, I, kh, kw]; dense [I, O] -> [O, I]; 1-D unchanged."""
  if len(flax_shape) == 4:
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  if len(flax_shape) == 2:
    return (flax_shape[1], flax_shape[0])
  return tuple(flax_shape)


def torch_to_flax(tensor: np.ndarray, flax_shape: Sequence[int]) -> np.ndarray:
  """A torch weight in the layout of a flax parameter of `flax_shape` (float32).

  Conv2d [O, I, kh, kw] -> [kh, kw, I, O]; Linear [O, I] -> [I, O] (also given as a
  [O, I, 1, 1] 1x1 conv, as some converted files store attention projections); vectors as is.
  """
  tensor = np.asarray(tensor, np.float32)
  if len(flax_shape) == 2 and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
    tensor = tensor[:, :, 0, 0]
  if tensor.ndim == 4:
    tensor = tensor.transpose(2, 3, 1, 0)
  elif tensor.ndim == 2:
    tensor = tensor.T
  return np.ascontiguousarray(tensor)


def diffusers_key_map(params_shapes: Params, legacy_attention: bool = False,
                      ) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """diffusers state-dict key -> (flax parameter path, torch shape), for every parameter.

  Args:
    params_shapes: the parameter tree (arrays or ShapeDtypeStructs), e.g. `abstract_params`.
    legacy_attention: name the mid-block attention projections query/key/value/proj_attn
      (diffusers before 0.14) instead of to_q/to_k/to_v/to_out.0.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params_shapes)[0]:
    names = tuple(str(entry.key) for entry in path)
    out[_diffusers_name(names, legacy_attention)] = (names, _torch_shape(leaf.shape))
  return out


def _accepted_shapes(torch_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
  if len(torch_shape) == 2:
    return (torch_shape, torch_shape + (1, 1))
  return (torch_shape,)


def _uses_legacy_attention(keys, source: str) -> bool:
  legacy = {k for k in keys if re.search(r"\.attentions\.0\.(query|key|value|proj_attn)\.", k)}
  current = {k for k in keys if re.search(r"\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.", k)}
  if legacy and current:
    raise ValueError(
        f"{source} mixes the current (to_q/to_k/to_v/to_out.0) and the old "
        f"(query/key/value/proj_attn) attention names, e.g. {sorted(current)[0]!r} and "
        f"{sorted(legacy)[0]!r}; it is not one AutoencoderKL state dict. Re-export it with one "
        "diffusers version.")
  return bool(legacy)


def check_diffusers_shapes(shapes: dict[str, Sequence[int]], params_shapes: Params,
                           source: str = "the weights file") -> bool:
  """Checks a {key: torch shape} table against the model; returns whether it uses legacy names.

  Raises:
    ValueError naming the missing keys, unexpected keys and mismatched shapes (first 10 of each).
  """
  legacy = _uses_legacy_attention(shapes, source)
  expected = diffusers_key_map(params_shapes, legacy)
  missing = sorted(set(expected) - set(shapes))
  unexpected = sorted(set(shapes) - set(expected))
  mismatched = sorted(
      f"{key}: file {tuple(shapes[key])}, model {expected[key][1]}" for key in expected
      if key in shapes and tuple(shapes[key]) not in _accepted_shapes(expected[key][1]))
  if missing or unexpected or mismatched:
    def listing(title, items):
      if not items:
        return ""
      more = f"\n    ... and {len(items) - 10} more" if len(items) > 10 else ""
      return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:10]) + more
    raise ValueError(
        f"{source} does not match this autoencoder ({len(expected)} parameters expected, "
        f"{len(shapes)} tensors in the file):" + listing("missing keys", missing) +
        listing("unexpected keys", unexpected) + listing("mismatched shapes", mismatched) +
        "\nCheck that the file is a diffusers AutoencoderKL (e.g. sd-vae-ft-ema/"
        f"{DIFFUSERS_FILENAME}) and that model.block_out_channels, layers_per_block, "
        "latent_channels and the data channels match its config.json.")
  return legacy


def params_from_diffusers(tensors: dict[str, np.ndarray], params_shapes: Params,
                          source: str = "the weights file") -> Params:
  """The flax parameter tree (float32 NumPy leaves) of a diffusers AutoencoderKL state dict."""
  legacy = check_diffusers_shapes({k: v.shape for k, v in tensors.items()}, params_shapes,
                                  source)
  params: dict = {}
  for key, (path, _) in diffusers_key_map(params_shapes, legacy).items():
    flax_shape = _flax_leaf(params_shapes, path).shape
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = torch_to_flax(tensors[key], flax_shape)
  return params


def _flax_leaf(tree: Params, path: Sequence[str]):
  for name in path:
    tree = tree[name]
  return tree


def to_diffusers(params: Params, legacy_attention: bool = False) -> dict[str, np.ndarray]:
  """The diffusers state dict (torch layouts, float32 NumPy) of a flax parameter tree."""
  out = {}
  for key, (path, _) in diffusers_key_map(params, legacy_attention).items():
    value = np.asarray(jax.device_get(_flax_leaf(params, path)), np.float32)
    if value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2:
      value = value.T
    out[key] = np.ascontiguousarray(value)
  return out


def from_diffusers_config(config: dict) -> "AutoencoderKL":
  """The AutoencoderKL of a diffusers AutoencoderKL config.json (its block_out_channels,
  layers_per_block, latent_channels, in_channels, norm_num_groups and mid_block_add_attention,
  which is true when absent, as in diffusers)."""
  return AutoencoderKL(
      block_out_channels=tuple(config["block_out_channels"]),
      layers_per_block=config["layers_per_block"], latent_channels=config["latent_channels"],
      image_channels=config["in_channels"], norm_groups=config["norm_num_groups"],
      mid_attention=config.get("mid_block_add_attention", True))


def load_diffusers(path: str, params_shapes: Params) -> Params:
  """Reads a diffusers AutoencoderKL .safetensors file (or a folder holding one).

  Args:
    path: `diffusion_pytorch_model.safetensors`, or the folder (e.g. `sd-vae-ft-ema/`,
      `sd-vae-ft-ema/vae/`) that holds it.
    params_shapes: the parameter tree of the model to load into.
  Returns:
    the flax parameter tree, float32 NumPy leaves.
  """
  from safetensors import numpy as safetensors_numpy
  if storage.is_remote(path) and storage.exists(path):  # the one file, through a local copy
    path = storage.local_copy(path, (DIFFUSERS_FILENAME,))
  if os.path.isdir(path):
    path = os.path.join(path, DIFFUSERS_FILENAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"No autoencoder weights at {path}; download {DIFFUSERS_FILENAME} of a diffusers "
        "AutoencoderKL (e.g. the stabilityai/sd-vae-ft-ema model folder) and give its path.")
  try:
    tensors = safetensors_numpy.load_file(path)
  except Exception as error:
    raise ValueError(f"{path} could not be read as a safetensors file ({type(error).__name__}: "
                     f"{error}); give the diffusers {DIFFUSERS_FILENAME}.") from error
  return params_from_diffusers(tensors, params_shapes, source=path)


def load_params(path: str, model: AutoencoderKL, image_shape: Sequence[int]) -> Params:
  """Autoencoder parameters from a diffusers safetensors file/folder or a flowjax workdir.

  A flowjax workdir is one trained by `python -m flowjax.main` with objective 'autoencoder' and
  this model; its newest readable checkpoint's `params` are returned (as jax.Arrays).
  """
  shapes = abstract_params(model, image_shape)
  if storage.isdir(storage.join(path, "checkpoints")):
    from flowjax import checkpoint
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          shapes)
    params, _ = checkpoint.restore_params(path, target)
    return params
  if path.endswith(".safetensors") or storage.isfile(storage.join(path, DIFFUSERS_FILENAME)):
    return load_diffusers(path, shapes)
  raise FileNotFoundError(
      f"Autoencoder weights {path!r} are neither a .safetensors file, a folder with "
      f"{DIFFUSERS_FILENAME}, nor a flowjax workdir with checkpoints/; give one of those.")


@MODELS.register("autoencoder")
def build(model_config: ml_collections.ConfigDict, info) -> AutoencoderKL:
  """AutoencoderKL from config.model; image channels from the data.

  Keys: block_out_channels, layers_per_block, latent_channels, norm_groups, mid_attention,
  scaling_factor (recorded with cached latents, not used by the module), dtype, param_dtype.
  """
  widths = tuple(int(w) for w in model_config.block_out_channels)
  groups = int(model_config.norm_groups)
  bad = [w for w in widths if w % groups]
  if not widths or bad:
    raise ValueError(f"model.norm_groups={groups} must divide every width of "
                     f"model.block_out_channels={widths}; use e.g. norm_groups=8.")
  model = AutoencoderKL(
      block_out_channels=widths, layers_per_block=int(model_config.layers_per_block),
      latent_channels=int(model_config.latent_channels),
      image_channels=int(info.image_shape[-1]), norm_groups=groups,
      mid_attention=bool(model_config.mid_attention),
      dtype=layers.dtype_from_name(model_config.dtype, "dtype"),
      param_dtype=layers.dtype_from_name(model_config.param_dtype, "param_dtype"))
  check_image_shape(model, info.image_shape)
  return model
