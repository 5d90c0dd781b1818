"""Frechet Inception Distance and Inception Score with the FID Inception-v3, read from a local file.

The network is the TensorFlow FID Inception graph (inception-2015-12-05) as ported to PyTorch by
pytorch-fid (its FIDInceptionA/C/E blocks): torchvision's Inception-v3 layout with a 1008-way
classifier, average pools that ignore the zero padding, and a max pool in the last block. Images
in [-1, 1] are resized bilinearly (no antialiasing) to 299 x 299, which is exactly pytorch-fid's
resize of [0, 1] images followed by its 2x - 1 scaling. BatchNorm runs in inference mode only:
a fixed affine map from the stored mean, variance, scale and offset.

Nothing is downloaded. Get pytorch-fid's weight file once (a torch state dict)

  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

and convert it to the .npz this module reads (needs torch; a .npz or .safetensors holding the
same state-dict names, written where torch is installed, is accepted without it):

  python -m flowjax.evals.fid --convert pt_inception-2015-12-05-6726825d.pth --out inception_fid.npz

Reference statistics (mean and covariance of the 2048 pool features over a dataset split, the
`mu`/`sigma` .npz layout of pytorch-fid, whose own statistics files are read as they are):

  python -m flowjax.evals.fid --stats --config=experiments/imm_cifar10.py \
      --weights=inception_fid.npz --out=cifar10_train_stats.npz [--split=train] [--num_examples=N]

Then set `eval.inception_weights` and `eval.fid_reference` in the config; `--mode=eval` reports
eval_fid, eval_inception_score and eval_inception_score_std from `eval.fid_num_samples` samples.
Samples are measured as float images; they are not rounded to 8 bits first.
"""

import argparse
import dataclasses
import functools
import logging
import math
import os
import sys
import types
import zipfile
import zlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from scipy import special

INPUT_SIZE = 299
MIN_INPUT_SIZE = 75
NUM_FEATURES = 2048
NUM_CLASSES = 1008
BATCH_NORM_EPSILON = 1e-3
WIDTH_DIVISORS = (1, 2, 4, 8, 16)
TORCH_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
CONVERT_COMMAND = f"python -m flowjax.evals.fid --convert {TORCH_WEIGHTS_FILE} --out OUT.npz"
_PRECISION = jax.lax.Precision.HIGHEST
_FID_SAMPLE_STREAM = 0x46494400
_SHOWN_NAMES = 6


class AssetError(RuntimeError):
  """A weights or statistics file is missing, unreadable or does not match the network."""


# The network. Module and parameter names follow torchvision's Inception3 so that every stored
# array has one torch state-dict name (see `torch_name`).

def avg_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3 average pool, stride 1, padding 1, that averages only the pixels inside the image (the
  TF graph's pooling); x: [B, H, W, C] -> [B, H, W, C]."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
  """3x3 max pool; stride 1 pads by 1 (padding never wins), stride 2 is unpadded;
  x: [B, H, W, C]."""
  padding = ((1, 1), (1, 1)) if stride == 1 else "VALID"
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class FixedBatchNorm(nn.Module):
  """Inference BatchNorm as a fixed affine map: (x - mean) / sqrt(var + eps) * scale + bias.

  Parameters (all [C]): scale, bias, mean, var; nothing is updated, no mutable collection.
  """
  epsilon: float = BATCH_NORM_EPSILON

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    mean = self.param("mean", nn.initializers.zeros, (channels,))
    var = self.param("var", nn.initializers.ones, (channels,))
    multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
    return x * multiplier + (bias - mean * multiplier)


class ConvBN(nn.Module):
  """Conv (no bias) -> FixedBatchNorm -> ReLU, torchvision's BasicConv2d.

  kernel: (kh, kw); padding: (ph, pw) zeros on each side; x: [B, H, W, C_in] -> [B, H', W',
  features].
  """
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=((ph, ph), (pw, pw)),
                use_bias=False, precision=_PRECISION, name="conv")(x)
    return nn.relu(FixedBatchNorm(name="bn")(x))


class InceptionA(nn.Module):
  """35x35 block (Mixed_5b-d): 64 + 64 + 96 + pool_features channels out."""
  pool_features: int
  divisor: int

  @nn.compact
  def __call__(self, x):
    c = lambda n: n // self.divisor  # noqa: E731
    branch1x1 = ConvBN(c(64), (1, 1), name="branch1x1")(x)
    branch5x5 = ConvBN(c(48), (1, 1), name="branch5x5_1")(x)
    branch5x5 = ConvBN(c(64), (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
    branch3x3 = ConvBN(c(64), (1, 1), name="branch3x3dbl_1")(x)
    branch3x3 = ConvBN(c(96), (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3)
    branch3x3 = ConvBN(c(96), (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3)
    branch_pool = ConvBN(c(self.pool_features), (1, 1), name="branch_pool")(avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction (Mixed_6a): 384 + 96 + C_in channels out."""
  divisor: int

  @nn.compact
  def __call__(self, x):
    c = lambda n: n // self.divisor  # noqa: E731
    branch3x3 = ConvBN(c(384), (3, 3), stride=2, name="branch3x3")(x)
    branch3x3dbl = ConvBN(c(64), (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = ConvBN(c(96), (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = ConvBN(c(96), (3, 3), stride=2, name="branch3x3dbl_3")(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convolutions (Mixed_6b-e): 4 x 192 channels out."""
  channels_7x7: int
  divisor: int

  @nn.compact
  def __call__(self, x):
    c = lambda n: n // self.divisor  # noqa: E731
    c7 = c(self.channels_7x7)
    branch1x1 = ConvBN(c(192), (1, 1), name="branch1x1")(x)
    branch7x7 = ConvBN(c7, (1, 1), name="branch7x7_1")(x)
    branch7x7 = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
    branch7x7 = ConvBN(c(192), (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
    branch7x7dbl = ConvBN(c7, (1, 1), name="branch7x7dbl_1")(x)
    branch7x7dbl = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(branch7x7dbl)
    branch7x7dbl = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(branch7x7dbl)
    branch7x7dbl = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(branch7x7dbl)
    branch7x7dbl = ConvBN(c(192), (1, 7), padding=(0, 3), name="branch7x7dbl_5")(branch7x7dbl)
    branch_pool = ConvBN(c(192), (1, 1), name="branch_pool")(avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction (Mixed_7a): 320 + 192 + C_in channels out."""
  divisor: int

  @nn.compact
  def __call__(self, x):
    c = lambda n: n // self.divisor  # noqa: E731
    branch3x3 = ConvBN(c(192), (1, 1), name="branch3x3_1")(x)
    branch3x3 = ConvBN(c(320), (3, 3), stride=2, name="branch3x3_2")(branch3x3)
    branch7x7x3 = ConvBN(c(192), (1, 1), name="branch7x7x3_1")(x)
    branch7x7x3 = ConvBN(c(192), (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
    branch7x7x3 = ConvBN(c(192), (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
    branch7x7x3 = ConvBN(c(192), (3, 3), stride=2, name="branch7x7x3_4")(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block (Mixed_7b with an average pool, Mixed_7c with a max pool): 2048 channels out."""
  pool: str
  divisor: int

  @nn.compact
  def __call__(self, x):
    c = lambda n: n // self.divisor  # noqa: E731
    branch1x1 = ConvBN(c(320), (1, 1), name="branch1x1")(x)
    branch3x3 = ConvBN(c(384), (1, 1), name="branch3x3_1")(x)
    branch3x3 = jnp.concatenate([
        ConvBN(c(384), (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
        ConvBN(c(384), (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3)], axis=-1)
    branch3x3dbl = ConvBN(c(448), (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = ConvBN(c(384), (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = jnp.concatenate([
        ConvBN(c(384), (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(branch3x3dbl),
        ConvBN(c(384), (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(branch3x3dbl)], axis=-1)
    pooled = avg_pool_3x3(x) if self.pool == "avg" else max_pool_3x3(x, 1)
    branch_pool = ConvBN(c(192), (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class Logits(nn.Module):
  """The 1008-way classifier: features [B, F] -> (features @ kernel, features @ kernel + bias)."""
  num_classes: int

  @nn.compact
  def __call__(self, features):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (features.shape[-1], self.num_classes))
    bias = self.param("bias", nn.initializers.zeros, (self.num_classes,))
    unbiased = jnp.dot(features, kernel, precision=_PRECISION)
    return unbiased, unbiased + bias


class InceptionV3(nn.Module):
  """The FID Inception-v3: x [B, H, W, 3] with H, W >= 75, already in [-1, 1] at the network's
  resolution (see `preprocess`) -> dict of
    pool: [B, 2048 / width_divisor], the FID features (final average pool), >= 0;
    logits: [B, num_classes], the classifier with its bias;
    logits_unbiased: [B, num_classes], without the bias (what the Inception Score reads, as in
      the original TF Inception Score code).

  width_divisor > 1 divides every layer's width (a cheap stand-in with the same structure, for
  tests); the real network has width_divisor = 1.
  """
  width_divisor: int = 1
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    d = self.width_divisor
    if d not in WIDTH_DIVISORS:
      raise ValueError(f"width_divisor must be one of {WIDTH_DIVISORS}; got {d}.")
    if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < MIN_INPUT_SIZE:
      raise ValueError(f"InceptionV3 needs x: [B, H, W, 3] with H, W >= {MIN_INPUT_SIZE}; got "
                       f"{x.shape}. Use preprocess() to resize and tile grayscale images.")
    x = ConvBN(32 // d, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = ConvBN(32 // d, (3, 3), name="Conv2d_2a_3x3")(x)
    x = ConvBN(64 // d, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = max_pool_3x3(x, 2)
    x = ConvBN(80 // d, (1, 1), name="Conv2d_3b_1x1")(x)
    x = ConvBN(192 // d, (3, 3), name="Conv2d_4a_3x3")(x)
    x = max_pool_3x3(x, 2)
    x = InceptionA(32, d, name="Mixed_5b")(x)
    x = InceptionA(64, d, name="Mixed_5c")(x)
    x = InceptionA(64, d, name="Mixed_5d")(x)
    x = InceptionB(d, name="Mixed_6a")(x)
    x = InceptionC(128, d, name="Mixed_6b")(x)
    x = InceptionC(160, d, name="Mixed_6c")(x)
    x = InceptionC(160, d, name="Mixed_6d")(x)
    x = InceptionC(192, d, name="Mixed_6e")(x)
    x = InceptionD(d, name="Mixed_7a")(x)
    x = InceptionE("avg", d, name="Mixed_7b")(x)
    x = InceptionE("max", d, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits_unbiased, logits = Logits(self.num_classes, name="fc")(pool)
    return {"pool": pool, "logits": logits, "logits_unbiased": logits_unbiased}


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """images: [B, H, W, C] in [-1, 1] with C = 3 (RGB) or 1 (grayscale, tiled to RGB) ->
  [B, size, size, 3], clipped to [-1, 1] and resized bilinearly without antialiasing (as
  pytorch-fid's F.interpolate(align_corners=False))."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"FID needs images [B, H, W, C] with C = 3 (RGB) or 1 (grayscale); got "
                     f"{images.shape}. Latents must be decoded to images first.")
  x = jnp.clip(images.astype(jnp.float32), -1.0, 1.0)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=False)
  return x


@functools.cache
def abstract_params(width_divisor: int = 1) -> dict:
  """ShapeDtypeStructs of the network's parameters (nothing is allocated)."""
  model = InceptionV3(width_divisor=width_divisor)
  dummy = jax.ShapeDtypeStruct((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]


# Weight files. The runtime file (.npz) holds float32 arrays named by their parameter path,
# e.g. 'Mixed_6b/branch7x7_2/conv/kernel' [1, 7, 128, 128]; the torch state dict names the same
# array 'Mixed_6b.branch7x7_2.conv.weight' [128, 128, 1, 7].

_TORCH_LEAVES = {("conv", "kernel"): "conv.weight", ("bn", "scale"): "bn.weight",
                 ("bn", "bias"): "bn.bias", ("bn", "mean"): "bn.running_mean",
                 ("bn", "var"): "bn.running_var", ("fc", "kernel"): "fc.weight",
                 ("fc", "bias"): "fc.bias"}
_IGNORED_TORCH_SUFFIX = ".num_batches_tracked"


def torch_name(path: tuple[str, ...]) -> str:
  """The torch state-dict name of the parameter at `path`, e.g. ('Mixed_5b', 'branch1x1',
  'conv', 'kernel') -> 'Mixed_5b.branch1x1.conv.weight'."""
  leaf = _TORCH_LEAVES[tuple(path[-2:])]
  return ".".join(list(path[:-2]) + [leaf])


def to_torch_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  """Conv kernels [kh, kw, in, out] -> [out, in, kh, kw]; the fc kernel [in, out] -> [out, in];
  vectors unchanged."""
  if path[-1] == "kernel":
    return np.transpose(array, (3, 2, 0, 1) if array.ndim == 4 else (1, 0))
  return array


def from_torch_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  """The inverse of `to_torch_layout`."""
  if path[-1] == "kernel":
    return np.transpose(array, (2, 3, 1, 0) if array.ndim == 4 else (1, 0))
  return array


def torch_shapes(width_divisor: int = 1) -> dict[str, tuple[int, ...]]:
  """{torch state-dict name: shape} of every array the network reads (no num_batches_tracked)."""
  flat = traverse_util.flatten_dict(abstract_params(width_divisor))
  return {torch_name(path): tuple(to_torch_layout(path, np.empty(leaf.shape, np.int8)).shape)
          for path, leaf in flat.items()}


def _width_from_torch(state_dict: Mapping[str, Any], source: str) -> int:
  name = "Conv2d_1a_3x3.conv.weight"
  if name not in state_dict:
    raise AssetError(f"{source} has no entry {name!r}: it is not a state dict of the FID "
                     f"Inception (pytorch-fid's {TORCH_WEIGHTS_FILE}).")
  out_channels = np.shape(state_dict[name])[0]
  divisor = 32 // out_channels if out_channels and 32 % out_channels == 0 else 0
  if divisor not in WIDTH_DIVISORS:
    raise AssetError(f"{source}: {name} has shape {np.shape(state_dict[name])}; the FID "
                     f"Inception's is (32, 3, 3, 3).")
  return divisor


def _describe_mismatch(expected: Mapping[str, tuple], found: Mapping[str, tuple]) -> str:
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
  parts = []
  if missing:
    parts.append(f"{len(missing)} missing (e.g. {missing[:_SHOWN_NAMES]})")
  if unexpected:
    parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:_SHOWN_NAMES]})")
  if wrong:
    shown = ", ".join(f"{k}: expected {tuple(expected[k])}, found {tuple(found[k])}"
                      for k in wrong[:_SHOWN_NAMES])
    parts.append(f"{len(wrong)} of the wrong shape ({shown})")
  return "; ".join(parts)


def convert_state_dict(state_dict: Mapping[str, Any], source: str = "the state dict"
                       ) -> dict[str, np.ndarray]:
  """pytorch-fid's Inception state dict {torch name: array} -> the runtime arrays
  {'a/b/conv/kernel': float32 array in flax layout}. Raises AssetError naming every missing,
  unexpected or misshapen entry ('*.num_batches_tracked' counters are ignored)."""
  divisor = _width_from_torch(state_dict, source)
  expected = torch_shapes(divisor)
  found = {name: tuple(np.shape(value)) for name, value in state_dict.items()
           if not name.endswith(_IGNORED_TORCH_SUFFIX)}
  if found != expected:
    hint = (" AuxLogits entries mean torchvision's ImageNet Inception, not the FID one."
            if any(name.startswith("AuxLogits.") for name in found) else "")
    raise AssetError(f"{source} is not the FID Inception-v3 state dict: "
                     f"{_describe_mismatch(expected, found)}.{hint} Use pytorch-fid's "
                     f"{TORCH_WEIGHTS_FILE}.")
  return {"/".join(path): np.ascontiguousarray(
              from_torch_layout(path, np.asarray(state_dict[torch_name(path)], np.float32)))
          for path in traverse_util.flatten_dict(abstract_params(divisor))}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A torch state dict as {name: NumPy array} from .pth/.pt (needs torch), .npz or .safetensors
  (the same names, written e.g. with `numpy.savez(out, **{k: v.numpy() for k, v in sd.items()})`
  where torch is installed)."""
  if not os.path.isfile(path):
    raise AssetError(f"The Inception weight file {path} does not exist; download pytorch-fid's "
                     f"{TORCH_WEIGHTS_FILE} and give its path.")
  if path.endswith(".npz"):
    return _read_npz(path, "state dict file", "write it with numpy.savez(PATH, **{name: "
                     "tensor.numpy()}) from pytorch-fid's state dict")
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file
    except ImportError as error:
      raise AssetError(f"Reading {path} needs the safetensors package (pip install "
                       "safetensors).") from error
    try:
      return dict(load_file(path))
    except Exception as error:  # safetensors raises its own error types
      raise AssetError(f"{path} is not a readable .safetensors file ({error}).") from error
  try:
    import torch
  except ImportError as error:
    raise AssetError(
        f"Reading the torch file {path} needs torch (pip install torch). Without it, convert it "
        f"where torch is installed: python -c \"import numpy, torch; numpy.savez('weights.npz', "
        f"**{{k: v.numpy() for k, v in torch.load('{path}', map_location='cpu').items()}})\", "
        f"then pass weights.npz to --convert.") from error
  try:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as error:  # torch raises many error types for damaged files
    raise AssetError(f"{path} is not a readable torch state dict ({error}); download "
                     f"pytorch-fid's {TORCH_WEIGHTS_FILE} again.") from error
  if isinstance(loaded, dict) and set(loaded) == {"state_dict"}:
    loaded = loaded["state_dict"]
  return {key: value.detach().cpu().numpy() for key, value in loaded.items()}


def convert(in_path: str, out_path: str) -> dict[str, np.ndarray]:
  """Reads pytorch-fid's weights from `in_path` and writes the runtime .npz to `out_path`."""
  arrays = convert_state_dict(read_state_dict(in_path), source=in_path)
  _save_npz(out_path, arrays)
  return arrays


def _save_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  partial = path + ".partial"
  with open(partial, "wb") as f:
    np.savez(f, **arrays)
  os.replace(partial, path)


def save_weights(path: str, params: Mapping) -> None:
  """Writes network parameters (a nested dict) as the runtime .npz."""
  _save_npz(path, {"/".join(key): np.asarray(value, np.float32)
                   for key, value in traverse_util.flatten_dict(dict(params)).items()})


def _read_npz(path: str, what: str, fix: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise AssetError(f"The {what} {path} does not exist; {fix}.")
  try:
    with np.load(path, allow_pickle=False) as stored:
      return {key: np.asarray(stored[key]) for key in stored.files}
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
    raise AssetError(f"The {what} {path} is not a readable .npz ({error}); {fix}.") from error


def load_weights(path: str) -> tuple[dict, int]:
  """(params, width_divisor) from a runtime .npz written by --convert (or `save_weights`).

  Every entry is checked against the network's parameter names and shapes; a missing,
  unexpected or misshapen entry, an unconverted state dict or non-finite values raise
  AssetError with the fix.
  """
  fix = f"convert pytorch-fid's weights with `{CONVERT_COMMAND}`"
  if path.endswith((".pth", ".pt")):
    raise AssetError(f"{path} is a torch file; {fix} and give the .npz.")
  arrays = _read_npz(path, "Inception weight file", fix)
  if any("." in key and "/" not in key for key in arrays):
    raise AssetError(f"{path} holds torch state-dict names (e.g. {sorted(arrays)[0]!r}), not "
                     f"converted weights; {fix.replace(TORCH_WEIGHTS_FILE, path)}.")
  first = arrays.get("Conv2d_1a_3x3/conv/kernel")
  out_channels = first.shape[-1] if first is not None and first.ndim == 4 else 0
  divisor = 32 // out_channels if out_channels and 32 % out_channels == 0 else 1
  divisor = divisor if divisor in WIDTH_DIVISORS else 1
  flat = traverse_util.flatten_dict(abstract_params(divisor))
  expected = {"/".join(key): tuple(leaf.shape) for key, leaf in flat.items()}
  found = {key: tuple(value.shape) for key, value in arrays.items()}
  if found != expected:
    raise AssetError(f"The Inception weight file {path} does not match the FID Inception-v3: "
                     f"{_describe_mismatch(expected, found)}; {fix}.")
  bad = sorted(key for key, value in arrays.items() if not np.isfinite(value).all())
  if bad:
    raise AssetError(f"The Inception weight file {path} has non-finite values in {bad[:6]}; "
                     f"{fix}.")
  variances = [key for key in arrays if key.endswith("/bn/var") and (arrays[key] < 0).any()]
  if variances:
    raise AssetError(f"The Inception weight file {path} has negative BatchNorm variances in "
                     f"{variances[:6]}; {fix}.")
  if divisor != 1:
    logging.warning("%s is a reduced-width Inception (width / %d); its FID values are not "
                    "comparable to published ones.", path, divisor)
  params = traverse_util.unflatten_dict(
      {tuple(key.split("/")): value.astype(np.float32) for key, value in arrays.items()})
  return params, divisor


# Feature extraction, jitted and sharded over the batch axis of a mesh.

def default_mesh() -> jax.sharding.Mesh:
  """A data-parallel mesh over every device."""
  from flowjax import sharding
  return sharding.make_mesh(types.SimpleNamespace(data=-1, fsdp=1, tensor=1))


@dataclasses.dataclass(frozen=True, eq=False)
class Inception:
  """The loaded network on a mesh. Build it with `load`.

  params: replicated on `mesh`; image_size: the network's input resolution (299 for FID);
  batch_size: images per compiled call, a multiple of the mesh's batch shards.
  """
  params: Any
  width_divisor: int
  image_size: int
  batch_size: int
  mesh: Any
  forward: Any

  @property
  def batch_sharding(self):
    from flowjax import sharding
    return sharding.batch_sharding(self.mesh)

  def features_and_logits(self, images) -> tuple[np.ndarray, np.ndarray]:
    """images: [N, H, W, C] in [-1, 1], C = 3 or 1: a host array (the same on every process)
    or a jax.Array (a global batch already sharded like `batch_sharding` is used in place).
    Returns (pool features [N, 2048 / width_divisor], unbiased logits [N, 1008]) as float32
    NumPy arrays, computed in sharded batches of `batch_size`."""
    if isinstance(images, jax.Array) and images.sharding == self.batch_sharding:
      return tuple(np.asarray(a) for a in jax.device_get(self.forward(self.params, images)))
    images = np.asarray(jax.device_get(images), np.float32)
    if images.ndim != 4 or len(images) < 1:
      raise ValueError(f"images must be [N, H, W, C] with N >= 1; got {images.shape}.")
    features, logits = [], []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      padded = np.concatenate(
          [chunk, np.zeros((self.batch_size - len(chunk),) + chunk.shape[1:], np.float32)])
      batch = jax.make_array_from_callback(padded.shape, self.batch_sharding,
                                           lambda index, padded=padded: padded[index])
      chunk_features, chunk_logits = jax.device_get(self.forward(self.params, batch))
      features.append(np.asarray(chunk_features)[:len(chunk)])
      logits.append(np.asarray(chunk_logits)[:len(chunk)])
    return np.concatenate(features), np.concatenate(logits)


def from_params(params, width_divisor: int = 1, *, mesh=None, image_size: int = INPUT_SIZE,
                batch_size: int = 64) -> Inception:
  """An `Inception` for `params` (a nested dict as `load_weights` returns) on `mesh` (default:
  data-parallel over all devices); batch_size is rounded up to a multiple of the batch shards."""
  from flowjax import sharding
  mesh = mesh if mesh is not None else default_mesh()
  if image_size < MIN_INPUT_SIZE:
    raise ValueError(f"image_size must be >= {MIN_INPUT_SIZE}; got {image_size}.")
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  batch_size = shards * math.ceil(max(1, batch_size) / shards)
  params = jax.device_put(jax.tree.map(jnp.asarray, params), sharding.replicated(mesh))
  return Inception(params=params, width_divisor=width_divisor, image_size=image_size,
                   batch_size=batch_size, mesh=mesh,
                   forward=_forward_fn(width_divisor, image_size, mesh))


@functools.cache
def _forward_fn(width_divisor: int, image_size: int, mesh):
  """jitted (params, images [B, H, W, C]) -> (pool [B, F], logits_unbiased [B, 1008]), batch
  sharded over `mesh`; one per network and mesh, so every evaluation reuses its compilations."""
  from flowjax import sharding
  model = InceptionV3(width_divisor=width_divisor)

  def forward(params, images):
    outputs = model.apply({"params": params}, preprocess(images, image_size))
    return outputs["pool"], outputs["logits_unbiased"]

  replicated = sharding.replicated(mesh)
  return jax.jit(forward, in_shardings=(replicated, sharding.batch_sharding(mesh)),
                 out_shardings=replicated)


def load(path: str, *, mesh=None, image_size: int = INPUT_SIZE, batch_size: int = 64
         ) -> Inception:
  """The network from a runtime weight file (see `load_weights`) on `mesh`."""
  params, divisor = load_weights(path)
  return from_params(params, divisor, mesh=mesh, image_size=image_size, batch_size=batch_size)


# Statistics and scores (float64 on the host).

def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """features: [N, F] with N >= 2 -> (mean [F], unbiased covariance [F, F]), float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f"Feature statistics need [N, F] features with N >= 2; got "
                     f"{features.shape}.")
  return features.mean(0), np.cov(features, rowvar=False)


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Square root of a symmetric PSD matrix by eigendecomposition (negative rounding clipped)."""
  values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the FID of two Gaussians; mu: [F],
  sigma: [F, F] symmetric positive semi-definite.

  tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2): the eigenvalues of S1 S2 are those of the
  symmetric PSD matrix S1^(1/2) S2 S1^(1/2), so the trace is a sum of square roots of real
  eigenvalues from `eigh`, also when S1 or S2 is singular (fewer samples than features). Float64.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  dim = len(mu1)
  if (mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or
      sigma2.shape != (dim, dim)):
    raise ValueError(f"frechet_distance needs mu1, mu2: [F] and sigma1, sigma2: [F, F] with the "
                     f"same F; got {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}.")
  root1 = _symmetric_sqrt(sigma1)
  product = root1 @ sigma2 @ root1
  eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
  trace_sqrt = np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def inception_score(logits, num_splits: int = 10) -> tuple[float, float]:
  """exp(E_x KL(p(y|x) || p(y))) with p(y|x) = softmax(logits); logits: [N, K], N >= num_splits.

  As in the standard code, the N examples are cut into `num_splits` consecutive groups, p(y) is
  the mean of p(y|x) within a group, and the score's mean and standard deviation over the groups
  are returned. Uniform predictions give 1; confident predictions spread evenly over K classes
  give K.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or len(logits) < num_splits or num_splits < 1:
    raise ValueError(f"inception_score needs logits [N, K] with N >= num_splits = {num_splits} "
                     f">= 1; got {logits.shape}.")
  log_probs = special.log_softmax(logits, axis=1)
  scores = []
  for group in np.array_split(log_probs, num_splits):
    log_marginal = special.logsumexp(group, axis=0) - np.log(len(group))
    kl = np.sum(np.exp(group) * (group - log_marginal), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray, num_examples: int) -> None:
  """Writes reference statistics as .npz: mu [F], sigma [F, F] (float64), num_examples."""
  _save_npz(path, {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64),
                   "num_examples": np.int64(num_examples)})


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu [F], sigma [F, F]) float64 from a statistics .npz (this module's or pytorch-fid's)."""
  fix = ("compute them with `python -m flowjax.evals.fid --stats --config=... --weights=... "
         f"--out={path}`")
  arrays = _read_npz(path, "FID reference statistics file", fix)
  if "mu" not in arrays or "sigma" not in arrays:
    raise AssetError(f"The FID reference statistics file {path} has entries {sorted(arrays)}, "
                     f"not 'mu' and 'sigma'; {fix}.")
  mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
  if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
    raise AssetError(f"The FID reference statistics file {path} has mu {mu.shape} and sigma "
                     f"{sigma.shape}; expected [F] and [F, F]; {fix}.")
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise AssetError(f"The FID reference statistics file {path} has non-finite values; {fix}.")
  return mu, sigma


def dataset_statistics(config, inception: Inception, split: str = "train",
                       num_examples: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
  """(mu, sigma, n): the statistics of the first n = num_examples (default: all) examples of
  a split of `config.data`, read in order without random flips, in global batches of
  config.train.batch_size sharded over the Inception's mesh."""
  import ml_collections

  from flowjax import data
  data_config = ml_collections.ConfigDict(config.data.to_dict())
  data_config.random_flip = False
  info = data.data_info(data_config, split)
  total = num_examples or info.num_examples
  if not total or total < 2:
    raise ValueError(f"Reference statistics need at least 2 examples of split {split!r}; the "
                     f"split has {info.num_examples}, num_examples={num_examples}.")
  if info.num_examples is not None and total > info.num_examples:
    raise ValueError(f"num_examples={total} exceeds the {info.num_examples} examples of split "
                     f"{split!r}.")
  batch_size = config.train.batch_size
  batches = data.build(data_config, split=split, global_batch_size=batch_size, seed=config.seed,
                       sharding=inception.batch_sharding, shuffle=False)
  features = []
  try:
    for _ in range(math.ceil(total / batch_size)):
      features.append(inception.features_and_logits(next(batches)["image"])[0])
  finally:
    batches.close()
  mu, sigma = feature_statistics(np.concatenate(features)[:total])
  return mu, sigma, total


def scores(features: np.ndarray, logits: np.ndarray, mu: np.ndarray, sigma: np.ndarray,
           num_splits: int = 10) -> dict[str, float]:
  """{'fid', 'inception_score', 'inception_score_std'} of samples' features [N, F] and unbiased
  logits [N, K] against reference statistics mu [F], sigma [F, F]."""
  features = np.asarray(features)
  if features.shape[1:] != mu.shape:
    raise AssetError(f"The reference statistics have {len(mu)} features but the network gives "
                     f"{features.shape[1]}; compute them with the same weight file.")
  splits = min(num_splits, len(logits))
  score, score_std = inception_score(logits, splits)
  return {"fid": frechet_distance(*feature_statistics(features), mu, sigma),
          "inception_score": score, "inception_score_std": score_std}


def evaluate_run(model, *, image_size: int = INPUT_SIZE) -> dict[str, float]:
  """FID and Inception Score of `eval.fid_num_samples` samples of a trained model (an
  evals.Evaluable: its sampler and parameters are those of `sample.*`), against
  `eval.fid_reference` with `eval.inception_weights`.

  Returns {'eval_fid', 'eval_inception_score', 'eval_inception_score_std'}, or {} with a warning
  when the weights or reference statistics are not set, missing or do not fit. The noise is the
  same at every step, so values at different steps are comparable. image_size: the network's
  input resolution (299 for FID; smaller only to test a reduced network cheaply).
  """
  config = model.config
  shape = tuple(model.info.image_shape)
  if len(shape) != 3 or shape[-1] not in (1, 3):
    logging.info("No FID: the data (shape %s) are not RGB or grayscale images.", shape)
    return {}
  weights = config.eval.get("inception_weights", "")
  reference = config.eval.get("fid_reference", "")
  if not weights or not reference:
    # Not configured is a choice (most CPU runs); configured but unreadable is a warning below.
    logging.info("FID skipped: set eval.inception_weights (converted with `%s`) and "
                    "eval.fid_reference (from `python -m flowjax.evals.fid --stats`).",
                    CONVERT_COMMAND)
    return {}
  try:
    inception = load(weights, mesh=model.mesh, image_size=image_size,
                     batch_size=config.train.batch_size)
    mu, sigma = load_statistics(reference)
  except AssetError as error:
    logging.warning("FID skipped: %s", error)
    return {}
  num = int(config.eval.get("fid_num_samples", 50_000))
  if num < 2:
    logging.warning("FID skipped: eval.fid_num_samples=%d; it needs at least 2 samples.", num)
    return {}
  chunk = config.train.batch_size
  rng = jax.random.fold_in(model.rng, _FID_SAMPLE_STREAM)
  features, logits = [], []
  for index in range(math.ceil(num / chunk)):
    images = model.sample(jax.random.fold_in(rng, index))
    chunk_features, chunk_logits = inception.features_and_logits(np.asarray(images))
    features.append(chunk_features)
    logits.append(chunk_logits)
  try:
    values = scores(np.concatenate(features)[:num], np.concatenate(logits)[:num], mu, sigma)
  except AssetError as error:
    logging.warning("FID skipped: %s", error)
    return {}
  return {f"eval_{key}": value for key, value in values.items()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m flowjax.evals.fid",
      description="Convert pytorch-fid's Inception weights (--convert) or compute FID reference "
                  "statistics of a dataset split (--stats).")
  parser.add_argument("--convert", metavar="IN", help=f"pytorch-fid's {TORCH_WEIGHTS_FILE} "
                      "(or a .npz/.safetensors of its state dict) to convert to --out")
  parser.add_argument("--stats", action="store_true",
                      help="write reference statistics of --config's data to --out")
  parser.add_argument("--out", required=True, help="the .npz to write")
  parser.add_argument("--config", help="experiment file[:preset] whose data section is read")
  parser.add_argument("--weights", help="converted Inception weights (default: the config's "
                      "eval.inception_weights)")
  parser.add_argument("--split", default="train", help="dataset split (default: train)")
  parser.add_argument("--num_examples", type=int, default=None,
                      help="first N examples of the split (default: all)")
  args = parser.parse_args(argv)
  if bool(args.convert) == bool(args.stats):
    parser.error("give exactly one of --convert IN or --stats.")
  try:
    if args.convert:
      arrays = convert(args.convert, args.out)
      print(f"Wrote {args.out}: {len(arrays)} arrays, "
            f"{sum(a.size for a in arrays.values()):,} values.")
      return
    if not args.config:
      parser.error("--stats needs --config=experiments/FILE.py[:preset].")
    from flowjax import config as config_lib, sharding
    sharding.start_runtime()
    path, _, preset = args.config.partition(":")
    config = config_lib.load_experiment(path, preset or None)
    weights = args.weights or config.eval.get("inception_weights", "")
    if not weights:
      parser.error("--stats needs --weights=PATH (or eval.inception_weights in the config).")
    inception = load(weights, mesh=sharding.make_mesh(config.mesh),
                     batch_size=config.train.batch_size)
    mu, sigma, num = dataset_statistics(config, inception, args.split, args.num_examples)
    if jax.process_index() == 0:
      save_statistics(args.out, mu, sigma, num)
    print(f"Wrote {args.out}: statistics of {num} examples of {config.data.name} "
          f"split {args.split!r}.")
  except AssetError as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  main()
