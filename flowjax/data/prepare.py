"""Packs your images once into array_record shards, served as data.name='packed:<OUT>'.

python -m flowjax.data.prepare --source=folder:/data/pets --out=/data/pets_64 --image_size=64
python -m flowjax.data.prepare --source=arrays:/data/mnist.npz --out=/data/mnist_packed

--source is a folder of images (folder:<DIR>) or image arrays (arrays:<PATH>); every split it has
is packed (--split=train,... picks some). Each image is decoded, resized and center cropped to
--image_size by the source itself, exactly as training on the source would serve it, and stored
as uint8 pixels (float32 in [-1, 1] for arrays of float pixels, which would lose precision as
uint8), with its label; see flowjax/data/packed.py for the layout. --image_size may be left out
for arrays of square images (their own side).

Decoding runs in --num_threads threads of this process (Pillow decodes and resizes without holding
the GIL) and, with --num_workers=N, in N worker processes. Resumable and atomic: each shard is
written to a temporary name and renamed when complete; the split's spec goes to
spec.pending.json first and is renamed to spec.json after the last shard, so a reader refuses an
interrupted split, and rerunning the same command skips the shards already written. A split
packed with other settings (another --image_size, a source that changed size) is refused; use a
new --out or delete that split's directory.
"""

import json
import logging
import math
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from flowjax import config as config_lib, data, storage
from flowjax.data import arrays, images, packed

SOURCES = ("folder:", "arrays:")
READ_BATCH = 64
SHARD_BYTES = 512 * 2**20


def _source_name(source: str) -> str:
  """The source with an absolute path: 'folder:photos' -> 'folder:/home/me/photos'."""
  prefix = next((prefix for prefix in SOURCES if source.startswith(prefix)), None)
  if prefix is None or len(source) == len(prefix):
    raise ValueError(f"--source={source!r}; pack a folder of images (--source=folder:<DIR>) or "
                     "image arrays (--source=arrays:<PATH>: .npy, .npz or a directory of MNIST idx "
                     "files).")
  return prefix + storage.absolute(os.path.expanduser(source[len(prefix):]))


def _data_config(source: str, **values) -> ml_collections.ConfigDict:
  """A data section reading `source` in its order, without flips."""
  data_config = ml_collections.ConfigDict(config_lib.base_config().data.to_dict())
  data_config.update(dict(name=source, random_flip=False, num_workers=0, prefetch=0), **values)
  return data_config


def _has_labels(source: str, split: str) -> bool:
  if source.startswith("folder:"):
    return bool(data.class_names(_data_config(source)))
  return arrays.load(source, split).labels is not None


def _stored_dtype(source: str, split: str) -> str:
  """'uint8' where the source's pixels are 8-bit (all folders), else 'float32'."""
  if source.startswith("arrays:") and arrays.load(source, split).pixels != "uint8":
    return "float32"
  return "uint8"


def _default_image_size(source: str) -> int:
  if source.startswith("arrays:"):
    height, width = arrays.load(source, "train").images.shape[1:3]
    if height == width:
      return int(height)
    raise ValueError(f"--source={source} holds {height}x{width} images; give --image_size=<S> "
                     "to resize and center crop them to S x S.")
  raise ValueError(f"--source={source}: give --image_size=<S>; the files of a folder have their "
                   "own sizes, and each is resized and center cropped to S x S.")


def split_spec(source: str, split: str, image_size: int, shard_size: int) -> dict:
  """The spec.json of a split: everything that determines the shards' contents."""
  conditional = _has_labels(source, split)
  info = data.data_info(_data_config(source, image_size=image_size, conditional=conditional),
                        split)
  dtype = _stored_dtype(source, split)
  if not shard_size:
    example_bytes = math.prod(info.image_shape) * np.dtype(dtype).itemsize + 4
    shard_size = max(READ_BATCH, SHARD_BYTES // example_bytes // READ_BATCH * READ_BATCH)
  return {
      "format": packed.FORMAT,
      "source": source,
      "split": split,
      "image_size": image_size,
      "image_shape": list(info.image_shape),
      "dtype": dtype,
      "num_examples": int(info.num_examples),
      "num_classes": int(info.num_classes),
      "class_names": list(data.class_names(_data_config(source))) if conditional else [],
      "shard_size": shard_size,
      "num_shards": -(-info.num_examples // shard_size),
  }


def _write_json(path: str, tree: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(tree, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _write_shard(path: str, stored: np.ndarray, labels: np.ndarray) -> None:
  from array_record.python.array_record_module import ArrayRecordWriter
  tmp = path + ".tmp"
  writer = ArrayRecordWriter(tmp, "group_size:1")
  for image, label in zip(stored, labels):
    writer.write(packed.encode_record(image, int(label)))
  writer.close()
  os.replace(tmp, path)


def _to_stored(batch_images: np.ndarray, dtype: str) -> np.ndarray:
  """Served images [n, S, S, C] float32 -> stored [n, S, S, C]; uint8 only where exact."""
  if dtype == "float32":
    return batch_images
  pixels = np.round((batch_images + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
  if not np.array_equal(images.uint8_to_unit_range(pixels), batch_images):
    raise RuntimeError("The source served images that are not 8-bit pixels mapped to [-1, 1]; "
                       "they cannot be packed as uint8.")
  return pixels


def _check_settings(path: str, spec: dict, split_dir: str) -> None:
  """A ValueError if the (pending) spec at `path` was written with other settings."""
  with open(path) as f:
    old = json.load(f)
  differ = sorted(key for key in set(old) | set(spec) if old.get(key) != spec.get(key))
  if differ:
    raise ValueError(
        f"{path} was written with other settings ({', '.join(differ)} differ: "
        f"{ {key: old.get(key) for key in differ} } now { {key: spec.get(key) for key in differ} }"
        f"); pack into a new --out, or delete {split_dir} to pack that split again.")


def _cpu_sharding() -> jax.sharding.NamedSharding:
  mesh = jax.sharding.Mesh(np.asarray(jax.devices("cpu")[:1]), ("data",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def pack_split(source: str, out: str, split: str, *, image_size: int, shard_size: int = 0,
               num_workers: int = 0, num_threads: int = 4) -> dict:
  """Packs one split of `source` into out/split (see the module docstring).

  Returns:
    {'spec': the split's spec, 'written': shard indices written now, 'skipped': shard indices
     already written (by an interrupted run, or all of them when 'complete_before': the split
     was packed already)}.
  """
  spec = split_spec(source, split, image_size, shard_size)
  split_dir = os.path.join(out, split)
  spec_path = os.path.join(split_dir, packed.SPEC_FILE)
  pending_path = os.path.join(split_dir, packed.PENDING_FILE)
  if os.path.isfile(spec_path):
    _check_settings(spec_path, spec, split_dir)
    return {"spec": spec, "written": [], "skipped": list(range(spec["num_shards"])),
            "complete_before": True}
  os.makedirs(split_dir, exist_ok=True)
  # Shards are reused only when an interrupted run with the same settings wrote them.
  resuming = os.path.isfile(pending_path)
  if resuming:
    _check_settings(pending_path, spec, split_dir)
  else:
    _write_json(pending_path, spec)

  read_batch = math.gcd(spec["shard_size"], READ_BATCH)
  data_config = _data_config(source, image_size=image_size, conditional=spec["num_classes"] > 0,
                             num_workers=num_workers, prefetch=num_threads)
  batches = data.build(data_config, split=split, global_batch_size=read_batch, seed=0,
                       sharding=_cpu_sharding(), shuffle=False)
  try:
    written, skipped = _write_shards(batches, spec, out, split, resuming, read_batch)
  finally:
    batches.close()
  os.replace(pending_path, spec_path)
  return {"spec": spec, "written": written, "skipped": skipped, "complete_before": False}


def _write_shards(batches: data.Batches, spec: dict, out: str, split: str, resuming: bool,
                  read_batch: int) -> tuple[list[int], list[int]]:
  """Writes the shards of a split from its source-order batches of read_batch examples; returns
  (shards written, shards kept from an interrupted run)."""
  num_examples, num_shards = spec["num_examples"], spec["num_shards"]
  written, skipped = [], []
  for shard in range(num_shards):
    path = packed.shard_path(out, split, shard, num_shards)
    if resuming and os.path.isfile(path):
      skipped.append(shard)
      continue
    start_time = time.perf_counter()
    first, stop = shard * spec["shard_size"], min((shard + 1) * spec["shard_size"], num_examples)
    state = batches.get_state()
    if state["next_batch"] != first // read_batch:
      batches.set_state(dict(state, next_batch=first // read_batch))
    stored, labels = [], []
    for position in range(first, stop, read_batch):
      batch = next(batches)
      valid = min(read_batch, stop - position)
      stored.append(_to_stored(np.asarray(batch["image"])[:valid], spec["dtype"]))
      labels.append(np.asarray(batch["label"])[:valid] if "label" in batch else
                    np.full(valid, packed.NO_LABEL, np.int32))
    _write_shard(path, np.concatenate(stored), np.concatenate(labels))
    written.append(shard)
    logging.info("%s: packed shard %d of %d of split %r (%d images, %.0f images/s): %s",
                 spec["source"], shard + 1, num_shards, split, stop - first,
                 (stop - first) / (time.perf_counter() - start_time), path)
  return written, skipped


def prepare(source: str, out: str, *, image_size: int = 0, splits: tuple[str, ...] = (),
            shard_size: int = 0, num_workers: int = 0, num_threads: int = 4) -> dict:
  """Packs the splits of `source` ('folder:<DIR>' or 'arrays:<PATH>') into `out`.

  Args:
    source: the source, as data.name would name it.
    out: the packed directory (data.name='packed:<out>').
    image_size: S, the side of the stored images; 0 = the side of square arrays.
    splits: the splits to pack; () = every split the source has.
    shard_size: examples per shard; 0 = about 512 MiB per shard.
    num_workers: worker processes decoding images (0 = threads of this process only).
    num_threads: threads decoding images.

  Returns:
    {split: pack_split's result}.
  """
  storage.check_local_output(out, "--out", "packed:")
  source = _source_name(source)
  image_size = image_size or _default_image_size(source)
  if image_size <= 0:
    raise ValueError(f"--image_size={image_size}; give a positive side in pixels.")
  if shard_size < 0:
    raise ValueError(f"--shard_size={shard_size}; give a positive number of examples per shard "
                     "(or 0 for about 512 MiB per shard).")
  available = data.splits(_data_config(source))
  unknown = [split for split in splits if split not in available]
  if unknown:
    raise ValueError(f"--split={','.join(splits)}: {source} has no split "
                     f"{', '.join(map(repr, unknown))}; its splits are {list(available)}.")
  return {split: pack_split(source, out, split, image_size=image_size, shard_size=shard_size,
                            num_workers=num_workers, num_threads=num_threads)
          for split in (splits or available)}


def main(argv):
  del argv
  from absl import flags
  from flowjax import metrics
  metrics.quiet_libraries()
  values = flags.FLAGS
  try:
    results = prepare(values.source, values.out, image_size=values.image_size,
                      splits=tuple(values.split), shard_size=values.shard_size,
                      num_workers=values.num_workers, num_threads=values.num_threads)
  except (ValueError, FileNotFoundError) as error:
    logging.error("%s: %s", type(error).__name__, error)
    sys.exit(1)
  for split, result in results.items():
    spec = result["spec"]
    if result["complete_before"]:
      done = "it was complete already"
    elif result["skipped"]:
      done = f"wrote shards {result['written']}, kept {result['skipped']} from an earlier run"
    else:
      done = "written"
    logging.info("%s/%s: %d examples of shape %s, %d classes, %d shard(s); %s.", values.out, split,
                 spec["num_examples"], tuple(spec["image_shape"]), spec["num_classes"],
                 spec["num_shards"], done)
  logging.info("Train on it with --config.data.name=packed:%s --config.data.image_size=%d",
               values.out, next(iter(results.values()))["spec"]["image_size"])


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("source", None, "folder:<DIR> or arrays:<PATH>, as data.name names them.")
  flags.DEFINE_string("out", None, "Packed directory (data.name='packed:<out>').")
  flags.DEFINE_integer("image_size", 0, "Side of the stored images (0: the side of square "
                       "arrays; required for folders).")
  flags.DEFINE_list("split", [], "Splits to pack (default: every split of the source).")
  flags.DEFINE_integer("shard_size", 0, "Examples per shard (0: about 512 MiB per shard).")
  flags.DEFINE_integer("num_workers", 0, "Worker processes decoding images.")
  flags.DEFINE_integer("num_threads", min(8, os.cpu_count() or 1), "Threads decoding images.")
  flags.mark_flags_as_required(["source", "out"])
  app.run(main)
