"""Writes the DINOv2 fixtures that tests/test_dinov2.py checks flowjax.models.dinov2 against, from
HuggingFace transformers' own models (needs torch, transformers and safetensors; run once by hand:
python tests/reference/make_dinov2.py). The tests read them without torch.

- dinov2_tiny: `Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=2,
  num_attention_heads=2, mlp_ratio=2, patch_size=4, image_size=16, layerscale_value=0.5))`;
  dinov2_reg_tiny: `Dinov2WithRegistersModel` of the same sizes with 2 registers and the SwiGLU
  feed-forward. Every parameter is moved off its initial value (seeded), eager attention, eval
  mode. `.safetensors` and `.json` are what `save_pretrained` wrote (model.safetensors,
  config.json).
- `.npz` (NCHW, as the torch models took them): pixel_values (multiples of 1/64) at the native
  16 x 16 (grid 4 x 4, the table used as it is) and at 24 x 20 (grid 6 x 5) and 12 x 28 (grid
  3 x 7: the table resampled up and down), each with its last_hidden_state; repa_images
  (uint8 / 127.5 - 1, 20 x 20) and repa_patch_tokens: REPA's DINOv2 pipeline at resolution 12
  (sihyun-yu/REPA train.py `preprocess_raw_image`: / 255 of the uint8 image, here (x + 1) / 2,
  ImageNet normalization, bicubic resize; utils.py `load_encoders`: the position table resampled
  by timm's `resample_abs_pos_embed`, i.e. bicubic with antialias to the 3 x 3 grid) and the
  model's x_norm_patchtokens.
- dinov2_resample.npz: torch `F.interpolate(mode='bicubic', align_corners=False)` of a random
  [1, 1, 37, 37] grid to 16 x 16, 5 x 9, 37 x 20 and 41 x 39, by size with and without antialias
  and by the official hub's scale factor (grid + 0.1) / 37 without; and of a 24 x 24 image to
  21 x 21 (REPA's resize, by size).
"""

import json
import os
import shutil
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import (Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,
                          Dinov2WithRegistersModel)

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
             patch_size=4, image_size=16, layerscale_value=0.5)
RESOLUTIONS = {"native": (16, 16), "up": (24, 20), "mixed": (12, 28)}
REPA_SIZE, REPA_RESOLUTION = 20, 12
RESAMPLE_SIZES = ((16, 16), (5, 9), (37, 20), (41, 39))
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def perturb(model, generator):
  """Moves every parameter off its initial value, at magnitudes that keep every path visible."""
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      noise = torch.randn(parameter.shape, generator=generator)
      if "layer_scale" in name:
        parameter.copy_(0.5 + 0.2 * noise)
      elif name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight")):
        parameter.copy_(1 + 0.2 * noise)
      elif name.endswith(".bias"):
        parameter.copy_(0.1 * noise)
      elif name.endswith(".weight"):
        parameter.copy_(noise / parameter[0].numel() ** 0.5)
      else:  # the [CLS], register and mask tokens and the position table
        parameter.copy_(noise)


def repa_patch_tokens(model_class, config_class, kwargs, state_dict, images):
  """REPA's DINOv2 targets for images in [-1, 1]: normalize, resize to REPA_RESOLUTION, a model
  whose table timm resampled to that grid, x_norm_patchtokens."""
  x = ((images + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD
  x = F.interpolate(x, REPA_RESOLUTION, mode="bicubic")
  table = state_dict["embeddings.position_embeddings"]
  size = SIZES["image_size"] // SIZES["patch_size"]
  grid = REPA_RESOLUTION // SIZES["patch_size"]
  patches = table[:, 1:].reshape(1, size, size, -1).permute(0, 3, 1, 2)
  patches = F.interpolate(patches, size=[grid, grid], mode="bicubic", antialias=True)
  table = torch.cat([table[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1)
  config = config_class(**dict(kwargs, image_size=REPA_RESOLUTION), attn_implementation="eager")
  model = model_class(config).eval()
  model.load_state_dict(dict(state_dict, **{"embeddings.position_embeddings": table}))
  registers = getattr(config, "num_register_tokens", 0)
  with torch.no_grad():
    return model(x).last_hidden_state[:, 1 + registers:]


def write(name, model_class, config_class, kwargs, seed):
  generator = torch.Generator().manual_seed(seed)
  torch.manual_seed(seed)
  model = model_class(config_class(**kwargs, attn_implementation="eager")).eval()
  perturb(model, generator)
  out = {}
  with torch.no_grad():
    for label, (height, width) in RESOLUTIONS.items():
      pixels = torch.randint(-128, 129, (2, 3, height, width), generator=generator) / 64
      out[f"pixel_values_{label}"] = pixels
      out[f"last_hidden_state_{label}"] = model(pixels).last_hidden_state
  raw = torch.randint(0, 256, (2, 3, REPA_SIZE, REPA_SIZE), generator=generator)
  images = raw / 127.5 - 1
  out["repa_images"] = images
  out["repa_patch_tokens"] = repa_patch_tokens(model_class, config_class, kwargs,
                                               model.state_dict(), images)
  np.savez_compressed(os.path.join(HERE, f"{name}.npz"),
                      **{key: value.numpy().astype(np.float32) for key, value in out.items()})
  with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    shutil.copy(os.path.join(folder, "model.safetensors"),
                os.path.join(HERE, f"{name}.safetensors"))
    with open(os.path.join(folder, "config.json")) as f:
      config = json.load(f)
  with open(os.path.join(HERE, f"{name}.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)


def write_resample():
  generator = torch.Generator().manual_seed(3)
  grid = torch.randint(-64, 65, (1, 1, 37, 37), generator=generator) / 16
  out = {"grid": grid}
  for height, width in RESAMPLE_SIZES:
    for antialias in (False, True):
      out[f"size_{height}x{width}_aa{int(antialias)}"] = F.interpolate(
          grid, size=(height, width), mode="bicubic", align_corners=False, antialias=antialias)
    out[f"offset_{height}x{width}"] = F.interpolate(
        grid, scale_factor=((height + 0.1) / 37, (width + 0.1) / 37), mode="bicubic",
        align_corners=False)
  image = torch.randint(0, 256, (1, 1, 24, 24), generator=generator) / 127.5 - 1
  out["image"] = image
  out["image_to_21"] = F.interpolate(image, 21, mode="bicubic")
  np.savez_compressed(os.path.join(HERE, "dinov2_resample.npz"),
                      **{key: value.numpy() for key, value in out.items()})


def main():
  print(f"torch {torch.__version__}, transformers {transformers.__version__}")
  write("dinov2_tiny", Dinov2Model, Dinov2Config, SIZES, seed=0)
  write("dinov2_reg_tiny", Dinov2WithRegistersModel, Dinov2WithRegistersConfig,
        dict(SIZES, num_register_tokens=2, use_swiglu_ffn=True), seed=1)
  write_resample()


if __name__ == "__main__":
  main()
