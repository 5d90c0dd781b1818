"""Tests of the SD-VAE autoencoder: the diffusers layout and weight loading, shapes, and the
'autoencoder' objective."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from safetensors import numpy as safetensors_numpy

from flowjax.data.pipeline import DataInfo
from flowjax.models import autoencoder
from flowjax.objectives import autoencoder as autoencoder_objective
from helpers import random_autoencoder_params

SD_VAE_PARAMS = 83_653_863  # diffusers AutoencoderKL of stabilityai/sd-vae-ft-ema / ft-mse
SD_VAE_TENSORS = 248
# Shapes of the published SD-VAE state dict (torch layouts).
SD_VAE_SHAPES = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down_blocks.0.downsamplers.0.conv.weight": (128, 128, 3, 3),
    "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": (256, 128, 1, 1),
    "encoder.mid_block.attentions.0.to_q.weight": (512, 512),
    "encoder.mid_block.attentions.0.group_norm.weight": (512,),
    "encoder.conv_out.weight": (8, 512, 3, 3),
    "quant_conv.weight": (8, 8, 1, 1),
    "post_quant_conv.weight": (4, 4, 1, 1),
    "decoder.conv_in.weight": (512, 4, 3, 3),
    "decoder.up_blocks.0.resnets.2.conv2.weight": (512, 512, 3, 3),
    "decoder.up_blocks.0.upsamplers.0.conv.weight": (512, 512, 3, 3),
    "decoder.up_blocks.2.resnets.0.conv_shortcut.weight": (256, 512, 1, 1),
    "decoder.up_blocks.3.resnets.0.conv_shortcut.weight": (128, 256, 1, 1),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}
TINY_IMAGE_SHAPE = (8, 8, 3)


@pytest.fixture(scope="module")
def sd_shapes():
  """The full SD-VAE parameter shapes (jax.eval_shape: nothing allocated)."""
  return autoencoder.abstract_params(autoencoder.AutoencoderKL(), (64, 64, 3))


@pytest.fixture(scope="module")
def tiny():
  """A 2-level autoencoder with random parameters (norms and biases too, so that every tensor
  of a loaded file affects the outputs) and a jitted encode + decode."""
  model = autoencoder.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1,
                                    latent_channels=4, image_channels=3, norm_groups=4)
  params = random_autoencoder_params(model, TINY_IMAGE_SHAPE)

  @jax.jit
  def encode_decode(params, x):
    mean, logvar = model.apply({"params": params}, x, method=model.encode)
    return mean, logvar, model.apply({"params": params}, mean, method=model.decode)

  x = jax.random.uniform(jax.random.key(2), (2, *TINY_IMAGE_SHAPE), minval=-1, maxval=1)
  return model, params, encode_decode, x


def test_sd_vae_has_the_published_layout(sd_shapes):
  assert sum(leaf.size for leaf in jax.tree.leaves(sd_shapes)) == SD_VAE_PARAMS
  key_map = autoencoder.diffusers_key_map(sd_shapes)
  assert len(key_map) == SD_VAE_TENSORS
  for key, shape in SD_VAE_SHAPES.items():
    assert key_map[key][1] == shape, key
  legacy = autoencoder.diffusers_key_map(sd_shapes, legacy_attention=True)
  assert legacy["decoder.mid_block.attentions.0.proj_attn.weight"][1] == (512, 512)
  assert "decoder.mid_block.attentions.0.to_out.0.weight" not in legacy
  assert len(legacy) == SD_VAE_TENSORS


def test_sd_vae_is_f8_with_4_latent_channels(sd_shapes):
  model = autoencoder.AutoencoderKL()
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  mean, logvar = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method=model.encode),
                                sd_shapes, x)
  assert mean.shape == logvar.shape == (2, 32, 32, 4)
  images = jax.eval_shape(lambda p, z: model.apply({"params": p}, z, method=model.decode),
                          sd_shapes, mean)
  assert images.shape == (2, 256, 256, 3)
  assert autoencoder.latent_shape(model, (256, 256, 3)) == (32, 32, 4)


def test_full_sd_key_set_passes_the_shape_check_and_bad_sets_are_named(sd_shapes):
  shapes = {key: shape for key, (_, shape) in autoencoder.diffusers_key_map(sd_shapes).items()}
  assert autoencoder.check_diffusers_shapes(shapes, sd_shapes) is False
  legacy = {key: shape for key, (_, shape)
            in autoencoder.diffusers_key_map(sd_shapes, legacy_attention=True).items()}
  legacy["encoder.mid_block.attentions.0.query.weight"] = (512, 512, 1, 1)  # 1x1-conv form
  assert autoencoder.check_diffusers_shapes(legacy, sd_shapes) is True

  bad = dict(shapes)
  del bad["decoder.up_blocks.1.resnets.2.norm1.weight"]
  bad["encoder.conv_in.weight"] = (128, 1, 3, 3)
  bad["encoder.extra.weight"] = (3,)
  with pytest.raises(ValueError) as error:
    autoencoder.check_diffusers_shapes(bad, sd_shapes, "vae.safetensors")
  message = str(error.value)
  assert "missing keys (1)" in message and "decoder.up_blocks.1.resnets.2.norm1.weight" in message
  assert "unexpected keys (1)" in message and "encoder.extra.weight" in message
  assert "encoder.conv_in.weight: file (128, 1, 3, 3), model (128, 3, 3, 3)" in message

  mixed = dict(shapes)
  mixed["decoder.mid_block.attentions.0.query.weight"] = (512, 512)
  with pytest.raises(ValueError, match="mixes the current"):
    autoencoder.check_diffusers_shapes(mixed, sd_shapes)


@pytest.mark.parametrize("legacy, as_folder", [(False, False), (True, True)])
def test_written_diffusers_file_loads_to_the_same_autoencoder(tiny, tmp_path, legacy, as_folder):
  model, params, encode_decode, x = tiny
  state_dict = autoencoder.to_diffusers(params, legacy_attention=legacy)
  assert all(value.dtype == np.float32 for value in state_dict.values())
  path = tmp_path / autoencoder.DIFFUSERS_FILENAME
  safetensors_numpy.save_file(state_dict, str(path))
  loaded = autoencoder.load_params(str(tmp_path if as_folder else path), model, TINY_IMAGE_SHAPE)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want)
  for got, want in zip(encode_decode(loaded, x), encode_decode(params, x)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_wrong_files_give_errors_naming_the_problem(tiny, tmp_path):
  model, params, _, _ = tiny
  state_dict = autoencoder.to_diffusers(params)
  partial = dict(state_dict)
  del partial["decoder.conv_out.bias"]
  partial["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)
  path = tmp_path / "partial.safetensors"
  safetensors_numpy.save_file(partial, str(path))
  with pytest.raises(ValueError) as error:
    autoencoder.load_params(str(path), model, TINY_IMAGE_SHAPE)
  assert "decoder.conv_out.bias" in str(error.value)
  assert "quant_conv.weight: file (8, 8, 3, 3), model (8, 8, 1, 1)" in str(error.value)

  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="could not be read as a safetensors file"):
    autoencoder.load_params(str(garbage), model, TINY_IMAGE_SHAPE)
  with pytest.raises(FileNotFoundError, match="neither a .safetensors file"):
    autoencoder.load_params(str(tmp_path), model, TINY_IMAGE_SHAPE)


def _torch_conv(x, weight, bias, stride, pad):
  """Reference cross-correlation: x [H, W, I], torch weight [O, I, kh, kw], pad ((t, b), (l, r))."""
  x = np.pad(x, (*pad, (0, 0)))
  out_channels, _, kh, kw = weight.shape
  rows = (x.shape[0] - kh) // stride + 1
  cols = (x.shape[1] - kw) // stride + 1
  out = np.zeros((rows, cols, out_channels))
  for i in range(rows):
    for j in range(cols):
      patch = x[i * stride:i * stride + kh, j * stride:j * stride + kw]  # [kh, kw, I]
      out[i, j] = np.einsum("hwi,oihw->o", patch, weight) + bias
  return out


def test_torch_layouts_convert_to_the_same_linear_maps():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 6, 3)).astype(np.float32)
  weight = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)
  bias = rng.normal(size=5).astype(np.float32)
  kernel = autoencoder.torch_to_flax(weight, (3, 3, 3, 5))
  conv = nn.Conv(5, (3, 3), padding=((1, 1), (1, 1)))
  got = conv.apply({"params": {"kernel": kernel, "bias": bias}}, x[None])[0]
  np.testing.assert_allclose(got, _torch_conv(x, weight, bias, 1, ((1, 1), (1, 1))), atol=1e-4)

  # The encoder's downsampling pads only bottom and right (diffusers F.pad(x, (0, 1, 0, 1))).
  square = rng.normal(size=(3, 3, 3, 3)).astype(np.float32)
  down = autoencoder.Resample("down")
  params = {"conv": {"kernel": autoencoder.torch_to_flax(square, (3, 3, 3, 3)), "bias": bias[:3]}}
  got = down.apply({"params": params}, x[None])[0]
  assert got.shape == (3, 3, 3)
  np.testing.assert_allclose(got, _torch_conv(x, square, bias[:3], 2, ((0, 1), (0, 1))),
                             atol=1e-4)

  linear = rng.normal(size=(4, 3)).astype(np.float32)  # torch Linear(3, 4): y = x W^T + b
  dense = nn.Dense(4)
  for stored in (linear, linear[:, :, None, None]):
    got = dense.apply({"params": {"kernel": autoencoder.torch_to_flax(stored, (3, 4)),
                                  "bias": bias[:4]}}, x[0])
    np.testing.assert_allclose(got, x[0] @ linear.T + bias[:4], atol=1e-5)


def test_gaussian_kl_matches_numerical_integration():
  z = np.linspace(-12, 12, 200001)
  for mean, logvar in ((0.0, 0.0), (1.5, -1.0), (-0.7, 0.8)):
    std = np.exp(0.5 * logvar)
    q = np.exp(-0.5 * ((z - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi))
    p = np.exp(-0.5 * z ** 2) / np.sqrt(2 * np.pi)
    integral = np.trapezoid(q * (np.log(q + 1e-300) - np.log(p)), z)
    closed_form = float(autoencoder_objective.gaussian_kl(jnp.float32(mean), jnp.float32(logvar)))
    assert closed_form == pytest.approx(integral, rel=1e-4, abs=1e-6)


def test_autoencoder_objective_trains_and_samples_images():
  """The objective's loss is the L1 reconstruction of the batch through a posterior draw plus
  1e-3 times the mean KL, by hand from the encoder and decoder with the same key (at the initial
  parameters); 15 Adam steps lower that loss on the batch with a fixed key by over 20%; samples
  decode N(0, I) latents drawn with the sampler's key."""
  config = ml_collections.ConfigDict(dict(name="autoencoder", reconstruction="l1",
                                          kl_weight=1e-3))
  model_config = ml_collections.ConfigDict(dict(
      block_out_channels=(8, 8), layers_per_block=1, latent_channels=2, norm_groups=4,
      mid_attention=False, scaling_factor=1.0, dtype="float32", param_dtype="float32"))
  info = DataInfo(image_shape=(8, 8, 1), num_classes=0, num_examples=None)
  model = autoencoder.build(model_config, info)
  objective = autoencoder_objective.Autoencoder.build(config, model, info)
  assert objective.latent_shape == (4, 4, 2)
  images = jnp.tanh(jax.random.normal(jax.random.key(0), (16, 8, 8, 1)))
  batch = {"image": images}
  boxed, extra = jax.eval_shape(objective.init, jax.random.key(1), batch)
  params = random_autoencoder_params(model, info.image_shape)
  assert jax.tree.structure(nn.meta.unbox(boxed)) == jax.tree.structure(params)
  assert extra == {}
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state, rng):
    (loss, metrics), grads = jax.value_and_grad(objective.loss, has_aux=True)(
        params, batch, rng, 0, {})
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss, metrics

  @jax.jit
  def by_hand(params, rng):
    """(loss, reconstruction error) of the batch with posterior draws from `rng`, and 5 images
    decoded from N(0, I) latents drawn with `rng`."""
    decode = lambda z: model.apply({"params": params}, z, method=model.decode)
    mean, logvar = model.apply({"params": params}, images, method=model.encode)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    rec = jnp.mean(jnp.abs(decode(z) - images))
    kl = jnp.mean(0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar))
    return rec + 1e-3 * kl, rec, decode(jax.random.normal(rng, (5, 4, 4, 2)))

  opt_state = tx.init(params)
  before, rec_before, _ = by_hand(params, jax.random.key(0))
  for i in range(15):
    params, opt_state, loss, metrics = step(params, opt_state, jax.random.key(i))
    if i == 0:
      np.testing.assert_allclose(loss, before, rtol=1e-5)
      np.testing.assert_allclose(metrics["reconstruction"], rec_before, rtol=1e-5)
    assert loss == pytest.approx(float(metrics["reconstruction"] + 1e-3 * metrics["kl"]),
                                 rel=1e-5)
  after, _, expected = by_hand(params, jax.random.key(0))
  assert after < 0.8 * before, (before, after)
  sample = jax.jit(lambda params, rng: objective.sample(params, rng, 5, None, num_steps=1))
  samples = sample(params, jax.random.key(0))
  assert samples.shape == (5, 8, 8, 1)
  np.testing.assert_allclose(samples, expected, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="reconstruction"):
    autoencoder_objective.Autoencoder.build(
        ml_collections.ConfigDict(dict(reconstruction="l3", kl_weight=0.0)), model, info)
  with pytest.raises(ValueError, match="norm_groups=4 must divide"):
    autoencoder.build(ml_collections.ConfigDict(dict(model_config, block_out_channels=(6, 8))),
                      info)
