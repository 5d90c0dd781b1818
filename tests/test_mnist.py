"""experiments/mnist.py: every few-step method trains on MNIST-sized arrays (28x28x1) read
through arrays: (an .npz, and a directory of idx files as MNIST ships them)."""

import gzip
import json
import os

import numpy as np
import pytest

from flowjax import config as config_lib, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("fm", "imm", "meanflow", "shortcut", "consistency")


@pytest.fixture(scope="module")
def mnist_like(tmp_path_factory):
  """64 random 28x28 uint8 images with labels 0-9: as an .npz and as gzipped idx files."""
  root = tmp_path_factory.mktemp("mnist")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, 64).astype(np.uint8)
  np.savez(root / "mnist.npz", x_train=images, y_train=labels)
  idx = root / "idx"
  idx.mkdir()
  with gzip.open(idx / "train-images-idx3-ubyte.gz", "wb") as f:
    f.write(bytes([0, 0, 8, 3]) + np.asarray((64, 28, 28), ">u4").tobytes() + images.tobytes())
  with gzip.open(idx / "train-labels-idx1-ubyte.gz", "wb") as f:
    f.write(bytes([0, 0, 8, 1]) + np.asarray((64,), ">u4").tobytes() + labels.tobytes())
  return root


def run(method, data_name, workdir, **overrides):
  config = config_lib.load_experiment(os.path.join(ROOT, "experiments", "mnist.py"),
                                      f"{method},tiny", **{"data.name": data_name, **overrides})
  state = train.run(config, str(workdir))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return config, state, records


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_on_mnist_arrays(method, mnist_like, tmp_path):
  config, state, records = run(method, f"arrays:{mnist_like}/mnist.npz", tmp_path / "w")
  assert config.objective.name == {"fm": "flow_matching"}.get(method, method)
  assert int(state.step) == config.train.steps and int(state.skipped) == 0
  assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
  assert (tmp_path / "w" / "checkpoints" / str(config.train.steps)).is_dir()


def test_ctm_distils_a_flow_matching_run_of_the_same_file(mnist_like, tmp_path):
  """CTM's teacher is this file's flow-matching run, read from the idx directory."""
  data_name = f"arrays:{mnist_like}/idx"
  run("fm", data_name, tmp_path / "teacher")
  config, state, records = run("ctm", data_name, tmp_path / "ctm",
                               **{"objective.teacher_workdir": str(tmp_path / "teacher")})
  assert int(state.step) == config.train.steps
  assert np.isfinite(records[-1]["loss"])


def test_the_method_is_the_first_part_of_the_argument():
  load = lambda arg: config_lib.load_experiment(os.path.join(ROOT, "experiments", "mnist.py"),
                                                arg)
  assert load(None).objective.name == "flow_matching"
  assert load("meanflow").objective.name == "meanflow"
  tiny = load("imm,tiny")
  assert tiny.objective.name == "imm" and tiny.model.model_channels == 8
  assert tuple(load("imm").data.values()) != () and load("imm").data.image_size == 28
  with pytest.raises(ValueError, match="preset"):
    load("gan")
