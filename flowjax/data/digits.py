"""scikit-learn's handwritten digits: 1797 real 8x8 grayscale images, 10 classes, offline.

The split is fixed forever and independent of the run seed: the first 1500 images are
'train', the last 297 (written by other people, as the set is ordered by writer) 'test'.

Captions (data.text.encoder set): "a handwritten seven", or "a thin handwritten seven" /
"a thick handwritten seven" for the digits in the lowest / highest third of their class by ink
(the sum of the 8x8 pixel values), thirds taken over all 1797 digits; 30 distinct captions.
"""

import dataclasses
import functools

import numpy as np
from PIL import Image
from sklearn import datasets

from flowjax.data import captions as captions_lib
from flowjax.data import pipeline

CAPTIONED = True
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STYLES = ("thin", "", "thick")

NATIVE_SIZE = 8
NUM_CLASSES = 10
NUM_EXAMPLES = 1797
NUM_TRAIN = 1500
SPLITS = {"train": (0, NUM_TRAIN), "test": (NUM_TRAIN, NUM_EXAMPLES)}
_MAX_VALUE = 16.0


@functools.lru_cache(maxsize=4)
def load(image_size: int = NATIVE_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """All digits, resized bilinearly when image_size != 8.

  Returns:
    images: [1797, image_size, image_size, 1] float32 in [-1, 1] (read-only);
    labels: [1797] int32 in [0, 10) (read-only).
  """
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32)
  if image_size != NATIVE_SIZE:
    images = np.stack([
        np.asarray(Image.fromarray(image).resize((image_size, image_size),
                                                 Image.Resampling.BILINEAR))
        for image in images
    ])
  images = np.clip(images / _MAX_VALUE * 2.0 - 1.0, -1.0, 1.0)[..., None]
  labels = digits.target.astype(np.int32)
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


def caption(label: int, style: str = "") -> str:
  """'a [thin |thick ]handwritten <number word>'."""
  return f"a {style + ' ' if style else ''}handwritten {NUMBER_WORDS[label]}"


@functools.lru_cache(maxsize=1)
def captions() -> tuple[str, ...]:
  """The caption of each of the 1797 digits (native 8x8 ink)."""
  images, labels = load(NATIVE_SIZE)
  ink = (images.reshape(len(images), -1) + 1.0).sum(axis=1)
  out = []
  for i, label in enumerate(labels):
    low, high = np.quantile(ink[labels == label], [1 / 3, 2 / 3])
    style = STYLES[0] if ink[i] < low else STYLES[2] if ink[i] > high else STYLES[1]
    out.append(caption(int(label), style))
  return tuple(out)


def split_captions(data_config, split: str) -> tuple[str, ...]:
  """The captions of a split, in source order."""
  _check(data_config, split)
  start, stop = SPLITS[split]
  return captions()[start:stop]


def label_of(prompt: str) -> int | None:
  """The digit a prompt names (its first number word), or None."""
  for word in prompt.lower().split():
    if word in NUMBER_WORDS:
      return NUMBER_WORDS.index(word)
  return None


@dataclasses.dataclass(frozen=True)
class _Source:
  """Random-access digits split: i -> {'image': [S, S, 1] float32 in [-1, 1], 'label': int}."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self.images[index], "label": self.labels[index]}


def _check(data_config, split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not a digits split; use one of {tuple(SPLITS)}.")
  return pipeline.check_positive_int(data_config.image_size, "data.image_size")


def info(data_config, split: str) -> pipeline.DataInfo:
  """Digits split: image_shape (S, S, 1), 10 classes when data.conditional."""
  image_size = _check(data_config, split)
  start, stop = SPLITS[split]
  text = None
  if captions_lib.settings(data_config).enabled:
    text = captions_lib.text_source(data_config, captions()[start:stop])
  return captions_lib.with_text(
      pipeline.DataInfo(image_shape=(image_size, image_size, 1),
                        num_classes=NUM_CLASSES if data_config.conditional else 0,
                        num_examples=stop - start), text)


def local_batches(data_config, *, split: str, seed: int, global_batch_size: int,
                  rows: tuple[int, int],
                  shuffle: bool) -> tuple[pipeline.DataInfo, pipeline.LocalBatchFn]:
  """The split's DataInfo and k -> this process's rows of global batch k.

  The rows are {'image': [n, S, S, 1] float32 in [-1, 1], 'label': [n] int32 if conditional}.
  """
  data_info = info(data_config, split)
  images, labels = load(data_info.image_shape[0])
  start, stop = SPLITS[split]
  source = _Source(images[start:stop], labels[start:stop])
  extra = ()
  if data_info.text is not None:
    source = captions_lib.in_memory(source, captions()[start:stop], data_config)
    extra = (captions_lib.KEY,)
  transform = pipeline.ExampleTransform(
      seed=seed, random_flip=bool(data_config.random_flip) and split == "train",
      with_labels=data_info.num_classes > 0, extra_keys=extra)
  examples = pipeline.example_stream(source, transform, seed=seed, shuffle=shuffle)
  return data_info, pipeline.ExampleBatch(examples, global_batch_size, rows)
