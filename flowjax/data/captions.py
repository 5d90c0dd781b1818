"""Captions of a data source, served as the frozen text features of `flowjax.text`.

A source with captions (data.text.encoder set) serves each example's caption features as the
batch array 'text' [T, D] (T = data.text.max_length tokens, D = the encoder's width), and names
its text in `DataInfo.text` (a `TextSource`): the encoder settings, the prompts of sample grids
(the split's first distinct captions) and, for a latent cache, the file holding the null
caption's and those prompts' features computed when the cache was written.

Captions of an image folder (data.name='folder:<DIR>'), for each image, either
  - a sidecar text file: the image's path with .txt for its extension (cat.png -> cat.txt), or
  - a line of a JSON-lines manifest `captions.jsonl` in the split's folder or in DIR:
    {"file": "<path relative to that folder>", "caption": "..."}.
The sidecar wins where both exist. An image with neither stops the run with its path.
"""

import dataclasses
import functools
import io
import json
import os
from typing import Sequence

import numpy as np

from flowjax import storage, text as text_lib

KEY = "text"
MANIFEST = "captions.jsonl"
NUM_PROMPTS = 10
ZEROS = "<zeros>"  # a features_file of zeros: synthetic text (one all-zero prompt)


@dataclasses.dataclass(frozen=True)
class TextSource:
  """The text of a captioned split.

  Attributes:
    settings: the encoder (data.text).
    prompts: the prompts of periodic sample grids: the split's first distinct captions.
    features_file: '' (the encoder computes the null caption's and the prompts' features when
      they are needed), a .npz with 'null' [T, D] and 'prompts' [K, T, D] (a latent cache), or
      ZEROS (synthetic text: zero null features and one zero prompt).
    dim: the feature width D.
  """
  settings: text_lib.TextSettings
  prompts: tuple[str, ...]
  dim: int
  features_file: str = ""

  @property
  def shape(self) -> tuple[int, int]:
    return (self.settings.max_length, self.dim)

  def encode(self, captions: Sequence[str]) -> np.ndarray:
    """Features [N, T, D] float32 of captions (prompts at sampling time)."""
    return text_lib.encoder_of(self.settings).encode(list(captions))

  def null(self) -> np.ndarray:
    """Features [T, D] float32 of the null caption (computed once per source)."""
    return _fixed_features(self)[0]

  def prompt_features(self) -> np.ndarray:
    """Features [K, T, D] float32 of `prompts` (computed once per source: sample grids and
    evaluations reuse them)."""
    return _fixed_features(self)[1]


@functools.lru_cache(maxsize=8)
def _fixed_features(source: TextSource) -> tuple[np.ndarray, np.ndarray]:
  """(null [T, D], prompts [K, T, D]) of a source: zeros, a cache's file, or the encoder's."""
  if source.features_file == ZEROS:
    return np.zeros(source.shape, np.float32), np.zeros((1,) + source.shape, np.float32)
  if source.features_file:
    stored = _features_file(source.features_file)
    return stored["null"], stored["prompts"]
  encoder = text_lib.encoder_of(source.settings)
  return encoder.null(), encoder.encode(list(source.prompts))


@functools.lru_cache(maxsize=8)
def _features_file(path: str) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(storage.read_bytes(path))) as stored:
    return {key: np.asarray(stored[key], np.float32) for key in ("null", "prompts")}


def settings(data_config) -> text_lib.TextSettings:
  return text_lib.TextSettings.of(data_config)


def first_distinct(captions: Sequence[str], count: int = NUM_PROMPTS) -> tuple[str, ...]:
  seen = []
  for caption in captions:
    if caption not in seen:
      seen.append(caption)
      if len(seen) == count:
        break
  return tuple(seen)


def text_source(data_config, captions: Sequence[str]) -> TextSource:
  """The TextSource of a split whose captions are `captions` (in source order)."""
  config = settings(data_config)
  return TextSource(config, first_distinct(captions), text_lib.feature_dim(config))


def with_text(info, source: TextSource | None):
  """`info` (a DataInfo) serving `source`'s features as the extra array 'text'."""
  if source is None:
    return info
  extra = tuple(e for e in info.extra_arrays if e[0] != KEY) + (
      (KEY, source.shape, "float32"),)
  return dataclasses.replace(info, extra_arrays=extra, text=source)


@dataclasses.dataclass(frozen=True, eq=False)
class Captioned:
  """A random-access source whose examples gain 'text': table[index[i]] (each distinct caption's
  features held once)."""
  source: object
  table: np.ndarray
  index: np.ndarray

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    return {**self.source[i], KEY: self.table[self.index[i]]}


# The most caption features a source holds in memory; beyond, the captions go into a latent cache.
MAX_IN_MEMORY_BYTES = 4 << 30


def in_memory(source, captions: Sequence[str], data_config) -> Captioned:
  """`source` with the features of its captions, encoded once per distinct caption."""
  if len(captions) != len(source):
    raise ValueError(f"{len(captions)} captions for {len(source)} examples.")
  config = settings(data_config)
  size = len(set(captions)) * config.max_length * text_lib.feature_dim(config) * 4
  if size > MAX_IN_MEMORY_BYTES:
    raise ValueError(
        f"data.name={data_config.name!r}: the features of its {len(set(captions)):,} distinct "
        f"captions take {size / 2**30:.1f} GiB, more than flowjax holds in memory "
        f"({MAX_IN_MEMORY_BYTES >> 30} GiB); encode them once into a latent cache (python -m "
        "flowjax.data.cache_latents with data.text set) and train on data.name='latents:DIR'.")
  table, index = text_lib.encoder(data_config).encode_distinct(list(captions))
  return Captioned(source, table, index)


def unsupported(data_config) -> None:
  """Refuses data.text on a source that has no captions."""
  if settings(data_config).enabled:
    raise ValueError(
        f"data.text.encoder={settings(data_config).encoder!r}: data.name={data_config.name!r} "
        "has no captions. Captions come with data.name='digits' (generated from the label and "
        "stroke width), 'folder:<DIR>' (sidecar .txt files or captions.jsonl), 'tfds:<NAME>' "
        "(a text feature, data.caption_feature), a latent cache written from one of those, and "
        "'synthetic' (random features, for dry runs); or set "
        "data.text.encoder=''.")


def _manifest(folder: str) -> dict[str, str]:
  path = os.path.join(folder, MANIFEST)
  if not os.path.isfile(path):
    return {}
  out = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
        out[os.path.normpath(os.path.join(folder, entry["file"]))] = str(entry["caption"])
      except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}, line {number}: not a JSON object with 'file' and 'caption' "
                         f"({type(error).__name__}: {error}).") from error
  return out


def folder_captions(paths: Sequence[str], folders: Sequence[str]) -> list[str]:
  """The caption of each image path: its sidecar .txt, else its line in a captions.jsonl of one
  of `folders` (the split's folder, then the dataset's)."""
  manifest = {}
  for folder in reversed(list(folders)):
    manifest.update(_manifest(folder))
  out = []
  for path in paths:
    sidecar = os.path.splitext(path)[0] + ".txt"
    if os.path.isfile(sidecar):
      with open(sidecar) as f:
        out.append(f.read().strip())
    elif os.path.normpath(path) in manifest:
      out.append(manifest[os.path.normpath(path)])
    else:
      raise FileNotFoundError(
          f"No caption for {path}: data.text.encoder is set, so every image needs a caption: "
          f"a sidecar {sidecar} or a line {{\"file\": ..., \"caption\": ...}} in "
          f"{os.path.join(folders[0], MANIFEST)}.")
  return out
