"""Synthetic Gaussian images (e.g. stand-ins for 32x32x4 latents) for benchmarks and dry runs.

Example i of global batch k is drawn from a NumPy generator keyed by (seed, split, k); with labels,
the image is N(m_label, 0.5^2 I) with a fixed per-class mean m_label, so models have something to
learn. Shape: [data.image_size, data.image_size, data.channels]; labels: data.num_classes.
With data.text.encoder set, each example also carries random caption features 'text'
[data.text.max_length, D] (D: the encoder's width; data.text.dim for a 't5' encoder without a
path), for dry runs and benchmarks of text models; the null caption is zeros and the encoder never
runs.
"""

import dataclasses
import functools

import numpy as np

from flowjax import text as text_lib
from flowjax.data import captions as captions_lib
from flowjax.data import pipeline

CAPTIONED = True

SPLITS = ("train", "test")


def _shape(data_config) -> tuple[int, int, int]:
  size = pipeline.check_positive_int(data_config.image_size, "data.image_size")
  channels = pipeline.check_positive_int(data_config.channels, "data.channels")
  return (size, size, channels)


def _num_classes(data_config) -> int:
  if not data_config.conditional:
    return 0
  if data_config.num_classes < 1:
    raise ValueError("data.name='synthetic' with data.conditional=True needs "
                     f"data.num_classes >= 1, got {data_config.num_classes}.")
  return data_config.num_classes


def info(data_config, split: str) -> pipeline.DataInfo:
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not a synthetic split; use one of {SPLITS}.")
  info = pipeline.DataInfo(image_shape=_shape(data_config),
                           num_classes=_num_classes(data_config), num_examples=None)
  settings = captions_lib.settings(data_config)
  if not settings.enabled:
    return info
  return captions_lib.with_text(info, captions_lib.TextSource(
      settings, (), text_lib.feature_dim(settings), features_file=captions_lib.ZEROS))


@functools.lru_cache(maxsize=4)
def class_means(num_classes: int, shape: tuple[int, ...]) -> np.ndarray:
  """[num_classes, *shape] fixed per-class means."""
  return np.random.default_rng(num_classes).standard_normal(
      (num_classes,) + shape).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _LocalBatch:
  shape: tuple[int, int, int]
  num_classes: int
  seed: int
  split_stream: int
  text_shape: tuple[int, ...] | None
  global_batch_size: int
  rows: tuple[int, int]

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((self.seed, self.split_stream, k))
    start, stop = self.rows
    images = 0.5 * rng.standard_normal((self.global_batch_size,) + self.shape, np.float32)
    out = {}
    if self.num_classes:
      labels = rng.integers(0, self.num_classes, self.global_batch_size).astype(np.int32)
      images = images + class_means(self.num_classes, self.shape)[labels]
      out["label"] = labels[start:stop]
    out["image"] = images[start:stop]
    if self.text_shape is not None:  # row r from (seed, split, k, r): only this process's rows
      out[captions_lib.KEY] = np.stack([
          np.random.default_rng((self.seed, self.split_stream, k, row)).standard_normal(
              self.text_shape, np.float32) for row in range(start, stop)])
    return out


def local_batches(data_config, *, split: str, seed: int, global_batch_size: int,
                  rows: tuple[int, int], shuffle: bool):
  del shuffle
  data_info = info(data_config, split)
  text_shape = None if data_info.text is None else data_info.text.shape
  return data_info, _LocalBatch(data_info.image_shape, data_info.num_classes, seed,
                                SPLITS.index(split), text_shape, global_batch_size, rows)
