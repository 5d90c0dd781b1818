"""Backbones, found by `config.model.name` in the MODELS registry."""

import flax.linen as nn
import ml_collections

from flowjax.models import autoencoder
from flowjax.models import dit
from flowjax.models import imf_dit
from flowjax.models import mlp
from flowjax.models import tarflow
from flowjax.models import unet
from flowjax.registry import MODELS

__all__ = ["autoencoder", "build", "dit", "imf_dit", "mlp", "tarflow", "unet"]


def build(model_config: ml_collections.ConfigDict, info) -> nn.Module:
  """Builds the backbone named by model_config.name.

  Args:
    model_config: config.model; `name` selects the builder ('dit', 'mlp', ...).
    info: dataset facts with `.image_shape` (per example, e.g. (H, W, C) or (2,))
      and `.num_classes` (0 = unconditional).
  """
  return MODELS.get(model_config.name)(model_config, info)


DEFAULTS = {
    "mlp": dict(hidden_size=256, depth=4, time_scale=1000.0, dropout=0.0, dtype="float32",
                param_dtype="float32"),
    "dit": dict(patch_size=2, hidden_size=384, depth=12, num_heads=6, mlp_ratio=4.0,
                time_scale=1000.0, dropout=0.0, attention_impl="xla", remat="none",
                dtype="float32", param_dtype="float32", norm="layer", qk_norm=False,
                attention_scale="inverse_sqrt_dim", modulation_norm=False, linear_init="xavier",
                time_init="normal", block_init="adaln_zero", text_dim=0, text_length=0,
                text_layers=0, text_heads=4),
    "imf_dit": dict(patch_size=2, hidden_size=384, depth=12, num_heads=6, mlp_ratio=4.0,
                    time_scale=1.0, time_tokens=(4, 4), label_tokens=8, aux_head_depth=0,
                    dropout=0.0, attention_impl="xla", remat="none", dtype="float32",
                    param_dtype="float32"),
    "unet": dict(model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4,
                 channel_mult_noise=1, num_blocks=4, attn_resolutions=(16,), dropout=0.1,
                 embedding_type="positional", fourier_scale=16.0, encoder_type="standard",
                 decoder_type="standard", resample_filter=(1, 1), time_mapping="separate",
                 augment_dim=0, zero_init_scale=1e-5, time_scale=1000.0, attention_impl="xla",
                 dtype="float32", param_dtype="float32"),
    "tarflow": dict(patch_size=1, hidden_size=256, num_blocks=4, layers_per_block=2,
                    deep_layers=0, num_heads=4, mlp_ratio=4.0, start_token=True,
                    scale="softplus", soft_clip=4.0, condition="deep", positions="learned",
                    order="r2l", label_input="add", label_null="learned",
                    final_norm="layernorm", norm_eps=1e-6, gelu="tanh", patch_channels="last",
                    text_dim=0, text_length=0, text_layers=0, text_heads=4, remat="none",
                    dtype="float32", param_dtype="float32"),
    "autoencoder": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        latent_channels=4, norm_groups=32, mid_attention=True,
                        scaling_factor=0.18215, dtype="float32", param_dtype="float32"),
}


def default_config(name: str) -> ml_collections.ConfigDict:
  """The model section with every key the named backbone reads, at its defaults."""
  MODELS.get(name)
  return ml_collections.ConfigDict(dict(name=name, **DEFAULTS[name]))
