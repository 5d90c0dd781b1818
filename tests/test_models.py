"""Backbone properties: shapes, adaLN-Zero init, partitioning names, JVP, labels, remat."""

import functools
import math
import re
import types
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowjax import models
from flowjax.models import dit
from flowjax.models import layers

BATCH = 3
NUM_CLASSES = 5


def make_info(image_shape, num_classes=0):
  return types.SimpleNamespace(image_shape=tuple(image_shape), num_classes=num_classes)


def dit_config(**overrides):
  config = dict(name="dit", patch_size=2, hidden_size=32, depth=1, num_heads=2, mlp_ratio=2.0,
                time_scale=1000.0, dropout=0.0, attention_impl="xla", remat="none",
                dtype="float32", param_dtype="float32")
  config.update(overrides)
  return ml_collections.ConfigDict(config)


def mlp_config(**overrides):
  config = dict(name="mlp", hidden_size=32, depth=2, time_scale=1000.0, dropout=0.0,
                dtype="float32", param_dtype="float32")
  config.update(overrides)
  return ml_collections.ConfigDict(config)


def inputs(image_shape, num_times=1, num_classes=0, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(keys[0], (BATCH, *image_shape))
  times = tuple(jax.random.uniform(keys[1 + i], (BATCH,)) for i in range(num_times))
  cond = (jax.random.randint(keys[4], (BATCH,), 0, num_classes + 1)
          if num_classes else None)
  return x, times, cond


@functools.partial(jax.jit, static_argnames=("model", "seed"))
def init(model, x, times, cond, seed=0):
  return model.init(jax.random.key(seed), x, times, cond, train=False)


@functools.partial(jax.jit, static_argnames=("model", "train"))
def apply(model, variables, x, times, cond, train=False, rngs=None):
  return model.apply(variables, x, times, cond, train=train, rngs=rngs)


def random_variables(model, x, times, cond, seed=1, scale=0.05):
  """Random parameters with the structure (boxes, dtypes) of model.init, without compiling init.

  Every leaf is nonzero, so the zero-initialised adaLN / FiLM layers are active.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, times, cond, train=False))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: (scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype),
                      shapes)


def boxed_leaves(variables):
  return jax.tree.leaves(variables, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))


@pytest.mark.parametrize("num_times,num_classes", [(1, 0), (2, NUM_CLASSES), (3, NUM_CLASSES)])
def test_mlp_output_shape(num_times, num_classes):
  model = models.build(mlp_config(), make_info((2,), num_classes))
  x, times, cond = inputs((2,), num_times, num_classes)
  variables = init(model, x, times, cond)
  out = apply(model, variables, x, times, cond, train=False)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))


@pytest.mark.parametrize("image_shape,num_times,num_classes", [
    ((8, 8, 1), 1, 0),
    ((8, 8, 4), 2, NUM_CLASSES),
    ((8, 8, 1), 3, NUM_CLASSES),
    ((8, 4, 4), 3, 0),
])
def test_dit_output_shape(image_shape, num_times, num_classes):
  model = models.build(dit_config(), make_info(image_shape, num_classes))
  x, times, cond = inputs(image_shape, num_times, num_classes)
  variables = random_variables(model, x, times, cond)
  out = apply(model, variables, x, times, cond, train=False)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))
  assert [k for k in variables["params"] if k.startswith("time_embed")] == [
      f"time_embed_{i}" for i in range(num_times)]


@pytest.mark.parametrize("config_fn,image_shape,param_dtype", [
    (dit_config, (8, 8, 4), "bfloat16"), (mlp_config, (2,), "float32")])
def test_bfloat16_compute_gives_float32_output(config_fn, image_shape, param_dtype):
  model = models.build(config_fn(dtype="bfloat16", param_dtype=param_dtype),
                       make_info(image_shape, NUM_CLASSES))
  x, times, cond = inputs(image_shape, 2, NUM_CLASSES)
  variables = random_variables(model, x, times, cond)
  out = apply(model, variables, x, times, cond, train=False)
  assert out.dtype == jnp.float32 and out.shape == x.shape
  assert np.all(np.isfinite(out)) and np.any(out != 0)
  leaf_dtypes = {leaf.dtype for leaf in jax.tree.leaves(variables)}
  assert leaf_dtypes == {jnp.dtype(layers.DTYPES[param_dtype])}


def test_dit_output_is_zero_at_init():
  """adaLN-Zero: the final linear layer and every modulation start at zero."""
  model = models.build(dit_config(depth=2), make_info((8, 8, 4), NUM_CLASSES))
  x, times, cond = inputs((8, 8, 4), 2, NUM_CLASSES)
  out = apply(model, init(model, x, times, cond), x, times, cond)
  np.testing.assert_array_equal(out, np.zeros_like(out))


@pytest.mark.parametrize("config_fn,image_shape", [(dit_config, (8, 8, 4)), (mlp_config, (2,))])
def test_every_param_is_logically_partitioned(config_fn, image_shape):
  model = models.build(config_fn(), make_info(image_shape, NUM_CLASSES))
  x, times, cond = inputs(image_shape, 3, NUM_CLASSES)
  variables = jax.eval_shape(lambda: init(model, x, times, cond))
  assert set(variables) == {"params"}
  leaves = boxed_leaves(variables)
  assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
  vocabulary = set(layers.LOGICAL_AXES) | {None}
  for leaf in leaves:
    assert set(leaf.names) <= vocabulary, leaf.names
    assert len(leaf.names) == len(leaf.value.shape), (leaf.names, leaf.value.shape)
  specs = nn.get_partition_spec(variables)
  assert len(jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
             ) == len(leaves)


def test_dit_jvp_matches_finite_differences():
  """Forward-mode JVP through the 'xla' attention path, as MeanFlow-style objectives need."""
  # A moderate time_scale keeps the float32 central difference in t accurate; the code
  # path is the same for any scale.
  model = models.build(dit_config(depth=2, time_scale=10.0), make_info((8, 8, 1), NUM_CLASSES))
  x, (t, s), cond = inputs((8, 8, 1), 2, NUM_CLASSES)
  variables = random_variables(model, x, (t, s), cond, scale=0.1)
  f = jax.jit(lambda x, t: model.apply(variables, x, (t, s), cond, train=False))

  keys = jax.random.split(jax.random.key(7), 2)
  x_dot = jax.random.normal(keys[0], x.shape)
  t_dot = jax.random.normal(keys[1], t.shape)
  out, out_dot = jax.jit(lambda x, t: jax.jvp(f, (x, t), (x_dot, t_dot)))(x, t)
  np.testing.assert_allclose(out, f(x, t), rtol=1e-5, atol=1e-6)
  _, t_part = jax.jit(lambda x, t: jax.jvp(f, (x, t), (jnp.zeros_like(x), t_dot)))(x, t)
  assert np.linalg.norm(t_part) > 0.1 * np.linalg.norm(out_dot)

  eps = 3e-3
  finite_difference = (f(x + eps * x_dot, t + eps * t_dot)
                       - f(x - eps * x_dot, t - eps * t_dot)) / (2 * eps)
  relative_error = np.linalg.norm(out_dot - finite_difference) / np.linalg.norm(out_dot)
  assert relative_error < 1e-3, relative_error


def test_null_label_equals_missing_labels():
  model = models.build(dit_config(), make_info((8, 8, 1), NUM_CLASSES))
  x, times, _ = inputs((8, 8, 1), 1, NUM_CLASSES)
  null = jnp.full((BATCH,), NUM_CLASSES, jnp.int32)
  variables = random_variables(model, x, times, null)
  out_none = apply(model, variables, x, times, None, train=False)
  out_null = apply(model, variables, x, times, null, train=False)
  np.testing.assert_array_equal(out_none, out_null)
  table = variables["params"]["label_embed"]["table"]["embedding"].value
  assert table.shape[0] == NUM_CLASSES + 1


@pytest.mark.parametrize("config_fn,image_shape", [(dit_config, (8, 8, 1)), (mlp_config, (2,))])
def test_output_depends_on_label(config_fn, image_shape):
  model = models.build(config_fn(), make_info(image_shape, NUM_CLASSES))
  x, times, _ = inputs(image_shape, 1, NUM_CLASSES)
  labels_a = jnp.array([0, 1, 2], jnp.int32)
  labels_b = jnp.array([3, 4, 2], jnp.int32)
  variables = random_variables(model, x, times, labels_a, scale=0.3)
  out_a = apply(model, variables, x, times, labels_a, train=False)
  out_b = apply(model, variables, x, times, labels_b, train=False)
  assert np.all(np.abs(out_a[:2] - out_b[:2]) .max(axis=tuple(range(1, x.ndim))) > 1e-4)
  np.testing.assert_array_equal(out_a[2], out_b[2])


@pytest.mark.parametrize("config_fn,image_shape", [(dit_config, (8, 8, 1)), (mlp_config, (2,))])
def test_unconditional_model_rejects_labels(config_fn, image_shape):
  model = models.build(config_fn(), make_info(image_shape, 0))
  x, times, _ = inputs(image_shape, 1)
  with pytest.raises(ValueError, match="unconditional"):
    init(model, x, times, jnp.zeros((BATCH,), jnp.int32))


def test_output_depends_on_every_time_input():
  model = models.build(mlp_config(), make_info((2,), 0))
  x, (t, s), _ = inputs((2,), 2)
  variables = random_variables(model, x, (t, s), None)
  out = apply(model, variables, x, (t, s), None, train=False)
  assert np.all(np.abs(out - apply(model, variables, x, (t, 1 - s), None, train=False)) > 0)
  assert np.all(np.abs(out - apply(model, variables, x, (1 - t, s), None, train=False)) > 0)


def test_remat_matches_plain_forward_and_gradient():
  info = make_info((8, 8, 4), NUM_CLASSES)
  x, times, cond = inputs((8, 8, 4), 2, NUM_CLASSES)

  @functools.partial(jax.jit, static_argnums=1)
  def value_and_grad(variables, model):
    loss = lambda v: jnp.mean(model.apply(v, x, times, cond, train=False) ** 2)
    return jax.value_and_grad(loss)(variables)

  plain = models.build(dit_config(depth=2), info)
  variables = random_variables(plain, x, times, cond)
  value_plain, grad_plain = value_and_grad(variables, plain)
  for remat in ("full", "dots"):
    rematted = models.build(dit_config(depth=2, remat=remat), info)
    assert jax.tree.structure(variables) == jax.tree.structure(
        jax.eval_shape(lambda: init(rematted, x, times, cond)))
    value_remat, grad_remat = value_and_grad(variables, rematted)
    np.testing.assert_allclose(value_remat, value_plain, rtol=1e-6)
    for g_remat, g_plain in zip(jax.tree.leaves(grad_remat), jax.tree.leaves(grad_plain)):
      np.testing.assert_allclose(g_remat, g_plain, rtol=1e-5, atol=1e-7)


def test_dropout_only_in_training():
  model = models.build(dit_config(dropout=0.5), make_info((8, 8, 1), 0))
  x, times, _ = inputs((8, 8, 1), 1)
  variables = random_variables(model, x, times, None)
  eval_a = apply(model, variables, x, times, None, train=False)
  eval_b = apply(model, variables, x, times, None, train=False)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_out = apply(model, variables, x, times, None, train=True,
                    rngs={"dropout": jax.random.key(3)})
  assert np.any(np.abs(train_out - eval_a) > 1e-4)


def test_patch_size_must_divide_image():
  model = models.build(dit_config(patch_size=3), make_info((8, 8, 1), 0))
  x, times, _ = inputs((8, 8, 1), 1)
  with pytest.raises(ValueError, match="patch_size=3"):
    init(model, x, times, None)


def test_bad_times_and_unknown_model_are_clear_errors():
  model = models.build(mlp_config(), make_info((2,), 0))
  x, (t,), _ = inputs((2,), 1)
  with pytest.raises(ValueError, match="tuple of 1 to 5"):
    init(model, x, t, None)
  with pytest.raises(ValueError, match="tuple of 1 to 5"):
    init(model, x, (t,) * 6, None)
  with pytest.raises(KeyError, match="Did you mean 'dit'"):
    models.build(dit_config(name="ditt"), make_info((8, 8, 1), 0))


def test_dit_xl2_param_count():
  """DiT-XL/2 on 32x32x4 latents with 1000 classes, counted from shapes only.

  The paper's 675M includes learned sigma (8 output channels); ours predicts 4.
  """
  depth, width, heads, patch, channels, classes = 28, 1152, 16, 2, 4, 1000
  config = dit_config(**dit.DIT_PRESETS["XL/2"])
  assert (config.depth, config.hidden_size, config.num_heads, config.patch_size) == (
      depth, width, heads, patch)
  config.mlp_ratio = 4.0
  model = models.build(config, make_info((32, 32, channels), classes))
  x, times, cond = inputs((32, 32, channels), 1, classes)
  shapes = jax.eval_shape(lambda: init(model, x, times, cond))
  count = sum(math.prod(leaf.value.shape) for leaf in boxed_leaves(shapes))

  dense_params = lambda fan_in, fan_out: fan_in * fan_out + fan_out
  patch_embed = dense_params(patch * patch * channels, width)
  time_embed = dense_params(256, width) + dense_params(width, width)
  label_embed = (classes + 1) * width
  block = (3 * dense_params(width, width) + dense_params(width, width)
           + dense_params(width, 4 * width) + dense_params(4 * width, width)
           + dense_params(width, 6 * width))
  final = dense_params(width, 2 * width) + dense_params(width, patch * patch * channels)
  expected = patch_embed + time_embed + label_embed + depth * block + final
  assert expected == 674_816_272
  assert count == expected


# Dropout masks: flowjax's threefry hash (one elementwise program) against jax.random's.

@pytest.mark.parametrize("shape", [(1,), (7,), (3, 1, 7), (2, 3, 4, 5, 6), (16, 32, 32, 8)])
@pytest.mark.parametrize("typed", [True, False])
def test_threefry_bits_and_bernoulli_equal_jax_random(shape, typed):
  for seed in (0, 1, 2**31 + 5):
    key = jax.random.key(seed) if typed else jax.random.PRNGKey(seed)
    bits = jax.jit(lambda k: layers.threefry_bits(k, shape))(key)
    np.testing.assert_array_equal(bits, jax.random.bits(key, shape, jnp.uint32))
    for p in (0.1, 0.5, 0.8, 0.87):
      np.testing.assert_array_equal(jax.jit(lambda k: layers.bernoulli(k, p, shape))(key),
                                    jax.random.bernoulli(key, p, shape))


class _Dropouts(nn.Module):
  """Two auto-named dropout layers (one broadcasting over axis 1), then a sum."""
  layer: type
  rate: float

  @nn.compact
  def __call__(self, x, train):
    h = self.layer(self.rate, deterministic=not train)(x)
    return h + 2.0 * self.layer(self.rate, broadcast_dims=(1,), deterministic=not train)(x ** 2)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 1.0])
def test_dropout_equals_flax_dropout_masks_and_gradients(rate):
  x = jax.random.normal(jax.random.key(0), (4, 6, 5, 3))

  def run(layer, train, key):
    f = lambda x: _Dropouts(layer, rate).apply({}, x, train, rngs={"dropout": key}).sum()
    return jax.jit(jax.value_and_grad(f))(x)

  for train in (True, False):
    for key in (jax.random.key(3), jax.random.PRNGKey(5), jax.random.key(4, impl="rbg")):
      ours, flax_ = run(layers.Dropout, train, key), run(nn.Dropout, train, key)
      for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(flax_)):
        np.testing.assert_array_equal(a, b)


def test_threefry_bits_defers_to_jax_where_its_layout_differs():
  assert layers.threefry_bits(jax.random.key(0, impl="rbg"), (4,)) is None
  assert layers.threefry_bits(jax.random.key(0), (2**16, 2**16)) is None  # 2^32 counters
  assert layers.threefry_bits(jax.random.split(jax.random.key(0), 3), (4, 2)) is None  # batched
  assert layers.threefry_bits(jnp.zeros((3, 2), jnp.uint32), (4, 2)) is None
  with jax.enable_x64(True):  # jax.random then draws float64 uniforms for a Python-float p
    key = jax.random.key(2)
    np.testing.assert_array_equal(layers.bernoulli(key, 0.7, (64, 5)),
                                  jax.random.bernoulli(key, 0.7, (64, 5)))
  jax.config.update("jax_threefry_partitionable", False)
  try:
    key = jax.random.key(1)
    assert layers.threefry_bits(key, (4, 5)) is None
    np.testing.assert_array_equal(layers.bernoulli(key, 0.7, (4, 5)),
                                  jax.random.bernoulli(key, 0.7, (4, 5)))
  finally:
    jax.config.update("jax_threefry_partitionable", True)


def test_sharded_dropout_mask_equals_the_unsharded_one():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, None, "model"))
  x = jax.device_put(jnp.ones((8, 4, 4, 6)), spec)
  key = jax.random.key(5)
  out = jax.jit(lambda x: layers.Dropout(0.3, deterministic=False).apply(
      {}, x, rngs={"dropout": key}), out_shardings=spec)(x)
  np.testing.assert_array_equal(out, nn.Dropout(0.3, deterministic=False).apply(
      {}, jnp.ones((8, 4, 4, 6)), rngs={"dropout": key}))


@pytest.mark.parametrize("config_fn, shape", [
    (lambda: dit_config(dropout=0.3), (8, 8, 1)),
    (lambda: mlp_config(dropout=0.3), (2,)),
    (lambda: ml_collections.ConfigDict(dict(
        name="unet", model_channels=8, channel_mult=(1,), num_blocks=1, attn_resolutions=(),
        dropout=0.3, time_scale=1000.0, attention_impl="xla")), (8, 8, 1))])
def test_train_step_draws_dropout_masks_without_loops(config_fn, shape):
  """XLA:CPU lowers jax.random's threefry as a loop over whole arrays (a slow dropout mask);
  every dropout layer of the backbones draws its mask as one elementwise program instead."""
  model = models.build(config_fn(), make_info(shape, 0))
  x, times, _ = inputs(shape, 1)
  variables = random_variables(model, x, times, None)

  def loss(v):
    return apply(model, v, x, times, None, train=True, rngs={"dropout": jax.random.key(3)}).sum()

  def mask_loops():
    jax.clear_caches()  # traces of the backbones' blocks are cached across jits
    hlo = jax.jit(jax.grad(loss)).lower(variables).compile().as_text()
    return [line for line in hlo.splitlines()
            if " while(" in line and re.search(r"u32\[\d+,\d+", line)]

  assert not mask_loops()
  # The check sees flax's masks: with jax.random's bernoulli the loops are there.
  with mock.patch.object(layers, "bernoulli", jax.random.bernoulli):
    assert mask_loops()
