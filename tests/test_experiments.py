"""Experiment configs: schema, validation, paper-scale shapes and shardings, tiny end-to-end runs.

The full-size DiT-XL/2 compile is marked slow and runs outside CI:
  python -m pytest -m slow tests/test_experiments.py
"""

import gc
import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from flowjax import config as config_lib
from flowjax import models, objectives, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS_DIR = os.path.join(ROOT, "experiments")
EXPERIMENTS = sorted(os.path.basename(p)[:-3]
                     for p in glob.glob(os.path.join(EXPERIMENTS_DIR, "*.py")))
COMMON_SECTIONS = ("data", "mesh", "sharding", "optim", "train", "ckpt", "eval", "sample")
DIT_XL_PARAMS = 674_816_272  # DiT-XL/2 on 32x32x4 latents, 1000 classes + null, 4 out channels


def load(name):
  spec = importlib.util.spec_from_file_location(f"experiment_{name}",
                                                os.path.join(EXPERIMENTS_DIR, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def all_configs():
  """(id, experiment name, preset or None) for every experiment and each of its presets."""
  out = []
  for name in EXPERIMENTS:
    out.append(pytest.param(name, None, id=name))
    for preset in getattr(load(name), "PRESETS", {}):
      out.append(pytest.param(name, preset, id=f"{name}:{preset}"))
  return out


def test_the_documented_experiments_exist():
  assert {"quickstart", "fm_toy2d", "fm_imagenet"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name, preset", all_configs())
def test_config_schema(name, preset):
  config = load(name).get_config(preset)
  assert config.is_locked
  base = config_lib.base_config()
  assert set(config.keys()) <= set(base.keys())
  assert set(config_lib.SECTIONS) <= set(config.keys())
  for section in COMMON_SECTIONS:
    extra = set(config[section].keys()) - set(base[section].keys())
    assert not extra, f"{name}:{preset} config.{section} has unknown keys {extra}"
  assert set(config.model.keys()) == set(models.default_config(config.model.name).keys())
  assert set(config.objective.keys()) == set(
      objectives.default_config(config.objective.name).keys())
  config_lib.validate(config, 8)
  # The public contract: experiments default to a data-parallel mesh over all devices.
  assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (-1, 1, 1)
  # An unknown key is an error, not a silently added setting.
  with pytest.raises(AttributeError):
    config.train.stepz = 3


def test_unknown_preset_is_an_error_naming_the_choices():
  with pytest.raises(ValueError, match="tiny"):
    load("fm_imagenet").get_config("tinyy")


# DiT-XL/2 at full size: shapes and shardings only (jax.eval_shape, nothing allocated).

def stand_in_data(config):
  """The config on `synthetic` data of the same shape: its dataset (tfds:, latents:) is not
  prepared in tests."""
  if config.data.name.startswith("tfds:"):  # images: 3 channels, the dataset's classes
    classes = {"tfds:imagenet2012": 1000, "tfds:cifar10": 10}[config.data.name]
    config.data.update(dict(name="synthetic", channels=3,
                            num_classes=config.data.num_classes or classes))
  elif config.data.name.startswith("latents:"):  # the experiment states the latents' shape
    config.data.name = "synthetic"


def xl_config(**overrides):
  config = load("fm_imagenet").get_config("XL")
  with config.unlocked():
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 4, 1
    stand_in_data(config)
    for key, value in overrides.items():
      config_lib.set_dotted(config, key, value)
  return config


@pytest.fixture(scope="module")
def xl_setup():
  return train.build(xl_config())


def test_xl_has_dit_xl_parameter_count(xl_setup):
  """The XL experiment builds exactly DiT-XL/2's parameters (counted layer by layer in
  tests/test_models.py::test_dit_xl2_param_count), not merely about as many."""
  params = jax.tree.leaves(xl_setup.abstract_state.params)
  assert all(isinstance(p, jax.ShapeDtypeStruct) for p in params)
  total = sum(math.prod(p.shape) for p in params)
  assert total == DIT_XL_PARAMS
  assert len([k for k in xl_setup.abstract_state.params if k.startswith("block_")]) == 28


def test_xl_large_kernels_are_sharded_over_fsdp(xl_setup):
  flat = jax.tree_util.tree_flatten_with_path(xl_setup.abstract_state.params)[0]
  large = [(jax.tree_util.keystr(path), leaf) for path, leaf in flat if leaf.size >= 2**20]
  assert len(large) >= 28 * 6  # adaLN, q, k, v, out, fc1, fc2 in every block
  for name, leaf in large:
    assert "fsdp" in jax.tree.leaves(tuple(leaf.sharding.spec)), name
    # 1/4 of the kernel per device.
    assert math.prod(leaf.sharding.shard_shape(leaf.shape)) * 4 == leaf.size, name
  # The optimizer moments and the EMA of the largest kernel follow it.
  state = xl_setup.abstract_state
  kernel = state.params["block_0"]["mlp"]["fc1"]["kernel"]
  ema = state.ema["0.9999"]["block_0"]["mlp"]["fc1"]["kernel"]
  assert ema.sharding.spec == kernel.sharding.spec
  moments = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
             if "block_0']['mlp']['fc1']['kernel" in jax.tree_util.keystr(path)]
  assert len(moments) == 2  # adam mu and nu
  assert all(m.sharding.spec == kernel.sharding.spec for m in moments)


def test_xl_state_bytes_per_device_fit_a_quarter(xl_setup):
  """params + 2 adam moments + 1 EMA in float32: about 4 x 675M x 4 bytes / fsdp(4) per device."""
  leaves = jax.tree.leaves(xl_setup.abstract_state)
  per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)
  full = 4 * DIT_XL_PARAMS * 4
  assert full / 4 <= per_device <= 1.02 * full / 4


@pytest.mark.slow
def test_xl_train_step_compiles():
  """python -m pytest -m slow tests/test_experiments.py (minutes; several GB of host memory)."""
  setup = train.build(xl_config())
  compiled, seconds, memory = train.compile_step(setup)
  assert compiled is not None
  assert seconds > 0
  if memory:  # the backend reports a memory analysis
    print(memory)
    leaves = jax.tree.leaves(setup.abstract_state)
    state_bytes = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                      for x in leaves)
    # Each device's arguments are its shard of the state (about 2.7 GB, not the full 10.8 GB)
    # plus its rows of the batch.
    assert state_bytes <= memory["argument"] <= 1.1 * state_bytes


# Tiny end-to-end runs.

def run_tiny(name, workdir):
  config = load(name).get_config("tiny")
  state = train.run(config, str(workdir))
  return config, state


# (STARFlow trains end to end through train.run in tests/test_arena.py, on toy2d.)
@pytest.mark.parametrize("name", ["fm_toy2d", "quickstart"])
def test_tiny_run_writes_the_workdir_contract(name, tmp_path):
  config, state = run_tiny(name, tmp_path)
  steps = config.train.steps
  assert int(state.step) == steps
  assert int(state.skipped) == 0

  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  logged = [r["step"] for r in records]
  assert logged == list(range(config.train.log_every, steps + 1, config.train.log_every))
  for record in records:
    assert {"step", "loss", "steps_per_sec"} <= set(record)
    assert np.isfinite(record["loss"]) and record["loss"] > 0
    assert record["steps_per_sec"] > 0

  checkpoints = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                       if p.name.isdigit())
  assert checkpoints == list(range(config.ckpt.every_steps, steps + 1, config.ckpt.every_steps))
  assert (tmp_path / "samples" / f"step_{steps}.png").is_file()
  assert (tmp_path / "samples" / f"step_{steps}.png").stat().st_size > 0

  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["train"]["steps"] == steps
  assert saved["model"]["name"] == config.model.name
  assert config_lib.identity(saved) == config_lib.identity(config)


def test_dry_run_compiles_and_allocates_nothing(tmp_path, monkeypatch):
  config = load("fm_toy2d").get_config("tiny")
  with config.unlocked():
    config.train.dry_run = True
  built, compiled, initialised = [], [], []
  build, compile_step = train.build, train.compile_step

  def spy_build(*args, **kwargs):
    setup = build(*args, **kwargs)
    built.append(setup)
    return setup._replace(init_fn=lambda: initialised.append(1) or setup.init_fn())

  def spy_compile_step(setup):
    compiled.append(compile_step(setup))
    return compiled[-1]

  monkeypatch.setattr(train, "build", spy_build)
  monkeypatch.setattr(train, "compile_step", spy_compile_step)
  workdir = tmp_path / "workdir"
  gc.collect()
  before = {id(a) for a in jax.live_arrays()}
  assert train.run(config, str(workdir)) is None
  assert len(built) == 1 and len(compiled) == 1  # compiled from the abstract state
  assert not initialised  # no parameter was ever created
  built.clear()
  compiled.clear()
  gc.collect()
  new = [a for a in jax.live_arrays() if id(a) not in before]
  assert sum(a.size for a in new) < 100  # nothing state-sized left behind (thousands of floats)
  assert not workdir.exists() or not any(workdir.iterdir())  # no config.json, no checkpoints


# The other paper-scale presets: full shapes and shardings by eval_shape, and a compile of a
# reduced-depth version of the same width, batch and mesh.

@pytest.mark.parametrize("name", ["imm_imagenet", "imm_cifar10", "scm_cifar10",
                                  "scm_imagenet64"])
def test_paper_scale_preset_shapes_and_reduced_depth_compile(name):
  config = load(name).get_config(None)
  with config.unlocked():
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 4, 1
    stand_in_data(config)  # the same shapes, without a prepared dataset
  setup = train.build(config)
  kernels = [leaf for leaf in jax.tree.leaves(setup.abstract_state.params) if leaf.size >= 2**20]
  assert kernels and all("fsdp" in jax.tree.leaves(tuple(k.sharding.spec)) for k in kernels)
  with config.unlocked():
    if config.model.name == "unet":  # one level of one block, at full width
      config.model.update(dict(num_blocks=1, channel_mult=(2,)))
    else:
      config.model.depth = 1
  compiled, _, memory = train.compile_step(train.build(config))
  assert compiled is not None


# STARFlow-XL (deep-shallow flow on 32x32x4 latents): full shapes and shardings by eval_shape.

def starflow_xl_config():
  config = load("starflow_imagenet").get_config("XL")
  with config.unlocked():
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 4, 1
    stand_in_data(config)
  return config


def starflow_parameter_count(model, channels, num_classes):
  """Analytic, for the official architecture: per layer 12 D^2 + 13 D (q, k, v, out, MLP 4D, two
  LayerNorms); per block the input and output projections, the start token and the final RMSNorm
  (RoPE has no parameters); the deep block's label-token projection of the one-hot labels."""
  width = model.hidden_size
  layer = 12 * width ** 2 + 13 * width
  block = channels * width + width + 2 * channels * width + 2 * channels + channels + width
  depth = (model.num_blocks - 1) * model.layers_per_block + model.deep_layers
  return model.num_blocks * block + depth * layer + (num_classes + 1) * width + width


def test_starflow_xl_shapes_parameter_count_and_fsdp_sharding():
  config = starflow_xl_config()
  setup = train.build(config)
  params = setup.abstract_state.params
  total = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  expected = starflow_parameter_count(config.model, 4, 1000)
  print(f"STARFlow-XL parameters: {total:,}")
  assert total == expected
  assert 1.40e9 < total < 1.42e9  # "18(6)-2048 (about 1.4B parameters)", arXiv:2506.06276
  assert len([k for k in params["blocks_5"] if k.startswith("layers_")]) == 18
  assert "label_token" in params["blocks_5"] and "label_token" not in params["blocks_0"]
  kernels = [leaf for leaf in jax.tree.leaves(params) if leaf.size >= 2**20]
  assert len(kernels) >= 28 * 6
  for kernel in kernels:
    assert "fsdp" in jax.tree.leaves(tuple(kernel.sharding.spec))
    assert math.prod(kernel.sharding.shard_shape(kernel.shape)) * 4 == kernel.size


@pytest.mark.slow
def test_starflow_xl_reduced_depth_compiles():
  """python -m pytest -m slow tests/test_experiments.py: full width, batch and mesh, 2 blocks."""
  config = starflow_xl_config()
  with config.unlocked():
    config.model.update(dict(num_blocks=2, layers_per_block=1, deep_layers=1))
  compiled, _, _ = train.compile_step(train.build(config))
  assert compiled is not None


# Data sources: a paper experiment names its dataset, and the log names what a run trains on.

@pytest.mark.parametrize("name", ["fm_imagenet", "imm_imagenet", "meanflow_imagenet",
                                  "imf_imagenet", "shortcut_imagenet", "starflow_imagenet",
                                  "tvm_imagenet"])
def test_latent_experiments_do_not_fall_back_to_stand_in_data(name):
  config = load(name).get_config(None)
  assert config.data.name == "latents:"
  with pytest.raises(config_lib.ConfigError, match="latents:DIR.*cache_latents|cache_latents"):
    train.build(config)


def test_the_first_log_lines_name_the_data_and_synthetic_is_loud(tmp_path):
  def run(config, *overrides):
    done = subprocess.run(
        [sys.executable, "-m", "flowjax.main", f"--config={config}", "--num_cpu_devices=1",
         f"--workdir={tmp_path / config.replace('/', '_')}", "--config.train.steps=1",
         "--config.sample.every_steps=0", "--config.ckpt.every_steps=0",
         "--config.train.dry_run=True", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr

  log = run("experiments/quickstart.py:tiny")
  assert "Data: digits, split 'train': 1,500 examples of shape (8, 8, 1), 10 classes." in log
  assert "RANDOM GAUSSIAN NOISE" not in log
  log = run("experiments/fm_imagenet.py:tiny")
  assert "Data: synthetic" in log
  assert "data.name='synthetic': TRAINING ON RANDOM GAUSSIAN NOISE" in log
  assert log.index("Data: synthetic") < log.index("Compiled the train step")
