"""DiT with in-context conditioning tokens and an auxiliary velocity head, the network of improved
MeanFlow (Geng, Lu, Wu, Shechtman, Kolter and He, "Improved Mean Flows", arXiv:2512.02012;
official code Lyy-iiis/imeanflow `models/mit.py`).

Every conditioning input becomes tokens prepended to the patch tokens, in place of DiT's
adaLN-Zero modulation: time-like input i gives time_tokens[i] learned tokens plus its
sinusoidal-MLP embedding, and the class label gives label_tokens learned tokens plus its label
embedding. The official network (`models/mit.py` `_build_sequence`) takes no t input: its tokens
are h = t - r (4), 1 - 1/omega (4), t_min and t_max (2 each), all raw times, and the class (8).
flowjax's objective passes t first, then h, 1 - 1/omega, t_min, t_max (time_tokens
(4, 4, 4, 2, 2) in experiments/imf_imagenet.py); the t tokens are flowjax's own addition. The
blocks are pre-norm transformer blocks whose two residual branches are scaled by zero-initialised
per-channel gates, so each block starts as the identity as adaLN-Zero blocks do. The last
aux_head_depth blocks are duplicated into a second branch with its own final layer: the auxiliary
head that predicts the instantaneous velocity v_theta during training (`models/mit.py`: 8
blocks); the network then returns both fields stacked on the channel axis, [B, H, W, 2C], the
main one first.

REPA (Yu et al., arXiv:2410.06940): with repa_depth > 0 the patch tokens (the conditioning
tokens left out) after block repa_depth (1-based; of the main branch where the auxiliary head
splits off before it) are projected and sown as intermediates/repa, [B, H/p, W/p, repa_dim]
(`layers.sow_repa_tokens`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from flowjax.models import dit, layers
from flowjax.registry import MODELS

TOKENS = dit.TOKENS


def _layer_norm(dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class InContextBlock(nn.Module):
  """Pre-norm transformer block with zero-initialised residual gates: [B, L, D] -> [B, L, D].

  x <- x + g_attn * Attn(LN(x)); x <- x + g_mlp * MLP(LN(x)), g_attn, g_mlp: [D], zero at init.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  attention_impl: str = "xla"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x: [B, L, D] float32 residual stream; train: static bool."""
    width = x.shape[-1]
    gate = lambda name: self.param(
        name, nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (width,),
        self.param_dtype).astype(jnp.float32)
    h = _layer_norm(self.dtype, "norm1")(x)
    h = layers.Attention(self.num_heads, impl=self.attention_impl, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="attn")(h)
    h = layers.Dropout(self.dropout, deterministic=not train)(h)
    x = x + gate("attn_gate") * h.astype(jnp.float32)
    x = nn.with_logical_constraint(x, TOKENS)
    h = _layer_norm(self.dtype, "norm2")(x)
    h = layers.FeedForward(int(width * self.mlp_ratio), dropout=self.dropout, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="mlp")(h, train)
    h = layers.Dropout(self.dropout, deterministic=not train)(h)
    x = x + gate("mlp_gate") * h.astype(jnp.float32)
    return nn.with_logical_constraint(x, TOKENS)


class FinalLayer(nn.Module):
  """LN -> zero-initialised Dense: [B, L, D] -> [B, L, out] float32."""
  out_features: int
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _layer_norm(jnp.float32, "norm")(x)
    return layers.dense(self.out_features, ("embed", "conv_out"),
                        kernel_init=nn.initializers.zeros, param_dtype=self.param_dtype,
                        name="linear")(x)


class InContextDiT(nn.Module):
  """The improved MeanFlow backbone (the flowjax Backbone contract, see the module docstring).

  Attributes:
    patch_size, hidden_size, depth, num_heads, mlp_ratio, dropout, attention_impl, remat, dtype,
      param_dtype: as `flowjax.models.dit.DiT`.
    num_classes: 0 = unconditional; else the label table has num_classes + 1 rows.
    time_scale: times are multiplied by this before the sinusoidal embedding.
    time_tokens: learned tokens per time input, one entry per element of `times` (flowjax's
      iMF: 4 for t, h and the guidance scale, 2 each for t_min and t_max; `models/mit.py` has no
      t input and 4, 4, 2, 2 for h, the guidance scale, t_min and t_max).
    label_tokens: learned tokens of the class label (iMF: 8), unused when num_classes = 0.
    aux_head_depth: 0, or the number of final blocks duplicated into the auxiliary velocity
      head (iMF: 8); with a head the output has 2C channels, the main field first.
    repa_depth, repa_dim, repa_projector_dim: REPA, as `flowjax.models.dit.DiT`.
  """
  patch_size: int
  hidden_size: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  num_classes: int = 0
  time_scale: float = 1.0
  time_tokens: tuple[int, ...] = (4, 4)
  label_tokens: int = 8
  aux_head_depth: int = 0
  dropout: float = 0.0
  attention_impl: str = "xla"
  remat: str = "none"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  repa_depth: int = 0
  repa_dim: int = 0
  repa_projector_dim: int = 2048

  @property
  def repa_blocks(self) -> int:
    """The blocks whose output REPA can align (repa_depth in 1 .. repa_blocks)."""
    return self.depth

  def condition_tokens(self, times, cond, batch: int) -> jax.Array:
    """[B, P, D] float32: the label's tokens, then each time input's, each the learned tokens
    plus the input's embedding."""
    token_init = nn.initializers.normal(1.0 / self.hidden_size ** 0.5)
    new_tokens = lambda name, count: self.param(
        name, nn.with_logical_partitioning(token_init, (None, "embed")),
        (count, self.hidden_size), self.param_dtype).astype(jnp.float32)
    groups = []
    if self.num_classes > 0:
      label = layers.LabelEmbedder(self.num_classes, self.hidden_size,
                                   param_dtype=self.param_dtype, name="label_embed")(cond, batch)
      groups.append(new_tokens("label_tokens", self.label_tokens)[None] + label[:, None])
    for i, (t, count) in enumerate(zip(times, self.time_tokens)):
      embedding = layers.TimestepEmbedder(self.hidden_size, time_scale=self.time_scale,
                                          param_dtype=self.param_dtype,
                                          name=f"time_embed_{i}")(jnp.asarray(t))
      groups.append(new_tokens(f"time_tokens_{i}", count)[None] + embedding[:, None])
    return jnp.concatenate(groups, axis=1)

  @nn.compact
  def __call__(self, x: jax.Array, times: tuple[jax.Array, ...], cond: jax.Array | None, *,
               train: bool) -> jax.Array:
    """x: [B, H, W, C]; times: tuple of len(time_tokens) arrays [B]; cond: int32 labels [B]
    (num_classes = null label) or None. Returns [B, H, W, C] float32, or [B, H, W, 2C] with the
    auxiliary head."""
    if x.ndim != 4:
      raise ValueError(f"imf_dit expects images [B, H, W, C]; got shape {list(x.shape)}.")
    batch, height, width, channels = x.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f"model.patch_size={p} does not divide the image size {height}x{width}; "
                       f"pick a patch size that divides both.")
    if self.remat not in ("none", *dit.REMAT_POLICIES):
      raise ValueError(f"model.remat={self.remat!r}; use 'none', 'full' or 'dots'.")
    if not isinstance(times, (tuple, list)) or len(times) != len(self.time_tokens):
      count = len(times) if isinstance(times, (tuple, list)) else "not a tuple of"
      raise ValueError(f"model.time_tokens={tuple(self.time_tokens)} names {len(self.time_tokens)} "
                       f"time inputs, but the objective passes {count} time inputs; give "
                       "model.time_tokens one token count per time input.")
    for t in times:
      if jnp.shape(t) != (batch,):
        raise ValueError(f"every time input must have shape ({batch},); got "
                         f"{list(jnp.shape(t))}.")
    if self.num_classes == 0 and cond is not None:
      raise ValueError("This model is unconditional (num_classes=0) but received class labels "
                       "(cond is not None); pass cond=None or build it for a labelled dataset.")

    layers.check_repa_depth(self.repa_depth, self.repa_blocks)
    prefix = self.condition_tokens(times, cond, batch)
    tokens = dit.patchify(x.astype(self.dtype), p)
    h = layers.dense(self.hidden_size, ("conv_in", "embed"), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="x_embed")(tokens)
    pos = layers.sincos_pos_embed_2d(self.hidden_size, height // p, width // p)
    h = jnp.concatenate([prefix, h.astype(jnp.float32) + pos[None]], axis=1)
    h = nn.with_logical_constraint(h, TOKENS)

    block_cls = InContextBlock
    if self.remat != "none":
      block_cls = nn.remat(InContextBlock, static_argnums=(2,),
                           policy=dit.REMAT_POLICIES[self.remat])
    block = lambda name: block_cls(self.num_heads, mlp_ratio=self.mlp_ratio,
                                   dropout=self.dropout, attention_impl=self.attention_impl,
                                   dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    start = prefix.shape[1]

    def repa_tokens(i, stream):
      if i + 1 == self.repa_depth:
        layers.sow_repa_tokens(self, stream[:, start:], (height // p, width // p), self.repa_dim,
                               self.repa_projector_dim, self.dtype, self.param_dtype)

    shared = self.depth - self.aux_head_depth
    for i in range(shared):
      h = block(f"block_{i}")(h, train)
      repa_tokens(i, h)
    main, aux = h, h
    for i in range(shared, self.depth):
      main = block(f"block_{i}")(main, train)
      repa_tokens(i, main)
    for i in range(shared, self.depth):
      aux = block(f"aux_block_{i}")(aux, train)

    head = lambda name, stream: dit.unpatchify(
        FinalLayer(p * p * channels, param_dtype=self.param_dtype, name=name)(stream[:, start:]),
        p, height, width)
    out = head("final", main)
    if self.aux_head_depth > 0:
      out = jnp.concatenate([out, head("aux_final", aux)], axis=-1)
    return out.astype(jnp.float32)


@MODELS.register("imf_dit")
def build(model_config: ml_collections.ConfigDict, info) -> InContextDiT:
  """InContextDiT from config.model.

  Keys: patch_size, hidden_size, depth, num_heads (required); mlp_ratio (4.0), time_scale (1.0),
  time_tokens ((4, 4)), label_tokens (8), aux_head_depth (0), dropout (0.0), attention_impl
  ('xla'), remat ('none'), dtype ('float32'), param_dtype ('float32').
  """
  if len(info.image_shape) != 3:
    raise ValueError(f"model.name='imf_dit' needs image data [H, W, C]; got per-example shape "
                     f"{tuple(info.image_shape)}. Use model.name='mlp' for flat vectors.")
  depth = int(model_config.depth)
  aux_head_depth = int(model_config.get("aux_head_depth", 0))
  if not 0 <= aux_head_depth <= depth:
    raise ValueError(f"model.aux_head_depth={aux_head_depth} must be in [0, model.depth={depth}] "
                     "(iMF: 8 of the blocks; 0 = no auxiliary velocity head).")
  time_tokens = tuple(int(n) for n in model_config.get("time_tokens", (4, 4)))
  label_tokens = int(model_config.get("label_tokens", 8))
  if (not 1 <= len(time_tokens) <= layers.MAX_TIME_INPUTS or min(time_tokens) < 1
      or label_tokens < 1):
    raise ValueError(f"model.time_tokens={time_tokens} needs 1 to {layers.MAX_TIME_INPUTS} "
                     f"positive token counts, one per time input, and model.label_tokens="
                     f"{label_tokens} must be positive.")
  return InContextDiT(
      patch_size=int(model_config.patch_size),
      hidden_size=int(model_config.hidden_size),
      depth=depth,
      num_heads=int(model_config.num_heads),
      mlp_ratio=float(model_config.get("mlp_ratio", 4.0)),
      num_classes=int(info.num_classes),
      time_scale=float(model_config.get("time_scale", 1.0)),
      time_tokens=time_tokens,
      label_tokens=label_tokens,
      aux_head_depth=aux_head_depth,
      dropout=float(model_config.get("dropout", 0.0)),
      attention_impl=str(model_config.get("attention_impl", "xla")),
      remat=str(model_config.get("remat", "none")),
      dtype=layers.dtype_from_name(model_config.get("dtype", "float32"), "dtype"),
      param_dtype=layers.dtype_from_name(model_config.get("param_dtype", "float32"),
                                         "param_dtype"))
