"""DINOv2, weight for weight against HuggingFace transformers: a checkpoint `save_pretrained` wrote,
read by flowjax's loader, gives `Dinov2Model` / `Dinov2WithRegistersModel`'s last_hidden_state at
the native resolution and at grids that resample the position table (1e-5 of the largest value,
float32); the bicubic resampling is torch's; `patch_tokens` is REPA's DINOv2 target. The
fixtures and the code that wrote them: tests/reference/make_dinov2.py (no torch needed here).
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from flowjax.models import dinov2

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")
NAMES = ("dinov2_tiny", "dinov2_reg_tiny")
RESOLUTIONS = ("native", "up", "mixed")
RTOL = 1e-5


def fixture_path(name, extension):
  return os.path.join(REFERENCE, f"{name}.{extension}")


def nhwc(x):
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def assert_close(got, want, what):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
  error = np.abs(got - want).max()
  assert error <= RTOL * np.abs(want).max(), f"{what}: max error {error:.3g}"


@pytest.fixture(scope="module", params=NAMES)
def reference(request):
  """(name, config, module, params, reference arrays) of one fixture, loaded by `load`."""
  name = request.param
  config, module, params = dinov2.load(fixture_path(name, "safetensors"),
                                       fixture_path(name, "json"))
  return name, config, module, params, np.load(fixture_path(name, "npz"))


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_last_hidden_state_matches_transformers(reference, resolution):
  """Native 16 x 16 (table as it is), 24 x 20 and 12 x 28 (table resampled up, and down in one
  axis while up in the other)."""
  name, _, module, params, ref = reference
  got = jax.jit(module.apply)({"params": params}, nhwc(ref[f"pixel_values_{resolution}"]))
  assert_close(got, ref[f"last_hidden_state_{resolution}"], f"{name} {resolution}")


def test_config_reads_the_hf_json():
  with open(fixture_path("dinov2_tiny", "json")) as f:
    plain = dinov2.Dinov2Config.from_hf_json(json.load(f))
  with open(fixture_path("dinov2_reg_tiny", "json")) as f:
    registers = dinov2.Dinov2Config.from_hf_json(json.load(f))
  assert (plain.hidden_size, plain.num_hidden_layers, plain.num_attention_heads,
          plain.patch_size, plain.image_size, plain.mlp_ratio) == (16, 2, 2, 4, 16, 2.0)
  assert (plain.num_register_tokens, plain.use_swiglu_ffn, plain.interpolate_antialias) == \
      (0, False, False)
  assert (registers.num_register_tokens, registers.use_swiglu_ffn,
          registers.interpolate_antialias, registers.mlp_hidden_size) == (2, True, True, 24)
  with pytest.raises(ValueError, match="hidden_size"):
    dinov2.Dinov2Config.from_hf_json({"model_type": "dinov2"})
  with pytest.raises(ValueError, match="model_type='vit'"):
    dinov2.Dinov2Config.from_hf_json({"model_type": "vit"})


@pytest.mark.parametrize("preset, millions", [("dinov2_vits14", 21), ("dinov2_vitb14", 86),
                                              ("dinov2_vitl14", 300),
                                              ("dinov2_vitg14", 1100)])
def test_presets_have_the_published_sizes(preset, millions):
  """facebookresearch/dinov2 README (rounded: ViT-S/14 here is 22.06 M): ViT-S/14 21 M,
  ViT-B/14 86 M, ViT-L/14 300 M, ViT-g/14 1,100 M parameters; registers add 4 tokens of width
  D."""
  counts = {}
  for name in (preset, preset + "_reg"):
    shapes = dinov2.abstract_params(dinov2.Dinov2(dinov2.PRESETS[name]))
    counts[name] = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
  assert abs(counts[preset] / 1e6 - millions) <= 0.06 * millions, counts
  width = dinov2.PRESETS[preset].hidden_size
  assert counts[preset + "_reg"] - counts[preset] == 4 * width


def test_checkpoint_folder_loads_like_the_file(reference, tmp_path):
  name, config, _, params, _ = reference
  shutil.copy(fixture_path(name, "safetensors"), tmp_path / "model.safetensors")
  shutil.copy(fixture_path(name, "json"), tmp_path / "config.json")
  folder_config, _, folder_params = dinov2.load(str(tmp_path))
  assert folder_config == config
  jax.tree.map(np.testing.assert_array_equal, folder_params, params)


def to_hub_names(tensors, config):
  """The official facebookresearch/dinov2 state dict of a HF one (the inverse of HF's
  convert_dinov2_to_hf.py renaming: q, k, v stacked into qkv)."""
  out = {"cls_token": tensors["embeddings.cls_token"],
         "pos_embed": tensors["embeddings.position_embeddings"],
         "mask_token": tensors["embeddings.mask_token"],
         "patch_embed.proj.weight": tensors["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": tensors["embeddings.patch_embeddings.projection.bias"],
         "norm.weight": tensors["layernorm.weight"], "norm.bias": tensors["layernorm.bias"]}
  if config.num_register_tokens:
    out["register_tokens"] = tensors["embeddings.register_tokens"]
  mlp = {"weights_in": "w12", "weights_out": "w3", "fc1": "fc1", "fc2": "fc2"}
  for index in range(config.num_hidden_layers):
    hf, hub = f"encoder.layer.{index}.", f"blocks.{index}."
    for kind in ("weight", "bias"):
      out[hub + f"attn.qkv.{kind}"] = np.concatenate(
          [tensors[hf + f"attention.attention.{part}.{kind}"]
           for part in ("query", "key", "value")])
      out[hub + f"attn.proj.{kind}"] = tensors[hf + f"attention.output.dense.{kind}"]
      for norm in ("norm1", "norm2"):
        out[hub + f"{norm}.{kind}"] = tensors[hf + f"{norm}.{kind}"]
    for number in (1, 2):
      out[hub + f"ls{number}.gamma"] = tensors[hf + f"layer_scale{number}.lambda1"]
    for key, value in tensors.items():
      if key.startswith(hf + "mlp."):
        layer, kind = key[len(hf + "mlp."):].split(".")
        out[hub + f"mlp.{mlp[layer]}.{kind}"] = value
  assert len(out) == len(tensors) - 4 * config.num_hidden_layers  # 6 q/k/v -> 2 qkv
  return out


def test_official_hub_state_dict_loads_to_the_same_parameters(reference, tmp_path):
  name, config, _, params, _ = reference
  tensors = safetensors_numpy.load_file(fixture_path(name, "safetensors"))
  path = str(tmp_path / "hub.npz")
  np.savez(path, **to_hub_names(tensors, config))
  _, _, hub_params = dinov2.load(path, config)
  jax.tree.map(np.testing.assert_array_equal, hub_params, params)


@pytest.mark.parametrize("fault", ["missing", "extra", "mis-shaped"])
def test_loader_names_missing_extra_and_misshaped_keys(fault, tmp_path):
  tensors = safetensors_numpy.load_file(fixture_path("dinov2_tiny", "safetensors"))
  key = "encoder.layer.1.layer_scale2.lambda1"
  if fault == "missing":
    del tensors[key]
  elif fault == "extra":
    tensors["encoder.layer.2.norm1.weight"] = tensors["encoder.layer.1.norm1.weight"]
    key = "encoder.layer.2.norm1.weight"
  else:
    tensors[key] = np.ones(17, np.float32)
  path = str(tmp_path / "bad.safetensors")
  safetensors_numpy.save_file(tensors, path)
  with pytest.raises(ValueError, match=f"1 {fault}") as error:
    dinov2.load(path, fixture_path("dinov2_tiny", "json"))
  assert key in str(error.value) and "config" in str(error.value)


def test_preset_of_another_size_is_rejected():
  with pytest.raises(ValueError, match="(?s)mis-shaped.*preset"):
    dinov2.load(fixture_path("dinov2_tiny", "safetensors"), "dinov2_vits14")


def test_position_resampling_is_torch_bicubic():
  """The table resampling of each checkpoint family (HF by size; HF/official with registers by
  size with antialias; official without registers by scale factor (grid + 0.1) / 37) and REPA's
  image resize, against torch F.interpolate."""
  ref = np.load(fixture_path("dinov2_resample", "npz"))
  grid = ref["grid"][0, 0]
  table = jnp.asarray(np.concatenate([[[7.0]], grid.reshape(-1, 1)])[None])  # [1, 1 + 37^2, 1]
  base = dinov2.Dinov2Config(1, 1, 1, 4.0, patch_size=14, image_size=518)
  families = {"aa0": base, "aa1": dataclasses.replace(base, interpolate_antialias=True),
              "offset": dataclasses.replace(base, interpolate_offset=0.1)}
  checked = 0
  for key in ref.files:
    if key in ("grid", "image", "image_to_21"):
      continue
    mode, size = key.split("_")[:2]
    family = families["offset" if mode == "offset" else key.split("_")[2]]
    rows, columns = map(int, size.split("x"))
    got = dinov2.position_embeddings(table, family, rows * 14, columns * 14)
    assert float(got[0, 0, 0]) == 7.0, key
    assert_close(got[0, 1:, 0].reshape(rows, columns), ref[key][0, 0], key)
    checked += 1
  assert checked == 12
  image = nhwc(ref["image"])
  assert_close(dinov2.resize_bicubic(image, (21, 21))[..., 0], ref["image_to_21"][:, 0],
               "image")


def test_patch_tokens_are_repas_target(reference):
  """for_resolution + patch_tokens on images in [-1, 1] = REPA's preprocessing and encoder
  (timm-resampled table) x_norm_patchtokens, [CLS] and registers dropped."""
  name, config, _, params, ref = reference
  _, module, resampled = dinov2.for_resolution(config, params, 12)
  images = nhwc(ref["repa_images"])
  tokens = dinov2.patch_tokens(module, resampled, images, resolution=12)
  assert_close(tokens, ref["repa_patch_tokens"], f"{name} REPA patch tokens")
  hidden = module.apply({"params": resampled}, dinov2.preprocess(images, 12))
  prefix = 1 + config.num_register_tokens
  assert hidden.shape == (2, prefix + 9, config.hidden_size)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(hidden[:, prefix:]))


def test_gray_images_are_repeated_to_rgb(reference):
  _, _, module, params, ref = reference
  gray = nhwc(ref["repa_images"])[..., :1]
  tokens = dinov2.patch_tokens(module, params, gray, resolution=16)
  assert tokens.shape == (2, 16, 16)
  np.testing.assert_array_equal(
      np.asarray(tokens),
      np.asarray(dinov2.patch_tokens(module, params, jnp.repeat(gray, 3, -1), resolution=16)))
