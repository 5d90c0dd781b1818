"""Tests of flowjax.data: sources, global order, per-process slices and exact resume."""

import contextlib
import json
import multiprocessing
import re
import threading

import jax
import ml_collections
import numpy as np
import pytest
from scipy import stats
from sklearn import datasets as sklearn_datasets
import tensorflow_datasets as tfds

from flowjax import data
from flowjax import sharding as sharding_lib
from flowjax.data import digits
from flowjax.data import pipeline
from flowjax.data import tfds as tfds_source
from flowjax.data import toy2d


def make_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict({
      "name": "digits",
      "toy_distribution": "checkerboard",
      "conditional": False,
      "image_size": 8,
      "random_flip": False,
      "tfds_data_dir": "",
      "num_workers": 0,
      "prefetch": 0,
  })
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def sharding():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


@pytest.fixture(scope="module")
def one_device_sharding():
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:1])
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def take(batches, n):
  """n batches as NumPy dicts."""
  return [{key: np.asarray(value) for key, value in next(batches).items()} for _ in range(n)]


def take_arrays(batches, n):
  """n batches as the global jax.Arrays the iterator yields."""
  return [next(batches) for _ in range(n)]


def assert_batches_equal(expected, actual):
  assert len(expected) == len(actual)
  for want, got in zip(expected, actual):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


def row_bytes(images):
  return sorted(image.tobytes() for image in np.asarray(images, np.float32))


# ----------------------------------------------------------------------------------------------
# toy2d


def test_toy2d_batches_shape_and_determinism(sharding):
  config = make_config(name="toy2d")
  build = lambda seed, split="train": data.build(config, split=split, global_batch_size=16,
                                                 seed=seed, sharding=sharding)
  batches = build(0)
  assert batches.info == data.DataInfo(image_shape=(2,), num_classes=0, num_examples=None)
  assert data.data_info(config) == batches.info
  assert set(batches.element_spec) == {"image"}
  assert batches.element_spec["image"].shape == (16, 2)
  assert batches.element_spec["image"].sharding == sharding
  first = next(batches)
  assert set(first) == {"image"}
  assert first["image"].shape == (16, 2) and first["image"].dtype == np.float32
  assert first["image"].sharding == sharding
  reference = [{"image": np.asarray(first["image"])}] + take(batches, 2)
  assert_batches_equal(reference, take(build(0), 3))
  assert not np.array_equal(reference[0]["image"], reference[1]["image"])
  assert not np.array_equal(reference[0]["image"], take(build(1), 1)[0]["image"])
  assert not np.array_equal(reference[0]["image"], take(build(0, "test"), 1)[0]["image"])


def _distance_to_swissroll(points):
  t = np.linspace(*toy2d._SWISSROLL_TURNS, 4000)
  curve = (2.0 / toy2d._SWISSROLL_TURNS[1]) * t[:, None] * np.stack([np.cos(t), np.sin(t)], 1)
  return np.min(np.linalg.norm(points[:, None] - curve[None], axis=-1), axis=1)


@pytest.mark.parametrize("distribution", toy2d.DISTRIBUTIONS)
def test_toy2d_statistics(distribution):
  n = 4000
  points = toy2d.sample(distribution, n, 0)
  assert points.shape == (n, 2) and points.dtype == np.float32
  np.testing.assert_array_equal(points, toy2d.sample(distribution, n, 0))
  assert not np.array_equal(points, toy2d.sample(distribution, n, 1))
  assert np.all(np.abs(points.mean(0)) < 0.3)
  assert np.all((0.1 < points.var(0)) & (points.var(0) < 3.0))
  if distribution == "checkerboard":
    assert np.all(np.abs(points) <= 2.0)
    squares = np.floor(points).astype(int)
    assert np.all(squares.sum(1) % 2 == 0)
    _, counts = np.unique(squares, axis=0, return_counts=True)
    assert len(counts) == 8 and np.all(np.abs(counts / n - 1 / 8) < 0.03)
  elif distribution == "8gaussians":
    angles = np.arange(8) * np.pi / 4
    centers = 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
    distances = np.linalg.norm(points[:, None] - centers[None], axis=-1)
    nearest = distances.argmin(1)
    assert np.all(distances.min(1) < 0.6)
    assert np.all(np.abs(np.bincount(nearest, minlength=8) / n - 1 / 8) < 0.03)
    offsets = points - centers[nearest]
    np.testing.assert_allclose(offsets.std(0), 0.1, rtol=0.1)
  elif distribution == "moons":
    raw = points / toy2d._MOONS_SCALE + np.array([0.5, 0.25])
    outer = np.abs(np.linalg.norm(raw, axis=1) - 1.0)
    inner = np.abs(np.linalg.norm(raw - np.array([1.0, 0.5]), axis=1) - 1.0)
    assert np.quantile(np.minimum(outer, inner), 0.99) < 0.2
    assert abs(np.mean(outer < inner) - 0.5) < 0.05
  elif distribution == "swissroll":
    radius = np.linalg.norm(points, axis=1)
    assert radius.max() < 2.3 and radius.min() > 0.4
    assert np.quantile(_distance_to_swissroll(points[:500]), 0.99) < 0.2
  else:
    assert distribution == "student_t"
    # x: 0.5 t(3), heavy-tailed; y: +-1 + N(0, 0.2^2), light-tailed and independent of x.
    x, y = points[:, 0], points[:, 1]
    quantiles = [0.75, 0.95, 0.99]
    law = stats.t(toy2d.STUDENT_T_NU, scale=toy2d.STUDENT_T_SCALE)
    expected = law.ppf(0.5 + 0.5 * np.array(quantiles))
    np.testing.assert_allclose(np.quantile(np.abs(x), quantiles), expected, rtol=0.1)
    assert stats.kstest(x, law.cdf).pvalue > 1e-3
    # P(|x| > 4) = 0.4% for 0.5 t(3); a Gaussian of the same variance puts 5e-6 there.
    assert np.mean(np.abs(x) > 4.0) > 0.002
    np.testing.assert_allclose(np.abs(y).mean(), 1.0, atol=0.02)
    assert np.abs(y).max() < 2.0 and abs(np.mean(y > 0) - 0.5) < 0.03
    assert abs(np.corrcoef(np.abs(x), np.abs(y))[0, 1]) < 0.05


# ----------------------------------------------------------------------------------------------
# digits


def test_digits_shape_range_labels(sharding):
  config = make_config(conditional=True)
  batches = data.build(config, split="train", global_batch_size=32, seed=0, sharding=sharding)
  assert batches.info == data.DataInfo(image_shape=(8, 8, 1), num_classes=10, num_examples=1500)
  assert data.data_info(config, "test") == data.DataInfo((8, 8, 1), 10, 297)
  batch = next(batches)
  assert batch["image"].shape == (32, 8, 8, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
  assert batch["image"].sharding == sharding and batch["label"].sharding == sharding
  images = np.asarray(batch["image"])
  assert images.min() >= -1.0 and images.max() <= 1.0
  assert images.min() == -1.0 and images.max() == 1.0
  labels = np.asarray(batch["label"])
  assert np.all((labels >= 0) & (labels < 10))
  raw = sklearn_datasets.load_digits()
  by_image = {}
  for image, label in zip(raw.images[:1500], raw.target[:1500]):
    by_image.setdefault((image / 8.0 - 1.0).astype(np.float32)[..., None].tobytes(),
                        set()).add(int(label))
  for image, label in zip(images, labels):
    assert int(label) in by_image[image.tobytes()]


def test_digits_unconditional_resized(sharding):
  config = make_config(image_size=16)
  batches = data.build(config, split="test", global_batch_size=8, seed=0, sharding=sharding)
  assert batches.info == data.DataInfo((16, 16, 1), 0, 297)
  batch = next(batches)
  assert set(batch) == {"image"} and batch["image"].shape == (8, 16, 16, 1)
  assert -1.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0


def test_digits_splits_are_disjoint_and_cover_the_dataset(one_device_sharding):
  epochs = {}
  for split, batch_size in (("train", 100), ("test", 99)):
    batches = data.build(make_config(), split=split, global_batch_size=batch_size, seed=3,
                         sharding=one_device_sharding)
    num_batches = batches.info.num_examples // batch_size
    epochs[split] = [batches._local_batch(k)["image"] for k in range(2 * num_batches)]
    first, second = (np.concatenate(epochs[split][i * num_batches:(i + 1) * num_batches])
                     for i in (0, 1))
    assert row_bytes(first) == row_bytes(second)
    assert not np.array_equal(first, second)
  all_images = digits.load()[0]
  train = np.concatenate(epochs["train"][:15])
  test = np.concatenate(epochs["test"][:3])
  assert row_bytes(np.concatenate([train, test])) == row_bytes(all_images)
  assert row_bytes(train) == row_bytes(all_images[:1500])


def test_digits_unshuffled_order_and_deterministic_flips(sharding):
  images = digits.load()[0]
  plain = data.build(make_config(), split="train", global_batch_size=16, seed=0,
                     sharding=sharding, shuffle=False)
  np.testing.assert_array_equal(plain._local_batch(0)["image"], images[:16])
  np.testing.assert_array_equal(plain._local_batch(94)["image"],
                                images[np.arange(94 * 16, 95 * 16) % 1500])
  flipped = [
      data.build(make_config(random_flip=True), split="train", global_batch_size=16, seed=0,
                 sharding=sharding, shuffle=False)._local_batch(0)["image"] for _ in range(2)
  ]
  np.testing.assert_array_equal(flipped[0], flipped[1])
  was_flipped = [not np.array_equal(got, want) for got, want in zip(flipped[0], images[:16])]
  assert 0 < sum(was_flipped) < 16
  for got, want, flip in zip(flipped[0], images[:16], was_flipped):
    np.testing.assert_array_equal(got, want[:, ::-1] if flip else want)
  evaluation = data.build(make_config(random_flip=True), split="test", global_batch_size=16,
                          seed=0, sharding=sharding, shuffle=False)
  np.testing.assert_array_equal(evaluation._local_batch(0)["image"], images[1500:1516])


# ----------------------------------------------------------------------------------------------
# per-process slices


def test_process_rows(sharding):
  assert pipeline.process_rows(sharding, 16) == (0, 16)
  assert pipeline.process_rows(sharding, 16, 1, 2) == (8, 16)
  assert pipeline.process_rows(sharding, 24, 2, 3) == (16, 24)


@pytest.mark.parametrize("name,process_count", [("digits", 2), ("toy2d", 2), ("digits", 4)])
def test_process_slices_partition_the_global_batch(sharding, name, process_count):
  config = make_config(name=name, conditional=name == "digits", random_flip=name == "digits")
  build = lambda **kwargs: data.build(config, split="train", global_batch_size=16, seed=5,
                                      sharding=sharding, **kwargs)
  single = build()
  global_batches = take(single, 3)
  per_process = [build(process_index=p, process_count=process_count)
                 for p in range(process_count)]
  for k, global_batch in enumerate(global_batches):
    slices = [batches._local_batch(k) for batches in per_process]
    for key in global_batch:
      assert all(len(piece[key]) == 16 // process_count for piece in slices)
      np.testing.assert_array_equal(np.concatenate([piece[key] for piece in slices]),
                                    global_batch[key])
      np.testing.assert_array_equal(single._local_batch(k)[key], global_batch[key])
    if name == "digits":
      assert row_bytes(np.concatenate([piece["image"] for piece in slices])) == row_bytes(
          global_batch["image"])
  with pytest.raises(ValueError, match="cannot assemble global arrays"):
    next(per_process[0])


# ----------------------------------------------------------------------------------------------
# (data, fsdp) meshes whose batch axes span processes


@contextlib.contextmanager
def process_holding(devices):
  """NamedShardings address only `devices` inside, as on the process that holds them."""
  held = set(devices)

  def addressable_devices_indices_map(self, global_shape):
    return {device: index for device, index in self.devices_indices_map(global_shape).items()
            if device in held}

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jax.sharding.NamedSharding, "addressable_devices_indices_map",
                  addressable_devices_indices_map)
    yield


def batch_sharding_of(shape, order):
  """The batch sharding of a (data, fsdp, tensor) mesh made from jax.devices() in `order`."""
  devices = jax.devices()
  mesh_config = ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), shape)))
  return sharding_lib.batch_sharding(
      sharding_lib.make_mesh(mesh_config, [devices[i] for i in order]))


def local_rows_on(device, held, index_map, local_length, global_length):
  """The rows of a process's local data that jax.make_array_from_process_local_data puts on
  `device`: the distinct row blocks of the process's devices, in increasing order, take
  consecutive pieces of the local data, or the local data is the whole global array when it is
  as long."""
  start, stop, _ = index_map[device][0].indices(global_length)
  if local_length == global_length:
    return slice(start, stop)
  starts = sorted({index_map[d][0].indices(global_length)[0] for d in held})
  offset = starts.index(start) * (stop - start)
  return slice(offset, offset + stop - start)


# Two processes x four devices: process p holds jax.devices()[4 p: 4 p + 4] (jax.devices() of a
# two-process CPU run lists process 0's devices, then process 1's), and the mesh is made from
# jax.devices() in the given order.
PROCESS_MAJOR = tuple(range(8))
TWO_PROCESS_LAYOUTS = {
    "data2_fsdp4": ((2, 4, 1), PROCESS_MAJOR),
    "data4_fsdp2": ((4, 2, 1), PROCESS_MAJOR),
    "data2_fsdp4_reversed_within_processes": ((2, 4, 1), (3, 2, 1, 0, 7, 6, 5, 4)),
    "data4_fsdp2_processes_swapped": ((4, 2, 1), (4, 5, 6, 7, 0, 1, 2, 3)),
    "data2_fsdp2_tensor_across_processes": ((2, 2, 2), (0, 4, 1, 5, 2, 6, 3, 7)),
}


@pytest.mark.parametrize("layout", list(TWO_PROCESS_LAYOUTS))
def test_processes_of_a_data_fsdp_mesh_assemble_the_single_process_batch(layout):
  """Each of two processes reads exactly the rows of the global batch that its devices hold,
  and placing them as jax.make_array_from_process_local_data does gives every device the
  shard of the single-process global batch, row for row, labels and random flips included."""
  shape, order = TWO_PROCESS_LAYOUTS[layout]
  devices = jax.devices()
  sharding = batch_sharding_of(shape, order)
  config = make_config(conditional=True, random_flip=True)
  build = lambda: data.build(config, split="train", global_batch_size=32, seed=5,
                             sharding=sharding)
  global_batches = take_arrays(build(), 2)
  index_map = sharding.devices_indices_map((32,))
  for p in range(2):
    held = devices[4 * p:4 * (p + 1)]
    with process_holding(held):
      local = build()
    held_rows = set()
    for device in held:
      held_rows.update(range(*index_map[device][0].indices(32)[:2]))
    assert set(range(*local._rows)) == held_rows
    if order == PROCESS_MAJOR:
      assert local._rows == pipeline.process_rows(sharding, 32, p, 2) == (16 * p, 16 * (p + 1))
    for k, global_batch in enumerate(global_batches):
      rows = local._local_batch(k)
      for key, array in global_batch.items():
        assert len(rows[key]) == len(held_rows)
        shards = [shard for shard in array.addressable_shards if shard.device in held]
        assert len(shards) == 4
        for shard in shards:
          placed = local_rows_on(shard.device, held, index_map, len(rows[key]), 32)
          np.testing.assert_array_equal(rows[key][placed], np.asarray(shard.data))


def test_batch_rows_that_no_process_can_read_in_one_block_are_rejected():
  """A batch size that the data x fsdp shards do not divide (though each axis alone does), and
  a mesh that gives a process row blocks with gaps between them, fail with the fix."""
  for shape in ((2, 4, 1), (4, 2, 1)):
    with pytest.raises(ValueError, match=r"global_batch_size=12 cannot be split over the 8 "
                                         r"devices .* divisible by 8"):
      pipeline.process_rows(batch_sharding_of(shape, PROCESS_MAJOR), 12)
  interleaved = batch_sharding_of((2, 4, 1), (0, 4, 1, 5, 2, 6, 3, 7))
  devices = jax.devices()
  for p, spans in ((0, "[(0, 4), (8, 12), (16, 20), (24, 28)]"),
                   (1, "[(4, 8), (12, 16), (20, 24), (28, 32)]")):
    with process_holding(devices[4 * p:4 * (p + 1)]):
      with pytest.raises(ValueError, match=r"non-contiguous rows " + re.escape(spans) +
                         r"; order the mesh devices by process"):
        data.build(make_config(), split="train", global_batch_size=32, seed=0,
                   sharding=interleaved)


# ----------------------------------------------------------------------------------------------
# exact resume


@pytest.mark.parametrize("name,prefetch", [("digits", 0), ("digits", 2), ("toy2d", 2)])
def test_resume_is_exact(sharding, name, prefetch):
  config = make_config(name=name, conditional=name == "digits", random_flip=True,
                       prefetch=prefetch)
  build = lambda: data.build(config, split="train", global_batch_size=256, seed=7,
                             sharding=sharding)
  batches = build()
  take(batches, 4)
  state = json.loads(json.dumps(batches.get_state()))
  assert state["next_batch"] == 4
  continued = take(batches, 4)  # Crosses the first epoch boundary of digits at batch 5.
  batches.close()
  resumed = build()
  resumed.set_state(state)
  assert_batches_equal(continued, take(resumed, 4))
  resumed.set_state(state)
  assert_batches_equal(continued[:1], take(resumed, 1))
  resumed.close()


def _prefetch_threads():
  return {thread for thread in threading.enumerate() if thread.name.startswith("grain-prefetch")}


def test_close_stops_prefetch_threads(sharding):
  before = _prefetch_threads()
  batches = data.build(make_config(prefetch=2), split="train", global_batch_size=16, seed=0,
                       sharding=sharding)
  take(batches, 2)
  started = _prefetch_threads() - before
  assert started
  batches.close()
  for thread in started:
    thread.join(timeout=10)
  assert not any(thread.is_alive() for thread in started)


def test_resume_with_worker_processes(sharding):
  config = make_config(conditional=True, random_flip=True)
  reference = data.build(config, split="train", global_batch_size=16, seed=1, sharding=sharding)
  expected = take(reference, 4)[2:]
  state = reference.get_state()
  config.num_workers = 1
  before = set(multiprocessing.active_children())
  batches = data.build(config, split="train", global_batch_size=16, seed=1, sharding=sharding)
  batches.set_state(dict(state, next_batch=2))
  try:
    assert_batches_equal(expected, take(batches, 2))
    assert set(multiprocessing.active_children()) - before
  finally:
    batches.close()
  assert not set(multiprocessing.active_children()) - before


def test_set_state_rejects_another_stream(sharding):
  batches = data.build(make_config(), split="train", global_batch_size=16, seed=0,
                       sharding=sharding)
  state = batches.get_state()
  with pytest.raises(ValueError, match="global_batch_size=32"):
    batches.set_state(dict(state, global_batch_size=32))
  with pytest.raises(ValueError, match="next_batch"):
    batches.set_state({})


# ----------------------------------------------------------------------------------------------
# tfds


def test_tfds_cifar10_mock(sharding):
  config = make_config(name="tfds:cifar10", conditional=True, image_size=32, random_flip=True)
  with tfds.testing.mock_data(num_examples=12):
    assert data.data_info(config) == data.DataInfo((32, 32, 3), 10, 12)
    batches = data.build(config, split="train", global_batch_size=8, seed=0, sharding=sharding)
    first = take(batches, 2)
    batches.close()
    again = data.build(config, split="train", global_batch_size=8, seed=0, sharding=sharding)
    assert_batches_equal(first, take(again, 2))
  image, label = first[0]["image"], first[0]["label"]
  assert image.shape == (8, 32, 32, 3) and image.dtype == np.float32
  assert image.min() >= -1.0 and image.max() <= 1.0 and image.std() > 0.1
  assert label.dtype == np.int32 and np.all((label >= 0) & (label < 10))


def test_tfds_imagenet_mock_random_sizes_are_cropped(sharding):
  config = make_config(name="tfds:imagenet2012", image_size=16)
  with tfds.testing.mock_data(num_examples=10):
    sizes = {tfds.data_source("imagenet2012", split="train")[i]["image"].shape
             for i in range(10)}
    batches = data.build(config, split="train", global_batch_size=16, seed=0, sharding=sharding)
    batch = take(batches, 1)[0]
  assert len(sizes) > 1
  assert set(batch) == {"image"}
  assert batch["image"].shape == (16, 16, 16, 3)
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0


def test_center_crop_arr():
  image = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
  assert tfds_source.center_crop_arr(image, 16).shape == (16, 16, 3)
  np.testing.assert_array_equal(tfds_source.center_crop_arr(image[:48], 48), image[:48])
  np.testing.assert_array_equal(tfds_source.center_crop_arr(image, 48), image[8:56])
  gray = np.full((40, 30, 1), 77, np.uint8)
  np.testing.assert_array_equal(tfds_source.center_crop_arr(gray, 10), np.full((10, 10, 1), 77))


def test_tfds_not_prepared_names_the_fix(tmp_path, sharding):
  config = make_config(name="tfds:cifar10", tfds_data_dir=str(tmp_path))
  expected = (r"data.name='tfds:cifar10' is not prepared in .*; prepare it with: pip install -e "
              r"\.\[prepare\] && tfds build cifar10 --file_format=array_record --data_dir=")
  with pytest.raises(FileNotFoundError, match=expected) as error:
    data.data_info(config)
  assert str(tmp_path) in str(error.value)
  with pytest.raises(FileNotFoundError, match=expected):
    data.build(config, split="train", global_batch_size=8, seed=0, sharding=sharding)
  assert not any(tmp_path.rglob("*.array_record*"))


class _FakeSource:
  """A data source serving the given examples, with the dataset's real metadata."""

  def __init__(self, builder, examples):
    self.dataset_info = builder.info
    self._examples = examples

  def __len__(self):
    return len(self._examples)

  def __getitem__(self, index):
    return self._examples[index]


def _fake_cifar(examples):
  return tfds.testing.mock_data(
      as_data_source_fn=lambda builder, **kwargs: _FakeSource(builder, examples))


@pytest.mark.parametrize("example,message", [
    ({"image": np.zeros((32, 32), np.uint8), "label": 0}, r"shape \(32, 32\)"),
    ({"image": np.zeros((32, 32, 1), np.uint8), "label": 0}, r"expected \[H, W, 3\]"),
    ({"image": np.zeros((32, 32, 3), np.uint8), "label": 10}, r"label 10, outside \[0, 10\)"),
])
def test_tfds_bad_examples(sharding, example, message):
  config = make_config(name="tfds:cifar10", conditional=True, image_size=32)
  with _fake_cifar([example] * 8):
    batches = data.build(config, split="train", global_batch_size=8, seed=0, sharding=sharding)
    with pytest.raises(ValueError, match=message):
      next(batches)


def test_tfds_empty_split(sharding):
  config = make_config(name="tfds:cifar10", image_size=32)
  with _fake_cifar([]):
    with pytest.raises(ValueError, match="is empty"):
      data.build(config, split="train", global_batch_size=8, seed=0, sharding=sharding)


# ----------------------------------------------------------------------------------------------
# bad input


def test_unknown_names_suggest_the_fix(sharding):
  with pytest.raises(ValueError, match="Did you mean 'digits'"):
    data.build(make_config(name="digit"), split="train", global_batch_size=8, seed=0,
               sharding=sharding)
  with pytest.raises(ValueError, match="Did you mean 'moons'"):
    data.data_info(make_config(name="toy2d", toy_distribution="moon"))
  with pytest.raises(ValueError, match="Did you mean 'tfds:cifar10'"):
    data.data_info(make_config(name="tfds:cifar01"))


def test_batch_size_errors(sharding):
  config = make_config()
  with pytest.raises(ValueError, match="not divisible by process_count=3"):
    data.build(config, split="train", global_batch_size=16, seed=0, sharding=sharding,
               process_index=0, process_count=3)
  with pytest.raises(ValueError, match="divisible by 8"):
    data.build(config, split="train", global_batch_size=12, seed=0, sharding=sharding)


def test_toy2d_has_no_labels(sharding):
  with pytest.raises(ValueError, match="data.conditional=True"):
    data.build(make_config(name="toy2d", conditional=True), split="train", global_batch_size=8,
               seed=0, sharding=sharding)
