"""Input pipeline: global example order, per-process slices, and global jax.Array batches.

The stream of examples is the concatenation of per-epoch permutations of a finite
random-access source (grain `MapDataset.source(...).shuffle(seed).repeat()`, whose epoch e
is permuted with a seed derived from (seed, e)). Global batch k holds the stream positions
[k * B, (k + 1) * B); each process reads only its contiguous rows of that range, and any
random preprocessing is keyed by (seed, stream position). So the global batches depend on
(seed, B, dataset, split) and not on how many processes read them.
"""

import abc
import dataclasses
import functools
import json
import math
import sys
from typing import Any, Callable

from absl import flags
import grain
import jax
import numpy as np

from flowjax import storage

LocalBatchFn = Callable[[int], dict[str, np.ndarray]]

_SHUFFLE_STREAM = 0
_FLIP_STREAM = 1


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """Static description of a data split.

  Attributes:
    image_shape: per-example shape: (H, W, C) for images, (2,) for toy2d.
    num_classes: number of labels emitted; 0 = unconditional (no `label` key).
    num_examples: size of the split; None for an infinite stream (toy2d).
    extra_arrays: per-example arrays the batches carry besides image and label, as (key,
      per-example shape, dtype name): ('repa_features', (256, 768), 'float16') for a latent
      cache that holds REPA features (flowjax.data.latents); ('text', (T, D), 'float32') for a
      captioned source.
    text: a captioned source's `flowjax.data.captions.TextSource` (encoder, sample prompts,
      null caption), else None.
  """
  image_shape: tuple[int, ...]
  num_classes: int
  num_examples: int | None
  extra_arrays: tuple[tuple[str, tuple[int, ...], str], ...] = ()
  text: Any = None

  def extra_array(self, key: str) -> tuple[tuple[int, ...], str] | None:
    """(per-example shape, dtype name) of the extra array `key`, or None without it."""
    for name, shape, dtype in self.extra_arrays:
      if name == key:
        return tuple(shape), dtype
    return None


def batch_spec(info: DataInfo, global_batch_size: int,
               sharding: jax.sharding.NamedSharding) -> dict[str, jax.ShapeDtypeStruct]:
  """{key: global shape, dtype and sharding} of the batches of a split: 'image' [B,
  *image_shape] float32, 'label' [B] int32 when num_classes > 0, and info.extra_arrays."""
  spec = {"image": jax.ShapeDtypeStruct((global_batch_size, *info.image_shape), np.float32,
                                        sharding=sharding)}
  if info.num_classes > 0:
    spec["label"] = jax.ShapeDtypeStruct((global_batch_size,), np.int32, sharding=sharding)
  for key, shape, dtype in info.extra_arrays:
    spec[key] = jax.ShapeDtypeStruct((global_batch_size, *shape), np.dtype(dtype),
                                     sharding=sharding)
  return spec


def read_json(path: str) -> dict:
  """A JSON file on local disk or object storage (a dataset directory may be either)."""
  return json.loads(storage.read_text(path))


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayRecordSource(abc.ABC):
  """Random access to array_record shards: i -> the example dict `decode` makes of record i.

  Holds the shard paths; the readers open on first use (also in worker processes). grain reads
  a batch of indices through `_getitems`: one array_record read and one vectorised decode.
  """
  paths: tuple[str, ...]

  @functools.cached_property
  def _records(self):
    try:
      return grain.sources.ArrayRecordDataSource(list(self.paths))
    except (OSError, RuntimeError) as error:
      if not any(storage.is_remote(path) for path in self.paths):
        raise
      raise OSError(f"The dataset shards on object storage ({self.paths[0]}, ...) cannot be "
                    f"read ({error}): array_record reads gs:// from version 0.8.6 with the "
                    "machine's credentials; pip install -e '.[gcs]' (or -U array-record), or "
                    "copy the directory to a local disk.") from error

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._getitems([index])[0]

  def _getitems(self, indices) -> list[dict[str, Any]]:
    return self.decode(self._records.__getitems__(list(indices)))

  @abc.abstractmethod
  def decode(self, records: list[bytes]) -> list[dict[str, Any]]:
    """The example dicts of n records (one vectorised decode)."""


def check_positive_int(value: Any, key: str) -> int:
  """Returns `value` if it is an int > 0, else raises a ValueError naming `key`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{key} must be a positive integer, got {value!r}.")
  return int(value)


def check_non_negative_int(value: Any, key: str) -> int:
  """Returns `value` if it is an int >= 0, else raises a ValueError naming `key`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"{key} must be a non-negative integer, got {value!r}.")
  return int(value)


def _batch_shards(sharding: jax.sharding.NamedSharding) -> int:
  """Number of pieces the sharding cuts the leading (batch) axis into."""
  if not sharding.spec or sharding.spec[0] is None:
    return 1
  axes = sharding.spec[0] if isinstance(sharding.spec[0], tuple) else (sharding.spec[0],)
  return math.prod(sharding.mesh.shape[axis] for axis in axes)


def process_rows(sharding: jax.sharding.NamedSharding, global_batch_size: int,
                 process_index: int | None = None,
                 process_count: int | None = None) -> tuple[int, int]:
  """The rows [start, stop) of every global batch that one process reads.

  With process_index and process_count both None, the rows are those that the sharding
  places on this process's devices (contiguous, as `jax.make_array_from_process_local_data`
  requires). With both given, process p of P reads [p * B / P, (p + 1) * B / P); this also
  lets one process compute another process's slice.

  Args:
    sharding: sharding of the batch; its leading axis is the batch axis.
    global_batch_size: B, the number of examples in a global batch.
    process_index: p, or None for jax.process_index() with rows taken from the sharding.
    process_count: P, or None for jax.process_count() with rows taken from the sharding.

  Returns:
    (start, stop) with 0 <= start < stop <= B.
  """
  batch_size = check_positive_int(global_batch_size, "global_batch_size")
  shards = _batch_shards(sharding)
  if batch_size % shards:
    raise ValueError(
        f"global_batch_size={batch_size} cannot be split over the {shards} devices that the "
        f"batch sharding {sharding.spec} uses for the batch axis; use a batch size divisible "
        f"by {shards} (train.batch_size) or change the mesh.")
  if (process_index is None) != (process_count is None):
    raise ValueError(
        f"Give both process_index and process_count or neither (got "
        f"process_index={process_index}, process_count={process_count}).")
  if process_count is not None:
    process_count = check_positive_int(process_count, "process_count")
    if not 0 <= process_index < process_count:
      raise ValueError(
          f"process_index={process_index} is out of range for process_count={process_count}.")
    if batch_size % process_count:
      raise ValueError(
          f"global_batch_size={batch_size} is not divisible by process_count={process_count}; "
          f"use a batch size that is a multiple of {process_count}.")
    local_size = batch_size // process_count
    return process_index * local_size, (process_index + 1) * local_size
  spans = sorted({
      index[0].indices(batch_size)[:2]
      for index in sharding.addressable_devices_indices_map((batch_size,)).values()
  })
  start, stop = spans[0]
  for span_start, span_stop in spans[1:]:
    if span_start > stop:
      raise ValueError(
          f"The batch sharding {sharding} gives process {jax.process_index()} the "
          f"non-contiguous rows {spans}; order the mesh devices by process "
          "(jax.make_mesh does) so that each process holds one contiguous block of the batch.")
    stop = max(stop, span_stop)
  return start, stop


def derived_seed(seed: int, stream: int) -> int:
  """A uint32 seed for one use (`stream`) of the run seed, decorrelated from other uses."""
  return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def flip_decision(seed: int, position: int) -> bool:
  """Whether the example at global stream `position` is flipped; a fair coin per position."""
  return bool(np.random.default_rng([seed, _FLIP_STREAM, position]).random() < 0.5)


@dataclasses.dataclass(frozen=True)
class ExampleTransform:
  """Random per-example preprocessing keyed by (seed, global stream position).

  Maps a source example {'image': [H, W, C] float32, 'label': int, ...} to
  {'image': [H, W, C] float32[, 'label': int32 scalar]}, flipping W with probability 1/2
  when `random_flip` is set; the arrays named by `extra_keys` pass through unchanged (so a
  source with them cannot flip).
  """
  seed: int
  random_flip: bool
  with_labels: bool
  extra_keys: tuple[str, ...] = ()

  def __post_init__(self):
    if self.random_flip and self.extra_keys:
      raise ValueError(f"random_flip would flip the images but not {list(self.extra_keys)}, "
                       "which describe the unflipped ones; set data.random_flip=False.")

  def __call__(self, position: int, example: dict[str, Any]) -> dict[str, np.ndarray]:
    image = example["image"]
    if self.random_flip and flip_decision(self.seed, position):
      image = image[:, ::-1]
    out = {"image": np.ascontiguousarray(image, dtype=np.float32)}
    if self.with_labels:
      out["label"] = np.int32(example["label"])
    for key in self.extra_keys:
      out[key] = example[key]
    return out


def example_stream(source: Any, transform: ExampleTransform, *, seed: int,
                   shuffle: bool) -> grain.MapDataset:
  """The infinite stream of examples: element g is the example at global position g.

  Args:
    source: finite random-access source (`__len__`, `__getitem__`) of example dicts.
    transform: preprocessing applied with the global position.
    seed: run seed; the order of epoch e comes from (seed, e).
    shuffle: False keeps the source order in every epoch.

  Returns:
    an infinite grain.MapDataset.
  """
  examples = grain.MapDataset.source(source)
  if shuffle:
    examples = examples.shuffle(seed=derived_seed(seed, _SHUFFLE_STREAM))
  return examples.repeat().map_with_index(transform)


@dataclasses.dataclass(frozen=True)
class ExampleBatch:
  """Global batch k -> this process's rows of it, read from an example stream.

  Returns {'image': [stop - start, *image_shape] float32[, 'label': [stop - start] int32], and
  the transform's extra arrays [stop - start, ...]}.
  """
  examples: grain.MapDataset
  global_batch_size: int
  rows: tuple[int, int]

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    first = k * self.global_batch_size
    # One batched read: sources with a batched reader (array_record) fetch the rows at once.
    elements = self.examples._getitems([first + row for row in range(*self.rows)])
    return {key: np.stack([element[key] for element in elements]) for key in elements[0]}


class Batches:
  """Infinite iterator of global batches, with an exact, JSON-serialisable position.

  Yields {'image': [B, *image_shape] float32, 'label': [B] int32 (only if num_classes > 0),
  and info.extra_arrays} as global jax.Arrays with the given sharding (`batch_spec`); this
  process fills its rows.

  Attributes:
    info: the DataInfo of the split.
    element_spec: {key: jax.ShapeDtypeStruct} with global shapes and the batch sharding.
  """

  def __init__(self, local_batch: LocalBatchFn, *, info: DataInfo, global_batch_size: int,
               sharding: jax.sharding.NamedSharding, rows: tuple[int, int],
               fingerprint: dict[str, Any], num_workers: int = 0, prefetch: int = 0):
    """Wraps a function from global batch index to this process's rows of that batch.

    Args:
      local_batch: k -> {'image': [rows, *image_shape], 'label': [rows]}; must be picklable
        when num_workers > 0.
      info: description of the split.
      global_batch_size: B.
      sharding: sharding of the global batch arrays (leading axis = batch).
      rows: (start, stop), the rows of each global batch this process reads.
      fingerprint: JSON values that identify the stream (seed, dataset, ...); stored in the
        state and checked by set_state.
      num_workers: grain worker processes (0 = read in this process).
      prefetch: batches prepared ahead in background threads (0 = none).
    """
    self.info = info
    self._local_batch_fn = local_batch
    self._global_batch_size = global_batch_size
    self._sharding = sharding
    self._rows = rows
    self._sharding_rows = process_rows(sharding, global_batch_size)
    self._fingerprint = dict(fingerprint, global_batch_size=global_batch_size)
    self._num_workers = check_non_negative_int(num_workers, "data.num_workers")
    self._prefetch = check_non_negative_int(prefetch, "data.prefetch")
    self.element_spec = batch_spec(info, global_batch_size, sharding)
    self._next_batch = 0
    self._iterator = None

  def _local_batch(self, k: int) -> dict[str, np.ndarray]:
    """This process's rows of global batch k, as NumPy arrays (no prefetch, no devices)."""
    return self._local_batch_fn(k)

  def _open(self):
    batches = grain.MapDataset.range(self._next_batch, sys.maxsize).map(self._local_batch_fn)
    stream = batches.to_iter_dataset(
        grain.ReadOptions(num_threads=self._prefetch, prefetch_buffer_size=self._prefetch))
    if self._num_workers > 0:
      if not flags.FLAGS.is_parsed():
        # grain's workers read its absl flags; outside an absl app (tests, notebooks) use
        # their defaults instead of failing.
        flags.FLAGS.mark_as_parsed()
      stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
    return iter(stream)

  def __iter__(self) -> "Batches":
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self._rows != self._sharding_rows:
      raise ValueError(
          f"This iterator reads rows {self._rows} of each global batch (process_index and "
          f"process_count were given explicitly) but the batch sharding places rows "
          f"{self._sharding_rows} on this process, so it cannot assemble global arrays; omit "
          "process_index and process_count, or only call _local_batch(k).")
    if self._iterator is None:
      self._iterator = self._open()
    local = next(self._iterator)
    batch = {
        key: jax.make_array_from_process_local_data(self._sharding, local[key], spec.shape)
        for key, spec in self.element_spec.items()
    }
    self._next_batch += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """The position: `next_batch` is the index of the next global batch handed out."""
    return dict(self._fingerprint, next_batch=self._next_batch)

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to a position taken by get_state() of an iterator over the same stream."""
    if not isinstance(state, dict) or "next_batch" not in state:
      raise ValueError(
          f"Data iterator state {state!r} has no 'next_batch'; pass a dict returned by "
          "Batches.get_state().")
    for key, value in self._fingerprint.items():
      if state.get(key) != value:
        raise ValueError(
            f"The data iterator state was saved with {key}={state.get(key)!r} but this "
            f"iterator has {key}={value!r}; resume with the same data config, seed and "
            "train.batch_size, or start a new workdir.")
    self.close()
    self._next_batch = check_non_negative_int(state["next_batch"], "state['next_batch']")

  def close(self) -> None:
    """Stops prefetch threads and worker processes; a later next() restarts them."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None
