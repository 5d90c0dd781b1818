"""Torch state dicts without torch, and their mapping onto flax parameter trees: the readers and
the key-by-key assembly that `flowjax.convert` and the pretrained encoders (flowjax.models.dinov2)
share.

`read_state_dict` reads .safetensors, .npz, .pt/.pth (needs torch) and EDM-style network pickles
(flowjax.network_pickle); `assemble` fills every parameter of a model from named source tensors
and stops with the list of missing, extra and mis-shaped keys.
"""

import io
import json
import os
import posixpath
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flowjax import network_pickle, storage

CHECKPOINT_KEYS = ("model", "state_dict", "model_state_dict", "net", "ema", "module")


class ConversionError(ValueError):
  pass


def read_state_dict(path: str, key: str = "") -> dict[str, np.ndarray]:
  """{name: float32 NumPy array} of a torch state dict in .safetensors, .npz or .pt/.pth, or of
  the network in an EDM-style network pickle (.pkl, read without torch: network_pickle).

  key: the entry of a checkpoint dict that holds the state dict ("" = find it: the file itself,
  or the first of CHECKPOINT_KEYS present); for a .pkl, the network ("" = 'ema').
  A .safetensors or .npz file may be on object storage (gs://...).
  """
  remote = storage.is_remote(path)
  if not storage.isfile(path):
    raise ConversionError(f"--checkpoint={path!r} is not a file.")
  extension = os.path.splitext(path)[1].lower()
  if remote and extension not in (".safetensors", ".npz"):
    raise ConversionError(f"{path}: a {extension} file is read from local disk; copy it there, "
                          "or store the weights as .safetensors or .npz.")
  try:
    if extension == ".safetensors":
      from safetensors import numpy as safetensors_numpy
      tensors = (safetensors_numpy.load(storage.read_bytes(path)) if remote
                 else safetensors_numpy.load_file(path))
    elif extension == ".npz":
      with np.load(io.BytesIO(storage.read_bytes(path)) if remote else path,
                   allow_pickle=False) as data:
        tensors = {name: data[name] for name in data.files}
    elif extension == ".pkl":
      tensors = network_pickle.state_dict(path, key)
      key = ""
    elif extension in (".pt", ".pth", ".bin", ".ckpt"):
      try:
        import torch
      except ImportError as error:
        raise ConversionError(
            f"{path} is a torch pickle and reading it needs torch (pip install torch); or save "
            "the state dict as .safetensors, which flowjax reads without torch.") from error
      tensors = torch.load(path, map_location="cpu", weights_only=True)
    else:
      raise ConversionError(f"--checkpoint={path!r}: unknown file type {extension!r}; use "
                            ".safetensors, .npz, .pt, .pth or an EDM-style network .pkl.")
  except ConversionError:
    raise
  except network_pickle.PickleError as error:
    raise ConversionError(f"--checkpoint={path!r}: {error}") from error
  except Exception as error:
    raise ConversionError(f"{path} could not be read ({type(error).__name__}: "
                          f"{str(error)[:300]}); is it a complete, uncorrupted file?") from error
  tensors = _find_state_dict(tensors, key, path)
  return {_strip_wrappers(name): _to_numpy(value) for name, value in tensors.items()}


HF_INDEX = "model.safetensors.index.json"  # a HF checkpoint saved in shards


def read_shards(weights: str, what: str) -> dict[str, np.ndarray]:
  """`read_state_dict` of a weights file, or of every shard that a HF index file
  (model.safetensors.index.json) names, merged; a missing or unreadable shard is a ValueError
  naming it (`what` names the model in the message)."""
  shards = [weights]
  if weights.endswith(HF_INDEX):
    names = sorted(set(json.loads(storage.read_text(weights))["weight_map"].values()))
    folder = (posixpath.dirname(weights) if storage.is_remote(weights)
              else os.path.dirname(weights))
    shards = [storage.join(folder, name) for name in names]
  state_dict = {}
  for shard in shards:
    if not storage.isfile(shard):
      raise FileNotFoundError(f"No {what} weights at {shard!r}: the index names it; copy every "
                              "shard of the checkpoint.")
    try:
      state_dict.update(read_state_dict(shard))
    except ConversionError as error:
      raise ValueError(f"{what} weights {shard}: {error}") from error
  return state_dict


def _strip_wrappers(name: str) -> str:
  """Drops the prefixes DistributedDataParallel ("module.") and torch.compile ("_orig_mod.")
  add to every key."""
  for prefix in ("module.", "_orig_mod."):
    while name.startswith(prefix):
      name = name[len(prefix):]
  return name


def _find_state_dict(tensors, key: str, path: str) -> Mapping:
  if key:
    if key not in tensors:
      raise ConversionError(f"{path} has no entry {key!r}; its top-level keys: "
                            f"{sorted(map(str, tensors))[:20]}.")
    return tensors[key]
  if all(hasattr(value, "shape") for value in tensors.values()):
    return tensors
  for name in CHECKPOINT_KEYS:
    if isinstance(tensors.get(name), Mapping):
      return tensors[name]
  raise ConversionError(f"{path} is not a state dict and holds none under "
                        f"{list(CHECKPOINT_KEYS)}; pass --key with the entry that holds it. "
                        f"Its top-level keys: {sorted(map(str, tensors))[:20]}.")


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


def linear(weight):
  """torch Linear weight (out, in) -> flax Dense kernel (in, out)."""
  return np.asarray(weight).T


def assemble(sources: Mapping[str, np.ndarray],
             targets: Mapping[tuple, tuple[str, Callable]],
             expected: Mapping[tuple, tuple], ignored: Callable[[str], bool] = lambda _: False,
             what: str = "checkpoint") -> dict:
  """A flowjax parameter tree from named source tensors.

  targets: flowjax path -> (source name, transform of the source array); expected: flowjax path
  -> shape (every parameter of the model); ignored(name): source entries that carry no
  parameter (buffers). Raises ConversionError listing the missing, extra and mis-shaped keys.
  """
  missing, misshaped, out = [], [], {}
  for path, shape in sorted(expected.items()):
    if path not in targets:
      missing.append(f"{'/'.join(path)} (no source)")
      continue
    name, transform = targets[path]
    if name not in sources:
      missing.append(name)
      continue
    value = np.asarray(transform(sources[name]), np.float32)
    if value.shape != tuple(shape):
      misshaped.append(f"{name} {tuple(sources[name].shape)} -> {'/'.join(path)} needs "
                       f"{tuple(shape)}")
      continue
    out[path] = value
  used = {targets[path][0] for path in expected if path in targets}
  extra = sorted(name for name in sources if name not in used and not ignored(name))
  problems = []
  for label, names in (("missing", missing), ("extra", extra), ("mis-shaped", misshaped)):
    if names:
      shown = "\n    ".join(names[:20]) + (f"\n    ... {len(names) - 20} more"
                                              if len(names) > 20 else "")
      problems.append(f"  {len(names)} {label}:\n    {shown}")
  if problems:
    raise ConversionError(
        f"The {what} does not fit this model:\n" + "\n".join(problems) + "\nCheck that the "
        "config builds the same architecture as the checkpoint (widths, depths, number of "
        "blocks and classes; the preset that names the official network).")
  return traverse_util.unflatten_dict({path: jnp.asarray(v) for path, v in out.items()})


def conv_kernel(weight):
  """torch Conv2d weight (out, in, kh, kw) -> flax Conv kernel (kh, kw, in, out)."""
  return np.asarray(weight).transpose(2, 3, 1, 0)
