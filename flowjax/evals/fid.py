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
`mu`/`sigma` .npz layout of pytorch-fid, whose own statistics files are read as they are), with
up to --num_pr_features (default 10,000) feature vectors of examples drawn with the config's
seed for precision and recall (arXiv:1904.06991, `flowjax.evals.precision_recall`):

  python -m flowjax.evals.fid --stats --config=experiments/imm_cifar10.py \
      --weights=inception_fid.npz --out=cifar10_train_stats.npz [--split=train] [--num_examples=N]

Any config key can be overridden as for flowjax.main, so the same command reads your own data
(`--config.data.name=folder:DIR` or `arrays:PATH`, `--config.data.image_size=S`): images are
served as training sees them (resized and cropped to S, grey-scale with one channel) and then,
like samples, tiled to RGB and resized to 299 x 299. With `eval.feature_extractor='classifier'`
the features are those of a classifier trained on the data (`flowjax.evals.classifier`) instead.

Then set `eval.inception_weights` and `eval.fid_reference` in the config; `--mode=eval` reports
eval_fid, eval_inception_score, eval_inception_score_std and, when the reference file holds
feature vectors, eval_precision and eval_recall from `eval.fid_num_samples` samples. Samples are
measured as float images; they are not rounded to 8 bits first.
"""

import argparse
import dataclasses
import functools
import hashlib
import io
import logging
import math
import os
import sys
import types
import zipfile
import zlib
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from scipy import special

from flowjax import storage
from flowjax.config import FEATURE_EXTRACTORS
from flowjax.evals import precision_recall

INPUT_SIZE = 299
MIN_INPUT_SIZE = 75
NUM_FEATURES = 2048
NUM_CLASSES = 1008
BATCH_NORM_EPSILON = 1e-3
WIDTH_DIVISORS = (1, 2, 4, 8, 16)
NUM_PR_FEATURES = 10_000
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
    return read_npz(path, "state dict file", "write it with numpy.savez(PATH, **{name: "
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
  save_npz(out_path, arrays)
  return arrays


def save_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes `arrays` as an .npz at `path` (parent folders created), atomically: a reader never
  sees a partial file (on object storage, gs://..., one object upload)."""
  if storage.is_remote(path):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    storage.write_bytes(path, buffer.getvalue())
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  partial = path + ".partial"
  with open(partial, "wb") as f:
    np.savez(f, **arrays)
  os.replace(partial, path)


def save_weights(path: str, params: Mapping) -> None:
  """Writes network parameters (a nested dict) as the runtime .npz."""
  save_npz(path, {"/".join(key): np.asarray(value, np.float32)
                  for key, value in traverse_util.flatten_dict(dict(params)).items()})


def read_npz(path: str, what: str, fix: str) -> dict[str, np.ndarray]:
  """{name: array} of the .npz at `path`; raises AssetError '<The what> <path> does not exist /
  is not a readable .npz (...); <fix>.' The file may be on object storage (gs://...)."""
  if not storage.isfile(path):
    raise AssetError(f"The {what} {path} does not exist; {fix}.")
  try:
    source = io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path
    with np.load(source, allow_pickle=False) as stored:
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
  arrays = read_npz(path, "Inception weight file", fix)
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


def params_digest(params) -> str:
  """A 16-hex-digit fingerprint of a parameter tree (names, shapes, dtypes and values), stored
  with reference statistics so that features of other weights are not compared with them."""
  digest = hashlib.sha256()
  for key, value in sorted(traverse_util.flatten_dict(dict(params), sep="/").items()):
    value = np.ascontiguousarray(np.asarray(value))
    digest.update(f"{key}:{value.dtype.str}:{value.shape};".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()[:16]


def batched_outputs(forward, params, images, batch_size: int, batch_sharding
                    ) -> tuple[np.ndarray, ...]:
  """forward(params, [batch_size, ...]) -> tuple of [batch_size, ...] arrays, applied to images:
  [N, H, W, C] (a host array, the same on every process, or a jax.Array: a global batch already
  sharded like batch_sharding is used in place) in zero-padded batches sharded by
  batch_sharding. Returns the tuple's arrays for the N images as float32 NumPy arrays."""
  if isinstance(images, jax.Array) and images.sharding == batch_sharding:
    return tuple(np.asarray(a) for a in jax.device_get(forward(params, images)))
  images = np.asarray(jax.device_get(images), np.float32)
  if images.ndim != 4 or len(images) < 1:
    raise ValueError(f"images must be [N, H, W, C] with N >= 1; got {images.shape}.")
  outputs = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    padded = np.concatenate(
        [chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:], np.float32)])
    batch = jax.make_array_from_callback(padded.shape, batch_sharding,
                                         lambda index, padded=padded: padded[index])
    outputs.append([np.asarray(a)[:len(chunk)] for a in jax.device_get(forward(params, batch))])
  return tuple(np.concatenate(parts) for parts in zip(*outputs))


@dataclasses.dataclass(frozen=True, eq=False)
class Inception:
  """The loaded network on a mesh, a feature extractor. Build it with `load`.

  params: replicated on `mesh`; image_size: the network's input resolution (299 for FID);
  batch_size: images per compiled call, a multiple of the mesh's batch shards; digest: the
  weights' `params_digest`.
  """
  params: Any
  width_divisor: int
  image_size: int
  batch_size: int
  mesh: Any
  forward: Any
  digest: str = ""
  name = "inception"

  @property
  def batch_sharding(self):
    from flowjax import sharding
    return sharding.batch_sharding(self.mesh)

  @property
  def num_features(self) -> int:
    return NUM_FEATURES // self.width_divisor

  def features_and_logits(self, images) -> tuple[np.ndarray, np.ndarray]:
    """images: [N, H, W, C] in [-1, 1], C = 3 or 1 (see `batched_outputs`). Returns (pool
    features [N, 2048 / width_divisor], unbiased logits [N, 1008]) as float32 NumPy arrays,
    computed in sharded batches of `batch_size`."""
    return batched_outputs(self.forward, self.params, images, self.batch_size,
                           self.batch_sharding)


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
  digest = params_digest(jax.device_get(params))
  params = jax.device_put(jax.tree.map(jnp.asarray, params), sharding.replicated(mesh))
  return Inception(params=params, width_divisor=width_divisor, image_size=image_size,
                   batch_size=batch_size, mesh=mesh,
                   forward=_forward_fn(width_divisor, image_size, mesh), digest=digest)


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


# Reference files: the statistics of a dataset split in one feature space, with a seeded random
# subset of its feature vectors for precision and recall.

class Reference(NamedTuple):
  """What a reference file holds.

  mu: [F] and sigma: [F, F] float64, the features' mean and covariance over num_examples
  examples; features: [M, F] float32, M <= --num_pr_features feature vectors of distinct examples
  drawn at random (in random order, so that any prefix is a random subset), or None (files
  written without them, pytorch-fid's files); feature_extractor: the network's name ('inception'
  or 'classifier') and digest: its weights' `params_digest`, both '' when not recorded.
  """
  mu: np.ndarray
  sigma: np.ndarray
  num_examples: int
  features: np.ndarray | None = None
  feature_extractor: str = ""
  digest: str = ""


def save_reference(path: str, reference: Reference) -> None:
  """Writes a reference .npz: mu [F], sigma [F, F] (float64), num_examples and, when present,
  pr_features [M, F] (float32), feature_extractor and feature_digest (strings)."""
  arrays = {"mu": np.asarray(reference.mu, np.float64),
            "sigma": np.asarray(reference.sigma, np.float64),
            "num_examples": np.int64(reference.num_examples)}
  if reference.features is not None:
    arrays["pr_features"] = np.asarray(reference.features, np.float32)
  if reference.feature_extractor:
    arrays["feature_extractor"] = np.array(reference.feature_extractor)
  if reference.digest:
    arrays["feature_digest"] = np.array(reference.digest)
  save_npz(path, arrays)


def load_reference(path: str, fix: str | None = None) -> Reference:
  """The Reference in a statistics .npz (this module's, or pytorch-fid's mu/sigma files); fix:
  the advice appended to every AssetError (default: the --stats command in general form)."""
  fix = fix or ("compute them with `python -m flowjax.evals.fid --stats --config=... "
                f"--weights=... --out={path}`")
  arrays = read_npz(path, "FID reference statistics file", fix)
  if "mu" not in arrays or "sigma" not in arrays:
    raise AssetError(f"The FID reference statistics file {path} has entries {sorted(arrays)}, "
                     f"not 'mu' and 'sigma'; {fix}.")
  mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
  if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
    raise AssetError(f"The FID reference statistics file {path} has mu {mu.shape} and sigma "
                     f"{sigma.shape}; expected [F] and [F, F]; {fix}.")
  features = arrays.get("pr_features")
  if features is not None and (features.ndim != 2 or features.shape[1] != len(mu)):
    raise AssetError(f"The FID reference statistics file {path} has pr_features "
                     f"{features.shape}; expected [M, {len(mu)}]; {fix}.")
  if not all(np.isfinite(a).all() for a in (mu, sigma) + (() if features is None else (features,))):
    raise AssetError(f"The FID reference statistics file {path} has non-finite values; {fix}.")
  return Reference(mu=mu, sigma=sigma, num_examples=int(arrays.get("num_examples", 0)),
                   features=None if features is None else features.astype(np.float32),
                   feature_extractor=str(arrays.get("feature_extractor", "")),
                   digest=str(arrays.get("feature_digest", "")))


def check_reference(reference: Reference, extractor, path: str, fix: str) -> None:
  """Raises AssetError when `reference` was computed in another feature space than that of
  `extractor` (another network or other weights, where the file records them, or another
  feature count)."""
  recorded = reference.feature_extractor
  if recorded and (recorded != extractor.name or
                   (reference.digest and reference.digest != extractor.digest)):
    raise AssetError(f"The FID reference statistics file {path} holds {recorded} features of "
                     f"weights {reference.digest or '(unrecorded)'}, but the evaluation uses "
                     f"{extractor.name} features of weights {extractor.digest}; {fix}.")
  if len(reference.mu) != extractor.num_features:
    raise AssetError(f"The FID reference statistics file {path} has {len(reference.mu)} features "
                     f"but the {extractor.name} network gives {extractor.num_features}; {fix}.")


class _Moments:
  """Running mean and covariance of feature batches in float64, accumulated about the first
  batch's mean (a shift that keeps the cancellation in sum(x x^T) - n mu mu^T small)."""

  def __init__(self):
    self.count, self.shift, self.total, self.outer = 0, None, None, None

  def add(self, features: np.ndarray) -> None:
    features = np.asarray(features, np.float64)
    if self.shift is None:
      self.shift = features.mean(0)
      self.total = np.zeros_like(self.shift)
      self.outer = np.zeros((len(self.shift), len(self.shift)))
    centred = features - self.shift
    self.count += len(features)
    self.total += centred.sum(0)
    self.outer += centred.T @ centred

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    """(mean [F], unbiased covariance [F, F]), as `feature_statistics` of all batches."""
    mean = self.total / self.count
    cov = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
    return self.shift + mean, (cov + cov.T) / 2


def dataset_statistics(config, extractor, split: str = "train", num_examples: int | None = None,
                       num_pr_features: int = NUM_PR_FEATURES) -> Reference:
  """The Reference of the first n = num_examples (default: all) examples of a split of
  `config.data` in the features of `extractor` (an Inception, or a flowjax.evals.classifier
  Classifier), read in order without random flips or labels, in global batches of
  config.train.batch_size sharded over the extractor's mesh. min(num_pr_features, n) feature
  vectors of examples drawn with config.seed are kept for precision and recall."""
  import ml_collections

  from flowjax import data
  data_config = ml_collections.ConfigDict(config.data.to_dict())
  data_config.random_flip = False
  data_config.conditional = False  # statistics need no labels; a flat folder has none
  if "text" in data_config:
    data_config.text.encoder = ""  # nor captions
  info = data.data_info(data_config, split)
  total = num_examples or info.num_examples
  if not total or total < 2:
    raise ValueError(f"Reference statistics need at least 2 examples of split {split!r}; the "
                     f"split has {info.num_examples}, num_examples={num_examples}.")
  if info.num_examples is not None and total > info.num_examples:
    raise ValueError(f"num_examples={total} exceeds the {info.num_examples} examples of split "
                     f"{split!r}.")
  keep = np.random.default_rng(config.seed).permutation(total)[:max(0, num_pr_features)]
  kept = None
  moments = _Moments()
  batch_size = config.train.batch_size
  batches = data.build(data_config, split=split, global_batch_size=batch_size, seed=config.seed,
                       sharding=extractor.batch_sharding, shuffle=False)
  try:
    for start in range(0, total, batch_size):
      features = extractor.features_and_logits(next(batches)["image"])[0][:total - start]
      moments.add(features)
      if kept is None:
        kept = np.zeros((len(keep), features.shape[1]), np.float32)
      slots = np.nonzero((keep >= start) & (keep < start + len(features)))[0]
      kept[slots] = features[keep[slots] - start]
  finally:
    batches.close()
  mu, sigma = moments.result()
  return Reference(mu=mu, sigma=sigma, num_examples=total,
                   features=kept if len(keep) else None, feature_extractor=extractor.name,
                   digest=extractor.digest)


def scores(features: np.ndarray, logits: np.ndarray | None, mu: np.ndarray, sigma: np.ndarray,
           num_splits: int = 10) -> dict[str, float]:
  """{'fid'} and, given unbiased Inception logits [N, K], {'inception_score',
  'inception_score_std'} of samples' features [N, F] against reference statistics mu [F],
  sigma [F, F]."""
  features = np.asarray(features)
  if features.shape[1:] != mu.shape:
    raise AssetError(f"The reference statistics have {len(mu)} features but the network gives "
                     f"{features.shape[1]}; compute them with the same weight file.")
  values = {"fid": frechet_distance(*feature_statistics(features), mu, sigma)}
  if logits is not None:
    score, score_std = inception_score(logits, min(num_splits, len(logits)))
    values.update(inception_score=score, inception_score_std=score_std)
  return values


# Feature extractors: eval.feature_extractor names the network whose features FID and precision
# and recall are measured in.

def feature_extractor_name(config) -> str:
  return config.eval.get("feature_extractor", "inception")


def weights_key(config) -> str:
  """The eval key that names the weight file of eval.feature_extractor."""
  return ("classifier_weights" if feature_extractor_name(config) == "classifier"
          else "inception_weights")


def stats_command(config, out: str) -> str:
  """The --stats command that writes the reference file `out` for this config's data and
  feature extractor."""
  weights = config.eval.get(weights_key(config), "") or "WEIGHTS.npz"
  network = (f"--weights={weights}" if feature_extractor_name(config) == "inception" else
             f"--config.eval.feature_extractor=classifier --config.eval.classifier_weights="
             f"{weights}")
  return (f"python -m flowjax.evals.fid --stats --config=EXPERIMENT.py "
          f"--config.data.name={config.data.name} --config.data.image_size="
          f"{config.data.image_size} {network} --out={out}")


def load_feature_extractor(config, image_shape=None, *, weights: str | None = None, mesh=None,
                           image_size: int = INPUT_SIZE):
  """The network of eval.feature_extractor with `weights` (default: the file its eval key
  names): 'inception', the FID Inception (see `load`), or 'classifier', the network of
  flowjax.evals.classifier for images of image_shape (H, W, C; checked when given). Both have
  name, digest, num_features, batch_sharding and features_and_logits(images). Raises AssetError
  naming the file and the command that makes it when it is missing, damaged or made for other
  images."""
  name = feature_extractor_name(config)
  weights = weights or config.eval.get(weights_key(config), "")
  batch_size = config.train.batch_size
  if name == "inception":
    return load(weights, mesh=mesh, image_size=image_size, batch_size=batch_size)
  if name == "classifier":
    from flowjax.evals import classifier
    return classifier.load(weights, image_shape=image_shape, mesh=mesh, batch_size=batch_size,
                           fix=f"train it with `{classifier.train_command(config, weights)}`")
  raise AssetError(f"eval.feature_extractor={name!r} is not one of {FEATURE_EXTRACTORS}.")


def _precision_recall(reference: Reference, features: np.ndarray, path: str) -> dict:
  """{'precision', 'recall'} of the first n = min(M, N) sample features against the first n
  reference vectors (a random subset), or {} with a log line when the file has none."""
  if reference.features is None:
    logging.info("Precision and recall skipped: %s holds no reference feature vectors (an older "
                 "or pytorch-fid statistics file); write it again with `python -m "
                 "flowjax.evals.fid --stats` to get them.", path)
    return {}
  num = min(len(reference.features), len(features))
  if num <= precision_recall.K:
    logging.warning("Precision and recall skipped: they need more than k = %d samples and "
                    "reference vectors; there are %d samples and %d vectors in %s.",
                    precision_recall.K, len(features), len(reference.features), path)
    return {}
  return precision_recall.precision_recall(reference.features[:num], features[:num])


def evaluate_run(model, *, image_size: int = INPUT_SIZE) -> dict[str, float]:
  """FID and precision and recall (arXiv:1904.06991, k = 3) of `eval.fid_num_samples` samples of
  a trained model (an evals.Evaluable: its sampler and parameters are those of `sample.*`)
  against `eval.fid_reference`, in the features of `eval.feature_extractor`: the FID Inception
  (`eval.inception_weights`, which adds the Inception Score) or a classifier trained on the data
  (`eval.classifier_weights`, flowjax.evals.classifier).

  Returns {'eval_fid', 'eval_precision', 'eval_recall'} and with the Inception
  'eval_inception_score', 'eval_inception_score_std'. Precision and recall use n = min(samples,
  reference vectors) of each and are left out, with a log line, for reference files without
  feature vectors. Returns {} with an info log when the files are not set, and with a warning
  naming the file and the command that makes it when one is missing or does not fit. The noise
  is the same at every step, so values at different steps are comparable. image_size: the
  Inception's input resolution (299 for FID; smaller only to test a reduced network cheaply).
  """
  config = model.config
  shape = tuple(model.info.image_shape)
  if len(shape) != 3 or shape[-1] not in (1, 3):
    logging.info("No FID: the data (shape %s) are not RGB or grayscale images.", shape)
    return {}
  name = feature_extractor_name(config)
  weights = config.eval.get(weights_key(config), "")
  reference_path = config.eval.get("fid_reference", "")
  if not weights or not reference_path:
    # Not configured is a choice (most CPU runs); configured but unreadable is a warning below.
    if name == "classifier":
      from flowjax.evals import classifier
      make = f"trained with `{classifier.train_command(config, 'CLASSIFIER.npz')}`"
    else:
      make = f"converted with `{CONVERT_COMMAND}`"
    logging.info("FID skipped: set eval.%s (%s) and eval.fid_reference (from `%s`).",
                 weights_key(config), make, stats_command(config, "STATS.npz"))
    return {}
  fix = f"compute it with `{stats_command(config, reference_path)}`"
  try:
    extractor = load_feature_extractor(config, shape, mesh=model.mesh, image_size=image_size)
    reference = load_reference(reference_path, fix)
    check_reference(reference, extractor, reference_path, fix)
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
    chunk_features, chunk_logits = extractor.features_and_logits(np.asarray(images))
    features.append(chunk_features)
    logits.append(chunk_logits)
  features = np.concatenate(features)[:num]
  logits = np.concatenate(logits)[:num] if name == "inception" else None
  try:
    values = scores(features, logits, reference.mu, reference.sigma)
  except AssetError as error:
    logging.warning("FID skipped: %s", error)
    return {}
  values.update(_precision_recall(reference, features, reference_path))
  return {f"eval_{key}": value for key, value in values.items()}


def load_cli_config(spec: str, overrides=()):
  """The locked config of `--config=FILE.py[:preset]` with `--config.KEY=VALUE` overrides, parsed
  as flowjax.main parses them. Raises ValueError naming a bad override or argument."""
  from absl import flags
  from ml_collections import config_flags

  from flowjax import config as config_lib
  path, _, preset = spec.partition(":")
  config = config_lib.load_experiment(path, preset or None)
  overrides = list(overrides)
  if not overrides:
    return config
  flag_values = flags.FlagValues()
  argv = ["python -m flowjax.evals", *overrides]
  try:
    holder = config_flags.DEFINE_config_dict("config", config, flag_values=flag_values,
                                             sys_argv=argv)
    rest = flag_values(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
    message = str(error).replace("\\n", " ").replace("\\'", "'").replace("\n", " ").strip()
    if len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
      message = message[1:-1]
    raise ValueError(f"bad config override ({' '.join(overrides)}): {message}") from error
  if len(rest) > 1:
    raise ValueError(f"unrecognized arguments: {' '.join(rest[1:])}")
  return holder.value


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m flowjax.evals.fid",
      description="Convert pytorch-fid's Inception weights (--convert) or compute reference "
                  "statistics of a dataset split (--stats) in the features of "
                  "eval.feature_extractor. --config.KEY=VALUE overrides any config key, as for "
                  "flowjax.main (e.g. --config.data.name=folder:DIR).")
  parser.add_argument("--convert", metavar="IN", help=f"pytorch-fid's {TORCH_WEIGHTS_FILE} "
                      "(or a .npz/.safetensors of its state dict) to convert to --out")
  parser.add_argument("--stats", action="store_true",
                      help="write reference statistics of --config's data to --out")
  parser.add_argument("--out", required=True, help="the .npz to write")
  parser.add_argument("--config", help="experiment file[:preset] whose data section is read")
  parser.add_argument("--weights", help="weights of the feature extractor (default: the config's "
                      "eval.inception_weights, or eval.classifier_weights with "
                      "eval.feature_extractor=classifier)")
  parser.add_argument("--split", default="train", help="dataset split (default: train)")
  parser.add_argument("--num_examples", type=int, default=None,
                      help="first N examples of the split (default: all)")
  parser.add_argument("--num_pr_features", type=int, default=NUM_PR_FEATURES,
                      help="feature vectors of distinct examples, drawn with the config's seed, "
                      f"stored for precision and recall (default {NUM_PR_FEATURES}; 0: none)")
  args, overrides = parser.parse_known_args(argv)
  if bool(args.convert) == bool(args.stats):
    parser.error("give exactly one of --convert IN or --stats.")
  if overrides and not args.stats:
    parser.error(f"unrecognized arguments: {' '.join(overrides)}")
  try:
    if args.convert:
      arrays = convert(args.convert, args.out)
      print(f"Wrote {args.out}: {len(arrays)} arrays, "
            f"{sum(a.size for a in arrays.values()):,} values.")
      return
    if not args.config:
      parser.error("--stats needs --config=experiments/FILE.py[:preset].")
    try:
      config = load_cli_config(args.config, overrides)
    except ValueError as error:
      parser.error(str(error))
    if feature_extractor_name(config) not in FEATURE_EXTRACTORS:
      parser.error(f"eval.feature_extractor={feature_extractor_name(config)!r} is not one of "
                   f"{FEATURE_EXTRACTORS}.")
    weights = args.weights or config.eval.get(weights_key(config), "")
    if not weights:
      parser.error(f"--stats needs --weights=PATH (or eval.{weights_key(config)} in the "
                   "config).")
    from flowjax import sharding
    sharding.start_runtime()
    extractor = load_feature_extractor(config, weights=weights,
                                       mesh=sharding.make_mesh(config.mesh))
    reference = dataset_statistics(config, extractor, args.split, args.num_examples,
                                   args.num_pr_features)
    if jax.process_index() == 0:
      save_reference(args.out, reference)
    kept = 0 if reference.features is None else len(reference.features)
    print(f"Wrote {args.out}: statistics of {reference.num_examples} examples of "
          f"{config.data.name} split {args.split!r} in the {extractor.name} features, and "
          f"{kept} feature vectors for precision and recall.")
  except AssetError as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  main()
