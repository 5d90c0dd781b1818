"""Official networks, weight for weight: a checkpoint written by the official code, loaded through
flowjax's own loader, gives the official outputs (1e-5 of each output's largest value, float32).

Fixtures in tests/reference/ were produced by running the official code at tiny sizes:
- sdvae_tiny: diffusers 0.42.1 `AutoencoderKL(block_out_channels=[8, 16], layers_per_block=1,
  latent_channels=4, norm_num_groups=4)` in eval mode; `.safetensors` is the file its
  `save_pretrained` wrote, `.config.json` its config, `.npz` its inputs and outputs (NCHW).
- meanflow_jax_dit: Gsunshine/meanflow (JAX) `models_dit.DiT` (8x8x4 input, patch 2, width 64,
  depth 2, 2 heads, 10 classes) inside `MeanFlow`, every parameter moved off its initial value;
  `.params.npz` its flat parameters, `.npz` its inputs and outputs (NHWC): u(x, t, h, y), u with
  h = 0, and the one-step sample z0 = z1 - u(z1, 1, 1, y).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowjax.models import autoencoder, dit
from flowjax.samplers import mean_flow

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")
RTOL = 1e-5


def nhwc(x):
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def assert_matches(got_nhwc, want_nchw, name):
  got = np.asarray(got_nhwc).transpose(0, 3, 1, 2)
  want = np.asarray(want_nchw)
  assert got.shape == want.shape, name
  error = np.abs(got - want).max()
  assert error <= RTOL * np.abs(want).max(), f"{name}: max error {error:.3g}"


@pytest.fixture(scope="module")
def sdvae():
  with open(os.path.join(REFERENCE, "sdvae_tiny.config.json")) as f:
    config = json.load(f)
  model = autoencoder.AutoencoderKL(
      block_out_channels=tuple(config["block_out_channels"]),
      layers_per_block=config["layers_per_block"], latent_channels=config["latent_channels"],
      image_channels=config["in_channels"], norm_groups=config["norm_num_groups"],
      mid_attention=config["mid_block_add_attention"])
  size = config["sample_size"]
  params = autoencoder.load_params(os.path.join(REFERENCE, "sdvae_tiny.safetensors"), model,
                                   (size, size, config["in_channels"]))
  return model, params, np.load(os.path.join(REFERENCE, "sdvae_tiny.npz"))


def test_sdvae_encoder_and_posterior_match_diffusers(sdvae):
  model, params, ref = sdvae
  x = nhwc(ref["x"])
  apply = lambda method: model.apply({"params": params}, x, method=method)
  encoder_out = apply(lambda m, x: m.encoder(x))
  assert_matches(encoder_out, ref["encoder_out"], "encoder_out")
  moments = apply(lambda m, x: m.quant_conv(m.encoder(x)))  # logvar not yet clamped
  assert_matches(moments, ref["moments"], "moments")
  mean, logvar = apply(lambda m, x: m.encode(x))
  assert_matches(mean, ref["posterior_mean"], "posterior_mean")
  assert_matches(logvar, ref["posterior_logvar"], "posterior_logvar")
  std = jnp.exp(0.5 * logvar)
  assert_matches(std, ref["posterior_std"], "posterior_std")
  assert_matches(mean + std * nhwc(ref["posterior_eps"]), ref["posterior_sample"],
                 "posterior_sample")


def test_sdvae_decoder_and_reconstruction_match_diffusers(sdvae):
  model, params, ref = sdvae
  decoded = model.apply({"params": params}, nhwc(ref["latent"]), method=model.decode)
  assert_matches(decoded, ref["decoded"], "decoded")
  reconstruction, _, _ = model.apply({"params": params}, nhwc(ref["x"]))
  assert_matches(reconstruction, ref["recon_from_mean"], "recon_from_mean")


@pytest.fixture(scope="module")
def meanflow_dit():
  model = dit.DiT(patch_size=2, hidden_size=64, depth=2, num_heads=2, mlp_ratio=4.0,
                  num_classes=10, time_scale=1.0)
  flat = dict(np.load(os.path.join(REFERENCE, "meanflow_jax_dit.params.npz")))
  params = dit.from_meanflow_jax(flat, depth=2)
  return model, params, np.load(os.path.join(REFERENCE, "meanflow_jax_dit.npz"))


def assert_close_nhwc(got, want, name):
  want = np.asarray(want)
  error = np.abs(np.asarray(got) - want).max()
  assert error <= RTOL * np.abs(want).max(), f"{name}: max error {error:.3g}"


def test_meanflow_jax_dit_average_velocity_and_one_step_sample(meanflow_dit):
  model, params, ref = meanflow_dit
  y = jnp.asarray(ref["y"])
  u = lambda z, t, h: model.apply({"params": params}, z, (t, h), y, train=False)
  t, h = jnp.asarray(ref["t"]), jnp.asarray(ref["h"])
  assert_close_nhwc(u(jnp.asarray(ref["x"]), t, h), ref["u"], "u")
  assert_close_nhwc(u(jnp.asarray(ref["x"]), t, jnp.zeros_like(h)), ref["v_h0"], "v_h0")
  z0 = mean_flow.solve(u, jnp.asarray(ref["sample_z1"]), num_steps=1)
  assert_close_nhwc(z0, ref["sample_z0"], "sample_z0")


def test_meanflow_jax_checkpoint_with_a_missing_key_is_named():
  flat = dict(np.load(os.path.join(REFERENCE, "meanflow_jax_dit.params.npz")))
  del flat["params/net/h_embedder/mlp/layers_2/_flax_linear/bias"]
  with pytest.raises(KeyError, match="h_embedder/mlp/layers_2/_flax_linear/bias"):
    dit.from_meanflow_jax(flat, depth=2)
