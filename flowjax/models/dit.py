"""DiT with adaLN-Zero (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023).

patchify -> linear embed + fixed 2D sin-cos positions -> depth x DiTBlock -> final adaLN
layer -> unpatchify. The conditioning vector c is the sum of one timestep embedding per
time input and the label embedding. The residual stream and the conditioning path stay in
float32; the token matmuls and attention run in the compute dtype.

Options for Lipschitz control (Terminal Velocity Matching, Zhou et al., arXiv:2511.19797 Sec. 4,
App. B.2 and Table 6; all off by default, which is DiT): norm='rms' replaces every LayerNorm by
RMSNorm without learned parameters; qk_norm adds RMSNorm with a learned scale to each head's
queries and keys; modulation_norm passes every adaLN modulation vector (shift, scale and gate of
the blocks, shift and scale of the final layer) through RMSNorm without parameters, so that
x <- x + RMSNorm(gate) * Attn(RMSNorm(x) * (1 + RMSNorm(scale)) + RMSNorm(shift)) (Eq. 16 as
lumalabs/tvm implements it, with DiT's 1 + scale); linear_init='spectral' starts the patch
embedding, attention and MLP kernels with spectral norm 1 (`layers.spectral_normal`),
time_init='spectral' the time embedders' kernels too.

REPA (Yu et al., arXiv:2410.06940): with repa_depth > 0 the tokens after block repa_depth
(1-based; the paper's SiT-XL/2 uses 8) go through the projector h_phi (`layers.RepaProjector`)
and are sown as intermediates/repa, [B, H/p, W/p, repa_dim] (`layers.sow_repa_tokens`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from flowjax.models import layers
from flowjax.registry import MODELS

# DiT paper sizes; patch size is the suffix (e.g. XL/2).
DIT_PRESETS = {
    "S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "S/4": dict(depth=12, hidden_size=384, num_heads=6, patch_size=4),
    "S/8": dict(depth=12, hidden_size=384, num_heads=6, patch_size=8),
    "B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "B/4": dict(depth=12, hidden_size=768, num_heads=12, patch_size=4),
    "B/8": dict(depth=12, hidden_size=768, num_heads=12, patch_size=8),
    "L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "L/4": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=4),
    "L/8": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=8),
    "XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),
    "XL/4": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=4),
    "XL/8": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=8),
}

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

TOKENS = ("batch", "length", "embed")
NORMS = ("layer", "rms")
INITS = ("xavier", "spectral")
# How a block's adaLN modulation and attention projections start: "adaln_zero" (DiT: modulation
# zero, so each block starts as the identity; q, k, v with the variance 2 / (D + 3D) of DiT's
# fused [D, 3D] kernel) or "xavier" (the reference DiT of Shortcut models, kvfrans/shortcut-models
# model.py: the modulation Dense and separate [D, D] q, k, v kernels xavier-uniform on their own
# shapes, variances 2 / (D + 6D) and 1 / D). The final layer's modulation starts at zero in both.
BLOCK_INITS = ("adaln_zero", "xavier")


def normalize(x: jax.Array, norm: str, dtype, name: str) -> jax.Array:
  """The parameter-free normalisation of a block input: LayerNorm ("layer") or RMSNorm ("rms")
  over the last axis, in `dtype`."""
  if norm == "rms":
    return layers.rms_norm(x).astype(dtype)
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, name=name)(x)


def modulation(c: jax.Array, count: int, normalized: bool, param_dtype, name: str,
               kernel_init=nn.initializers.zeros):
  """`count` adaLN modulation vectors [B, D] from Dense_{count D}(SiLU(c)) (zero-initialised
  unless `kernel_init` says otherwise), each passed through RMSNorm without parameters when
  `normalized`."""
  width = c.shape[-1]
  out = layers.dense(count * width, ("embed", "mlp"), kernel_init=kernel_init,
                     param_dtype=param_dtype, name=name)(nn.silu(c))
  parts = jnp.split(out, count, axis=-1)
  return [layers.rms_norm(part) for part in parts] if normalized else parts


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C], patches row-major, pixels (p, p, C) inside."""
  batch, height, width, channels = x.shape
  p = patch_size
  x = x.reshape(batch, height // p, p, width // p, p, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, (height // p) * (width // p), p * p * channels)


def unpatchify(x: jax.Array, patch_size: int, height: int, width: int) -> jax.Array:
  """Inverse of patchify: [B, (H/p)(W/p), p*p*C] -> [B, H, W, C]."""
  batch, _, features = x.shape
  p = patch_size
  channels = features // (p * p)
  x = x.reshape(batch, height // p, width // p, p, p, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, height, width, channels)


class DiTBlock(nn.Module):
  """adaLN-Zero transformer block: [B, L, D] tokens, [B, D] conditioning -> [B, L, D].

  x <- x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))
  x <- x + gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))
  with (shift, scale, gate) x 2 = Dense_6D(SiLU(c)), zero-initialised so the block
  starts as the identity (block_init='adaln_zero'; 'xavier': see BLOCK_INITS).
  """
  num_heads: int
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  attention_impl: str = "xla"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  norm: str = "layer"
  qk_norm: bool = False
  modulation_norm: bool = False
  spectral_init: bool = False
  attention_scale: str = "inverse_sqrt_dim"
  block_init: str = "adaln_zero"

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array, train: bool) -> jax.Array:
    """x: [B, L, D] float32 residual stream; c: [B, D] float32; train: static bool."""
    width = x.shape[-1]
    xavier = self.block_init == "xavier"
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(
        c, 6, self.modulation_norm, self.param_dtype, "adaLN_modulation",
        layers.xavier_uniform if xavier else nn.initializers.zeros)
    norm = lambda name: lambda y: normalize(y, self.norm, self.dtype, name)

    h = layers.modulate(norm("norm1")(x), shift_msa, scale_msa)
    h = layers.Attention(self.num_heads, impl=self.attention_impl, dtype=self.dtype,
                         param_dtype=self.param_dtype, qk_norm=self.qk_norm,
                         spectral_init=self.spectral_init, logit_scale=self.attention_scale,
                         separate_qkv_init=xavier, name="attn")(h)
    h = layers.Dropout(self.dropout, deterministic=not train)(h)
    x = x + gate_msa[:, None, :] * h.astype(jnp.float32)
    x = nn.with_logical_constraint(x, TOKENS)

    h = layers.modulate(norm("norm2")(x), shift_mlp, scale_mlp)
    h = layers.FeedForward(int(width * self.mlp_ratio), dropout=self.dropout, dtype=self.dtype,
                           param_dtype=self.param_dtype, spectral_init=self.spectral_init,
                           name="mlp")(h, train)
    h = layers.Dropout(self.dropout, deterministic=not train)(h)
    x = x + gate_mlp[:, None, :] * h.astype(jnp.float32)
    return nn.with_logical_constraint(x, TOKENS)


class FinalLayer(nn.Module):
  """LN (or RMSNorm) -> adaLN(shift, scale) -> zero-initialised Dense: [B, L, D] -> [B, L, out]
  float32."""
  out_features: int
  param_dtype: layers.Dtype = jnp.float32
  norm: str = "layer"
  modulation_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = modulation(c, 2, self.modulation_norm, self.param_dtype, "adaLN_modulation")
    x = normalize(x, self.norm, jnp.float32, "norm")
    x = layers.modulate(x, shift, scale)
    return layers.dense(self.out_features, ("embed", "conv_out"),
                        kernel_init=nn.initializers.zeros, param_dtype=self.param_dtype,
                        name="linear")(x)


class DiT(nn.Module):
  """Diffusion Transformer backbone (the flowjax Backbone contract).

  Attributes:
    patch_size: p; image height and width must be divisible by it.
    hidden_size: token width D (divisible by 4 and by num_heads).
    depth: number of DiT blocks.
    num_heads: attention heads.
    mlp_ratio: MLP hidden width / D.
    num_classes: 0 = unconditional; else the label table has num_classes + 1 rows.
    time_scale: times are multiplied by this before the sinusoidal embedding.
    dropout: dropout rate on attention and MLP outputs when train=True.
    attention_impl: 'xla' (reference, supports jax.jvp) or 'cudnn'.
    remat: 'none' | 'full' | 'dots' rematerialisation of each block.
    dtype: compute dtype of the token matmuls and attention.
    param_dtype: parameter dtype.
    norm: 'layer' (LayerNorm, DiT) | 'rms' (RMSNorm without parameters).
    qk_norm: RMSNorm with a learned scale on each head's queries and keys.
    attention_scale: 'inverse_sqrt_dim' (logits q.k / sqrt(d)) | 'inverse_dim' (q.k / d, the
      reference DiT of Shortcut models).
    modulation_norm: RMSNorm without parameters on every adaLN modulation vector.
    block_init: 'adaln_zero' (DiT) | 'xavier' (the reference DiT of Shortcut models), how each
      block's adaLN modulation and q, k, v kernels start (BLOCK_INITS).
    linear_init: 'xavier' (DiT) | 'spectral' (patch embedding, attention and MLP kernels with
      spectral norm 1).
    time_init: 'normal' (N(0, 0.02), DiT) | 'spectral' for the time embedders' kernels.
    repa_depth: 0, or the block (1-based) whose output tokens REPA aligns; repa_dim: the
      encoder's feature width; repa_projector_dim: the projector's hidden width. Set from
      config.repa by `flowjax.objectives.repa`, not from config.model.
    text_dim, text_length: 0, or the width and token count of the caption features
      [B, text_length, text_dim] (`flowjax.text`) a text-to-image DiT reads instead of labels:
      projected by a Dense (with bias) plus a learned position per token, they are text_length
      prefix tokens every block attends to jointly with the image tokens (DiT's in-context
      conditioning, Peebles and Xie, arXiv:2212.09748, Sec. 3.1, with the caption's tokens), and
      the mean of the caption's non-padding features, projected, joins the time embedding that
      drives adaLN (as a pooled text embedding does in SD3, Esser et al., arXiv:2403.03206).
    text_layers, text_heads: trainable caption-encoder layers (`layers.TextEncoder`) over the
      frozen caption features before both, 0 = none.
  """
  patch_size: int
  hidden_size: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  num_classes: int = 0
  time_scale: float = 1000.0
  dropout: float = 0.0
  attention_impl: str = "xla"
  remat: str = "none"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  norm: str = "layer"
  qk_norm: bool = False
  attention_scale: str = "inverse_sqrt_dim"
  modulation_norm: bool = False
  linear_init: str = "xavier"
  time_init: str = "normal"
  block_init: str = "adaln_zero"
  repa_depth: int = 0
  repa_dim: int = 0
  repa_projector_dim: int = 2048
  text_dim: int = 0
  text_length: int = 0
  text_layers: int = 0
  text_heads: int = 4

  @property
  def repa_blocks(self) -> int:
    """The blocks whose output REPA can align (repa_depth in 1 .. repa_blocks)."""
    return self.depth

  @nn.compact
  def __call__(self, x: jax.Array, times: tuple[jax.Array, ...], cond: jax.Array | None, *,
               train: bool) -> jax.Array:
    """Predicts a field of the same shape as the input.

    Args:
      x: [B, H, W, C] float.
      times: tuple of 1 to 5 arrays [B] in [0, 1]; one embedder per element.
      cond: int32 labels [B] (num_classes = null label), caption features [B, text_length,
        text_dim] of a text model, or None (all null).
      train: enables dropout (rng collection 'dropout').
    Returns:
      [B, H, W, C] float32.
    """
    if x.ndim != 4:
      raise ValueError(f"DiT expects images [B, H, W, C]; got shape {list(x.shape)}.")
    batch, height, width, channels = x.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f"model.patch_size={p} does not divide the image size {height}x{width}; "
                       f"pick a patch size that divides both.")
    if self.remat not in ("none", *REMAT_POLICIES):
      raise ValueError(f"model.remat={self.remat!r}; use 'none', 'full' or 'dots'.")
    for key, value, allowed in (("norm", self.norm, NORMS),
                                ("linear_init", self.linear_init, INITS),
                                ("time_init", self.time_init, layers.TIME_INITS),
                                ("block_init", self.block_init, BLOCK_INITS)):
      if value not in allowed:
        raise ValueError(f"model.{key}={value!r}; use one of {', '.join(map(repr, allowed))}.")
    spectral = self.linear_init == "spectral"
    layers.check_repa_depth(self.repa_depth, self.repa_blocks)

    text = None
    if self.text_dim > 0:
      text, cond = cond, None
      expected = (batch, self.text_length, self.text_dim)
      if text is None or tuple(text.shape) != expected:
        raise ValueError(f"This DiT reads caption features of shape [B, {self.text_length}, "
                         f"{self.text_dim}] (model.text_length, model.text_dim); got "
                         f"{None if text is None else list(text.shape)}.")
    c = layers.embed_conditioning(times, cond, batch_size=batch, hidden_size=self.hidden_size,
                                  num_classes=self.num_classes, time_scale=self.time_scale,
                                  param_dtype=self.param_dtype, time_init=self.time_init)
    prefix = 0
    if text is not None:
      text = text.astype(jnp.float32)
      if self.text_layers:
        text = layers.TextEncoder(self.text_layers, self.text_heads, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name="text_encoder")(text)
      present = jnp.any(text != 0, axis=-1, keepdims=True).astype(jnp.float32)
      pooled = (text * present).sum(1) / jnp.maximum(present.sum(1), 1.0)
      c = c + layers.dense(self.hidden_size, ("vocab", "embed"), param_dtype=self.param_dtype,
                           name="text_pool")(pooled).astype(jnp.float32)
      text_tokens = layers.dense(self.hidden_size, ("vocab", "embed"), dtype=self.dtype,
                                 param_dtype=self.param_dtype, use_bias=True,
                                 name="text_proj")(text.astype(self.dtype))
      text_pos = self.param("text_pos", nn.initializers.normal(0.02),
                            (self.text_length, self.hidden_size), self.param_dtype)
      text_tokens = text_tokens.astype(jnp.float32) + text_pos.astype(jnp.float32)[None]
      prefix = self.text_length

    tokens = patchify(x.astype(self.dtype), p)
    embed_init = layers.spectral_normal() if spectral else layers.xavier_uniform
    h = layers.dense(self.hidden_size, ("conv_in", "embed"), kernel_init=embed_init,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="x_embed")(tokens)
    pos = layers.sincos_pos_embed_2d(self.hidden_size, height // p, width // p)
    h = h.astype(jnp.float32) + pos[None]
    if prefix:
      h = jnp.concatenate([text_tokens, h], axis=1)
    h = nn.with_logical_constraint(h, TOKENS)

    block_cls = DiTBlock
    if self.remat != "none":
      block_cls = nn.remat(DiTBlock, static_argnums=(3,), policy=REMAT_POLICIES[self.remat])
    for i in range(self.depth):
      h = block_cls(self.num_heads, mlp_ratio=self.mlp_ratio, dropout=self.dropout,
                    attention_impl=self.attention_impl, dtype=self.dtype,
                    param_dtype=self.param_dtype, norm=self.norm, qk_norm=self.qk_norm,
                    modulation_norm=self.modulation_norm, spectral_init=spectral,
                    attention_scale=self.attention_scale, block_init=self.block_init,
                    name=f"block_{i}")(h, c, train)
      if i + 1 == self.repa_depth:
        layers.sow_repa_tokens(self, h[:, prefix:], (height // p, width // p), self.repa_dim,
                               self.repa_projector_dim, self.dtype, self.param_dtype)

    out = FinalLayer(p * p * channels, param_dtype=self.param_dtype, norm=self.norm,
                     modulation_norm=self.modulation_norm, name="final")(h[:, prefix:], c)
    return unpatchify(out, p, height, width).astype(jnp.float32)


@MODELS.register("dit")
def build(model_config: ml_collections.ConfigDict, info) -> DiT:
  """DiT from config.model.

  Keys: patch_size, hidden_size, depth, num_heads (required); mlp_ratio (4.0),
  time_scale (1000.0), dropout (0.0), attention_impl ('xla'), remat ('none'),
  dtype ('float32'), param_dtype ('float32'), norm ('layer'), qk_norm (False),
  attention_scale ('inverse_sqrt_dim'), modulation_norm (False), linear_init ('xavier'),
  time_init ('normal'), block_init ('adaln_zero'), text_dim (0), text_length (0),
  text_layers (0), text_heads (4).
  """
  if len(info.image_shape) != 3:
    raise ValueError(f"model.name='dit' needs image data [H, W, C]; got per-example shape "
                     f"{tuple(info.image_shape)}. Use model.name='mlp' for flat vectors.")
  return DiT(
      patch_size=int(model_config.patch_size),
      hidden_size=int(model_config.hidden_size),
      depth=int(model_config.depth),
      num_heads=int(model_config.num_heads),
      mlp_ratio=float(model_config.get("mlp_ratio", 4.0)),
      num_classes=int(info.num_classes),
      time_scale=float(model_config.get("time_scale", 1000.0)),
      dropout=float(model_config.get("dropout", 0.0)),
      attention_impl=str(model_config.get("attention_impl", "xla")),
      remat=str(model_config.get("remat", "none")),
      dtype=layers.dtype_from_name(model_config.get("dtype", "float32"), "dtype"),
      param_dtype=layers.dtype_from_name(model_config.get("param_dtype", "float32"),
                                         "param_dtype"),
      norm=str(model_config.get("norm", "layer")),
      qk_norm=bool(model_config.get("qk_norm", False)),
      attention_scale=str(model_config.get("attention_scale", "inverse_sqrt_dim")),
      modulation_norm=bool(model_config.get("modulation_norm", False)),
      linear_init=str(model_config.get("linear_init", "xavier")),
      time_init=str(model_config.get("time_init", "normal")),
      block_init=str(model_config.get("block_init", "adaln_zero")),
      **layers.text_settings(model_config, info))

