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
- starflow_tiny_{l2r,r2l,l2r_uncond}: apple/ml-starflow `transformer_flow.Model(in_channels=3,
  img_size=8, patch_size=2, channels=64, num_blocks=3, layers_per_block=[1, 1, 2], head_dim=32,
  rope=1, sos=1, use_softplus=1, use_final_norm=1, soft_clip=4, seq_order=L2R|R2L, txt_size=1,
  txt_dim=11, cond_top_only=1)` (the class label a one-token one-hot "caption", 10 = null; the
  `_uncond` model has no text), every parameter moved off its initial value; `.safetensors` its
  state dict (l2r and r2l share the weights), `.npz` its inputs and outputs (NCHW): z, each
  block's output and elementwise log-determinant, the loss, the RoPE angles, reverse sampling
  without and with guidance (w = 2), with the null label, Jacobi decoding (the official
  defaults, a truncated run and a run to exactness) and one self-denoising step.
- tarflow_tiny: apple/ml-tarflow `transformer_flow.Model(in_channels=3, img_size=8, patch_size=2,
  channels=128, num_blocks=2, layers_per_block=1, nvp=True, num_classes=10)`, every parameter
  moved off its initial value; `.npz` (token layout (c, p, p) per patch): z, per-block outputs
  and log-determinants, the loss, a dropped label (-1) and no labels (the class mean), reverse
  sampling without guidance, with guidance 2 (plain, annealed, annealed with attention
  temperature 0.5 on the unconditional pass, shift only), without labels, and one
  self-denoising step.
- imm_songunet, imm_dit: lumalabs/imm `IMMPrecond` with a tiny SongUNet (16x16x3, width 16,
  levels (1, 2), attention at 8x8, 10 classes, s embedded as itself) and a tiny DiT (8x8x4,
  patch 2, width 64, depth 2, s embedded as the stride t - s), every parameter moved off its
  initial value (the DiT's fixed position table kept): the raw network output, without labels
  and without the s branch, the preconditioned step f(x, t, s) for simple_edm and euler_fm, and
  the official pushforward sampler's 1- and 2-step samples with and without guidance 1.5.
- meanflow_songunet: Gsunshine/py-meanflow `SongUNet` (16x16x3, width 16, levels (1, 2), FIR
  filter, 2x-wide time embeddings of t and h = t - r, EDM augmentation input of 6), every
  parameter moved off its initial value: u(z, (t, h)) with zero, absent and random augmentation
  labels, the training JVP du/dt along (v, 1, 0), and the one-step sample z0 = z1 - u(z1, 1, 1).
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowjax import convert, modes, train
from flowjax.models import autoencoder, tarflow
from flowjax.samplers import autoregressive, mean_flow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "tests", "reference")
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
  model = autoencoder.from_diffusers_config(config)
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


def test_sdvae_converts_into_a_workdir_the_latent_cache_reads(sdvae, tmp_path):
  """python -m flowjax.convert --format=sdvae: the workdir's parameters (what cache_latents and
  the latent experiments load) are the loader's, leaf for leaf."""
  model, params, _ = sdvae
  config = experiment_config("sdvae_imagenet", "tiny")
  with config.unlocked():
    config.model.update(dict(block_out_channels=model.block_out_channels, layers_per_block=1,
                             latent_channels=4, norm_groups=4))
    config.data.image_size = 16
  workdir = str(tmp_path / "sdvae")
  convert.convert(config, os.path.join(REFERENCE, "sdvae_tiny.safetensors"), "sdvae", workdir)
  restored = autoencoder.load_params(workdir, model, (16, 16, 3))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, want), got in zip(flat, jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want),
                                  err_msg=jax.tree_util.keystr(path))


def meanflow_imagenet_tiny():
  """meanflow_imagenet's architecture at the fixture's size (8x8x4, patch 2, width 64)."""
  config = experiment_config("meanflow_imagenet", "tiny")
  with config.unlocked():
    config.model.update(dict(patch_size=2, hidden_size=64, depth=2, num_heads=2))
    config.data.update(dict(image_size=8, channels=4, num_classes=10))
  return config


@pytest.fixture(scope="module")
def meanflow_dit(tmp_path_factory):
  config = meanflow_imagenet_tiny()
  params = convert.convert(config, os.path.join(REFERENCE, "meanflow_jax_dit.params.npz"),
                           "meanflow_jax_dit", str(tmp_path_factory.mktemp("meanflow_jax")))
  return (train.build(config).objective, params,
          np.load(os.path.join(REFERENCE, "meanflow_jax_dit.npz")))


def assert_close_nhwc(got, want, name):
  want = np.asarray(want)
  error = np.abs(np.asarray(got) - want).max()
  assert error <= RTOL * np.abs(want).max(), f"{name}: max error {error:.3g}"


def test_meanflow_jax_dit_average_velocity_and_one_step_sample(meanflow_dit):
  objective, params, ref = meanflow_dit
  assert objective.model.time_scale == 1.0  # raw times, as the official TimestepEmbedder
  y = jnp.asarray(ref["y"])
  u = lambda z, t, h: objective.network(params, z, t, h, y)
  t, h = jnp.asarray(ref["t"]), jnp.asarray(ref["h"])
  assert_close_nhwc(u(jnp.asarray(ref["x"]), t, h), ref["u"], "u")
  assert_close_nhwc(u(jnp.asarray(ref["x"]), t, jnp.zeros_like(h)), ref["v_h0"], "v_h0")
  z0 = mean_flow.solve(u, jnp.asarray(ref["sample_z1"]), num_steps=1)
  assert_close_nhwc(z0, ref["sample_z0"], "sample_z0")


def test_meanflow_jax_checkpoint_with_a_missing_key_is_named(tmp_path):
  flat = dict(np.load(os.path.join(REFERENCE, "meanflow_jax_dit.params.npz")))
  del flat["params/net/h_embedder/mlp/layers_2/_flax_linear/bias"]
  np.savez(tmp_path / "partial.npz", **flat)
  with pytest.raises(convert.ConversionError,
                     match="1 missing:\n    params/net/h_embedder/mlp/layers_2/_flax_linear/bias"):
    convert.convert(meanflow_imagenet_tiny(), str(tmp_path / "partial.npz"), "meanflow_jax_dit",
                    str(tmp_path / "workdir"))


# STARFlow: the official transformer_flow.Model, converted by flowjax.convert into the
# starflow_imagenet experiment's architecture at the fixture's size (its :tiny preset).

STARFLOW = {  # fixture: (seq_order, state dict file)
    "starflow_tiny_l2r": ("l2r", "starflow_tiny_l2r.safetensors"),
    "starflow_tiny_r2l": ("r2l", "starflow_tiny_l2r.safetensors"),
    "starflow_tiny_l2r_uncond": ("l2r", "starflow_tiny_l2r_uncond.safetensors"),
}


def starflow_config(order: str, conditional: bool):
  spec = importlib.util.spec_from_file_location(
      "starflow_imagenet", os.path.join(ROOT, "experiments", "starflow_imagenet.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  with config.unlocked():
    config.model.order = order
    config.data.conditional = conditional
    config.data.num_classes = 10 if conditional else 0
    config.optim.ema_decays = (0.999,)
  return config


@pytest.fixture(scope="module", params=list(STARFLOW))
def starflow(request, tmp_path_factory):
  """(objective, params, reference npz, json, workdir) with params converted into a workdir."""
  order, weights = STARFLOW[request.param]
  ref = np.load(os.path.join(REFERENCE, request.param + ".npz"))
  with open(os.path.join(REFERENCE, request.param + ".json")) as f:
    info = json.load(f)
  assert info["kwargs"]["seq_order"] == order.upper()
  config = starflow_config(order, conditional="labels" in ref)
  workdir = str(tmp_path_factory.mktemp(request.param))
  params = convert.convert(config, os.path.join(REFERENCE, weights), "starflow", workdir)
  return train.build(config).objective, params, ref, info, workdir, config


def labels_of(ref):
  return jnp.asarray(ref["labels"], jnp.int32) if "labels" in ref else None


def assert_close(got, want, name):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  error = np.abs(got - want).max()
  assert error <= RTOL * max(np.abs(want).max(), 1e-6), f"{name}: max error {error:.3g}"


def test_starflow_forward_blocks_logdets_and_loss_match_the_official_model(starflow):
  objective, params, ref, _, _, _ = starflow
  model, cond = objective.model, labels_of(ref)
  apply = lambda *args, method=None: model.apply({"params": params}, *args, method=method)
  x = nhwc(ref["x_noisy"])
  z, logdet, intermediates = apply(x, cond)
  assert_matches(z, ref["z"], "z")
  tokens = model.to_tokens(x)
  assert_close(tokens, ref["outputs_0"].reshape(tokens.shape), "outputs_0 (patchify)")
  for block in range(model.num_blocks):
    tokens, log_scales = apply(block, tokens, cond, method="block_log_scales")
    assert_close(tokens, ref[f"outputs_{block + 1}"].reshape(tokens.shape), f"outputs_{block + 1}")
    assert_close(log_scales, ref[f"logdets_{block}"], f"logdets_{block}")
  loss, prior, intermediate = objective.training_loss(z, logdet, intermediates)
  assert_close(prior, ref["loss_z"], "loss_z")
  assert_close(-jnp.mean(logdet), ref["loss_logdet"], "loss_logdet")
  assert objective.intermediate_weight == pytest.approx(float(ref["latent_norm_regularization"]))
  data_term = objective.intermediate_weight * np.mean(np.square(ref["outputs_0"]))
  assert_close(loss + data_term, ref["loss_train"], "loss_train")
  assert_close(prior - jnp.mean(logdet), ref["loss"], "loss")


def test_starflow_rope_angles_are_the_official_ones(starflow):
  objective, _, ref, _, _, _ = starflow
  model = objective.model
  head_dim = model.hidden_size // model.num_heads
  label_axis = model.num_classes > 0
  for name, block in (("rope_angles_top", model.num_blocks - 1), ("rope_angles_bottom", 0)):
    angles = tarflow.rope_angles((4, 4), head_dim, model.block_prefix(block), label_axis)
    assert_close(angles, ref[name], name)


def sample_arguments(call, num_classes):
  """autoregressive.invert arguments of one official `model(z, y, reverse=True, **call)`; the
  guided calls pass y_cfg = [y; y_null], which invert builds from the labels itself."""
  guidance = float(call.get("guidance", 0))
  arguments = dict(guidance=guidance if guidance > 0 else None, null_label=num_classes)
  # The official annealing factor is computed but not applied (transformer_flow.py
  # MetaBlock.reverse), so annealed_guidance=True samples with the constant weight.
  arguments["anneal"] = False
  if call.get("jacobi"):
    arguments.update(method="jacobi", chunk_size=call["jacobi_block_size"],
                     tolerance=call["jacobi_th"], max_iterations=call["jacobi_max_iter"])
  return arguments


def test_starflow_sampling_guidance_and_jacobi_match_the_official_model(starflow):
  objective, params, ref, info, _, _ = starflow
  model, cond = objective.model, labels_of(ref)
  noise = nhwc(ref["sample_noise"])
  sample = jax.jit(lambda p, z, c, guidance, arguments: autoregressive.invert(
      model, p, z, c, guidance=guidance, **dict(arguments))[0], static_argnums=(4,))
  checked = []
  for key, call in info["sample_calls"].items():
    arguments = sample_arguments(call, model.num_classes)
    labels = cond
    if key == "sample_uncond_null_label":  # y = y_null, the dropped-label one-hot
      labels = jnp.full_like(cond, model.num_classes)
    guidance = arguments.pop("guidance")
    got = sample(params, noise, labels, guidance, tuple(sorted(arguments.items())))
    assert_matches(got, ref[key], key)
    checked.append(key)
  assert {"sample_noguide", "sample_jacobi_default", "sample_jacobi_b4_it2"} <= set(checked)
  if cond is not None:
    assert {"sample_cfg2", "sample_cfg2_annealed", "sample_jacobi_b4_it2_cfg2"} <= set(checked)


def test_starflow_self_denoising_matches_the_official_step(starflow):
  objective, params, ref, _, _, _ = starflow
  cond = labels_of(ref)
  x = nhwc(ref["sample_noguide"])
  denoised = autoregressive.tweedie_denoise(
      lambda y: objective.log_density(params, y, cond), x, float(ref["noise_std"]))
  assert objective.noise_std == pytest.approx(float(ref["noise_std"]))
  assert_matches(denoised, ref["sample_noguide_selfdenoised"], "sample_noguide_selfdenoised")


def test_converted_workdir_restores_the_converted_parameters(starflow):
  _, params, _, _, workdir, config = starflow
  _, state = modes.load(config, workdir)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert int(state.step) == 0


def test_starflow_text_path_reproduces_the_official_caption_model(tmp_path):
  """The fixture's label is the official model's one-token caption: its one-hot [B, 1, 11],
  projected by the top block's proj_txt. The same network built as a text model (text_dim=11,
  text_length=1, the projection as its text_proj) reading those one-hots as caption features
  gives the official z, and guided against the null one-hot as its null caption, the official
  guided samples."""
  import dataclasses
  ref = np.load(os.path.join(REFERENCE, "starflow_tiny_l2r.npz"))
  config = starflow_config("l2r", conditional=True)
  params = convert.convert(config, os.path.join(REFERENCE, "starflow_tiny_l2r.safetensors"),
                           "starflow", str(tmp_path / "workdir"))
  labelled = train.build(config).objective.model
  model = dataclasses.replace(labelled, num_classes=0, text_dim=11, text_length=1)
  top = f"blocks_{model.num_blocks - 1}"
  params = {**params, top: {("text_proj" if k == "label_token" else k): v
                            for k, v in params[top].items()}}
  captions, null = jnp.asarray(ref["y"], jnp.float32), jnp.asarray(ref["y_null"][0], jnp.float32)
  z, _, _ = model.apply({"params": params}, nhwc(ref["x_noisy"]), captions)
  assert_matches(z, ref["z"], "z")
  noise = nhwc(ref["sample_noise"])
  for key, guidance in (("sample_noguide", None), ("sample_cfg2", 2.0)):
    got, _ = autoregressive.invert(model, params, noise, captions, guidance=guidance,
                                   null_label=null)
    assert_matches(got, ref[key], key)


def test_conversion_lists_missing_extra_and_misshaped_keys(tmp_path):
  from safetensors import numpy as safetensors_numpy
  state = safetensors_numpy.load_file(os.path.join(REFERENCE, "starflow_tiny_l2r.safetensors"))
  del state["blocks.1.attn_blocks.0.mlp.main.0.bias"]
  state["blocks.2.attn_blocks.2.mlp.norm.weight"] = np.ones(64, np.float32)
  state["blocks.0.proj_in.weight"] = np.zeros((64, 48), np.float32)
  path = str(tmp_path / "damaged.safetensors")
  safetensors_numpy.save_file(state, path)
  config = starflow_config("l2r", conditional=True)
  with pytest.raises(convert.ConversionError) as error:
    convert.convert(config, path, "starflow", str(tmp_path / "workdir"))
  message = str(error.value)
  assert "1 missing:\n    blocks.1.attn_blocks.0.mlp.main.0.bias" in message
  assert "1 extra:\n    blocks.2.attn_blocks.2.mlp.norm.weight" in message
  assert "1 mis-shaped:\n    blocks.0.proj_in.weight (64, 48) -> blocks_0/proj_in/kernel " \
         "needs (12, 64)" in message
  assert not os.path.exists(tmp_path / "workdir" / "checkpoints")
  # Another architecture (a learned position table instead of RoPE) is refused the same way.
  with config.unlocked():
    config.model.positions = "learned"
  with pytest.raises(convert.ConversionError, match=r"3 missing:\n    blocks.0.pos_embed"):
    convert.convert(config, os.path.join(REFERENCE, "starflow_tiny_l2r.safetensors"),
                    "starflow", str(tmp_path / "other"))


def test_convert_command_then_sample_command(tmp_path):
  """python -m flowjax.convert writes a workdir that python -m flowjax.main --mode=sample reads;
  the .safetensors path needs no torch."""
  workdir = str(tmp_path / "converted")
  common = ["--config=experiments/starflow_imagenet.py:tiny", f"--workdir={workdir}"]
  done = subprocess.run(
      [sys.executable, "-m", "flowjax.convert", *common, "--format=starflow",
       "--checkpoint=tests/reference/starflow_tiny_l2r.safetensors"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert os.path.exists(os.path.join(workdir, "config.json"))
  done = subprocess.run([sys.executable, "-m", "flowjax.main", *common, "--mode=sample",
                         "--config.sample.num=4", "--config.sample.method=kv_cache"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  again = subprocess.run(
      [sys.executable, "-m", "flowjax.convert", *common, "--format=starflow",
       "--checkpoint=tests/reference/starflow_tiny_l2r.safetensors"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode == 1 and "already holds checkpoints" in again.stderr


# TarFlow: the official transformer_flow.Model, converted into tarflow_imagenet64's architecture
# at the fixture's size (its :tiny preset).

def experiment_config(name, preset):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments",
                                                                   name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


@pytest.fixture(scope="module")
def tarflow_reference(tmp_path_factory):
  config = experiment_config("tarflow_imagenet64", "tiny")
  workdir = str(tmp_path_factory.mktemp("tarflow_tiny"))
  params = convert.convert(config, os.path.join(REFERENCE, "tarflow_tiny.safetensors"),
                           "tarflow", workdir)
  with open(os.path.join(REFERENCE, "tarflow_tiny.json")) as f:
    info = json.load(f)
  return (train.build(config).objective, params, np.load(os.path.join(REFERENCE,
                                                                      "tarflow_tiny.npz")), info)


def test_tarflow_forward_dropped_labels_and_loss_match_the_official_model(tarflow_reference):
  objective, params, ref, _ = tarflow_reference
  model = objective.model
  apply = lambda *args, method=None: model.apply({"params": params}, *args, method=method)
  x = nhwc(ref["x_noisy"])
  assert_close(model.to_tokens(x), ref["x_patches"], "x_patches (channel-first patches)")
  labels = jnp.asarray(ref["labels"], jnp.int32)
  z, logdet, intermediates = apply(x, labels)
  assert_close(model.to_tokens(z), ref["z"], "z")
  assert_close(logdet, ref["logdets"], "logdets")
  assert_close(intermediates[0], ref["outputs_0"], "outputs_0")
  tokens = model.to_tokens(x)
  for block in range(model.num_blocks):
    tokens, block_logdet = apply(block, tokens, labels, method="block_forward")
    assert_close(tokens, ref[f"outputs_{block}"], f"outputs_{block}")
    assert_close(block_logdet, ref[f"logdet_block_{block}"], f"logdet_block_{block}")
  loss, _, _ = objective.training_loss(z, logdet, intermediates)
  assert objective.intermediate_weight == 0.0
  assert_close(loss, ref["loss"], "loss")
  # A dropped label (-1 there, the null label num_classes here) and no labels at all: the mean
  # of the class embeddings.
  dropped = jnp.asarray(np.where(ref["labels_drop"] < 0, model.num_classes, ref["labels_drop"]),
                        jnp.int32)
  z, logdet, _ = apply(x, dropped)
  assert_close(model.to_tokens(z), ref["z_labels_drop"], "z_labels_drop")
  assert_close(logdet, ref["logdets_labels_drop"], "logdets_labels_drop")
  z, logdet, _ = apply(x, None)
  assert_close(model.to_tokens(z), ref["z_y_none"], "z_y_none")
  assert_close(logdet, ref["logdets_y_none"], "logdets_y_none")


TARFLOW_SAMPLES = {  # fixture key: flowjax sampling arguments of the official call
    "sample_noguide": {},
    "sample_cfg2": dict(guidance=2.0, rule="tarflow"),
    "sample_cfg2_annealed": dict(guidance=2.0, rule="tarflow", anneal=True),
    "sample_cfg2_annealed_attntemp0.5": dict(guidance=2.0, rule="tarflow", anneal=True,
                                             attention_temperature=0.5),
    "sample_cfg2_guide_b_only": dict(guidance=2.0, rule="tarflow_shift"),
    "sample_y_none": dict(labels=None),
}


def test_tarflow_sampling_guidance_and_temperature_match_the_official_model(tarflow_reference):
  objective, params, ref, info = tarflow_reference
  model = objective.model
  assert set(TARFLOW_SAMPLES) == set(info["sample_calls"]) - {"sample_noguide_seq_<i>"}
  noise = model.from_tokens(jnp.asarray(ref["sample_noise"]))
  labels = jnp.asarray(ref["labels"], jnp.int32)
  for key, arguments in TARFLOW_SAMPLES.items():
    arguments = dict(arguments)
    cond = arguments.pop("labels", labels)
    got, _ = autoregressive.invert(model, params, noise, cond, null_label=model.num_classes,
                                   **arguments)
    assert_matches(got, ref[key], key)
  # The sequence of the official reverse ends with the sample.
  np.testing.assert_array_equal(ref["sample_noguide_seq_2"], ref["sample_noguide"])


def test_tarflow_self_denoising_matches_the_official_step(tarflow_reference):
  objective, params, ref, _ = tarflow_reference
  labels = jnp.asarray(ref["labels"], jnp.int32)
  noise_std = float(ref["noise_std"])
  assert objective.noise_std == pytest.approx(noise_std)
  # evaluate_fid.py: lr = 1 * (batch 4) * (8 * 8 * 3) * noise_std^2 on the batch-mean loss, the
  # Tweedie step x + noise_std^2 grad log p(x) per example.
  assert float(ref["selfdenoise_lr"]) == pytest.approx(4 * 8 * 8 * 3 * noise_std ** 2)
  denoised = autoregressive.tweedie_denoise(
      lambda y: objective.log_density(params, y, labels), nhwc(ref["sample_noguide"]), noise_std)
  assert_matches(denoised, ref["sample_noguide_selfdenoised"], "sample_noguide_selfdenoised")


def test_state_dict_readers_strip_wrapper_prefixes_and_name_bad_files(tmp_path):
  from safetensors import numpy as safetensors_numpy
  state = safetensors_numpy.load_file(os.path.join(REFERENCE, "tarflow_tiny.safetensors"))
  path = str(tmp_path / "ddp.npz")
  np.savez(path, **{"module._orig_mod." + name: value for name, value in state.items()})
  read = convert.read_state_dict(path)
  assert sorted(read) == sorted(state)
  for name in state:
    np.testing.assert_array_equal(read[name], state[name])
  truncated = tmp_path / "truncated.safetensors"
  with open(os.path.join(REFERENCE, "tarflow_tiny.safetensors"), "rb") as f:
    truncated.write_bytes(f.read()[:5000])
  with pytest.raises(convert.ConversionError, match="could not be read.*uncorrupted"):
    convert.read_state_dict(str(truncated))
  with pytest.raises(convert.ConversionError, match="unknown file type '.txt'"):
    (tmp_path / "weights.txt").write_text("x")
    convert.read_state_dict(str(tmp_path / "weights.txt"))
  with pytest.raises(convert.ConversionError, match="is not a file"):
    convert.read_state_dict(str(tmp_path / "missing.safetensors"))
  # A prior variance other than 1 (nvp=False) cannot be loaded.
  state["var"] = np.full_like(state["var"], 2.0)
  np.savez(tmp_path / "vp.npz", **state)
  with pytest.raises(convert.ConversionError, match="prior variance `var` other than 1"):
    convert.convert(experiment_config("tarflow_imagenet64", "tiny"), str(tmp_path / "vp.npz"),
                    "tarflow", str(tmp_path / "workdir"))


# IMM: the official IMMPrecond networks, converted into imm_cifar10's U-Net and imm_imagenet's
# DiT at the fixtures' sizes.

IMM = {  # fixture: (experiment, preset, overrides)
    "imm_songunet": ("imm_cifar10", "tiny", {
        "model.channel_mult": (1, 2), "model.attn_resolutions": (8,), "data.image_size": 16,
        "data.conditional": True, "data.num_classes": 10, "objective.t_min": 0.006,
        "objective.t_max": 0.994, "objective.time_embedding": "identity"}),
    "imm_dit": ("imm_imagenet", "tiny", {
        "model.hidden_size": 64, "model.depth": 2, "model.num_heads": 2,
        "objective.t_min": 0.0, "objective.t_max": 0.994, "objective.f_type": "euler_fm"}),
}


def imm_objective(name, f_type=None):
  experiment, preset, overrides = IMM[name]
  config = experiment_config(experiment, preset)
  with config.unlocked():
    for key, value in overrides.items():
      section, field = key.split(".")
      config[section][field] = value
    if f_type:
      config.objective.f_type = f_type
  return config, train.build(config).objective


# imm_songunet also as the EDM-style network pickle IMM publishes (tests/reference/
# make_edm_pickle.py), read without torch.
IMM_FILES = {"imm_songunet": "imm_songunet.safetensors", "imm_dit": "imm_dit.safetensors",
             "imm_songunet_pkl": "imm_songunet_edm.pkl"}


@pytest.fixture(scope="module", params=list(IMM_FILES))
def imm_reference(request, tmp_path_factory):
  name = request.param.removesuffix("_pkl")
  config, objective = imm_objective(name)
  params = convert.convert(config, os.path.join(REFERENCE, IMM_FILES[request.param]), name,
                           str(tmp_path_factory.mktemp(name)))
  with open(os.path.join(REFERENCE, name + ".json")) as f:
    info = json.load(f)
  return name, objective, params, np.load(os.path.join(REFERENCE, name + ".npz")), info


def imm_labels(ref):
  labels = np.asarray(ref["labels"])
  return jnp.asarray(np.where(labels < 0, 10, labels), jnp.int32)


def test_imm_network_and_preconditioned_step_match_the_official_model(imm_reference):
  name, objective, params, ref, info = imm_reference
  x, t, s = nhwc(ref["x"]), jnp.asarray(ref["t"]), jnp.asarray(ref["s"])
  labels = imm_labels(ref)
  assert objective.sigma_d == info["kwargs"]["sigma_data"]
  assert objective.time_embedding == info["kwargs"]["temb_type"]
  assert_matches(objective.network(params, x, t, s, labels), ref["F"], "F")
  if "F_zero_labels" in ref:  # the all-zero one-hot: flowjax's null label
    null = jnp.full_like(labels, objective.num_classes)
    assert_matches(objective.network(params, x, t, s, null), ref["F_zero_labels"],
                   "F_zero_labels")
  # Without the s branch: the backbone called with the one time t.
  model = objective.model
  backbone_x = nhwc(ref["backbone_in_x"])
  no_s = model.apply({"params": params}, backbone_x, (t,), labels, train=False)
  assert_matches(no_s, ref["F_no_s"], "F_no_s")
  for f_type in info.get("f_types", [info["kwargs"].get("f_type")]):
    _, objective = imm_objective(name, f_type)
    assert_matches(objective.flow_map(params, x, t, s, labels), ref[f"out_{f_type}"],
                   f"out_{f_type}")


def test_imm_pushforward_samples_match_the_official_sampler(imm_reference):
  name, _, params, ref, info = imm_reference
  labels = imm_labels(ref)
  latents = nhwc(ref["sample_latents"])
  for key, call in info["sample_calls"].items():
    _, objective = imm_objective(name, call.get("f_type"))
    guidance = call["cfg_scale"] or 1.0
    got = objective.sample_from(params, latents, labels, num_steps=call["num_steps"],
                                method="uniform", guidance=guidance)
    assert_matches(got, ref[key].astype(np.float32), key)


# MeanFlow: py-meanflow's SongUNet, converted into meanflow_cifar10's U-Net at the fixture's size.

def meanflow_unet(tmp_path, augment_dim):
  config = experiment_config("meanflow_cifar10", "tiny")
  with config.unlocked():
    config.model.update(dict(channel_mult=(1, 2), attn_resolutions=(8,), augment_dim=augment_dim))
    config.data.image_size = 16
  params = convert.convert(config, os.path.join(REFERENCE, "meanflow_songunet.safetensors"),
                           "meanflow_songunet", str(tmp_path / f"augment{augment_dim}"))
  return train.build(config).objective, params


def test_meanflow_unet_velocity_jvp_and_sample_match_py_meanflow(tmp_path):
  from flowjax.objectives import meanflow
  ref = np.load(os.path.join(REFERENCE, "meanflow_songunet.npz"))
  z, t, r, h = nhwc(ref["z"]), *(jnp.asarray(ref[k]) for k in ("t", "r", "h"))
  for augment_dim in (0, 6):  # dropped (the preset's), and with the augmentation input
    objective, params = meanflow_unet(tmp_path, augment_dim)
    u = jax.jit(objective.network)(params, z, t, h, None)
    assert_matches(u, ref["u"], "u")
    assert_matches(u, ref["u_aug_none"], "u_aug_none")
  u_random = objective.model.apply({"params": params}, z, (t, h), None, train=False,
                                   augment_labels=jnp.asarray(ref["aug_cond_rand"]))
  assert_matches(u_random, ref["u_aug_rand"], "u_aug_rand")
  # The training JVP: u_tgt = v - (t - r) du/dt with du/dt along (v, 1, 0).
  tangent = nhwc(ref["jvp_tangent_z"])
  u_fn = lambda z_, t_, r_: objective.network(params, z_, t_, t_ - r_, None)
  u, u_tgt = jax.jit(functools.partial(meanflow.meanflow_target, u_fn))(z, t, r, tangent)
  assert_matches(u, ref["u"], "u (inside the JVP)")
  want = np.asarray(ref["jvp_tangent_z"]) - (np.asarray(ref["h"])[:, None, None, None]
                                             * np.asarray(ref["dudt"]))
  assert_matches(u_tgt, want, "u_tgt = v - (t - r) du/dt")
  sample = jax.jit(lambda z1: mean_flow.solve(
      lambda z_, t_, h_: objective.network(params, z_, t_, h_, None), z1, 1))(
          nhwc(ref["sample_z1"]))
  assert_matches(sample, ref["sample_z0"], "sample_z0")
