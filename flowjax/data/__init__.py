"""Data sources, found by data.name, served as sharded global batches.

`build` returns a `Batches` iterator whose global batches depend only on (seed, global batch
size, dataset, split); every process reads its slice of each global batch.

A source is one module of this package with `info(data_config, split) -> DataInfo` and
`local_batches(data_config, *, split, seed, global_batch_size, rows, shuffle)`, and optionally
`image_decoder(data_config)`, `class_names(data_config)` and `splits(data_config)`; adding one
is a line in `_SOURCES`.
"""

import dataclasses
import importlib

import jax

from flowjax import registry
from flowjax.data import captions, pipeline
from flowjax.data.pipeline import Batches, DataInfo

__all__ = ["Batches", "DataInfo", "build", "class_names", "data_info", "splits"]


@dataclasses.dataclass(frozen=True)
class _Source:
  """One entry of the table: the module `flowjax.data.<module>` serves the source.

  Attributes:
    module: module name inside flowjax.data (imported on first use: tfds and sklearn are slow).
    argument: for a prefix ('tfds:'), what follows it, as SOURCE_NAMES shows it ('<name>').
    if_missing: for a prefix, the error when data.name is the bare prefix (default: a generic
      one naming the expected form).
  """
  module: str
  argument: str = ""
  if_missing: str = ""


# data.name -> source. A key ending in ':' is a prefix: 'folder:photos' is served by 'folder:'.
_SOURCES = {
    "toy2d": _Source("toy2d"),
    "digits": _Source("digits"),
    "synthetic": _Source("synthetic"),
    "tfds:": _Source("tfds", "<name>"),
    "latents:": _Source("latents", "<DIR>", if_missing=(
        "data.name='latents:' names no directory: this experiment trains on cached autoencoder "
        "latents. Cache them once with `python -m flowjax.data.cache_latents "
        "--config=experiments/sdvae_imagenet.py --weights=PATH --out=DIR` and pass "
        "--config.data.name=latents:DIR (or --config.data.name=synthetic for a dry run or a "
        "benchmark on random latents of the same shape).")),
    "folder:": _Source("folder", "<DIR>"),
    "arrays:": _Source("arrays", "<PATH>"),
    "packed:": _Source("packed", "<DIR>", if_missing=(
        "data.name='packed:' names no directory; pack your images once with `python -m "
        "flowjax.data.prepare --source=folder:<DIR> --out=<OUT> --image_size=<S>` and pass "
        "--config.data.name=packed:<OUT>.")),
}
SOURCE_NAMES = (sorted(name for name in _SOURCES if not name.endswith(":")) +
                [name + source.argument for name, source in _SOURCES.items()
                 if name.endswith(":")])


def _source_module(data_config):
  """The module serving data.name (imported on first use); refuses data.text on a source that
  has no captions."""
  name = data_config.name
  key = name.split(":", 1)[0] + ":" if isinstance(name, str) and ":" in name else name
  source = _SOURCES.get(key) if isinstance(key, str) else None
  if source is None:
    raise ValueError(registry.unknown_name_message("data.name", str(name), SOURCE_NAMES))
  if name == key and source.argument:
    from flowjax.config import ConfigError
    raise ConfigError(source.if_missing or (
        f"data.name={name!r} names no {source.argument}; write it after the prefix: "
        f"--config.data.name={name}{source.argument}."))
  module = importlib.import_module(f"flowjax.data.{source.module}")
  if not getattr(module, "CAPTIONED", False):
    captions.unsupported(data_config)
  return module


def describe(data_config, info: DataInfo, split: str = "train") -> str:
  """One line naming the data source, the split and its size, for the start of a run's log."""
  size = "an endless stream" if info.num_examples is None else f"{info.num_examples:,} examples"
  classes = f", {info.num_classes} classes" if info.num_classes else ", unconditional"
  if info.text is not None:
    length, dim = info.text.shape
    classes = (f", captioned ({info.text.settings.encoder!r} caption features, {length} tokens "
               f"of {dim})")
  return (f"Data: {data_config.name}, split {split!r}: {size} of shape "
          f"{tuple(info.image_shape)}{classes}.")


def data_info(data_config, split: str = "train") -> DataInfo:
  """Shape, label count and size of a split, without reading examples.

  Raises the 'not prepared' FileNotFoundError for a TFDS dataset that is not built.
  """
  return _source_module(data_config).info(data_config, split)


def image_decoder(data_config):
  """For sources whose examples are not images (cached autoencoder latents): a function from
  samples [B, ...] to images [B, H, W, C] in [-1, 1], for sample grids; None for image sources."""
  return getattr(_source_module(data_config), "image_decoder", lambda _: None)(data_config)


def class_names(data_config) -> tuple[str, ...]:
  """The class name of each label (label i is class_names[i]) for sources that have names
  (folder:<DIR>: its class subfolders, sorted); () for the others."""
  names = getattr(_source_module(data_config), "class_names", lambda _: ())
  return tuple(names(data_config))


def split_captions(data_config, split: str) -> list[str]:
  """The caption of every example of a split, in source order, for the sources that have
  captions (digits, folder:<DIR> with captions, tfds:<NAME> with a text feature); a ValueError
  for the others."""
  module = _source_module(data_config)
  if not hasattr(module, "split_captions"):
    raise ValueError(f"data.name={data_config.name!r} has no captions to cache.")
  return list(module.split_captions(data_config, split))


def splits(data_config) -> tuple[str, ...]:
  """The splits a source has, for sources that list them (folder:, arrays:, packed:); () for the
  others."""
  return tuple(getattr(_source_module(data_config), "splits", lambda _: ())(data_config))


def build(data_config, *, split: str, global_batch_size: int, seed: int,
          sharding: jax.sharding.NamedSharding, shuffle: bool = True,
          process_index: int | None = None, process_count: int | None = None) -> Batches:
  """An infinite iterator of global batches of a split.

  Args:
    data_config: the config's `data` section (name, toy_distribution, conditional, image_size,
      random_flip, tfds_data_dir, num_workers, prefetch).
    split: 'train' or 'test' (most sources); a TFDS split string for 'tfds:<name>'.
    global_batch_size: B, examples per global batch (all processes together).
    seed: non-negative int; fixes the order of every epoch and the random flips.
    sharding: sharding of the batch arrays; the leading axis is the batch axis.
    shuffle: False reads every epoch in the source order.
    process_index: with process_count, read process p's rows [p B / P, (p + 1) B / P) instead
      of the rows the sharding places on this process (to compute another process's slice).
    process_count: P; see process_index.

  Returns:
    Batches yielding {'image': [B, *image_shape] float32, 'label': [B] int32 if conditional}.
  """
  module = _source_module(data_config)
  seed = pipeline.check_non_negative_int(seed, "seed")
  rows = pipeline.process_rows(sharding, global_batch_size, process_index, process_count)
  info, local_batch = module.local_batches(
      data_config, split=split, seed=seed, global_batch_size=global_batch_size, rows=rows,
      shuffle=shuffle)
  fingerprint = {"dataset": data_config.name, "split": split, "seed": seed, "shuffle": shuffle}
  return Batches(local_batch, info=info, global_batch_size=global_batch_size,
                 sharding=sharding, rows=rows, fingerprint=fingerprint,
                 num_workers=data_config.num_workers, prefetch=data_config.prefetch)
