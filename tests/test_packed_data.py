"""Tests of `python -m flowjax.data.prepare` and the 'packed:<DIR>' source it writes: a packed
source serves what the source itself serves (images, labels, order, flips), through the shared
pipeline (per-process slices, exact resume), and refuses missing, interrupted or mismatched
packs with one message each."""

import json
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from flowjax import config as config_lib, data, train
from flowjax.data import packed, prepare
from test_own_data import (ROOT, assert_batches_equal, assert_process_slices_partition,
                           assert_resume_is_exact, make_config, mnist_like, take, write_idx)


@pytest.fixture(scope="module")
def sharding():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def noise_folder(root, sizes=((13, 10), (9, 12), (16, 16))):
  """root/train/<class>/ and root/val/<class>/ with random RGB images of several sizes."""
  rng = np.random.default_rng(0)
  for split, per_class in (("train", 7), ("val", 3)):
    for name in ("zebra", "ant"):
      os.makedirs(os.path.join(root, split, name))
      for j in range(per_class):
        shape = sizes[j % len(sizes)] + (3,)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
            os.path.join(root, split, name, f"{j}.png"))
  return f"folder:{root}"


def assert_same_stream(source_config, packed_config, split, sharding, *, num_examples):
  """Same DataInfo, the same source-order batches (over an epoch boundary) with shuffle=False,
  and the same shuffled, flipped global batches for one seed."""
  assert data.data_info(packed_config, split) == data.data_info(source_config, split)
  plain = [data.build(config, split=split, global_batch_size=8, seed=0, sharding=sharding,
                      shuffle=False) for config in (source_config, packed_config)]
  batches = -(-num_examples // 8) + 1
  assert_batches_equal([plain[0]._local_batch(k) for k in range(batches)],
                       [plain[1]._local_batch(k) for k in range(batches)])
  flipped = [data.build(config, split=split, global_batch_size=16, seed=7, sharding=sharding)
             for config in (source_config, packed_config)]
  assert_batches_equal(take(flipped[0], 3), take(flipped[1], 3))


def test_folder_packs_to_the_same_images_labels_and_order(tmp_path, sharding):
  source = noise_folder(str(tmp_path / "pets"))
  out = str(tmp_path / "packed")
  results = prepare.prepare(source, out, image_size=8, shard_size=4)
  assert sorted(results) == ["test", "train"]
  spec = results["train"]["spec"]
  assert (spec["num_examples"], spec["num_shards"], spec["dtype"]) == (14, 4, "uint8")
  assert spec["class_names"] == ["ant", "zebra"] and spec["image_shape"] == [8, 8, 3]
  assert json.loads((tmp_path / "packed" / "train" / "spec.json").read_text()) == spec
  assert not (tmp_path / "packed" / "train" / packed.PENDING_FILE).exists()
  for conditional in (True, False):
    folder = make_config(source, conditional=conditional, random_flip=True)
    packs = make_config(f"packed:{out}", conditional=conditional, random_flip=True)
    assert data.class_names(packs) == data.class_names(folder) == ("ant", "zebra")
    for split, num_examples in (("train", 14), ("test", 6)):
      assert_same_stream(folder, packs, split, sharding, num_examples=num_examples)
  # The whole split sits in the shards in source order: uint8 pixels, labels as int32.
  records = packed._Source(tuple(packed.shard_path(out, "train", s, 4) for s in range(4)),
                           (8, 8, 3), "uint8")._getitems(range(14))
  direct = data.build(make_config(source, conditional=True), split="train", global_batch_size=16,
                      seed=0, sharding=sharding, shuffle=False)._local_batch(0)
  np.testing.assert_array_equal(np.stack([r["image"] for r in records]), direct["image"][:14])
  np.testing.assert_array_equal([r["label"] for r in records], direct["label"][:14])


def _npz_uint8(root):
  rng = np.random.default_rng(1)
  x_train, y_train = rng.integers(0, 256, (21, 10, 10, 3), dtype=np.uint8), np.arange(21) % 5
  x_test, y_test = rng.integers(0, 256, (6, 10, 10, 3), dtype=np.uint8), np.arange(6) % 5
  np.savez(os.path.join(root, "d.npz"), x_train=x_train, y_train=y_train, x_test=x_test,
           y_test=y_test)
  return f"arrays:{root}/d.npz", True, ("train", "test"), "uint8"


def _npz_unit_floats(root):
  rng = np.random.default_rng(2)
  np.savez(os.path.join(root, "f.npz"), images=rng.uniform(0, 1, (19, 10, 10)).astype(np.float32),
           labels=np.arange(19) % 3)
  return f"arrays:{root}/f.npz", True, ("train",), "float32"


def _npy(root):
  images = np.random.default_rng(3).integers(0, 256, (17, 8, 8, 3), dtype=np.uint8)
  np.save(os.path.join(root, "x.npy"), images)
  return f"arrays:{root}/x.npy", False, ("train",), "uint8"


def _idx_directory(root):
  rng = np.random.default_rng(4)
  for prefix, num in (("train", 20), ("t10k", 9)):
    images, labels = mnist_like(num, rng, size=12)
    write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), images, gzipped=True)
    write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), labels, gzipped=True)
  return f"arrays:{root}", True, ("train", "test"), "uint8"


@pytest.mark.parametrize("make", [_npz_uint8, _npz_unit_floats, _npy, _idx_directory])
def test_arrays_pack_to_the_same_images_labels_and_order(tmp_path, sharding, make):
  (tmp_path / "src").mkdir()
  source, labelled, splits, dtype = make(str(tmp_path / "src"))
  out = str(tmp_path / "packed")
  results = prepare.prepare(source, out, image_size=8, shard_size=8)
  assert tuple(sorted(results)) == tuple(sorted(splits))
  assert results["train"]["spec"]["dtype"] == dtype
  for split in splits:
    own = make_config(source, conditional=labelled, random_flip=True)
    packs = make_config(f"packed:{out}", conditional=labelled, random_flip=True)
    assert_same_stream(own, packs, split, sharding,
                       num_examples=results[split]["spec"]["num_examples"])


def test_square_arrays_keep_their_side_by_default(tmp_path):
  np.save(tmp_path / "x.npy", np.zeros((3, 6, 6), np.uint8))
  spec = prepare.prepare(f"arrays:{tmp_path / 'x.npy'}", str(tmp_path / "p"))["train"]["spec"]
  assert spec["image_shape"] == [6, 6, 1] and spec["num_classes"] == 0
  np.save(tmp_path / "wide.npy", np.zeros((3, 6, 9), np.uint8))
  with pytest.raises(ValueError, match="holds 6x9 images; give --image_size"):
    prepare.prepare(f"arrays:{tmp_path / 'wide.npy'}", str(tmp_path / "q"))
  with pytest.raises(ValueError, match="give --image_size=<S>; the files of a folder"):
    prepare.prepare(f"folder:{tmp_path}", str(tmp_path / "r"))


def test_every_split_of_the_source_is_packed(tmp_path):
  flat = tmp_path / "flat"
  flat.mkdir()
  Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(flat / "a.png")
  assert data.splits(make_config(f"folder:{flat}")) == ("train",)
  assert data.splits(make_config(noise_folder(str(tmp_path / "split")))) == ("train", "test")
  assert data.splits(make_config("digits")) == ()
  results = prepare.prepare(f"folder:{flat}", str(tmp_path / "p"), image_size=4)
  assert list(results) == ["train"] and results["train"]["spec"]["class_names"] == []
  assert data.splits(make_config(f"packed:{tmp_path / 'p'}")) == ("train",)


# ----------------------------------------------------------------------------------------------
# the shared pipeline: per-process slices and exact resume


@pytest.fixture
def packed_folder(tmp_path):
  """data.name of a packed folder: 14 train examples, 2 classes, in 3 shards."""
  prepare.prepare(noise_folder(str(tmp_path / "pets")), str(tmp_path / "packed"), image_size=8,
                  shard_size=5)
  return f"packed:{tmp_path / 'packed'}"


def test_process_slices_partition_the_global_batch(sharding, packed_folder):
  config = make_config(packed_folder, conditional=True, random_flip=True)
  assert_process_slices_partition(config, sharding, 4)


def test_resume_is_exact(sharding, packed_folder):
  config = make_config(packed_folder, conditional=True, random_flip=True, prefetch=2)
  continued, resumed = assert_resume_is_exact(config, sharding)
  # Worker processes (data.num_workers > 0) receive the batch function pickled.
  copy = pickle.loads(pickle.dumps(resumed._local_batch_fn))
  assert_batches_equal([resumed._local_batch(4)], [copy(4)])
  resumed.close()
  assert not all(np.array_equal(continued[0]["image"], later["image"]) for later in continued[1:])


# ----------------------------------------------------------------------------------------------
# interrupted and repeated packing


def test_interrupted_prepare_is_refused_then_resumed(tmp_path, sharding, monkeypatch):
  source = noise_folder(str(tmp_path / "pets"))
  out = tmp_path / "packed"
  write_shard = prepare._write_shard

  def interrupted_in_the_third_shard(path, stored, labels):
    if "images-00002" in path:
      with open(path + ".tmp", "wb") as partial:
        partial.write(b"half a shard")
      raise KeyboardInterrupt
    write_shard(path, stored, labels)

  monkeypatch.setattr(prepare, "_write_shard", interrupted_in_the_third_shard)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(source, str(out), image_size=8, shard_size=4, splits=("train",))
  monkeypatch.setattr(prepare, "_write_shard", write_shard)
  assert sorted(os.listdir(out / "train")) == [
      "images-00000-of-00004.array_record", "images-00001-of-00004.array_record",
      "images-00002-of-00004.array_record.tmp", packed.PENDING_FILE]
  config = make_config(f"packed:{out}", conditional=True)
  with pytest.raises(FileNotFoundError, match=(
      r"the packed split 'train' in .*packed is incomplete \(no spec.json: prepare was "
      r"interrupted .*running the same command again: python -m flowjax.data.prepare "
      r"--source=folder:.*pets --out=.*packed --split=train --image_size=8")):
    data.data_info(config)
  result = prepare.prepare(source, str(out), image_size=8, shard_size=4, splits=("train",))
  assert (result["train"]["written"], result["train"]["skipped"]) == ([2, 3], [0, 1])
  assert_same_stream(make_config(source, conditional=True, random_flip=True),
                     make_config(f"packed:{out}", conditional=True, random_flip=True), "train",
                     sharding, num_examples=14)
  again = prepare.prepare(source, str(out), image_size=8, shard_size=4, splits=("train",))
  assert again["train"]["complete_before"] and not again["train"]["written"]
  with pytest.raises(ValueError, match=r"spec.json was written with other settings "
                                       r"\(image_shape, image_size differ.*delete .*train"):
    prepare.prepare(source, str(out), image_size=6, shard_size=4, splits=("train",))
  # Without a pending spec, leftover shards are not trusted: a deleted spec packs everything.
  os.remove(out / "train" / "spec.json")
  with pytest.raises(FileNotFoundError, match="is incomplete"):
    data.data_info(config)
  result = prepare.prepare(source, str(out), image_size=8, shard_size=4, splits=("train",))
  assert result["train"]["written"] == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------
# errors: one message each


def test_reader_errors(tmp_path, sharding, packed_folder):
  with pytest.raises(FileNotFoundError, match=r"there is no directory '.*nowhere'.*pack your "
                                              r"images into it first: python -m flowjax.data"):
    data.data_info(make_config(f"packed:{tmp_path / 'nowhere'}"))
  with pytest.raises(ValueError, match=(
      r"data.image_size=16 but data.name='packed:.*' holds 8x8 images \(packed with "
      r"--image_size=8\); set --config.data.image_size=8, or re-pack the source at 16 into a new "
      r"directory: python -m flowjax.data.prepare --source=folder:.*pets --out=<NEW_DIR> "
      r"--image_size=16")):
    data.data_info(make_config(packed_folder, image_size=16))
  os.rename(os.path.join(packed.directory(packed_folder), "test"), tmp_path / "elsewhere")
  with pytest.raises(ValueError, match=(
      r"has no split 'test': .*packed holds the packed splits \['train'\]. Pack it with python -m "
      r"flowjax.data.prepare --source=folder:.*pets --out=.*packed --split=test --image_size=8, "
      r"or evaluate on split 'train'")):
    data.data_info(make_config(packed_folder), "test")
  with pytest.raises(ValueError, match=r"data.num_classes=1 but .* was packed with 2 classes"):
    data.data_info(make_config(packed_folder, conditional=True, num_classes=1))
  more_classes = make_config(packed_folder, conditional=True, num_classes=5)
  assert data.data_info(more_classes).num_classes == 5
  with pytest.raises(ValueError, match="data.name='packed:' names no directory; pack your images"):
    data.data_info(make_config("packed:"))
  assert "packed:<DIR>" in data.SOURCE_NAMES

  np.save(tmp_path / "x.npy", np.zeros((3, 8, 8), np.uint8))
  prepare.prepare(f"arrays:{tmp_path / 'x.npy'}", str(tmp_path / "unlabelled"))
  with pytest.raises(ValueError, match=r"data.conditional=True but .* was packed from "
                                       r"arrays:.*x.npy without labels"):
    data.data_info(make_config(f"packed:{tmp_path / 'unlabelled'}", conditional=True))
  os.remove(tmp_path / "unlabelled" / "train" / "images-00000-of-00001.array_record")
  with pytest.raises(FileNotFoundError, match=r"1 of the 1 shards of split 'train' are missing"):
    data.build(make_config(f"packed:{tmp_path / 'unlabelled'}"), split="train",
               global_batch_size=8, seed=0, sharding=sharding)


def test_prepare_errors(tmp_path):
  with pytest.raises(ValueError, match=r"--source='tfds:mnist'; pack a folder of images"):
    prepare.prepare("tfds:mnist", str(tmp_path / "p"), image_size=8)
  with pytest.raises(FileNotFoundError, match="there is no directory"):
    prepare.prepare(f"folder:{tmp_path / 'missing'}", str(tmp_path / "p"), image_size=8)
  np.save(tmp_path / "x.npy", np.zeros((3, 8, 8), np.uint8))
  with pytest.raises(ValueError, match=r"has no split 'test'; its splits are \['train'\]"):
    prepare.prepare(f"arrays:{tmp_path / 'x.npy'}", str(tmp_path / "p"), splits=("test",))


def test_a_mismatched_image_size_stops_the_trainer_before_it_builds(packed_folder):
  config = config_lib.load_experiment(os.path.join(ROOT, "experiments", "quickstart.py"), "tiny",
                                      **{"data.name": packed_folder, "data.image_size": 16,
                                         "data.conditional": True})
  with pytest.raises(config_lib.ConfigError, match="re-pack the source at 16"):
    train.build(config)


def test_command_line(tmp_path):
  noise_folder(str(tmp_path / "pets"))
  command = [sys.executable, "-m", "flowjax.data.prepare", f"--source=folder:{tmp_path / 'pets'}",
             f"--out={tmp_path / 'packed'}", "--split=test"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
  assert done.returncode == 1 and "give --image_size=<S>" in done.stderr, done.stderr[-2000:]
  done = subprocess.run(command + ["--image_size=8"], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, env=env)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "packed/test: 6 examples of shape (8, 8, 3), 2 classes, 1 shard(s)" in done.stderr
  assert sorted(os.listdir(tmp_path / "packed")) == ["test"]


def test_the_data_loading_benchmark_reads_every_source(tmp_path):
  out = tmp_path / "result.json"
  done = subprocess.run(
      [sys.executable, "-m", "flowjax.bench", "--data_loading", "--data_workers=0",
       "--folder_images=20", "--array_images=300", "--data_seconds=0.05",
       f"--data_dir={tmp_path}", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result["command"].startswith("python -m flowjax.bench --data_loading")
  assert len(result["commit"]) == 40 and result["machine"]["cpu_count"] == os.cpu_count()
  assert [case["source"] for case in result["cases"]] == [
      "folder", "packed_folder", "npy", "npz", "packed_npz"]
  assert all(case["examples_per_sec"] > 0 and case["num_workers"] == 0
             for case in result["cases"])
  assert sorted(result["prepare"]) == ["packed_folder", "packed_npz"]
  assert data.data_info(make_config(f"packed:{tmp_path / 'packed_folder'}", image_size=64,
                                    conditional=True)) == data.DataInfo((64, 64, 3), 10, 20)
