"""SongUNet (DDPM++ / NCSN++): published parameter counts, shapes for every option, resampling
identities, EDM's near-zero output initialisation, conditioning, gradients, the same loss on one
device and on 8, and the CIFAR-10 experiments at full size (shapes) and tiny size (a few steps)."""

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowjax import config as config_lib
from flowjax import models, train
from flowjax.models import unet

EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "experiments")
TINY = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
            dropout=0.0)
ONE_LEVEL = dict(model_channels=16, channel_mult=(1,), num_blocks=1, attn_resolutions=(8,),
                 dropout=0.0)


def load_config(name, preset=None):
  spec = importlib.util.spec_from_file_location(f"experiment_{name}",
                                                os.path.join(EXPERIMENTS_DIR, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def times_of(batch, num, seed=0):
  keys = jax.random.split(jax.random.key(seed), num)
  return tuple(jax.random.uniform(k, (batch,)) for k in keys)


def num_params(model, num_times, num_classes=0, image=(32, 32, 3)):
  x = jax.ShapeDtypeStruct((2,) + image, jnp.float32)
  times = tuple(jax.ShapeDtypeStruct((2,), jnp.float32) for _ in range(num_times))
  cond = jax.ShapeDtypeStruct((2,), jnp.int32) if num_classes else None
  params = jax.eval_shape(
      lambda x, times, cond: model.init(jax.random.key(0), x, times, cond, train=False),
      x, times, cond)
  leaves = jax.tree.leaves(params)
  assert all(isinstance(p, jax.ShapeDtypeStruct) for p in leaves)  # nothing allocated
  return sum(math.prod(p.shape) for p in leaves)


# Published networks (CIFAR-10, 32x32x3, unconditional unless stated).

@pytest.mark.parametrize("preset, num_times, num_classes, expected", [
    ("imm_cifar10", 2, 0, 56_061_443),       # lumalabs/imm CIFAR-10 network
    ("meanflow_cifar10", 2, 0, 55_929_347),  # Gsunshine/py-meanflow CIFAR-10 network
    ("ddpmpp_cifar10", 1, 10, 55_735_299),   # EDM DDPM++ cond (55,733,891 uncond)
])
def test_parameter_counts_match_the_published_networks(preset, num_times, num_classes, expected):
  model = unet.SongUNet(**unet.UNET_PRESETS[preset], num_classes=num_classes)
  assert num_params(model, num_times, num_classes) == expected


def test_presets_differ_only_where_the_papers_do():
  """NCSN++ widens the time embedding, uses the FIR filter, Fourier features and the residual
  encoder; the resampling filter does not change the parameter count."""
  ddpm, ncsn = unet.UNET_PRESETS["ddpmpp_cifar10"], unet.UNET_PRESETS["ncsnpp_cifar10"]
  assert {k for k in ddpm if ddpm[k] != ncsn.get(k)} == {
      "channel_mult_noise", "embedding_type", "encoder_type", "resample_filter"}
  box = unet.SongUNet(**{**TINY, "resample_filter": (1, 1)})
  fir = unet.SongUNet(**{**TINY, "resample_filter": (1, 3, 3, 1)})
  assert num_params(box, 1, image=(8, 8, 3)) == num_params(fir, 1, image=(8, 8, 3))


# Shapes for every option (eval_shape: traced, not compiled).

OPTIONS = {
    "ddpmpp_one_time": dict(),
    "two_times_separate": dict(num_times=2),
    "three_times_concat": dict(num_times=3, time_mapping="concat"),
    "labels": dict(num_classes=10),
    "fourier": dict(embedding_type="fourier", channel_mult_noise=2),
    "ncsnpp_residual_fir": dict(embedding_type="fourier", channel_mult_noise=2,
                                encoder_type="residual", resample_filter=(1, 3, 3, 1)),
    "skip_encoder_decoder": dict(encoder_type="skip", decoder_type="skip"),
    "no_level_attention": dict(attn_resolutions=()),
    "augment_labels": dict(augment_dim=9),
    "three_levels_out_channels": dict(channel_mult=(1, 2, 2), out_channels=5),
    "bfloat16": dict(dtype=jnp.bfloat16),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_output_shape_for_every_option(option):
  options = dict(OPTIONS[option])
  num_times = options.pop("num_times", 1)
  model = unet.SongUNet(**{**TINY, **options})
  batch, image = 3, (8, 8, 4)
  x = jax.ShapeDtypeStruct((batch,) + image, jnp.float32)
  times = tuple(jax.ShapeDtypeStruct((batch,), jnp.float32) for _ in range(num_times))
  cond = jax.ShapeDtypeStruct((batch,), jnp.int32) if model.num_classes else None

  def forward(x, times, cond):
    return model.init_with_output(jax.random.key(0), x, times, cond, train=False)[0]

  out = jax.eval_shape(forward, x, times, cond)
  assert out.shape == (batch, 8, 8, model.out_channels or image[-1])
  assert out.dtype == jnp.float32


def test_errors_name_the_setting():
  x = jnp.zeros((2, 10, 10, 3))
  with pytest.raises(ValueError, match="divisible by 4"):
    unet.SongUNet(**{**TINY, "channel_mult": (1, 2, 2)}).init(
        jax.random.key(0), x, times_of(2, 1), None, train=False)
  with pytest.raises(ValueError, match="model.encoder_type"):
    unet.SongUNet(**{**TINY, "encoder_type": "dense"}).init(
        jax.random.key(0), x[:, :8, :8], times_of(2, 1), None, train=False)
  with pytest.raises(ValueError, match="unconditional"):
    unet.SongUNet(**TINY).init(jax.random.key(0), x[:, :8, :8], times_of(2, 1),
                               jnp.zeros((2,), jnp.int32), train=False)


# Resampling.

@pytest.mark.parametrize("taps", [(1, 1), (1, 3, 3, 1)])
def test_resampling_keeps_constants_and_box_down_inverts_up(taps):
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  up = unet.upsample(x, taps)
  down = unet.downsample(x, taps)
  assert up.shape == (2, 16, 16, 3) and down.shape == (2, 4, 4, 3)
  ones = jnp.ones((1, 8, 8, 2))
  np.testing.assert_allclose(unet.upsample(ones, taps)[:, 2:-2, 2:-2], 1.0, atol=1e-6)
  np.testing.assert_allclose(unet.downsample(ones, taps)[:, 1:-1, 1:-1], 1.0, atol=1e-6)
  if taps == (1, 1):  # nearest-neighbour up, 2x2 mean down
    np.testing.assert_allclose(up, jnp.repeat(jnp.repeat(x, 2, 1), 2, 2), atol=1e-6)
    np.testing.assert_allclose(unet.downsample(up, taps), x, atol=1e-6)


# Initialisation, conditioning, gradients (one compiled tiny model, shared).

@pytest.fixture(scope="module")
def tiny():
  """A conditional two-time tiny U-Net, its parameters and a jitted apply."""
  model = unet.SongUNet(**{**ONE_LEVEL, "num_classes": 10, "zero_init_scale": 1.0,
                           "embedding_type": "fourier", "channel_mult_noise": 2})
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  params = jax.jit(lambda x, times: model.init(jax.random.key(1), x, times, None,
                                               train=False))(x, times_of(4, 2))
  apply = jax.jit(lambda p, x, times, cond: model.apply(p, x, times, cond, train=False))
  return model, params, x, apply


def test_zero_initialised_output_layers_give_zero_output():
  """EDM initialises the output conv, each block's last conv and each attention projection at
  1e-5 x xavier; with zero_init_scale=0 they start at exactly zero, so the untrained network
  outputs zero for any input, times and labels."""
  model = unet.SongUNet(**{**ONE_LEVEL, "zero_init_scale": 0.0, "num_classes": 10})
  x = 3.0 * jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  init = jax.jit(lambda x, times, cond: model.init_with_output(
      jax.random.key(1), x, times, cond, train=False))
  out, params = init(x, times_of(2, 2), jnp.array([3, 10], jnp.int32))
  assert not np.any(np.asarray(out))
  flat = jax.tree_util.tree_flatten_with_path(jax.tree.map(nn_unbox, params))[0]
  zero = {jax.tree_util.keystr(p) for p, v in flat if not np.any(np.asarray(v))}
  kernels = {jax.tree_util.keystr(p) for p, v in flat if "kernel" in jax.tree_util.keystr(p)}
  expected = {k for k in kernels if any(n in k for n in ("conv1", "proj", "aux_conv"))}
  assert expected and expected <= zero
  assert not (kernels - expected) & zero  # every other kernel is random


def nn_unbox(x):
  return x.unbox() if hasattr(x, "unbox") else x


def test_null_label_equals_no_label_and_labels_and_times_matter(tiny):
  model, params, x, apply = tiny
  times = times_of(4, 2)
  null = jnp.full((4,), 10, jnp.int32)
  np.testing.assert_allclose(apply(params, x, times, None), apply(params, x, times, null),
                             atol=1e-6)
  labelled = apply(params, x, times, jnp.arange(4, dtype=jnp.int32))
  assert float(jnp.max(jnp.abs(labelled - apply(params, x, times, null)))) > 1e-4
  moved_s = (times[0], times[1] * 0.5)
  assert float(jnp.max(jnp.abs(apply(params, x, moved_s, null)
                               - apply(params, x, times, null)))) > 1e-4
  # Each example is processed on its own: permuting the batch permutes the output.
  order = jnp.array([2, 0, 3, 1])
  np.testing.assert_allclose(
      apply(params, x[order], tuple(t[order] for t in times), null)[...],
      apply(params, x, times, null)[order], atol=1e-5)


def test_gradients_are_finite_and_reach_every_parameter(tiny):
  model, params, x, _ = tiny

  def loss(p):
    out = model.apply(p, x, times_of(4, 2), jnp.arange(4, dtype=jnp.int32), train=True,
                      rngs={"dropout": jax.random.key(2)})
    return jnp.mean((out - x) ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  flat = jax.tree_util.tree_flatten_with_path(jax.tree.map(nn_unbox, grads))[0]
  for path, g in flat:
    assert np.all(np.isfinite(np.asarray(g))), jax.tree_util.keystr(path)
  # The label table rows of unused labels get no gradient; everything else does.
  silent = [jax.tree_util.keystr(p) for p, g in flat
            if not np.any(np.asarray(g)) and "map_label" not in jax.tree_util.keystr(p)]
  assert not silent


def test_every_parameter_has_logical_axis_names(tiny):
  _, params, _, _ = tiny
  boxed = jax.tree.leaves(params, is_leaf=lambda x: hasattr(x, "names"))
  assert boxed and all(hasattr(b, "names") and len(b.names) == b.value.ndim for b in boxed)
  kernels = [b for b in boxed if b.value.ndim == 4]
  assert all("embed" in b.names for b in kernels)


# The CIFAR-10 experiments.

def test_meanflow_cifar10_full_size_shapes_and_shardings():
  """Shapes by jax.eval_shape on 8 fake devices (the reduced-depth compile of the full-width U-Net
  runs for imm_cifar10 in tests/test_experiments.py)."""
  config = load_config("meanflow_cifar10")
  with config.unlocked():
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 4, 1
    config.data.update(dict(name="synthetic", image_size=32, channels=3))
  setup = train.build(config)
  params = jax.tree.leaves(setup.abstract_state.params)
  assert sum(math.prod(p.shape) for p in params) == 55_929_347
  kernels = [p for p in params if p.size >= 2**20]
  assert kernels and all("fsdp" in jax.tree.leaves(tuple(k.sharding.spec)) for k in kernels)
  for k in kernels:  # a quarter of each large kernel per device
    assert math.prod(k.sharding.shard_shape(k.shape)) * 4 == k.size


def test_cifar10_experiments_use_the_published_networks():
  for name, preset in (("imm_cifar10", "imm_cifar10"), ("meanflow_cifar10", "meanflow_cifar10")):
    config = load_config(name)
    assert config.model.name == "unet"
    for key, value in unet.UNET_PRESETS[preset].items():
      seen = config.model[key]
      assert (tuple(seen) if isinstance(value, tuple) else seen) == value, (name, key)
    assert set(config.model.keys()) == set(models.default_config("unet").keys())
    config_lib.validate(config, 8)
