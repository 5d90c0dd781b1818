"""Images packed into array_record shards by `python -m flowjax.data.prepare`, served as data.name
'packed:<DIR>'.

Layout of DIR, per split:
  <split>/images-SSSSS-of-NNNNN.array_record
                   shard S holds examples [S shard_size, (S + 1) shard_size) of the split in the
                   source's order; one record per example: the image [S, S, C] as stored (uint8,
                   or float32 in [-1, 1] for float arrays), C order, then the label as int32
                   (-1 when the source has no labels);
  <split>/spec.json
                   format, source, split, image_size, image_shape, dtype, num_examples,
                   num_classes, class_names, shard_size, num_shards; written last (renamed from
                   spec.pending.json), so its presence marks a complete split.

The images were decoded, resized and center cropped once, by the source that was packed, exactly
as that source serves them: a run on 'packed:<DIR>' sees the same images, labels and global order
as one on the source itself (same seed, same batch size), and reads a few large shards instead of
one file per image. Served through the shared pipeline (global order from the seed, per-process
slices, resumable state) as {'image': [S, S, C] float32 in [-1, 1], 'label': int32}; random
horizontal flips on split 'train' when data.random_flip. The number of classes is the packed
one, or data.num_classes when that is set and not smaller.
"""

import dataclasses
import os
from typing import Any

import numpy as np

from flowjax import storage
from flowjax.data import images as image_lib
from flowjax.data import pipeline

PREFIX = "packed:"
FORMAT = "flowjax-packed-1"
SPEC_FILE = "spec.json"
PENDING_FILE = "spec.pending.json"
DTYPES = ("uint8", "float32")
NO_LABEL = -1


def directory(name: str) -> str:
  """'packed:<DIR>' -> DIR, with ~ expanded (DIR may be on object storage: gs://...)."""
  if not name.startswith(PREFIX) or len(name) == len(PREFIX):
    raise ValueError(f"data.name={name!r} is not a packed dataset; use 'packed:<DIR>' with DIR "
                     "written by python -m flowjax.data.prepare.")
  root = name[len(PREFIX):]
  return root if storage.is_remote(root) else os.path.expanduser(root)


def shard_path(root: str, split: str, index: int, num_shards: int) -> str:
  return storage.join(root, split, f"images-{index:05d}-of-{num_shards:05d}.array_record")


def encode_record(image: np.ndarray, label: int) -> bytes:
  """One example as bytes: image [S, S, C] (uint8 or float32, little-endian, C order), then the
  label as int32."""
  dtype = "<f4" if image.dtype == np.float32 else "u1"
  return np.ascontiguousarray(image, dtype).tobytes() + np.asarray(label, "<i4").tobytes()


def decode_records(records: list[bytes], image_shape: tuple[int, ...],
                   dtype: str) -> tuple[np.ndarray, np.ndarray]:
  """Inverse of encode_record for n records: (images [n, S, S, C] of dtype, labels [n] int32)."""
  image_bytes = int(np.prod(image_shape)) * np.dtype(dtype).itemsize
  rows = np.frombuffer(b"".join(records), np.uint8).reshape(len(records), image_bytes + 4)
  stored = "<f4" if dtype == "float32" else "u1"
  images = np.ascontiguousarray(rows[:, :image_bytes]).view(stored)
  labels = np.ascontiguousarray(rows[:, image_bytes:]).view("<i4")[:, 0]
  return images.reshape((len(records),) + tuple(image_shape)), labels.astype(np.int32)


def to_unit_range(images: np.ndarray) -> np.ndarray:
  """Stored images [...] (uint8, or float32 already in [-1, 1]) -> float32 in [-1, 1]."""
  if images.dtype == np.uint8:
    return image_lib.uint8_to_unit_range(images)
  return images.astype(np.float32)


def _prepare_command(root: str, split: str, spec: dict | None) -> str:
  source = spec["source"] if spec else "<folder:DIR or arrays:PATH>"
  size = spec["image_size"] if spec else "<S>"
  return (f"python -m flowjax.data.prepare --source={source} --out={root} --split={split} "
          f"--image_size={size}")


def packed_splits(root: str) -> tuple[str, ...]:
  """The complete splits in a packed directory (those with a spec.json), sorted."""
  return tuple(sorted(name for name in storage.listdir(root)
                      if storage.exists(storage.join(root, name, SPEC_FILE))))


def read_spec(data_name: str, split: str) -> dict:
  """The spec.json of a complete packed split; one clear error for a missing directory, a missing
  split, an interrupted prepare or another format."""
  root = directory(data_name)
  if not storage.isdir(root):
    where = ("" if storage.is_remote(root) or os.path.isabs(root)
             else f" (relative to the working directory {os.getcwd()})")
    raise FileNotFoundError(
        f"data.name={data_name!r}: there is no directory {root!r}{where}; pack your images into "
        f"it first: {_prepare_command(root, split, None)}")
  spec_path = storage.join(root, split, SPEC_FILE)
  if storage.exists(spec_path):
    spec = pipeline.read_json(spec_path)
    if spec.get("format") != FORMAT:
      raise ValueError(f"{spec_path} has format {spec.get('format')!r}, not {FORMAT!r}; delete "
                       f"{storage.join(root, split)} and pack the split again with this version "
                       f"of flowjax: {_prepare_command(root, split, spec)}")
    return spec
  pending_path = storage.join(root, split, PENDING_FILE)
  if storage.isdir(storage.join(root, split)):
    pending = pipeline.read_json(pending_path) if storage.exists(pending_path) else None
    raise FileNotFoundError(
        f"data.name={data_name!r}: the packed split {split!r} in {root} is incomplete (no "
        f"{SPEC_FILE}: prepare was interrupted or is still running); finish it by running the "
        f"same command again: {_prepare_command(root, split, pending)}")
  packed = packed_splits(root)
  other = pipeline.read_json(storage.join(root, packed[0], SPEC_FILE)) if packed else None
  raise ValueError(
      f"data.name={data_name!r} has no split {split!r}: {root} holds the packed splits "
      f"{list(packed)}. Pack it with {_prepare_command(root, split, other)}"
      + (", or evaluate on split 'train' (--config.eval.split=train)." if "train" in packed
         else "."))


def class_names(data_config) -> tuple[str, ...]:
  """The class names recorded when split 'train' was packed (folder: sources); () otherwise."""
  return tuple(read_spec(data_config.name, "train").get("class_names", ()))


def splits(data_config) -> tuple[str, ...]:
  """The complete packed splits of data.name='packed:<DIR>', sorted."""
  root = directory(data_config.name)
  if not storage.isdir(root):
    read_spec(data_config.name, "train")  # the missing-directory error
  return packed_splits(root)


def _num_classes(data_config, spec: dict) -> int:
  packed = int(spec["num_classes"])
  if data_config.conditional and packed == 0:
    raise ValueError(
        f"data.conditional=True but data.name={data_config.name!r}, split {spec['split']!r}, was "
        f"packed from {spec['source']} without labels; set data.conditional=False.")
  if not data_config.conditional:
    return 0
  configured = data_config.get("num_classes", 0)
  if not configured:
    return packed
  configured = pipeline.check_positive_int(configured, "data.num_classes")
  if configured < packed:
    raise ValueError(
        f"data.num_classes={configured} but data.name={data_config.name!r} was packed with "
        f"{packed} classes (labels up to {packed - 1}); set --config.data.num_classes={packed} "
        "or leave it 0 to use the packed count.")
  return configured


def info(data_config, split: str) -> pipeline.DataInfo:
  """A packed split: image_shape (S, S, C) as packed; labels when data.conditional."""
  spec = read_spec(data_config.name, split)
  image_size = pipeline.check_positive_int(data_config.image_size, "data.image_size")
  if image_size != spec["image_size"]:
    packed = spec["image_size"]
    raise ValueError(
        f"data.image_size={image_size} but data.name={data_config.name!r} holds {packed}x{packed} "
        f"images (packed with --image_size={packed}); set --config.data.image_size={packed}, or "
        f"re-pack the source at {image_size} into a new directory: python -m flowjax.data.prepare "
        f"--source={spec['source']} --out=<NEW_DIR> --image_size={image_size}.")
  return pipeline.DataInfo(image_shape=tuple(spec["image_shape"]),
                           num_classes=_num_classes(data_config, spec),
                           num_examples=int(spec["num_examples"]))


@dataclasses.dataclass(frozen=True, eq=False)
class _Source(pipeline.ArrayRecordSource):
  """A packed split: i -> {'image': [S, S, C] float32 in [-1, 1], 'label': int}."""
  image_shape: tuple[int, ...] = ()
  dtype: str = "uint8"

  def decode(self, records: list[bytes]) -> list[dict[str, Any]]:
    stored, labels = decode_records(records, self.image_shape, self.dtype)
    images = to_unit_range(stored)
    return [{"image": image, "label": int(label)} for image, label in zip(images, labels)]


def local_batches(data_config, *, split: str, seed: int, global_batch_size: int,
                  rows: tuple[int, int],
                  shuffle: bool) -> tuple[pipeline.DataInfo, pipeline.LocalBatchFn]:
  """The split's DataInfo and k -> this process's rows of global batch k.

  The rows are {'image': [n, S, S, C] float32 in [-1, 1], 'label': [n] int32 if conditional}.
  """
  data_info = info(data_config, split)
  spec = read_spec(data_config.name, split)
  root = directory(data_config.name)
  num_shards = int(spec["num_shards"])
  paths = tuple(shard_path(root, split, s, num_shards) for s in range(num_shards))
  # One listing of the split (one request on object storage), not one lookup per shard.
  present = set(storage.listdir(storage.join(root, split)))
  missing = [path for path in paths if path.rsplit("/", 1)[-1] not in present]
  if missing:
    raise FileNotFoundError(
        f"data.name={data_config.name!r}: {len(missing)} of the {num_shards} shards of split "
        f"{split!r} are missing (e.g. {missing[0]}); delete {storage.join(root, split)} and pack "
        f"it again: {_prepare_command(root, split, spec)}")
  source = _Source(paths, data_info.image_shape, spec["dtype"])
  if len(source) != data_info.num_examples:
    raise ValueError(
        f"data.name={data_config.name!r}: the shards of split {split!r} hold {len(source)} "
        f"examples but {SPEC_FILE} says {data_info.num_examples}; delete "
        f"{storage.join(root, split)} and pack it again: {_prepare_command(root, split, spec)}")
  transform = pipeline.ExampleTransform(
      seed=seed, random_flip=bool(data_config.random_flip) and split == "train",
      with_labels=data_info.num_classes > 0)
  examples = pipeline.example_stream(source, transform, seed=seed, shuffle=shuffle)
  return data_info, pipeline.ExampleBatch(examples, global_batch_size, rows)
