"""TFDS image datasets read with random access from prepared array_record files.

`tfds.data_source` decodes images to uint8 [H, W, C]; each is center cropped and resized the
way ADM (guided-diffusion) does, then scaled to [-1, 1]. Nothing is ever downloaded here: an
unprepared dataset raises one error that names the command preparing it.

Captions (data.text.encoder set) come from a text feature of the dataset named by
data.caption_feature: a path through the features ('caption', 'captions/text' for coco_captions'
sequence of {'text', 'id'}), or '' to take the first of 'caption', 'captions/text' and 'text'
that exists. A feature inside a sequence gives the example's first caption. The captions of a
split are read once (images are not decoded for it) and encoded once per distinct caption
(`flowjax.data.captions`); a split too large for that goes into a latent cache first.
"""

import dataclasses
import difflib
import functools
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from flowjax.data import captions as captions_lib
from flowjax.data import pipeline
from flowjax.data.images import center_crop_arr, uint8_to_unit_range

PREFIX = "tfds:"
_SUPPORTED_CHANNELS = (1, 2, 3, 4)
CAPTIONED = True
CAPTION_FEATURES = ("caption", "captions/text", "text")  # tried in order when none is named
_READ_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class _Source:
  """Random access to a TFDS split: i -> {'image': [S, S, C] float32 in [-1, 1], 'label': int}.

  Each example is validated: image rank, channels and dtype against image_shape, and the
  label against [0, num_classes) (labels are only read when num_classes > 0).
  """
  source: Any
  data_name: str
  image_shape: tuple[int, int, int]
  num_classes: int

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self.source[index]
    image = np.asarray(example["image"])
    channels = self.image_shape[-1]
    if image.ndim != 3 or image.shape[-1] != channels or image.dtype != np.uint8:
      raise ValueError(
          f"data.name={self.data_name!r}: example {index} has an image of shape {image.shape} "
          f"and dtype {image.dtype}, expected [H, W, {channels}] uint8 as the dataset's image "
          "feature declares; the prepared files do not match their metadata, rebuild them.")
    out = {"image": uint8_to_unit_range(center_crop_arr(image, self.image_shape[0]))}
    if self.num_classes > 0:
      label = int(example["label"])
      if not 0 <= label < self.num_classes:
        raise ValueError(
            f"data.name={self.data_name!r}: example {index} has label {label}, outside "
            f"[0, {self.num_classes}); the prepared files do not match their metadata, rebuild "
            "them.")
      out["label"] = label
    return out


def _unknown_dataset_message(data_name: str, dataset: str) -> str:
  base_name = dataset.split("/")[0].split(":")[0]
  close = difflib.get_close_matches(base_name, tfds.list_builders(with_community_datasets=False),
                                    n=3)
  hint = f" Did you mean {', '.join(repr(PREFIX + name) for name in close)}?" if close else ""
  return (f"Unknown TFDS dataset in data.name={data_name!r}.{hint} "
          "`tfds.list_builders()` lists the known names.")


def _open(data_config, split: str) -> tuple[Any, str]:
  """Opens the array_record data source of a split, or raises the 'not prepared' error."""
  data_name = data_config.name
  dataset = data_name[len(PREFIX):]
  data_dir = data_config.tfds_data_dir or None
  try:
    source = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
  except tfds.core.DatasetNotFoundError as error:
    raise ValueError(_unknown_dataset_message(data_name, dataset)) from error
  except Exception as error:  # pylint: disable=broad-exception-caught
    # A missing or unusable directory surfaces as NotImplementedError, FileNotFoundError, ...;
    # the builder tells whether the dataset is prepared at all.
    builder = tfds.builder(dataset, data_dir=data_dir)
    root = builder.data_dir_root
    if not builder.is_prepared():
      raise FileNotFoundError(
          f"data.name={data_name!r} is not prepared in {root}; prepare it with: "
          f"pip install -e .[prepare] && tfds build {dataset} --file_format=array_record "
          f"--data_dir={root} (see BUILD.md)") from error
    raise ValueError(
        f"data.name={data_name!r}: split {split!r} could not be opened from {root} ({error}); "
        "check the split name, and that the dataset was built with "
        "--file_format=array_record.") from error
  if len(source) == 0:
    raise ValueError(
        f"data.name={data_name!r}: split {split!r} is empty (0 examples); choose a split with "
        "examples (data source split names follow TFDS, e.g. 'train', 'train[:90%]').")
  return source, data_name


def _describe(data_config, split: str) -> tuple[Any, pipeline.DataInfo]:
  """The opened source and its DataInfo, after checking the image and label features."""
  source, data_name = _open(data_config, split)
  image_size = pipeline.check_positive_int(data_config.image_size, "data.image_size")
  features = source.dataset_info.features
  image_feature = features["image"] if "image" in features else None
  if not isinstance(image_feature, tfds.features.Image):
    raise ValueError(
        f"data.name={data_name!r} has no tfds.features.Image feature named 'image' (features: "
        f"{list(features)}); flowjax reads image datasets only.")
  channels = image_feature.shape[-1]
  if channels not in _SUPPORTED_CHANNELS:
    raise ValueError(
        f"data.name={data_name!r}: the image feature has shape {image_feature.shape}; flowjax "
        f"needs a known channel count in {_SUPPORTED_CHANNELS}.")
  num_classes = 0
  if data_config.conditional:
    label_feature = features["label"] if "label" in features else None
    if not isinstance(label_feature, tfds.features.ClassLabel):
      raise ValueError(
          f"data.conditional=True but data.name={data_name!r} has no ClassLabel feature named "
          f"'label' (features: {list(features)}); set data.conditional=False.")
    num_classes = label_feature.num_classes
  info = pipeline.DataInfo(image_shape=(image_size, image_size, channels),
                           num_classes=num_classes, num_examples=len(source))
  if captions_lib.settings(data_config).enabled:
    info = captions_lib.with_text(
        info, captions_lib.text_source(data_config, split_captions(data_config, split)))
  return source, info


def _feature_at(features, path: str):
  """(the feature at a '/'-separated path, whether the path crosses a Sequence), or None."""
  feature, in_sequence = features, False
  for part in path.split("/"):
    while isinstance(feature, tfds.features.Sequence):
      feature, in_sequence = feature.feature, True
    if not isinstance(feature, tfds.features.FeaturesDict) or part not in feature:
      return None
    feature = feature[part]
  while isinstance(feature, tfds.features.Sequence):  # a list of captions: Sequence(Text())
    feature, in_sequence = feature.feature, True
  return feature, in_sequence


def _text_paths(feature, prefix: str = "") -> list[str]:
  """The '/'-separated paths of every Text feature."""
  while isinstance(feature, tfds.features.Sequence):
    feature = feature.feature
  if isinstance(feature, tfds.features.Text):
    return [prefix]
  if isinstance(feature, tfds.features.FeaturesDict):
    return [path for name in sorted(feature.keys())
            for path in _text_paths(feature[name], f"{prefix}/{name}" if prefix else name)]
  return []


def _caption_path(data_config, features) -> str:
  """The caption feature's path (data.caption_feature, or the first of CAPTION_FEATURES)."""
  named = data_config.get("caption_feature", "")
  for path in ([named] if named else CAPTION_FEATURES):
    found = _feature_at(features, path)
    if found is not None and isinstance(found[0], tfds.features.Text):
      return path
  what = (f"data.caption_feature={named!r} is not a Text feature" if named else
          f"none of {list(CAPTION_FEATURES)} is a Text feature")
  raise ValueError(
      f"data.text.encoder={captions_lib.settings(data_config).encoder!r}: in "
      f"data.name={data_config.name!r}, {what} (its text features: {_text_paths(features)}); "
      "name the caption "
      "feature with --config.data.caption_feature=<path> (e.g. 'captions/text'), or set "
      "data.text.encoder=''.")


def _caption(value, path: str, data_name: str, index: int) -> str:
  """The caption string of one example's value at `path` (the first of a sequence)."""
  for part in path.split("/"):
    value = value[part]
  while isinstance(value, (list, tuple, np.ndarray)) and not isinstance(value, (bytes, str)):
    if len(value) == 0:
      raise ValueError(f"data.name={data_name!r}: example {index} has no caption in its "
                       f"{path!r} sequence; every example needs one (or set "
                       "data.text.encoder='').")
    value = value[0]
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def split_captions(data_config, split: str) -> tuple[str, ...]:
  """The caption of each example of a split, in the source's order (read once per split)."""
  source, data_name = _open(data_config, split)
  features = source.dataset_info.features
  images = tuple(sorted(name for name, feature in features.items()
                        if isinstance(feature, tfds.features.Image)))
  return _split_captions(data_name, split, data_config.tfds_data_dir or "",
                         _caption_path(data_config, features), images)


@functools.lru_cache(maxsize=4)
def _split_captions(data_name: str, split: str, data_dir: str, path: str,
                    images: tuple[str, ...]) -> tuple[str, ...]:
  skip = {name: tfds.decode.SkipDecoding() for name in images}  # no image is decoded
  source = tfds.data_source(data_name[len(PREFIX):], split=split, data_dir=data_dir or None,
                            download=False, decoders=skip)
  out = []
  for start in range(0, len(source), _READ_CHUNK):
    indices = range(start, min(start + _READ_CHUNK, len(source)))
    examples = (source.__getitems__(list(indices)) if hasattr(source, "__getitems__")
                else [source[i] for i in indices])
    out.extend(_caption(example, path, data_name, i) for i, example in zip(indices, examples))
  return tuple(out)


def info(data_config, split: str) -> pipeline.DataInfo:
  """DataInfo of a TFDS split; opens the files' index, and reads no examples unless captions
  are on (then every example's caption, once per split)."""
  return _describe(data_config, split)[1]


def local_batches(data_config, *, split: str, seed: int, global_batch_size: int,
                  rows: tuple[int, int],
                  shuffle: bool) -> tuple[pipeline.DataInfo, pipeline.LocalBatchFn]:
  """The split's DataInfo and k -> this process's rows of global batch k.

  The rows are {'image': [n, S, S, C] float32 in [-1, 1], 'label': [n] int32 if conditional}.
  """
  source, data_info = _describe(data_config, split)
  examples = _Source(source, data_config.name, data_info.image_shape, data_info.num_classes)
  extra = ()
  if data_info.text is not None:
    examples = captions_lib.in_memory(examples, split_captions(data_config, split), data_config)
    extra = (captions_lib.KEY,)
  transform = pipeline.ExampleTransform(
      seed=seed, random_flip=bool(data_config.random_flip) and split.startswith("train"),
      with_labels=data_info.num_classes > 0, extra_keys=extra)
  examples = pipeline.example_stream(examples, transform, seed=seed, shuffle=shuffle)
  return data_info, pipeline.ExampleBatch(examples, global_batch_size, rows)
