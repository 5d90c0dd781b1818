"""Tests of the user-data sources: 'folder:<DIR>' (image files) and 'arrays:<PATH>' (.npy, .npz,
MNIST idx files), through the shared pipeline, and a few training steps on each."""

import gzip
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from flowjax import config as config_lib, data, train
from flowjax.data import arrays

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(name, **overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict({
      "name": name,
      "conditional": False,
      "image_size": 8,
      "num_classes": 0,
      "random_flip": False,
      "num_workers": 0,
      "prefetch": 0,
  })
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def sharding():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def take(batches, n):
  """n batches as NumPy dicts."""
  return [{key: np.asarray(value) for key, value in next(batches).items()} for _ in range(n)]


def assert_batches_equal(expected, actual):
  assert len(expected) == len(actual)
  for want, got in zip(expected, actual):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


def pixel_value(example: int) -> int:
  """The 8-bit value of example i's constant images: distinct for i < 60, none at 0 or 255."""
  return 4 * example + 10


def unit(value) -> np.float32:
  return np.float32(value) / np.float32(127.5) - np.float32(1.0)


def write_image(path, value, shape=(13, 10, 3)):
  """A constant image file (any resize keeps it constant): [H, W, C] of `value`, C in (1, 3)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.full(shape, value, np.uint8)
  Image.fromarray(pixels[..., 0] if shape[-1] == 1 else pixels).save(path)


def make_class_folder(root, classes=("zebra", "ant", "mouse"), per_class=3, shape=(13, 10, 3)):
  """root/<class>/img<j>.png with constant images; returns {value: label} (classes sorted)."""
  value_to_label = {}
  for index, name in enumerate(classes):
    label = sorted(classes).index(name)
    for j in range(per_class):
      value = pixel_value(index * per_class + j)
      write_image(os.path.join(root, name, f"img{j}.png"), value, shape)
      value_to_label[value] = label
  return value_to_label


def constant_values(images):
  """[B, H, W, C] of constant images -> [B] 8-bit values (asserts each image is constant)."""
  flat = images.reshape(len(images), -1)
  np.testing.assert_allclose(flat, flat[:, :1].repeat(flat.shape[1], 1), atol=1e-6)
  return np.round((flat[:, 0] + 1.0) * 127.5).astype(int)


# ----------------------------------------------------------------------------------------------
# folder:<DIR>


def test_folder_classes_sorted_resized_and_in_range(tmp_path, sharding):
  value_to_label = make_class_folder(tmp_path / "pets")
  config = make_config(f"folder:{tmp_path / 'pets'}", conditional=True)
  assert data.class_names(config) == ("ant", "mouse", "zebra")
  assert data.data_info(config) == data.DataInfo((8, 8, 3), 3, 9)
  assert data.describe(config, data.data_info(config)).endswith(
      "9 examples of shape (8, 8, 3), 3 classes.")
  plain = data.build(config, split="train", global_batch_size=8, seed=0, sharding=sharding,
                     shuffle=False)
  first = plain._local_batch(0)
  # Source order: classes sorted (ant, mouse, zebra), then files; 'zebra' was written first.
  np.testing.assert_array_equal(first["label"], [0, 0, 0, 1, 1, 1, 2, 2])
  np.testing.assert_array_equal(constant_values(first["image"]),
                                [pixel_value(i) for i in (3, 4, 5, 6, 7, 8, 0, 1)])
  batch = take(data.build(config, split="train", global_batch_size=16, seed=1,
                          sharding=sharding), 1)[0]
  assert batch["image"].shape == (16, 8, 8, 3) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  for value, label in zip(constant_values(batch["image"]), batch["label"]):
    assert value_to_label[value] == label
  unconditional = make_config(f"folder:{tmp_path / 'pets'}")
  assert data.data_info(unconditional) == data.DataInfo((8, 8, 3), 0, 9)
  write_image(str(tmp_path / "pets" / "ant" / "new.png"), 200)  # A changed folder is relisted.
  assert data.data_info(unconditional) == data.DataInfo((8, 8, 3), 0, 10)


def test_folder_flat_grey_scale_and_random_flips(tmp_path, sharding):
  rng = np.random.default_rng(0)
  pictures = [rng.integers(0, 256, (20, 24), dtype=np.uint8) for _ in range(8)]
  for i, picture in enumerate(pictures):
    Image.fromarray(picture).save(tmp_path / f"{i:02d}.{('png', 'jpg', 'JPEG')[i % 3]}")
  (tmp_path / "notes.txt").write_text("not an image")
  config = make_config(f"folder:{tmp_path}", image_size=16, random_flip=True)
  assert data.data_info(config) == data.DataInfo((16, 16, 1), 0, 8)
  assert data.class_names(config) == ()
  flipped = data.build(config, split="train", global_batch_size=8, seed=0, sharding=sharding,
                       shuffle=False)._local_batch(0)["image"]
  plain = data.build(make_config(f"folder:{tmp_path}", image_size=16), split="train",
                     global_batch_size=8, seed=0, sharding=sharding,
                     shuffle=False)._local_batch(0)["image"]
  assert plain.shape == (8, 16, 16, 1)
  was_flipped = [not np.array_equal(a, b) for a, b in zip(flipped, plain)]
  assert 0 < sum(was_flipped) < 8
  for got, want, flip in zip(flipped, plain, was_flipped):
    np.testing.assert_array_equal(got, want[:, ::-1] if flip else want)
  # 20x24 -> BICUBIC to 16x19 -> center crop of 16 columns, as ADM's center_crop_arr.
  resized = np.asarray(Image.fromarray(pictures[0]).resize((19, 16), Image.Resampling.BICUBIC))
  np.testing.assert_allclose(plain[0, ..., 0], unit(resized[:, 1:17]), atol=1e-6)


def test_folder_sixteen_bit_grey_is_scaled_to_eight_bits(tmp_path, sharding):
  Image.fromarray(np.full((8, 8), 257 * 200, np.uint16)).save(tmp_path / "deep.png")
  assert Image.open(tmp_path / "deep.png").mode.startswith("I")
  image = data.build(make_config(f"folder:{tmp_path}"), split="train", global_batch_size=8,
                     seed=0, sharding=sharding)._local_batch(0)["image"]
  np.testing.assert_allclose(image, unit(200), atol=1e-6)


def test_folder_train_and_val_splits_share_the_train_classes(tmp_path, sharding):
  make_class_folder(tmp_path / "train", classes=("a", "b", "c"), per_class=2)
  write_image(str(tmp_path / "val" / "c" / "x.png"), 50)
  write_image(str(tmp_path / "val" / "b" / "y.png"), 60)
  config = make_config(f"folder:{tmp_path}", conditional=True)
  assert data.data_info(config, "train") == data.DataInfo((8, 8, 3), 3, 6)
  assert data.data_info(config, "test") == data.DataInfo((8, 8, 3), 3, 2)
  batch = data.build(config, split="test", global_batch_size=8, seed=0, sharding=sharding,
                     shuffle=False)._local_batch(0)
  assert batch["image"].shape == (8, 8, 8, 3)
  np.testing.assert_array_equal(batch["label"], [1, 2] * 4)
  np.testing.assert_array_equal(constant_values(batch["image"]), [60, 50] * 4)
  write_image(str(tmp_path / "test" / "d" / "z.png"), 70)
  with pytest.raises(ValueError, match=r"classes of split 'test' \['d'\] are not among those of "
                                       r"split 'train' \['a', 'b', 'c'\]"):
    data.data_info(config, "test")


# ----------------------------------------------------------------------------------------------
# arrays:<PATH>


def write_idx(path, array, gzipped):
  """An idx file of a uint8 array, written from the format's definition."""
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  payload = header + np.ascontiguousarray(array, np.uint8).tobytes()
  with (gzip.open if gzipped else open)(path, "wb") as file:
    file.write(payload)


def mnist_like(num, rng, size=28):
  """[num, size, size] uint8 constant images of distinct values and [num] labels 0..9."""
  values = np.asarray([pixel_value(i) for i in range(num)], np.uint8)
  return np.repeat(np.repeat(values[:, None, None], size, 1), size, 2), rng.permutation(num) % 10


@pytest.mark.parametrize("gzipped,separator", [(False, "-"), (True, "-"), (True, "."),
                                               (False, ".")])
def test_idx_directory(tmp_path, sharding, gzipped, separator):
  rng = np.random.default_rng(0)
  train_images, train_labels = mnist_like(20, rng)
  test_images, test_labels = mnist_like(12, rng)
  suffix = ".gz" if gzipped else ""
  for prefix, images, labels in (("train", train_images, train_labels),
                                 ("t10k", test_images, test_labels)):
    write_idx(tmp_path / f"{prefix}-images{separator}idx3-ubyte{suffix}", images, gzipped)
    write_idx(tmp_path / f"{prefix}-labels{separator}idx1-ubyte{suffix}", labels, gzipped)
  path = str(tmp_path / f"train-images{separator}idx3-ubyte{suffix}")
  read = arrays.read_idx(path)
  assert read.shape == (20, 28, 28)
  np.testing.assert_array_equal(read, train_images)
  assert isinstance(read, np.memmap) != gzipped
  config = make_config(f"arrays:{tmp_path}", conditional=True, image_size=8)
  assert data.data_info(config) == data.DataInfo((8, 8, 1), 10, 20)
  assert data.data_info(config, "test") == data.DataInfo((8, 8, 1), 10, 12)
  for split, images, labels in (("train", train_images, train_labels),
                                ("test", test_images, test_labels)):
    batch = data.build(config, split=split, global_batch_size=8, seed=0, sharding=sharding,
                       shuffle=False)._local_batch(0)
    assert batch["image"].shape == (8, 8, 8, 1)
    np.testing.assert_array_equal(batch["label"], labels[:8])
    np.testing.assert_array_equal(constant_values(batch["image"]), images[:8, 0, 0])


def test_idx_reader_rejects_bad_files(tmp_path):
  write_idx(tmp_path / "ok", np.zeros((3, 4, 4), np.uint8), gzipped=False)
  data_bytes = (tmp_path / "ok").read_bytes()
  (tmp_path / "short").write_bytes(data_bytes[:-5])
  with pytest.raises(ValueError, match=r"short holds 59 bytes but its header \(shape \(3, 4, 4\), "
                                       r"uint8\) says 64"):
    arrays.read_idx(str(tmp_path / "short"))
  (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
  with pytest.raises(ValueError, match="png is not an idx file: it starts with bytes 89 50 4e 47"):
    arrays.read_idx(str(tmp_path / "png"))


def test_npy_is_memory_mapped_and_unit_floats_map_to_signed(tmp_path, sharding):
  rng = np.random.default_rng(0)
  images = rng.uniform(0.0, 1.0, (10, 8, 8, 3)).astype(np.float32)
  np.save(tmp_path / "x.npy", images)
  config = make_config(f"arrays:{tmp_path / 'x.npy'}")
  assert data.data_info(config) == data.DataInfo((8, 8, 3), 0, 10)
  loaded = arrays.load(config.name, "train")
  assert isinstance(loaded.images, np.memmap) and loaded.pixels == "unit"
  batch = data.build(config, split="train", global_batch_size=8, seed=0, sharding=sharding,
                     shuffle=False)._local_batch(0)
  np.testing.assert_allclose(batch["image"], 2.0 * images[:8] - 1.0, atol=1e-6)
  signed = 2.0 * images - 1.0
  np.save(tmp_path / "s.npy", signed)
  batch = data.build(make_config(f"arrays:{tmp_path / 's.npy'}"), split="train",
                     global_batch_size=8, seed=0, sharding=sharding, shuffle=False)._local_batch(0)
  np.testing.assert_array_equal(batch["image"], signed[:8])
  with pytest.raises(ValueError, match="an .npy file holds split 'train' only"):
    data.data_info(config, "test")
  with pytest.raises(ValueError, match="has no labels for split 'train'"):
    data.data_info(make_config(config.name, conditional=True))


def test_npz_keys_splits_resize_and_num_classes(tmp_path, sharding):
  rng = np.random.default_rng(0)
  x_train, y_train = mnist_like(16, rng, size=12)
  x_test, y_test = mnist_like(8, rng, size=12)
  np.savez(tmp_path / "keras.npz", x_train=x_train, y_train=y_train[:, None].astype(np.int64),
           x_test=x_test.astype(np.int32), y_test=y_test)
  config = make_config(f"arrays:{tmp_path / 'keras.npz'}", conditional=True, image_size=16)
  assert data.data_info(config) == data.DataInfo((16, 16, 1), int(y_train.max()) + 1, 16)
  assert data.data_info(make_config(config.name, conditional=True, num_classes=12, image_size=16),
                        "test") == data.DataInfo((16, 16, 1), 12, 8)
  for split, images, labels in (("train", x_train, y_train), ("test", x_test, y_test)):
    batch = data.build(config, split=split, global_batch_size=8, seed=0, sharding=sharding,
                       shuffle=False)._local_batch(0)
    assert batch["image"].shape == (8, 16, 16, 1)
    np.testing.assert_array_equal(batch["label"], labels[:8])
    np.testing.assert_array_equal(constant_values(batch["image"]), images[:8, 0, 0])
  np.savez(tmp_path / "plain.npz", images=x_train)
  assert data.data_info(make_config(f"arrays:{tmp_path / 'plain.npz'}")) == data.DataInfo(
      (8, 8, 1), 0, 16)


# ----------------------------------------------------------------------------------------------
# the shared pipeline: per-process slices and exact resume


@pytest.fixture
def own_datasets(tmp_path):
  """{'folder': data.name, 'arrays': data.name}: 20 conditional examples each."""
  make_class_folder(tmp_path / "images", classes=("b", "a"), per_class=10, shape=(9, 12, 3))
  rng = np.random.default_rng(0)
  x, y = rng.integers(0, 256, (20, 10, 10, 3), dtype=np.uint8), np.arange(20) % 4
  np.savez(tmp_path / "arrays.npz", x=x, y=y)
  return {"folder": f"folder:{tmp_path / 'images'}", "arrays": f"arrays:{tmp_path}/arrays.npz"}


def assert_process_slices_partition(config, sharding, num_processes):
  """Each of `num_processes` processes reads its rows of global batches of 16; together they
  are the global batch, for 3 batches (48 examples, across epoch boundaries of small data)."""
  build = lambda **kwargs: data.build(config, split="train", global_batch_size=16, seed=5,
                                      sharding=sharding, **kwargs)
  global_batches = take(build(), 3)
  per_process = [build(process_index=p, process_count=num_processes)
                 for p in range(num_processes)]
  for k, global_batch in enumerate(global_batches):
    slices = [batches._local_batch(k) for batches in per_process]
    for key in ("image", "label"):
      assert all(len(piece[key]) == 16 // num_processes for piece in slices)
      np.testing.assert_array_equal(np.concatenate([piece[key] for piece in slices]),
                                    global_batch[key])


@pytest.mark.parametrize("kind", ["folder", "arrays"])
def test_process_slices_partition_the_global_batch(sharding, own_datasets, kind):
  config = make_config(own_datasets[kind], conditional=True, random_flip=True)
  assert_process_slices_partition(config, sharding, 2)


def assert_resume_is_exact(config, sharding):
  """Batches 3-5 read after restoring the (JSON round-tripped) state saved after batch 2 equal
  those of the uninterrupted iterator; returns (continued batches, the resumed iterator)."""
  build = lambda: data.build(config, split="train", global_batch_size=8, seed=3,
                             sharding=sharding)
  batches = build()
  take(batches, 2)
  state = json.loads(json.dumps(batches.get_state()))
  continued = take(batches, 3)
  batches.close()
  resumed = build()
  resumed.set_state(state)
  assert_batches_equal(continued, take(resumed, 3))
  return continued, resumed


@pytest.mark.parametrize("kind", ["folder", "arrays"])
def test_resume_is_exact(sharding, own_datasets, kind):
  config = make_config(own_datasets[kind], conditional=True, random_flip=True, prefetch=2)
  continued, resumed = assert_resume_is_exact(config, sharding)
  resumed.close()
  assert not all(np.array_equal(continued[0]["image"], later["image"]) for later in continued[1:])


# ----------------------------------------------------------------------------------------------
# bad data: one message each, naming the file or the value


def test_folder_errors(tmp_path, sharding):
  with pytest.raises(FileNotFoundError, match=r"there is no directory '.*missing'"):
    data.data_info(make_config(f"folder:{tmp_path / 'missing'}"))
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "readme.gif").write_bytes(b"GIF89a")
  with pytest.raises(ValueError, match=r"No images in .*empty; it holds 1 other files, e.g. "
                                       r"'readme.gif'. Image files end in .png, .jpg, .jpeg"):
    data.data_info(make_config(f"folder:{tmp_path / 'empty'}"))

  make_class_folder(tmp_path / "classes", classes=("a", "b", "c"), per_class=1)
  (tmp_path / "classes" / "d").mkdir()
  (tmp_path / "classes" / "b" / "x.txt").write_text("")
  with pytest.raises(ValueError, match=r"1 of the 4 class folders of .*classes hold no images: d"):
    data.data_info(make_config(f"folder:{tmp_path / 'classes'}"))

  mixed = tmp_path / "mixed"
  write_image(str(mixed / "a" / "colour.png"), 30)
  write_image(str(mixed / "b" / "grey.png"), 40, shape=(6, 6, 1))
  with pytest.raises(ValueError, match=r"mixes grey-scale and colour images: .*b/grey.png \(mode "
                                       r"L, 1 channel\) and .*a/colour.png \(mode RGB"):
    data.data_info(make_config(f"folder:{mixed}"))

  corrupt = tmp_path / "corrupt"
  write_image(str(corrupt / "good.png"), 30)
  (corrupt / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
  with pytest.raises(ValueError, match=r"Cannot read .*corrupt/bad.png as an image"):
    data.data_info(make_config(f"folder:{corrupt}"))

  truncated = tmp_path / "truncated"
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  Image.fromarray(noise).save(tmp_path / "whole.png")
  write_image(str(truncated / "good.png"), 30)
  (truncated / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:4000])
  batches = data.build(make_config(f"folder:{truncated}"), split="train", global_batch_size=8,
                       seed=0, sharding=sharding)
  with pytest.raises(ValueError, match=r"Cannot decode .*truncated/cut.png .*corrupt or truncated"):
    next(batches)

  write_image(str(truncated / "a" / "sub.png"), 30)
  with pytest.raises(ValueError, match=r"holds both image files \(e.g. 'cut.png'\) and subfolders"):
    data.data_info(make_config(f"folder:{truncated}"))
  os.remove(truncated / "a" / "sub.png")
  os.rmdir(truncated / "a")
  with pytest.raises(ValueError, match="is a flat folder of images"):
    data.data_info(make_config(f"folder:{truncated}", conditional=True))
  with pytest.raises(ValueError, match=r"has no split 'test': .* has no train/ subfolder"):
    data.data_info(make_config(f"folder:{truncated}"), "test")
  with pytest.raises(ValueError, match="names no <DIR>"):
    data.data_info(make_config("folder:"))


@pytest.mark.parametrize("labels,overrides,message", [
    (np.array([0, 1, 3, 2]), {"num_classes": 3},
     r"include 3 \(example 2\), outside \[0, 3\) where 3 classes is data.num_classes"),
    (np.array([0, -1, 2, 2]), {}, r"include the negative label -1 \(example 1\)"),
    (np.array([0, 1, 2]), {}, r"number 3 but the images .* 4; give one label per image"),
    (np.eye(4, dtype=np.int64), {}, r"have shape \(4, 4\); expected \[N\] \(or \[N, 1\]\)"),
    (np.array([0.0, 1.0, 2.0, 3.0]), {}, r"have dtype float64; expected integer class indices"),
])
def test_bad_labels(tmp_path, labels, overrides, message):
  np.savez(tmp_path / "d.npz", images=np.zeros((4, 8, 8), np.uint8), labels=labels)
  config = make_config(f"arrays:{tmp_path / 'd.npz'}", conditional=True, **overrides)
  with pytest.raises(ValueError, match=message):
    data.data_info(config)


@pytest.mark.parametrize("images,message", [
    (np.zeros((4, 8), np.uint8), r"have shape \(4, 8\); expected \[N, H, W, C\] or \[N, H, W\]"),
    (np.zeros((4, 3, 8, 8), np.uint8), r"looks channel-first"),
    (np.full((4, 8, 8), 255.0), r"are floats in \[255, 255\]; float images must lie in \[0, 1\]"),
    (np.full((4, 8, 8), 300, np.int64), r"are int64 with values in \[300, 300\]"),
    (np.zeros((0, 8, 8), np.uint8), r"are empty"),
])
def test_bad_images(tmp_path, images, message):
  np.save(tmp_path / "x.npy", images)
  with pytest.raises(ValueError, match=message):
    data.data_info(make_config(f"arrays:{tmp_path / 'x.npy'}"))


def test_arrays_path_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="there is no file or directory"):
    data.data_info(make_config(f"arrays:{tmp_path / 'nope.npz'}"))
  with pytest.raises(FileNotFoundError, match="has no train-images-idx3-ubyte"):
    data.data_info(make_config(f"arrays:{tmp_path}"))
  np.savez(tmp_path / "only_train.npz", x_train=np.zeros((2, 8, 8), np.uint8))
  with pytest.raises(ValueError, match=r"has no images for split 'test': its keys are "
                                       r"\['x_train'\].*\['x_test', 'images_test'\]"):
    data.data_info(make_config(f"arrays:{tmp_path / 'only_train.npz'}"), "test")
  np.save(tmp_path / "single.npy", np.zeros((2, 8, 8), np.uint8))
  os.rename(tmp_path / "single.npy", tmp_path / "single.npz")
  with pytest.raises(ValueError, match="single.npz holds a single array, not an .npz archive"):
    data.data_info(make_config(f"arrays:{tmp_path / 'single.npz'}"))
  (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
  with pytest.raises(ValueError, match="Cannot read .*broken.npz as an .npz file"):
    data.data_info(make_config(f"arrays:{tmp_path / 'broken.npz'}"))


def test_registry_names_the_new_sources():
  assert "folder:<DIR>" in data.SOURCE_NAMES and "arrays:<PATH>" in data.SOURCE_NAMES
  with pytest.raises(ValueError, match="Did you mean 'folder:<DIR>'"):
    data.data_info(make_config("folders:x"))
  with pytest.raises(ValueError, match="data.name='latents:' names no directory"):
    data.data_info(make_config("latents:"))


# ----------------------------------------------------------------------------------------------
# a few training steps on each


def _image_folder(root):
  make_class_folder(root, classes=("three", "one", "two"), per_class=4, shape=(12, 11, 3))
  return f"folder:{root}", "12 examples of shape (8, 8, 3), 3 classes"


def _npz(root):
  x, y = mnist_like(20, np.random.default_rng(0))
  os.makedirs(root)
  np.savez(os.path.join(root, "mnist.npz"), x_train=x, y_train=y)
  return f"arrays:{root}/mnist.npz", "20 examples of shape (8, 8, 1), 10 classes"


def _idx_directory(root):
  x, y = mnist_like(20, np.random.default_rng(0))
  os.makedirs(root)
  write_idx(os.path.join(root, "train-images-idx3-ubyte.gz"), x, gzipped=True)
  write_idx(os.path.join(root, "train-labels-idx1-ubyte.gz"), y, gzipped=True)
  return f"arrays:{root}", "20 examples of shape (8, 8, 1), 10 classes"


@pytest.mark.parametrize("make", [_image_folder, _npz, _idx_directory])
def test_quickstart_trains_on_own_data(tmp_path, make):
  name, described = make(str(tmp_path / "data"))
  workdir = tmp_path / "w"
  done = subprocess.run(
      [sys.executable, "-m", "flowjax.main", "--config=experiments/quickstart.py:tiny",
       f"--workdir={workdir}", "--num_cpu_devices=1", f"--config.data.name={name}",
       "--config.train.steps=2", "--config.ckpt.every_steps=2", "--config.sample.num=4",
       "--config.sample.num_steps=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"Data: {name}, split 'train': {described}." in done.stderr, done.stderr[-3000:]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert records[-1]["step"] == 2 and np.isfinite(records[-1]["loss"])
  assert (workdir / "checkpoints" / "2").is_dir()
  assert (workdir / "samples" / "step_2.png").is_file()
  if name.startswith("folder:"):  # label i is the i-th class folder in sorted order
    assert json.loads((workdir / "classes.json").read_text()) == ["one", "three", "two"]
  else:
    assert not (workdir / "classes.json").exists()


def test_a_missing_evaluation_split_stops_before_training(tmp_path):
  """A folder without test/ or val/ cannot serve eval.split='test': one config error at build."""
  root = str(tmp_path / "data")
  make_class_folder(root, classes=("a", "b"), per_class=2, shape=(8, 8, 3))
  config = config_lib.load_experiment(os.path.join(ROOT, "experiments", "quickstart.py"), "tiny",
                                      **{"data.name": f"folder:{root}", "eval.every_steps": 2})
  with pytest.raises(config_lib.ConfigError, match="test"):
    train.build(config)
  assert not (tmp_path / "w").exists()
