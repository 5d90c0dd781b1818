"""STARFlow's text conditioning (apple/ml-starflow's text-to-image model): text-encoder features
as a prefix of the deep block, and the 3B configuration's parameter count and FSDP layout."""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowjax import config as config_lib, sharding
from flowjax.models import tarflow


def text_model(**overrides):
  settings = dict(tarflow.STARFLOW_OPTIONS, image_shape=(4, 4, 2), patch_size=1, hidden_size=48,
                  num_heads=2, num_blocks=3, layers_per_block=1, deep_layers=2, order="l2r",
                  text_dim=5, text_length=3)
  settings.update(overrides)
  return tarflow.TarFlow(**settings)


def perturbed_params(model, x, text):
  params = nn.meta.unbox(model.init(jax.random.key(0), x, text)["params"])
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return treedef.unflatten([leaf + 0.1 * jax.random.normal(k, leaf.shape)
                            for leaf, k in zip(leaves, keys)])


def test_the_deep_block_alone_reads_the_caption_through_one_projection():
  """Only the last (deep) block has `text_proj` [text_dim, width] with a bias; the shallow blocks'
  outputs do not depend on the caption and the deep block's do; the deep block's cache holds the
  text tokens before the image tokens."""
  model = text_model()
  x = jax.random.normal(jax.random.key(2), (2, 4, 4, 2))
  text = jax.random.normal(jax.random.key(3), (2, 3, 5))
  params = perturbed_params(model, x, text)
  assert "text_proj" in params["blocks_2"]
  assert params["blocks_2"]["text_proj"]["kernel"].shape == (5, 48)
  assert params["blocks_2"]["text_proj"]["bias"].shape == (48,)
  assert not any("text_proj" in params[f"blocks_{i}"] for i in range(2))
  forward = jax.jit(lambda t: model.apply({"params": params}, x, t))
  z, _, inner = forward(text)
  z_other, _, inner_other = forward(text[::-1])
  for a, b in zip(inner, inner_other):
    np.testing.assert_array_equal(a, b)
  assert float(jnp.max(jnp.abs(z - z_other))) > 1e-3
  assert [model.block_prefix(i) for i in range(3)] == [0, 0, 3]
  assert model.init_cache(2, 2)[0][0].shape == (2, 16 + 3, 2, 24)
  with pytest.raises(ValueError, match=r"text features of shape \[B, 3, 5\]"):
    model.apply({"params": params}, x, text[:, :2])


def test_text_tokens_take_the_third_rope_coordinate():
  """Text token k sits at (0, 0, k / T * H) (ml-starflow's misc/pe.py), image token (i, j) at
  (i, j, 0): the last 8 rotary frequencies of each head carry the third coordinate."""
  angles = tarflow.rope_angles((4, 4), 24, 3, True)
  assert angles.shape == (3 + 16, 24)
  frequencies = 1.0 / 10000.0 ** (np.arange(8) / 8)
  for k in range(3):
    np.testing.assert_allclose(angles[k, -16:], np.repeat(k / 3 * 4 * frequencies, 2), rtol=1e-6)
    np.testing.assert_array_equal(angles[k, :-16], 0.0)
  np.testing.assert_array_equal(angles[3:, -16:], 0.0)


def test_text_and_class_labels_are_refused_together_and_the_sizes_checked():
  from flowjax import models
  config = models.default_config("tarflow")
  config.update(dict(positions="rope", label_input="token", hidden_size=48, num_heads=2,
                     text_dim=5, text_length=3))
  info = lambda classes: type("Info", (), dict(image_shape=(4, 4, 2), num_classes=classes))()
  with pytest.raises(ValueError, match="reads captions"):
    models.build(config, info(10))
  config.text_length = 0
  with pytest.raises(ValueError, match="both 0"):
    models.build(config, info(0))


def test_the_3b_text_to_image_configuration_has_the_official_parameter_count():
  """apple/ml-starflow's starflow_3B_t2i_256x256: 3,858,281,544 parameters (34 layers of
  12 D^2 + 13 D, 43,020 per block, the 2048 -> 3072 text projection), every large kernel sharded
  over fsdp on a 2 x 4 (data x fsdp) mesh of 8 devices: 3.86 GB of float32 parameters per
  device, 11.6 GB with Adam's two moments."""
  model = tarflow.TarFlow(**tarflow.STARFLOW_3B_T2I)
  x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
  text = jax.ShapeDtypeStruct((1, 128, 2048), jnp.float32)
  boxed = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t)["params"], x, text)
  params = nn.meta.unbox(boxed)
  total = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  assert total == 3_858_281_544
  width = 3072
  assert total == 34 * (12 * width**2 + 13 * width) + 6 * 43_020 + 2048 * width + width
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1)),
                            jax.devices()[:8])
  shardings = sharding.tree_shardings(boxed, mesh,
                                      sharding.rules(config_lib.base_config().sharding))
  kernels = [(p, s) for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings))
             if math.prod(p.shape) >= 2**20]
  assert len(kernels) >= 34 * 4 + 1
  per_device = 0
  for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    per_device += math.prod(s.shard_shape(p.shape))
  for p, s in kernels:
    assert "fsdp" in jax.tree.leaves(tuple(s.spec)), (p.shape, s.spec)
  assert per_device * 4 < 1.01 * total * 4 / 4 + 50e6  # parameters split 4 ways (fsdp)


T2I_PRESET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "experiments", "starflow_t2i_3b.py")


def t2i_preset(**overrides):
  """experiments/starflow_t2i_3b.py on synthetic latents and caption features of its shapes
  (its latent cache is not prepared in tests), on a 2 x 4 (data x fsdp) mesh of 8 devices."""
  return config_lib.load_experiment(
      T2I_PRESET, None, **{"data.name": "synthetic", "mesh.data": 2, "mesh.fsdp": 4, **overrides})


def test_the_3b_preset_builds_the_official_network_sharded_over_fsdp():
  """The preset's trainer state (nothing allocated): the official parameter count, the caption
  features as the batch's 'text' [B, 128, 2048], every large kernel and its Adam moments split
  over fsdp."""
  from flowjax import train
  config = t2i_preset()
  setup = train.build(config)
  params = setup.abstract_state.params
  assert sum(math.prod(p.shape) for p in jax.tree.leaves(params)) == 3_858_281_544
  assert setup.info.text.shape == (128, 2048) and setup.objective.null_text.shape == (128, 2048)
  assert not setup.objective.null_text.any()  # synthetic: the zero null caption
  for leaf in jax.tree.leaves(setup.abstract_state.opt_state):
    if getattr(leaf, "size", 0) >= 2**20:
      assert math.prod(leaf.sharding.shard_shape(leaf.shape)) * 4 == leaf.size
  with pytest.raises(config_lib.ConfigError, match="latents:DIR"):
    train.build(config_lib.load_experiment(T2I_PRESET))  # no stand-in data by default


@pytest.mark.slow
def test_the_3b_preset_dry_run_compiles():
  """python -m pytest -m slow tests/test_starflow_text.py: the full 3B train step (batch 1024)
  compiled from abstract shapes on 8 CPU devices, as --config.train.dry_run=True does."""
  from flowjax import train
  compiled, _, memory = train.compile_step(train.build(t2i_preset()))
  assert compiled is not None
  print(memory)
