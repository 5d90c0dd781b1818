"""SongUNet (DDPM++ / NCSN++): published parameter counts, shapes for every option, resampling
identities, EDM's near-zero output initialisation, conditioning, gradients, the same loss on one
device and on 8, and the CIFAR-10 experiments at full size (shapes) and tiny size (a few steps)."""

import importlib.util
import math
import os
import types

import flax.linen as nn
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
    "two_times_per_block_labels": dict(num_times=2, time_mapping="per_block", num_classes=10),
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


def depthwise_reference(x, taps, up, padding=None):
  """EDM's resampling as it is written there: a depthwise convolution with the filter
  outer(taps, taps) / sum(taps)^2, stride 2 (down), or its transpose with the filter x4 (up)."""
  f = np.asarray(taps, np.float64)
  kernel = np.outer(f, f) / f.sum() ** 2 * (4 if up else 1)
  channels, k = x.shape[-1], len(taps)
  kernel = jnp.asarray(np.tile(kernel[:, :, None, None], (1, 1, 1, channels)), x.dtype)
  if up:
    pad = k - 1 - (k - 1) // 2
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((pad, pad), (pad, pad)), lhs_dilation=(2, 2),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)
  pad = (k - 1) // 2 if padding is None else padding
  return jax.lax.conv_general_dilated(
      x, kernel, (2, 2), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=channels)


@pytest.mark.parametrize("taps", [(1, 1), (1, 3, 3, 1), (1, 2), (2, 5, 1, 3, 1, 1)])
@pytest.mark.parametrize("padding", [None, 0, 2])
def test_resampling_equals_the_depthwise_convolution_and_its_gradient(taps, padding):
  """The box filter's repeat is exact; every filter (box, FIR, asymmetric, 6 taps) and padding
  (the residual encoder's 0) agrees with EDM's depthwise convolution to float32 rounding, and so
  does the input gradient, on a non-square image with channels that are not a power of 2."""
  x = jax.random.normal(jax.random.key(1), (3, 8, 12, 5))
  cotangent_down = jax.random.normal(jax.random.key(2), unet.downsample(x, taps, padding).shape)
  cotangent_up = jax.random.normal(jax.random.key(3), (3, 16, 24, 5))
  for up, ours, cotangent in (
      (False, lambda x: unet.downsample(x, taps, padding), cotangent_down),
      (True, lambda x: unet.upsample(x, taps), cotangent_up)):
    theirs = lambda x, up=up: depthwise_reference(x, taps, up, padding)
    assert ours(x).shape == theirs(x).shape
    np.testing.assert_allclose(ours(x), theirs(x), rtol=0, atol=1e-6)
    grad = lambda f, cotangent=cotangent: jax.grad(lambda x: jnp.sum(f(x) * cotangent))(x)
    np.testing.assert_allclose(grad(ours), grad(theirs), rtol=0, atol=2e-6)
  if taps == (1, 1):
    assert (unet.upsample(x, taps) == depthwise_reference(x, taps, True)).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_group_norm_is_flax_group_norm(dtype):
  """Same parameters, same values to float32 rounding (and the bfloat16 output's rounding), same
  gradients, on features with an offset and a spread (E[x^2] - E[x]^2 is the delicate part)."""
  x = (3.0 * jax.random.normal(jax.random.key(0), (2, 8, 12, 24)) + 1.5).astype(dtype)
  ours = unet.GroupNorm(num_groups=6, epsilon=1e-6, dtype=dtype)
  theirs = nn.GroupNorm(num_groups=6, epsilon=1e-6, dtype=dtype)
  params = nn.meta.unbox(ours.init(jax.random.key(1), x))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, theirs.init(
      jax.random.key(1), x)) == {"params": {"scale": (24,), "bias": (24,)}}
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params)
  got, want = ours.apply(params, x), theirs.apply(params, x)
  assert got.dtype == want.dtype == dtype
  tolerance = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=0, atol=tolerance)
  cotangent = jax.random.normal(jax.random.key(3), x.shape)
  grad = lambda model: jax.grad(lambda p, x: jnp.sum(
      model.apply(p, x).astype(jnp.float32) * cotangent), (0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(grad(ours)), jax.tree.leaves(grad(theirs))):
    scale = float(jnp.abs(jnp.float32(b)).max())
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=0,
                               atol=(1e-5 if dtype == jnp.float32 else 3e-2) * max(scale, 1.0))


def test_resample_matrix_rows_are_the_filter():
  """Down with (1, 3, 3, 1): row i holds the taps / 8 at columns 2i - 1 .. 2i + 2 (cut at the
  border); up: every column sums to 2 (each pixel feeds 2 outputs per axis with weight 2 f)."""
  down = unet.resample_matrix((1, 3, 3, 1), 8, up=False)
  np.testing.assert_array_equal(down[1, 1:5], np.array([1, 3, 3, 1]) / 8)
  np.testing.assert_array_equal(down[0, :3], np.array([3, 3, 1]) / 8)
  assert down.shape == (4, 8)
  up = unet.resample_matrix((1, 3, 3, 1), 4, up=True)
  assert up.shape == (8, 4)
  np.testing.assert_allclose(up.sum(axis=0)[1:-1], 2.0)


@pytest.mark.parametrize("name, expected", [
    ("imm_cifar10", 2_227_971), ("meanflow_cifar10", 2_219_523)])
def test_bench_presets_are_the_tiny_networks_of_the_pytorch_comparison(name, expected):
  """:bench_tiny is the official U-Net at width 32, 2 blocks per level, channel_mult (2, 2, 2),
  dropout 0.2, on 32x32x3 at batch 16 (README "Performance" times PyTorch on the same)."""
  config = load_config(name, "bench_tiny")
  assert (config.model.model_channels, tuple(config.model.channel_mult),
          config.model.num_blocks, config.model.dropout) == (32, (2, 2, 2), 2, 0.2)
  assert (config.data.image_size, config.data.channels, config.train.batch_size) == (32, 3, 16)
  setup = train.build(config)
  assert sum(x.size for x in jax.tree.leaves(setup.abstract_state.params)) == expected


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


def test_ctm_cifar10_network_is_sony_ctms():
  """sony/ctm's CIFAR-10 network (networks.py, SongUNet with training_mode='ctm'): EDM's DDPM++
  (55,732,739 parameters without augmentation labels) plus a mapping network for s (map_layer0_s,
  map_layer1_s: 128 x 512 + 512 + 512 x 512 + 512) and, in each of its 33 blocks, a Dense of s's
  embedding (affine_s: 512 x 256 + 256), whose shift adds to that of t's (affine)."""
  config = load_config("ctm_cifar10")
  info = types.SimpleNamespace(image_shape=(32, 32, 3), num_classes=0)
  model = unet.build(config.model, info)
  assert num_params(model, 2) == 55_732_739 + (128 * 512 + 512 + 512 * 512 + 512) + 33 * (
      512 * 256 + 256)
  # s enters only through the s mapping and each block's affine_s: with those zeroed, moving s
  # moves nothing.
  small = unet.SongUNet(**{**ONE_LEVEL, "time_mapping": "per_block", "zero_init_scale": 1.0})
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  times = times_of(2, 2)
  params = small.init(jax.random.key(1), x, times, None, train=False)
  apply = lambda p, times: small.apply(p, x, times, None, train=False)
  moved = (times[0], times[1] * 0.3)
  assert float(jnp.max(jnp.abs(apply(params, moved) - apply(params, times)))) > 1e-4
  cut = jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.zeros_like(p) if "affine_s" in jax.tree_util.keystr(path) else p,
      params)
  np.testing.assert_allclose(apply(cut, moved), apply(cut, times), atol=1e-6)
  # The label joins s's embedding too (sony/ctm adds map_label to both): with t's mapping and
  # every block's affine zeroed, the label still moves the output.
  labelled = unet.SongUNet(**{**ONE_LEVEL, "time_mapping": "per_block", "zero_init_scale": 1.0,
                              "num_classes": 10})
  params = labelled.init(jax.random.key(1), x, times, jnp.zeros((2,), jnp.int32), train=False)
  t_path = jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.zeros_like(p) if any(
          key in jax.tree_util.keystr(path) for key in ("['affine']", "['map_0']")) else p,
      params)
  out = lambda labels: labelled.apply(t_path, x, times, labels, train=False)
  assert float(jnp.max(jnp.abs(out(jnp.array([1, 2])) - out(jnp.array([7, 8]))))) > 1e-4


def test_cifar10_experiments_use_the_published_networks():
  for name, preset in (("imm_cifar10", "imm_cifar10"), ("meanflow_cifar10", "meanflow_cifar10")):
    config = load_config(name)
    assert config.model.name == "unet"
    for key, value in unet.UNET_PRESETS[preset].items():
      seen = config.model[key]
      assert (tuple(seen) if isinstance(value, tuple) else seen) == value, (name, key)
    assert set(config.model.keys()) == set(models.default_config("unet").keys())
    config_lib.validate(config, 8)
