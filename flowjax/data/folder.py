"""A folder of image files, served as data.name 'folder:<DIR>' (decoded by Pillow, no TensorFlow).

Layouts of DIR (image files end in .png, .jpg or .jpeg, in any case):
  DIR/<class>/.../<image>   class subfolders (torchvision's ImageFolder layout): the class names
                            sorted give labels 0..K-1 (`class_names`); images may sit in
                            further subfolders of a class folder;
  DIR/<image>               flat: unconditional (data.conditional=False);
  DIR/train/, DIR/test/     splits, each in one of the layouts above; split 'test' reads
                            DIR/test, or DIR/val when there is no DIR/test. The classes and
                            labels of every split are those of DIR/train.
Without DIR/train the whole folder is split 'train' and there is no split 'test'. With
data.text.encoder set, every image has a caption (a sidecar .txt or a line of captions.jsonl;
`flowjax.data.captions`), served as the text features 'text'. Files and
folders whose names start with '.' are ignored.

Each image is resized and center cropped to data.image_size as ADM does
(`images.center_crop_arr`) and scaled to [-1, 1]. Grey-scale images (Pillow modes 1, L, LA and
16-bit I) are served with one channel (16-bit values scaled to 8 bits), all others (RGB, RGBA,
palette, CMYK, ...) as RGB with 3 channels (alpha dropped); every image of a dataset must have
the same channel count. The folder is listed, and every file's header read, once per process
and folder state, so a file that is not an image or a mix of grey and colour images stops a run
before it trains.
"""

import concurrent.futures
import dataclasses
import functools
import os

import numpy as np
from PIL import Image

from flowjax.data import captions as captions_lib
from flowjax.data import images
from flowjax.data import pipeline

CAPTIONED = True

PREFIX = "folder:"
EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")
TEST_FOLDERS = ("test", "val")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_HEADER_THREADS = 16
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def directory(name: str) -> str:
  """'folder:<DIR>' -> DIR, with ~ expanded."""
  if not name.startswith(PREFIX) or len(name) == len(PREFIX):
    raise ValueError(f"data.name={name!r} is not an image folder; use 'folder:<DIR>'.")
  return os.path.expanduser(name[len(PREFIX):])


def _is_image_file(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(EXTENSIONS)


def _split_folder(data_name: str, split: str) -> str:
  """The folder holding a split of data.name='folder:<DIR>' (absolute path)."""
  root = directory(data_name)
  if "://" in root:
    raise ValueError(
        f"data.name={data_name!r}: image folders are read from local disk, one file at a time. "
        f"Pack the folder into shards (python -m flowjax.data.prepare --source=folder:<local "
        "copy> --out=DIR ..., BUILD.md), copy DIR to the bucket and train with "
        "data.name=packed:gs://...")
  if not os.path.isdir(root):
    where = "" if os.path.isabs(root) else f" (relative to the working directory {os.getcwd()})"
    raise FileNotFoundError(f"data.name={data_name!r}: there is no directory {root!r}{where}; "
                            "name a folder of images: folder:<DIR>.")
  root = os.path.abspath(root)
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not a split of data.name={data_name!r}; use one of "
                     f"{SPLITS}.")
  if not os.path.isdir(os.path.join(root, "train")):
    if split == "train":
      return root
    raise ValueError(
        f"data.name={data_name!r} has no split {split!r}: {root} has no train/ subfolder, so all "
        f"of it is split 'train'. Put the training images in {os.path.join(root, 'train')} and "
        f"held-out ones in {os.path.join(root, 'test')} (same layout), or evaluate on split "
        "'train' (--config.eval.split=train).")
  if split == "train":
    return os.path.join(root, "train")
  for name in TEST_FOLDERS:
    if os.path.isdir(os.path.join(root, name)):
      return os.path.join(root, name)
  raise ValueError(
      f"data.name={data_name!r} has no split {split!r}: {root} has a train/ subfolder but no "
      f"{' or '.join(name + '/' for name in TEST_FOLDERS)} next to it; add one (same layout as "
      "train/), or evaluate on split 'train' (--config.eval.split=train).")


@dataclasses.dataclass(frozen=True)
class Listing:
  """The images of one split folder.

  Attributes:
    paths: absolute file paths, ordered by class, then by path inside the class folder.
    labels: [len(paths)] int32, the index of each file's class in class_names (0 when flat).
    class_names: the class folder names, sorted; () for a flat folder.
    channels: 1 (grey-scale) or 3 (colour), the same for every file.
  """
  paths: tuple[str, ...]
  labels: np.ndarray
  class_names: tuple[str, ...]
  channels: int


def _channels(mode: str) -> int:
  return 1 if mode in GREY_MODES else 3


def _read_mode(path: str) -> str:
  """The Pillow mode in a file's header; a ValueError naming the file if it is no image."""
  try:
    with Image.open(path) as image:
      return image.mode
  except _READ_ERRORS as error:
    raise ValueError(f"Cannot read {path} as an image ({type(error).__name__}: {error}); remove "
                     "or replace the file.") from error


def _images_under(folder: str) -> list[str]:
  """Image files anywhere under `folder` (following links, skipping hidden entries), sorted."""
  found = []
  for parent, subfolders, files in os.walk(folder, followlinks=True):
    subfolders[:] = [name for name in subfolders if not name.startswith(".")]
    found.extend(os.path.join(parent, name) for name in files if _is_image_file(name))
  return sorted(found)


def _state(root: str) -> tuple:
  """Modification times of the folder and its subfolders: a changed folder is listed again."""
  entries = [root] + [entry.path for entry in os.scandir(root) if entry.is_dir()]
  return tuple(sorted((path, os.stat(path).st_mtime_ns) for path in entries))


def list_folder(root: str) -> Listing:
  """Lists the images of a split folder (cached per folder state) and checks their headers."""
  return _list_folder(root, _state(root))


@functools.lru_cache(maxsize=8)
def _list_folder(root: str, state: tuple) -> Listing:
  del state
  entries = sorted(name for name in os.listdir(root) if not name.startswith("."))
  classes = tuple(name for name in entries if os.path.isdir(os.path.join(root, name)))
  top_images = [name for name in entries if _is_image_file(name)]
  accepted = ", ".join(EXTENSIONS)
  if classes and top_images:
    raise ValueError(
        f"{root} holds both image files (e.g. {top_images[0]!r}) and subfolders (e.g. "
        f"{classes[0]!r}); use one layout: class subfolders (<DIR>/<class>/<image>) or a "
        "flat folder of images.")
  if not classes:
    if not top_images:
      others = [name for name in entries if os.path.isfile(os.path.join(root, name))]
      seen = f"; it holds {len(others)} other files, e.g. {others[0]!r}" if others else ""
      raise ValueError(f"No images in {root}{seen}. Image files end in {accepted} (any case), "
                       "in the folder itself or in class subfolders <DIR>/<class>/.")
    paths = [os.path.join(root, name) for name in top_images]
    labels = [0] * len(paths)
  else:
    per_class = [_images_under(os.path.join(root, name)) for name in classes]
    empty = [name for name, files in zip(classes, per_class) if not files]
    if empty:
      raise ValueError(
          f"{len(empty)} of the {len(classes)} class folders of {root} hold no images: "
          f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}. Image files end in "
          f"{accepted} (any case); add images or remove those folders.")
    paths = [path for files in per_class for path in files]
    labels = [label for label, files in enumerate(per_class) for _ in files]
  with concurrent.futures.ThreadPoolExecutor(min(_HEADER_THREADS, len(paths))) as pool:
    modes = list(pool.map(_read_mode, paths))
  first_of = {}
  for path, mode in zip(paths, modes):
    first_of.setdefault(_channels(mode), (path, mode))
  if len(first_of) > 1:
    (grey, grey_mode), (colour, colour_mode) = first_of[1], first_of[3]
    raise ValueError(
        f"{root} mixes grey-scale and colour images: {grey} (mode {grey_mode}, 1 channel) and "
        f"{colour} (mode {colour_mode}, 3 channels). Convert them to one kind, e.g. with "
        "PIL.Image.open(path).convert('RGB').save(path).")
  labels = np.asarray(labels, np.int32)
  labels.flags.writeable = False
  return Listing(paths=tuple(paths), labels=labels, class_names=classes,
                 channels=next(iter(first_of)))


def load_image(path: str, channels: int, image_size: int) -> np.ndarray:
  """One file -> [S, S, channels] float32 in [-1, 1] (resized and center cropped as ADM)."""
  try:
    with Image.open(path) as image:
      mode = image.mode
      if mode in _SIXTEEN_BIT_MODES:
        pixels = np.clip(np.round(np.asarray(image) / 257.0), 0, 255).astype(np.uint8)
      else:
        pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"))
  except _READ_ERRORS as error:
    raise ValueError(f"Cannot decode {path} ({type(error).__name__}: {error}); the file is "
                     "corrupt or truncated: remove or replace it.") from error
  if _channels(mode) != channels:
    raise ValueError(f"{path} has mode {mode} but the other images of its folder have "
                     f"{channels} channel(s); the file changed after the folder was listed.")
  if channels == 1:
    pixels = pixels[..., None]
  return images.uint8_to_unit_range(images.center_crop_arr(pixels, image_size))


def _listing(data_name: str, split: str) -> Listing:
  """The listing of a split, its labels given by the classes of split 'train'."""
  listing = list_folder(_split_folder(data_name, split))
  if split == "train":
    return listing
  train = list_folder(_split_folder(data_name, "train"))
  if listing.channels != train.channels:
    raise ValueError(
        f"data.name={data_name!r}: split {split!r} has {listing.channels}-channel images (e.g. "
        f"{listing.paths[0]}) but split 'train' {train.channels}-channel ones (e.g. "
        f"{train.paths[0]}); convert them to one kind.")
  unknown = sorted(set(listing.class_names) - set(train.class_names))
  if unknown or bool(listing.class_names) != bool(train.class_names):
    raise ValueError(
        f"data.name={data_name!r}: the classes of split {split!r} "
        f"{list(listing.class_names)} are not among those of split 'train' "
        f"{list(train.class_names)}; give every split the same class subfolders (or none).")
  to_train = np.asarray([train.class_names.index(name) for name in listing.class_names] or [0],
                        np.int32)
  return dataclasses.replace(listing, labels=to_train[listing.labels],
                             class_names=train.class_names)


def splits(data_config) -> tuple[str, ...]:
  """The splits of data.name='folder:<DIR>': ('train', 'test') when DIR/train/ has a test/ or val/
  next to it, else ('train',)."""
  _split_folder(data_config.name, "train")  # a missing DIR: its error
  root = directory(data_config.name)
  has_test = os.path.isdir(os.path.join(root, "train")) and any(
      os.path.isdir(os.path.join(root, name)) for name in TEST_FOLDERS)
  return SPLITS if has_test else ("train",)


def class_names(data_config) -> tuple[str, ...]:
  """The class folder names of split 'train', sorted: label i is class_names[i]; () if flat."""
  return list_folder(_split_folder(data_config.name, "train")).class_names


def _describe(data_config, split: str) -> tuple[Listing, pipeline.DataInfo]:
  image_size = pipeline.check_positive_int(data_config.image_size, "data.image_size")
  listing = _listing(data_config.name, split)
  if data_config.conditional and not listing.class_names:
    raise ValueError(
        f"data.conditional=True but data.name={data_config.name!r} is a flat folder of images "
        "(no class subfolders, so no labels); set data.conditional=False, or sort the images "
        "into <DIR>/<class>/ subfolders.")
  num_classes = len(listing.class_names) if data_config.conditional else 0
  info = pipeline.DataInfo(image_shape=(image_size, image_size, listing.channels),
                           num_classes=num_classes, num_examples=len(listing.paths))
  if captions_lib.settings(data_config).enabled:
    info = captions_lib.with_text(
        info, captions_lib.text_source(data_config, split_captions(data_config, split)))
  return listing, info


def split_captions(data_config, split: str) -> list[str]:
  """The caption of each image of a split, in the listing's order (read once per folder
  state)."""
  folders = (_split_folder(data_config.name, split), directory(data_config.name))
  return list(_split_captions(data_config.name, split, folders,
                              _state(folders[0]) + _state(folders[1])))


@functools.lru_cache(maxsize=8)
def _split_captions(name: str, split: str, folders: tuple, state: tuple) -> tuple[str, ...]:
  del state
  return tuple(captions_lib.folder_captions(_listing(name, split).paths, folders))


def info(data_config, split: str) -> pipeline.DataInfo:
  """A split: image_shape (S, S, 1 or 3); one class per class folder when data.conditional."""
  return _describe(data_config, split)[1]


@dataclasses.dataclass(frozen=True, eq=False)
class _Source:
  """Random access to a listed split: i -> {'image': [S, S, C] float32 in [-1, 1], 'label': int}."""
  paths: tuple[str, ...]
  labels: np.ndarray
  channels: int
  image_size: int

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    return {"image": load_image(self.paths[index], self.channels, self.image_size),
            "label": int(self.labels[index])}


def local_batches(data_config, *, split: str, seed: int, global_batch_size: int,
                  rows: tuple[int, int],
                  shuffle: bool) -> tuple[pipeline.DataInfo, pipeline.LocalBatchFn]:
  """The split's DataInfo and k -> this process's rows of global batch k.

  The rows are {'image': [n, S, S, C] float32 in [-1, 1], 'label': [n] int32 if conditional}.
  """
  listing, data_info = _describe(data_config, split)
  source = _Source(listing.paths, listing.labels, listing.channels, data_info.image_shape[0])
  extra = ()
  if data_info.text is not None:
    source = captions_lib.in_memory(source, split_captions(data_config, split), data_config)
    extra = (captions_lib.KEY,)
  transform = pipeline.ExampleTransform(
      seed=seed, random_flip=bool(data_config.random_flip) and split == "train",
      with_labels=data_info.num_classes > 0, extra_keys=extra)
  examples = pipeline.example_stream(source, transform, seed=seed, shuffle=shuffle)
  return data_info, pipeline.ExampleBatch(examples, global_batch_size, rows)
