"""Image arrays in NumPy files or MNIST idx files, served as data.name 'arrays:<PATH>' (no
TensorFlow).

PATH is one of:
  FILE.npy  images [N, H, W, C] or [N, H, W], memory-mapped (read as batches need them);
            unconditional, split 'train' only;
  FILE.npz  images with optional labels, read into memory. Split 'train' takes the first
            present of the keys IMAGE_KEYS['train'] (images, image, x, x_train, data, arr_0)
            and LABEL_KEYS['train'] (labels, label, y, y_train, targets); split 'test' those of
            IMAGE_KEYS['test'] (x_test, images_test) and LABEL_KEYS['test'] (y_test,
            labels_test). Keras' mnist.npz (x_train, y_train, x_test, y_test) reads as it is;
  DIR       a directory of idx files (MNIST, Fashion-MNIST, KMNIST, ...): split 'train' reads
            train-images-idx3-ubyte and train-labels-idx1-ubyte, split 'test'
            t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte; each may be gzipped (.gz) and
            spelled with a dot before idx (train-images.idx3-ubyte). Plain files are
            memory-mapped, gzipped ones read into memory.

Pixels. Integer images (uint8, or any integer dtype with values in [0, 255]) map to [-1, 1] by
x / 127.5 - 1. Float images are taken by the range of the whole array: with a negative value
and all values in [-1, 1] they are served as they are; with all values in [0, 1] they map by
2 x - 1; any other range (e.g. floats in [0, 255]) is an error that names the range seen.
[N, H, W] arrays are grey-scale: one channel. Images whose H, W differ from data.image_size are
resized and center cropped as ADM does (`images.center_crop_arr`, as for folder: and tfds:), so
28x28 MNIST trains at image_size=28 as it is, or at 32 resized.

Labels. Integers, [N] or [N, 1]; the number of classes is data.num_classes when it is set
(> 0), else the largest label of split 'train' + 1. Labels are read only when
data.conditional=True.
"""

import dataclasses
import functools
import gzip
import os
import zipfile
import zlib

import numpy as np

from flowjax import storage
from flowjax.data import images as image_lib
from flowjax.data import pipeline

PREFIX = "arrays:"
SPLITS = ("train", "test")
IMAGE_KEYS = {"train": ("images", "image", "x", "x_train", "data", "arr_0"),
              "test": ("x_test", "images_test")}
LABEL_KEYS = {"train": ("labels", "label", "y", "y_train", "targets"),
              "test": ("y_test", "labels_test")}
IDX_PREFIXES = {"train": "train", "test": "t10k"}
# idx type byte -> big-endian NumPy dtype (the idx format of LeCun et al.'s MNIST page).
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_RANGE_TOLERANCE = 1e-3


def path_of(name: str) -> str:
  """'arrays:<PATH>' -> PATH, with ~ expanded; a PATH on object storage (gs://...: an .npz,
  .npy or idx folder) is its local copy (`storage.local_copy`, once per host)."""
  if not name.startswith(PREFIX) or len(name) == len(PREFIX):
    raise ValueError(f"data.name={name!r} is not an array dataset; use 'arrays:<PATH>'.")
  path = name[len(PREFIX):]
  if storage.is_remote(path):
    return storage.local_copy(path, suffixes=ARRAY_SUFFIXES)
  return os.path.expanduser(path)


# What arrays: reads from a folder on object storage: its idx files, gzipped or not (a single
# .npz or .npy object is copied whatever its name).
ARRAY_SUFFIXES = ("ubyte", "ubyte.gz")


def _named(data_name: str, local: str):
  """Errors inside name the dataset's path on object storage, not its local copy."""
  return storage.naming_copy(local, data_name[len(PREFIX):])


# ----------------------------------------------------------------------------------------------
# idx files


def idx_file(directory: str, split: str, kind: str) -> str | None:
  """The idx file of a split's 'images' or 'labels' in `directory`, or None if absent.

  Plain files come before gzipped ones (they can be memory-mapped); 'train-images-idx3-ubyte'
  before 'train-images.idx3-ubyte'.
  """
  rank = 3 if kind == "images" else 1
  for extension in ("", ".gz"):
    for separator in ("-", "."):
      path = os.path.join(directory,
                          f"{IDX_PREFIXES[split]}-{kind}{separator}idx{rank}-ubyte{extension}")
      if os.path.isfile(path):
        return path
  return None


def read_idx(path: str) -> np.ndarray:
  """An idx file (optionally gzipped) -> its array, of the dtype its header names (big-endian).

  The header is: two zero bytes, a type byte (IDX_DTYPES), the number of dimensions d, then d
  big-endian uint32 sizes; the values follow in C order. Plain files are memory-mapped.
  """
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as file:
        data = file.read()
      header = data[:4 + 4 * 255]
    else:
      with open(path, "rb") as file:
        header = file.read(4 + 4 * 255)
      data = None
  except (OSError, EOFError, zlib.error) as error:
    raise ValueError(f"Cannot read {path} ({type(error).__name__}: {error}); the file is "
                     "corrupt or truncated.") from error
  if len(header) < 4 or header[0] != 0 or header[1] != 0 or header[2] not in IDX_DTYPES:
    raise ValueError(f"{path} is not an idx file: it starts with bytes {header[:4].hex(' ')}, "
                     "not an idx magic number 00 00 <type> <number of dimensions>.")
  dtype = np.dtype(IDX_DTYPES[header[2]])
  ndim = header[3]
  offset = 4 + 4 * ndim
  if len(header) < offset:
    raise ValueError(f"{path} is truncated: its header names {ndim} dimensions but the file "
                     "ends before their sizes.")
  shape = tuple(int(size) for size in np.frombuffer(header, ">u4", count=ndim, offset=4))
  size = offset + int(np.prod(shape)) * dtype.itemsize
  actual = len(data) if data is not None else os.path.getsize(path)
  if actual != size:
    raise ValueError(f"{path} holds {actual} bytes but its header (shape {shape}, {dtype}) "
                     f"says {size}; the file is truncated or corrupt.")
  if data is not None:
    return np.frombuffer(data, dtype, offset=offset).reshape(shape)
  return np.memmap(path, dtype, mode="r", offset=offset, shape=shape)


# ----------------------------------------------------------------------------------------------
# loading a split


@dataclasses.dataclass(frozen=True, eq=False)
class Arrays:
  """One split as stored.

  Attributes:
    images: [N, H, W, C] integer or float (may be memory-mapped, of any byte order).
    labels: [N] or [N, 1] as stored (unchecked), or None when the split has none.
    origin: where the images come from, for messages ("'x_train' in /data/mnist.npz").
    labels_origin: where the labels come from, or what was looked for.
    pixels: 'uint8' (integers in [0, 255]), 'unit' (floats in [0, 1]) or 'signed' (floats in
      [-1, 1]).
  """
  images: np.ndarray
  labels: np.ndarray | None
  origin: str
  labels_origin: str
  pixels: str


def _split_files(path: str, data_name: str, split: str) -> tuple[str, ...]:
  """The files a split reads: (images[, labels]) idx files of a directory, else (PATH,)."""
  if not os.path.exists(path):
    where = "" if os.path.isabs(path) else f" (relative to the working directory {os.getcwd()})"
    raise FileNotFoundError(f"data.name={data_name!r}: there is no file or directory "
                            f"{path!r}{where}; name an .npy or .npz file or a directory of "
                            "MNIST idx files: arrays:<PATH>.")
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not a split of data.name={data_name!r}; use one of "
                     f"{SPLITS}.")
  if os.path.isdir(path):
    found = idx_file(path, split, "images")
    if found is None:
      prefix = IDX_PREFIXES[split]
      raise FileNotFoundError(
          f"data.name={data_name!r}: {path} has no {prefix}-images-idx3-ubyte (nor .gz, nor "
          f"{prefix}-images.idx3-ubyte) for split {split!r}; arrays:<DIR> reads the idx files "
          "of MNIST-like datasets (train-* for split 'train', t10k-* for 'test').")
    labels = idx_file(path, split, "labels")
    return (found,) + ((labels,) if labels else ())
  if not path.endswith((".npy", ".npz")):
    raise ValueError(f"data.name={data_name!r}: {path} is neither an .npy nor an .npz file nor "
                     "a directory of MNIST idx files.")
  if path.endswith(".npy") and split != "train":
    raise ValueError(f"data.name={data_name!r}: an .npy file holds split 'train' only, not "
                     f"{split!r}; save both splits in one .npz (np.savez(path, x_train=..., "
                     "x_test=...)), or evaluate on split 'train' (--config.eval.split=train).")
  return (path,)


def splits(data_config) -> tuple[str, ...]:
  """The splits of data.name='arrays:<PATH>': ('train', 'test') when PATH has test images (t10k
  idx files, or an .npz key of IMAGE_KEYS['test']), else ('train',)."""
  path = path_of(data_config.name)
  with _named(data_config.name, path):
    _split_files(path, data_config.name, "train")  # a missing PATH or train split: its error
  if os.path.isdir(path):
    has_test = idx_file(path, "test", "images") is not None
  elif path.endswith(".npz"):
    try:  # an unreadable file has no test split here; reading split 'train' names the problem
      archive = np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
      archive = None
    has_test = isinstance(archive, np.lib.npyio.NpzFile) and any(
        key in archive.files for key in IMAGE_KEYS["test"])
    if isinstance(archive, np.lib.npyio.NpzFile):
      archive.close()
  else:
    has_test = False
  return SPLITS if has_test else ("train",)


def load(data_name: str, split: str) -> Arrays:
  """The arrays of a split of data.name='arrays:<PATH>', checked (cached per file state)."""
  with _named(data_name, path_of(data_name)):
    return _load(data_name, split, _stamp(data_name, split))


def _stamp(data_name: str, split: str) -> tuple:
  """((file, modification time, size), ...) of the files a split reads: the cache key."""
  files = _split_files(path_of(data_name), data_name, split)
  return tuple((file, os.stat(file).st_mtime_ns, os.stat(file).st_size) for file in files)


def _read_npz(path: str, split: str) -> tuple[np.ndarray, np.ndarray | None, str, str]:
  """(images, labels or None, where the images are, where the labels are) of an .npz split."""
  try:
    archive = np.load(path)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
    raise ValueError(f"Cannot read {path} as an .npz file ({type(error).__name__}: "
                     f"{error}).") from error
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise ValueError(f"{path} holds a single array, not an .npz archive of named arrays; rename "
                     "it to .npy, or save it with np.savez(path, images=..., labels=...).")
  with archive:
    keys = list(archive.files)
    image_key = next((key for key in IMAGE_KEYS[split] if key in keys), None)
    if image_key is None:
      raise ValueError(
          f"{path} has no images for split {split!r}: its keys are {keys}, and images are read "
          f"from the first present of {list(IMAGE_KEYS[split])}; resave it with one of those "
          "keys.")
    label_key = next((key for key in LABEL_KEYS[split] if key in keys), None)
    try:
      images = archive[image_key]
      labels = archive[label_key] if label_key else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
      raise ValueError(f"Cannot read the arrays of {path} ({type(error).__name__}: "
                       f"{error}).") from error
  labels_origin = (f"{label_key!r} in {path}" if label_key else
                   f"{path} (no key among {list(LABEL_KEYS[split])})")
  return images, labels, f"{image_key!r} in {path}", labels_origin


def _read_npy(path: str) -> np.ndarray:
  try:
    return np.load(path, mmap_mode="r")
  except (OSError, ValueError, EOFError) as error:
    raise ValueError(f"Cannot read {path} as an .npy array ({type(error).__name__}: "
                     f"{error}).") from error


@functools.lru_cache(maxsize=4)
def _load(data_name: str, split: str, stamp: tuple) -> Arrays:
  # The files the stamp names (a worker process reads the ones its parent checked).
  path = stamp[0][0]
  if not path.endswith((".npz", ".npy")):  # an idx folder's images
    path = os.path.dirname(path)
    images = read_idx(stamp[0][0])
    labels = read_idx(stamp[1][0]) if len(stamp) > 1 else None
    origin = stamp[0][0]
    labels_origin = stamp[1][0] if labels is not None else (
        f"{path} (no {IDX_PREFIXES[split]}-labels-idx1-ubyte)")
  elif path.endswith(".npz"):
    images, labels, origin, labels_origin = _read_npz(path, split)
  else:
    images, labels, origin, labels_origin = _read_npy(path), None, path, f"{path} (an .npy file)"
  prefix = f"data.name={data_name!r}: the images ({origin})"
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(f"{prefix} have shape {images.shape}; expected [N, H, W, C] or [N, H, W].")
  if len(images) == 0:
    raise ValueError(f"{prefix} are empty (shape {images.shape}).")
  if images.shape[-1] > 4 and images.shape[1] <= 4:
    raise ValueError(
        f"{prefix} have shape {images.shape}, which looks channel-first [N, C, H, W]; flowjax "
        "reads channel-last images: save np.transpose(images, (0, 2, 3, 1)).")
  return Arrays(images=images, labels=labels, origin=origin, labels_origin=labels_origin,
                pixels=_pixel_range(images, prefix))


def _pixel_range(images: np.ndarray, prefix: str) -> str:
  """'uint8', 'unit' or 'signed' (see Arrays); a ValueError for any other range or dtype."""
  if images.dtype == np.uint8:
    return "uint8"
  if images.dtype.kind not in "iuf":
    raise ValueError(f"{prefix} have dtype {images.dtype}; use integers in [0, 255] or floats "
                     "in [0, 1] or [-1, 1].")
  low, high = float(images.min()), float(images.max())
  if images.dtype.kind in "iu":
    if low < 0 or high > 255:
      raise ValueError(f"{prefix} are {images.dtype} with values in [{low:g}, {high:g}]; "
                       "integer images must lie in [0, 255] (8-bit pixels).")
    return "uint8"
  if not (np.isfinite(low) and np.isfinite(high)):
    raise ValueError(f"{prefix} hold non-finite values (min {low}, max {high}).")
  if low >= -_RANGE_TOLERANCE and high <= 1 + _RANGE_TOLERANCE:
    return "unit"
  if low >= -1 - _RANGE_TOLERANCE and high <= 1 + _RANGE_TOLERANCE:
    return "signed"
  raise ValueError(
      f"{prefix} are floats in [{low:g}, {high:g}]; float images must lie in [0, 1] (mapped to "
      "[-1, 1]) or [-1, 1] (taken as they are). Scale them first, e.g. x / 255 for 8-bit "
      "values, or store them as uint8.")


def to_unit_range(image: np.ndarray, pixels: str, image_size: int) -> np.ndarray:
  """One stored image [H, W, C] -> [S, S, C] float32 in [-1, 1], resized if H, W != S."""
  if pixels == "uint8":
    image = np.asarray(image).astype(np.uint8)
    if image.shape[:2] != (image_size, image_size):
      image = image_lib.center_crop_arr(image, image_size)
    return image_lib.uint8_to_unit_range(image)
  image = np.asarray(image, np.float32)
  if pixels == "unit":
    image = 2.0 * image - 1.0
  if image.shape[:2] != (image_size, image_size):
    image = image_lib.center_crop_arr(image, image_size)
  return np.clip(image, -1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# labels


def _checked_labels(arrays: Arrays, data_name: str, split: str) -> np.ndarray:
  """[N] int32 labels, all >= 0; one ValueError per kind of bad labels."""
  prefix = f"data.name={data_name!r}, split {split!r}: the labels ({arrays.labels_origin})"
  if arrays.labels is None:
    raise ValueError(f"data.conditional=True but data.name={data_name!r} has no labels for "
                     f"split {split!r} (looked in {arrays.labels_origin}); add labels or set "
                     "data.conditional=False.")
  labels = np.asarray(arrays.labels)
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  if labels.ndim != 1:
    raise ValueError(f"{prefix} have shape {labels.shape}; expected [N] (or [N, 1]) class "
                     "indices, not one-hot or multi-label arrays.")
  if labels.dtype.kind not in "iu":
    raise ValueError(f"{prefix} have dtype {labels.dtype}; expected integer class indices "
                     "(convert with labels.astype(np.int64)).")
  if len(labels) != len(arrays.images):
    raise ValueError(f"{prefix} number {len(labels)} but the images ({arrays.origin}) "
                     f"{len(arrays.images)}; give one label per image.")
  if labels.min() < 0:
    index = int(np.argmin(labels))
    raise ValueError(f"{prefix} include the negative label {int(labels[index])} (example "
                     f"{index}); labels are class indices 0, 1, ..., K - 1.")
  return labels.astype(np.int32)


def _num_classes(data_config) -> int:
  """data.num_classes if set (> 0), else the largest label of split 'train' + 1."""
  configured = data_config.get("num_classes", 0)
  if configured:
    return pipeline.check_positive_int(configured, "data.num_classes")
  train = load(data_config.name, "train")
  return int(_checked_labels(train, data_config.name, "train").max()) + 1


def _describe(data_config, split: str) -> tuple[tuple, np.ndarray | None, pipeline.DataInfo]:
  """(the split's cache key, its checked labels or None, its DataInfo)."""
  image_size = pipeline.check_positive_int(data_config.image_size, "data.image_size")
  with _named(data_config.name, path_of(data_config.name)):
    stamp = _stamp(data_config.name, split)
    arrays = _load(data_config.name, split, stamp)
    labels, num_classes = _checked(data_config, split, arrays)
  return stamp, labels, pipeline.DataInfo(
      image_shape=(image_size, image_size, arrays.images.shape[-1]), num_classes=num_classes,
      num_examples=len(arrays.images))


def _checked(data_config, split: str, arrays: Arrays) -> tuple[np.ndarray | None, int]:
  """(the checked labels or None, the number of classes) of a split's arrays."""
  labels, num_classes = None, 0
  if data_config.conditional:
    labels = _checked_labels(arrays, data_config.name, split)
    num_classes = _num_classes(data_config)
    if labels.max() >= num_classes:
      index = int(np.argmax(labels))
      source = ("data.num_classes" if data_config.get("num_classes", 0) else
                "the largest label of split 'train' + 1")
      raise ValueError(
          f"data.name={data_config.name!r}, split {split!r}: the labels "
          f"({arrays.labels_origin}) include {int(labels[index])} (example {index}), outside "
          f"[0, {num_classes}) where {num_classes} classes is {source}; set "
          "--config.data.num_classes to the number of classes.")
  return labels, num_classes


def info(data_config, split: str) -> pipeline.DataInfo:
  """A split: image_shape (S, S, C) with the arrays' C; labels when data.conditional."""
  return _describe(data_config, split)[2]


@dataclasses.dataclass(frozen=True, eq=False)
class _Source:
  """Random access to a split: i -> {'image': [S, S, C] float32 in [-1, 1], 'label': int}.

  Holds the cache key of the arrays, not the arrays: worker processes open the files themselves.
  """
  data_name: str
  split: str
  stamp: tuple
  labels: np.ndarray | None
  image_size: int

  def __len__(self) -> int:
    return len(_load(self.data_name, self.split, self.stamp).images)

  def __getitem__(self, index: int) -> dict:
    arrays = _load(self.data_name, self.split, self.stamp)
    example = {"image": to_unit_range(arrays.images[index], arrays.pixels, self.image_size)}
    if self.labels is not None:
      example["label"] = int(self.labels[index])
    return example


def local_batches(data_config, *, split: str, seed: int, global_batch_size: int,
                  rows: tuple[int, int],
                  shuffle: bool) -> tuple[pipeline.DataInfo, pipeline.LocalBatchFn]:
  """The split's DataInfo and k -> this process's rows of global batch k.

  The rows are {'image': [n, S, S, C] float32 in [-1, 1], 'label': [n] int32 if conditional}.
  """
  stamp, labels, data_info = _describe(data_config, split)
  transform = pipeline.ExampleTransform(
      seed=seed, random_flip=bool(data_config.random_flip) and split == "train",
      with_labels=data_info.num_classes > 0)
  source = _Source(data_config.name, split, stamp, labels, data_info.image_shape[0])
  examples = pipeline.example_stream(source, transform, seed=seed, shuffle=shuffle)
  return data_info, pipeline.ExampleBatch(examples, global_batch_size, rows)
