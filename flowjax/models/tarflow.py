"""TarFlow and STARFlow: normalizing flows built from autoregressive causal-transformer blocks.

Data x ([B, H, W, C] images, patchified into L = (H/p)(W/p) tokens of p*p*C channels, or flat
[B, D] vectors, one token of one channel per coordinate) go through `num_blocks` affine
autoregressive blocks, data -> noise (Zhai et al., arXiv:2412.06329; Gu et al., arXiv:2506.06276).
Block k reads its tokens in its own order (identity for even k, flipped for odd k) and maps token i
by z_i = (x_i - mu_i) / sigma_i, where (a_i, mu_i) come from a causal transformer that has seen only
the tokens before i:
- TarFlow (`start_token=False`): the transformer reads x_0 .. x_{L-2}, its outputs are shifted by
  one token, and token 0 passes through unchanged (mu = 0, sigma = 1);
- STARFlow (`start_token=True`): a learned start token is read before x_0, so token 0 is
  transformed too.
The output projection is zero-initialised, `soft_clip` > 0 bounds it by soft_clip tanh(. /
soft_clip), and sigma = exp(a) (`scale='exp'`, TarFlow) or softplus(a + 0.5413) (`'softplus'`,
STARFlow): both are the identity at initialisation. The affine maps and log-determinants are
computed in float32 whatever the compute dtype.

Deep-shallow (STARFlow): with `deep_layers` > 0 the LAST block in the data -> noise direction (the
first one inverted when sampling) has `deep_layers` transformer layers and the others
`layers_per_block`. With `condition='deep'` only that block sees the class label; with 'all' every
block does (plain TarFlow). Labels are embedded with a null row (index num_classes) for CFG.

Text (STARFlow's text-to-image model, `text_dim` > 0): the conditioned blocks read text-encoder
features [B, text_length, text_dim] projected by one Dense (with bias, apple/ml-starflow's
`proj_txt`) as a prefix of text_length tokens before the image tokens, causal among themselves
and for the image tokens, with RoPE's third coordinate k / text_length * H for text token k; their
outputs are discarded. A class label is the one-token case (`label_input='token'`: the one-hot of
num_classes + 1 entries through the same kind of Dense). The unconditional input of guidance is
the features of an empty caption, which the caller passes; cond=None reads zero features.

Flow-model contract (one sampler, `flowjax.samplers.autoregressive`, serves any model with it):
- `__call__(x, cond) -> (z, logdet, intermediates)`: data -> noise. z has the shape of x;
  logdet: [B] float32, the sum over blocks of each block's -mean(log sigma) over tokens and
  channels (a log-determinant per dimension: log|det dz/dx| / D); intermediates: the outputs of
  blocks 0 .. num_blocks-2 as token arrays [B, L, C].
- `to_tokens(x)` / `from_tokens(tokens)` and `permute(block_index, tokens)` (its own inverse)
  move between data layout, data token order and a block's token order;
- `init_cache(batch, block_index)`: an explicit KV cache for one block, a tuple with one
  (keys, values) pair of zeros [batch, S, num_heads, head_dim] per layer (no mutable
  collections), S = L plus the label tokens the block reads first (`label_input='token'`);
  `prefill_cache(block_index, cache, cond, batch)` writes those label tokens into it;
- `block_chunk(block_index, inputs, start, cache, cond) -> (mu, sigma, cache)`: the affine
  parameters [B, T, C] of tokens start .. start+T-1 (block order) from the transformer inputs
  [B, T, C], i.e. the tokens start-1 .. start+T-2 (the entry for token -1 is ignored), reading
  and writing the cache; `block_step` is the one-token case ([B, C] in and out);
- `block_sequence(block_index, tokens, cond) -> (mu, sigma)`: the full causal pass over a block's
  tokens [B, L, C] without a cache (naive decoding), and `block_forward` the block's own
  data -> noise map.
Inside the cache every token has a slot: token t's transformer input (token t-1, or the start
token) is written at slot t (t + 1 after a label token). Without a start token the input of
token 0 is a placeholder that no other token attends to.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowjax.models import dit, layers
from flowjax.registry import MODELS

INV_SOFTPLUS_ONE = math.log(math.expm1(1.0))  # softplus(0.5413...) = 1
SCALES = ("exp", "softplus")
CONDITIONS = ("deep", "all")
POSITIONS = ("learned", "sincos", "rope")
ORDERS = ("r2l", "l2r")
LABEL_INPUTS = ("add", "token")
FINAL_NORMS = ("layernorm", "rmsnorm", "none")
PATCH_CHANNELS = ("last", "first")
LABEL_NULLS = ("learned", "mean")
GELUS = ("tanh", "exact")
REMATS = ("none", "full", "dots")
TOKENS = ("batch", "length", "embed")
# Causal attention without a cache over at least 2x this many tokens attends in two halves
# (CausalAttention): 0.72x the time of one masked attention over 256 tokens, forward plus
# backward, on XLA:CPU.
CAUSAL_SPLIT_MIN = 64
# The architecture of apple/ml-starflow's `transformer_flow.Model` (rope=1, sos=1,
# use_softplus=1, use_final_norm=1, soft_clip=4, class labels as a one-token one-hot "caption"
# read by the deep block only, torch LayerNorm eps 1e-5, exact GELU); `order` follows its
# seq_order. A model built with these options loads its checkpoints (`flowjax.convert`).
STARFLOW_OPTIONS = dict(start_token=True, scale="softplus", soft_clip=4.0, condition="deep",
                        positions="rope", label_input="token", final_norm="rmsnorm",
                        norm_eps=1e-5, gelu="exact")
# The architecture of apple/ml-tarflow's `transformer_flow.Model` (nvp=True): the one-token
# shift instead of a start token, exp scale without clip, learned positions, a class embedding
# added to every token of every block with the mean over classes for a dropped label, no final
# norm, torch LayerNorm eps 1e-5, exact GELU, patches flattened channel-first (F.unfold).
TARFLOW_OPTIONS = dict(start_token=False, scale="exp", soft_clip=0.0, condition="all",
                       positions="learned", label_input="add", label_null="mean",
                       final_norm="none", norm_eps=1e-5, gelu="exact", patch_channels="first",
                       order="r2l")
# apple/ml-starflow's 3B text-to-image model (configs/starflow_3B_t2i_256x256.yaml): 256x256
# images as 32x32x4 SD-VAE latents at patch 1, width 3072 (48 heads of 64), 6 blocks of 2 layers
# with a deep block of 24, the text (flan-t5-xl's encoder features, 2048 wide, 128 tokens) read
# by the deep block only (cond_top_only), noise_std 0.3 and classifier-free guidance with
# captions dropped to the empty string at rate 0.1. Its flow has 3,858,281,544 parameters:
# 34 layers of 12 D^2 + 13 D, 6 x 43,020 per block, and the 2048 -> 3072 text projection.
STARFLOW_3B_T2I = dict(STARFLOW_OPTIONS, image_shape=(32, 32, 4), patch_size=1, hidden_size=3072,
                       num_heads=48, num_blocks=6, layers_per_block=2, deep_layers=24,
                       order="l2r", text_dim=2048, text_length=128, num_classes=0)
ROPE_THETA = 10000.0
ROPE_LABEL_FREQUENCIES = 8


def token_shape(image_shape, patch_size: int) -> tuple[int, int]:
  """(L, C): the number of tokens and channels per token of one example."""
  if len(image_shape) == 3:
    height, width, channels = image_shape
    if height % patch_size or width % patch_size:
      raise ValueError(f"model.patch_size={patch_size} does not divide the image size "
                       f"{height}x{width}; pick a patch size that divides both.")
    return (height // patch_size) * (width // patch_size), patch_size * patch_size * channels
  if len(image_shape) == 1:
    return int(image_shape[0]), 1
  raise ValueError(f"model.name='tarflow' needs images [H, W, C] or flat vectors [D]; got the "
                   f"per-example shape {tuple(image_shape)}.")


def sincos_positions(length: int, width: int) -> np.ndarray:
  """[length, width] float32 fixed 1-D sin-cos embedding of token indices 0 .. length-1."""
  if width % 2:
    raise ValueError(f"model.positions='sincos' needs an even hidden_size; got {width}.")
  omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2.0))
  angles = np.arange(length, dtype=np.float64)[:, None] * omega[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def rope_angles(grid: tuple[int, int], head_dim: int, label_tokens: int,
                label_axis: bool) -> np.ndarray:
  """[label_tokens + H*W, head_dim] float32 rotary angles of STARFlow's 2-D RoPE (Gu et al.,
  arXiv:2506.06276), one row per sequence position: the label tokens first, then the (H, W) grid
  in raster order, each angle repeated for the two channels of its rotated pair.

  With n = head_dim / 2 frequencies: without `label_axis`, n/2 frequencies theta^(-2i/n) of the
  row index and the same of the column index; with it (models that read labels as tokens), the
  last 8 are theta^(-i/8) of a third coordinate, k / label_tokens * H for label token k and 0 for
  image tokens, and the first n - 8 are split between row and column as theta^(-2i/(n-8)).
  """
  height, width = grid
  half = head_dim // 2
  spatial = half - ROPE_LABEL_FREQUENCIES if label_axis else half
  if head_dim % 2 or spatial < 2 or spatial % 2:
    raise ValueError(
        f"model.positions='rope' with head_dim={head_dim} (hidden_size / num_heads): the "
        f"{'row, column and label' if label_axis else 'row and column'} frequencies need an "
        f"even head_dim with head_dim / 2 {'- 8 ' if label_axis else ''}even and >= 2.")
  frequencies = 1.0 / ROPE_THETA ** (np.arange(0, spatial, 2, dtype=np.float64) / spatial)
  rows, cols = np.meshgrid(np.arange(height, dtype=np.float64),
                           np.arange(width, dtype=np.float64), indexing="ij")
  rows, cols = rows.reshape(-1), cols.reshape(-1)
  parts = [rows[:, None] * frequencies, cols[:, None] * frequencies]
  if label_axis:
    label_frequencies = 1.0 / ROPE_THETA ** (
        np.arange(ROPE_LABEL_FREQUENCIES, dtype=np.float64) / ROPE_LABEL_FREQUENCIES)
    third = np.zeros_like(rows)
    parts.append(third[:, None] * label_frequencies)
  angles = np.concatenate(parts, axis=1)
  if label_tokens:
    label_rows = np.zeros((label_tokens, angles.shape[1]))
    if label_axis:
      position = np.arange(label_tokens, dtype=np.float64) / label_tokens * height
      label_rows[:, -ROPE_LABEL_FREQUENCIES:] = position[:, None] * label_frequencies
    angles = np.concatenate([label_rows, angles], axis=0)
  return np.repeat(angles, 2, axis=1).astype(np.float32)


def rope_rotation(angles: np.ndarray) -> np.ndarray:
  """[2, T, head_dim] float32 tables of apply_rope from rotary angles [T, head_dim] (pairs of
  equal angles): cos(angles), and sin(angles) negated on the first channel of each pair.
  Computed once on the host: inside the step, XLA would recompute the cosines for every element
  of the broadcast products that it fuses them into."""
  angles = np.asarray(angles, np.float64)
  sign = np.tile(np.array([-1.0, 1.0]), angles.shape[-1] // 2)
  return np.stack([np.cos(angles), np.sin(angles) * sign]).astype(np.float32)


def apply_rope(x, rotation):
  """Rotates each consecutive channel pair of x [B, T, heads, head_dim] by the angles whose
  rope_rotation tables are `rotation` [2, T, head_dim]: (x_2i, x_2i+1) -> (x_2i cos - x_2i+1 sin,
  x_2i+1 cos + x_2i sin)."""
  swapped = jnp.flip(x.reshape(x.shape[:-1] + (-1, 2)), axis=-1).reshape(x.shape)
  cos = rotation[0][None, :, None, :].astype(x.dtype)
  signed_sin = rotation[1][None, :, None, :].astype(x.dtype)
  return x * cos + swapped * signed_sin


class RMSNorm(nn.Module):
  """x / rms(x) * (1 + w) in float32, w initialised at zero (STARFlow's final norm)."""
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    weight = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                        (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return x * (1.0 + weight)


def _layer_norm(name: str, epsilon: float = 1e-6) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=epsilon, dtype=jnp.float32, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class CausalAttention(nn.Module):
  """Causal multi-head self-attention over token slots, with an optional explicit KV cache.

  Slot s may attend to slots <= s; slot `hidden_slot` (>= 0) is attended by itself only.
  """
  num_heads: int
  hidden_slot: int = -1
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, slots, cache, rope=None, temperature=None):
    """x: [B, T, D] tokens at the consecutive slots `slots` ([T] int32); cache: None (the T
    tokens attend among themselves) or (keys, values) [B, S, heads, head_dim], into which this
    call's keys and values are written at slots[0] .. slots[0]+T-1 before attending over all S
    slots; rope: None or [2, T, head_dim] rope_rotation tables of the slots (queries and keys
    rotated before the cache); temperature: None or [B] attention temperatures (logits /
    temperature). Returns ([B, T, D], the updated cache or None)."""
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"hidden_size={width} is not divisible by num_heads={self.num_heads}.")
    head_dim = width // self.num_heads
    qkv_init = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")
    projections = []
    for name in ("query", "key", "value"):
      y = layers.dense(width, ("embed", "heads"), kernel_init=qkv_init, dtype=self.dtype,
                       param_dtype=self.param_dtype, name=name)(x)
      y = y.reshape(batch, length, self.num_heads, head_dim)
      projections.append(nn.with_logical_constraint(y, ("batch", "length", "heads", "kv")))
    q, k, v = projections
    if rope is not None:
      q, k = apply_rope(q, rope), apply_rope(k, rope)
    if temperature is not None:
      q = q / jnp.asarray(temperature, q.dtype)[:, None, None, None]
    if cache is None:
      keys, values, key_slots = k, v, slots
    else:
      cache_keys, cache_values = cache
      at = (0, slots[0], 0, 0)
      keys = jax.lax.dynamic_update_slice(cache_keys, k.astype(cache_keys.dtype), at)
      values = jax.lax.dynamic_update_slice(cache_values, v.astype(cache_values.dtype), at)
      cache = (keys, values)
      key_slots = jnp.arange(keys.shape[1])
    mask = key_slots[None, :] <= slots[:, None]
    if self.hidden_slot >= 0:
      hidden = self.hidden_slot
      mask = mask & ((key_slots[None, :] != hidden) | (slots[:, None] == hidden))
    keys, values = keys.astype(q.dtype), values.astype(q.dtype)
    if cache is None and length >= 2 * CAUSAL_SPLIT_MIN:
      # Without a cache the keys are the queries' own slots, which increase, so the first half
      # of the queries sees none of the second half of the keys: attending over the first half
      # alone drops only masked (zero-weight) columns. The same values (bit for bit on
      # XLA:CPU), a quarter of the score matrix less to compute and differentiate.
      half = length // 2
      y = jnp.concatenate([
          jax.nn.dot_product_attention(q[:, :half], keys[:, :half], values[:, :half],
                                       mask=mask[None, None, :half, :half]),
          jax.nn.dot_product_attention(q[:, half:], keys, values,
                                       mask=mask[None, None, half:])], axis=1)
    else:
      y = jax.nn.dot_product_attention(q, keys, values, mask=mask[None, None])
    y = y.reshape(batch, length, width)
    out = layers.dense(width, ("heads", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                       name="out")(y)
    return out, cache


class TransformerLayer(nn.Module):
  """Pre-LayerNorm causal transformer layer: h + Attn(LN(h)), then h + MLP(LN(h))."""
  num_heads: int
  mlp_ratio: float = 4.0
  hidden_slot: int = -1
  norm_eps: float = 1e-6
  exact_gelu: bool = False
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, slots, cache, rope=None, temperature=None):
    """h: [B, T, D] float32 residual stream; slots, cache, rope, temperature: as in
    CausalAttention."""
    a, cache = CausalAttention(self.num_heads, self.hidden_slot, self.dtype,
                               self.param_dtype, name="attn")(
                                   _layer_norm("norm1", self.norm_eps)(h).astype(self.dtype),
                                   slots, cache, rope, temperature)
    h = nn.with_logical_constraint(h + a.astype(jnp.float32), TOKENS)
    m = layers.FeedForward(int(h.shape[-1] * self.mlp_ratio), exact_gelu=self.exact_gelu,
                           dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(
                               _layer_norm("norm2", self.norm_eps)(h).astype(self.dtype), False)
    return nn.with_logical_constraint(h + m.astype(jnp.float32), TOKENS), cache


class MeanNullLabelEmbedder(nn.Module):
  """Class labels -> [B, hidden_size] from a table of num_classes rows; the null label
  (num_classes) and labels=None take the mean of the rows (TarFlow's dropped label)."""
  num_classes: int
  hidden_size: int
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, labels, batch_size: int):
    table = self.param("table", nn.with_logical_partitioning(nn.initializers.normal(0.01),
                                                             ("vocab", "embed")),
                       (self.num_classes, self.hidden_size), self.param_dtype)
    table = jnp.asarray(table, jnp.float32)
    mean = jnp.mean(table, axis=0)
    if labels is None:
      return jnp.broadcast_to(mean, (batch_size, self.hidden_size))
    rows = jnp.take(table, jnp.clip(labels, 0, self.num_classes - 1), axis=0)
    return jnp.where((labels >= self.num_classes)[:, None], mean[None], rows)


class FlowBlock(nn.Module):
  """One affine autoregressive block over L tokens of C channels (see the module docstring).

  With `label_input='token'` a conditioned block reads the label as one token before the
  sequence (a Dense of its one-hot, STARFlow's class "caption"), so its cache has L + 1 slots
  and image slot s sits at cache slot s + 1.
  """
  length: int
  channels: int
  hidden_size: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  flip: bool = False
  start_token: bool = True
  scale: str = "softplus"
  soft_clip: float = 4.0
  conditioned: bool = False
  num_classes: int = 0
  positions: str = "learned"
  grid: tuple = ()
  rope_label_axis: bool = False
  label_input: str = "add"
  label_null: str = "learned"
  final_norm: str = "layernorm"
  norm_eps: float = 1e-6
  exact_gelu: bool = False
  text_dim: int = 0
  text_length: int = 0
  text_layers: int = 0
  text_heads: int = 4
  remat: str = "none"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @property
  def prefix(self) -> int:
    """Condition tokens before the sequence: text_length for a conditioned block of a text
    model, 1 for one with label_input='token', else 0."""
    if self.text_dim > 0:
      return self.text_length if self.conditioned else 0
    return int(self.label_input == "token" and self.conditioned and self.num_classes > 0)

  def setup(self):
    self.proj_in = layers.dense(self.hidden_size, ("conv_in", "embed"), dtype=self.dtype,
                                param_dtype=self.param_dtype)
    self.proj_out = layers.dense(2 * self.channels, ("embed", "conv_out"),
                                 kernel_init=nn.initializers.zeros, dtype=self.dtype,
                                 param_dtype=self.param_dtype)
    if self.positions == "learned":
      self.pos_embed = self.param(
          "pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.01),
                                                    ("length", "embed")),
          (self.length, self.hidden_size), self.param_dtype)
    if self.start_token:
      self.start = self.param(
          "start_token", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("conv_in",)),
          (self.channels,), self.param_dtype)
    if self.conditioned and self.text_dim > 0:
      self.text_proj = layers.dense(self.hidden_size, ("vocab", "embed"), dtype=self.dtype,
                                    param_dtype=self.param_dtype)
      if self.text_layers:
        self.text_encoder = layers.TextEncoder(self.text_layers, self.text_heads,
                                               dtype=self.dtype, param_dtype=self.param_dtype)
    elif self.conditioned and self.num_classes > 0:
      if self.prefix:
        self.label_token = layers.dense(self.hidden_size, ("vocab", "embed"), dtype=self.dtype,
                                        param_dtype=self.param_dtype)
      elif self.label_null == "mean":
        self.label_embed = MeanNullLabelEmbedder(self.num_classes, self.hidden_size,
                                                 param_dtype=self.param_dtype)
      else:
        self.label_embed = layers.LabelEmbedder(self.num_classes, self.hidden_size,
                                                param_dtype=self.param_dtype)
    hidden_slot = -1 if self.start_token else self.prefix
    layer_cls = TransformerLayer
    if self.remat != "none":  # each layer's activations recomputed in the backward pass
      layer_cls = nn.remat(TransformerLayer, policy=dit.REMAT_POLICIES[self.remat])
    self.layers = [layer_cls(self.num_heads, self.mlp_ratio, hidden_slot=hidden_slot,
                                    norm_eps=self.norm_eps, exact_gelu=self.exact_gelu,
                                    dtype=self.dtype, param_dtype=self.param_dtype)
                   for _ in range(self.depth)]
    if self.final_norm == "rmsnorm":
      self.out_norm = RMSNorm(name="final_norm")
    elif self.final_norm == "layernorm":
      self.out_norm = _layer_norm("final_norm", self.norm_eps)
    else:
      self.out_norm = lambda h: h

  def position_table(self):
    if self.positions == "learned":
      return jnp.asarray(self.pos_embed, jnp.float32)
    return jnp.asarray(sincos_positions(self.length, self.hidden_size))

  def rope_table(self):
    """[2, prefix + L, head_dim] rope_rotation tables by cache slot, or None without RoPE."""
    if self.positions != "rope":
      return None
    return jnp.asarray(rope_rotation(rope_angles(
        self.grid, self.hidden_size // self.num_heads, self.prefix, self.rope_label_axis)))

  def _layers(self, h, slots, cache, temperature=None):
    """The transformer over h [B, T, D] at cache slots `slots` (prefix included)."""
    table = self.rope_table()
    rope = None if table is None else jnp.take(table, slots, axis=1)
    new_cache = []
    for index, layer in enumerate(self.layers):
      h, layer_cache = layer(h, slots, None if cache is None else cache[index], rope,
                             temperature)
      new_cache.append(layer_cache)
    return h, (None if cache is None else tuple(new_cache))

  def _label_tokens(self, cond, batch):
    """[B, prefix, D] float32 condition tokens: the projected text features [B, text_length,
    text_dim] (None: zeros), or the label token (labels in [0, num_classes], the last = null)."""
    if self.text_dim > 0:
      shape = (batch, self.text_length, self.text_dim)
      if cond is None:
        cond = jnp.zeros(shape, jnp.float32)
      if tuple(cond.shape) != shape:
        raise ValueError(f"This STARFlow model reads text features of shape "
                         f"[B, {self.text_length}, {self.text_dim}] (model.text_length, "
                         f"model.text_dim); got {list(cond.shape)}.")
      if self.text_layers:
        cond = self.text_encoder(cond)
      return self.text_proj(cond.astype(self.dtype)).astype(jnp.float32)
    if cond is None:
      cond = jnp.full((batch,), self.num_classes, jnp.int32)
    one_hot = jax.nn.one_hot(cond, self.num_classes + 1, dtype=self.dtype)
    return self.label_token(one_hot)[:, None].astype(jnp.float32)

  def prefill(self, cond, cache, batch: int, temperature=None):
    """Writes the keys and values of the label token(s) into the cache (identity without)."""
    if not self.prefix:
      return cache
    _, cache = self._layers(self._label_tokens(cond, batch), jnp.arange(self.prefix), cache,
                            temperature)
    return cache

  def affine(self, inputs, slots, cond, cache, temperature=None):
    """(mu, sigma) [B, T, C] float32 of the tokens at `slots` ([T], consecutive, block order)
    from their transformer inputs [B, T, C] (the preceding tokens), and the updated cache (which
    must hold the label token from `prefill` when the block reads one); temperature: None or
    [B] attention temperatures (sampling only)."""
    batch = inputs.shape[0]
    if self.start_token:
      start = jnp.broadcast_to(jnp.asarray(self.start, inputs.dtype), inputs.shape)
      inputs = jnp.where((slots == 0)[None, :, None], start, inputs)
    h = self.proj_in(inputs.astype(self.dtype)).astype(jnp.float32)
    if self.positions != "rope":
      # The position embedding of the data token each input stands for (the input itself in
      # TarFlow, the predicted token with a start token), in data order.
      source = slots if self.start_token else jnp.maximum(slots - 1, 0)
      if self.flip:
        source = self.length - 1 - source
      h = h + jnp.take(self.position_table(), source, axis=0)[None]
    if self.conditioned and self.num_classes > 0 and not self.prefix and not self.text_dim:
      h = h + self.label_embed(cond, batch)[:, None, :]
    h = nn.with_logical_constraint(h, TOKENS)
    cache_slots = slots + self.prefix
    if self.prefix and cache is None:
      h = jnp.concatenate([self._label_tokens(cond, batch), h], axis=1)
      cache_slots = jnp.concatenate([jnp.arange(self.prefix), cache_slots])
    h, cache = self._layers(h, cache_slots, cache, temperature)
    h = h[:, h.shape[1] - inputs.shape[1]:]
    out = self.proj_out(self.out_norm(h).astype(self.dtype)).astype(jnp.float32)
    if self.soft_clip > 0:
      out = self.soft_clip * jnp.tanh(out / self.soft_clip)
    a, mu = jnp.split(out, 2, axis=-1)
    sigma = jnp.exp(a) if self.scale == "exp" else jax.nn.softplus(a + INV_SOFTPLUS_ONE)
    if not self.start_token:
      first = (slots == 0)[None, :, None]
      mu, sigma = jnp.where(first, 0.0, mu), jnp.where(first, 1.0, sigma)
    return mu, sigma, cache

  def sequence(self, tokens, cond, temperature=None):
    """(mu, sigma) [B, L, C] of every token of `tokens` [B, L, C] (block order), no cache."""
    inputs = jnp.concatenate([jnp.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
    mu, sigma, _ = self.affine(inputs, jnp.arange(self.length), cond, None, temperature)
    return mu, sigma

  def __call__(self, tokens, cond):
    """Data -> noise: tokens [B, L, C] in data order -> (z [B, L, C] float32 in data order,
    -log sigma [B, L, C] float32 in this block's token order)."""
    x = jnp.flip(tokens, axis=1) if self.flip else tokens
    x = x.astype(jnp.float32)
    mu, sigma = self.sequence(x, cond)
    z = (x - mu) / sigma
    return (jnp.flip(z, axis=1) if self.flip else z), -jnp.log(sigma)


class TarFlow(nn.Module):
  """A stack of `num_blocks` FlowBlocks (see the module docstring for the contract).

  Attributes:
    image_shape: per-example data shape, (H, W, C) or (D,).
    patch_size: p for images (tokens of p*p*C channels); ignored for flat data.
    hidden_size, num_heads, mlp_ratio: transformer width, heads (dividing hidden_size), MLP ratio.
    num_blocks: number of flow blocks.
    layers_per_block: transformer layers of every block (of the shallow ones with deep_layers).
    deep_layers: 0, or the layers of the last block (deep-shallow STARFlow).
    num_classes: 0 = unconditional; else labels in [0, num_classes], num_classes = null.
    start_token: learned start token (STARFlow) instead of the one-token shift (TarFlow).
    scale: 'exp' (sigma = exp(a)) or 'softplus' (sigma = softplus(a + 0.5413)).
    soft_clip: c > 0 maps the projection output o to c tanh(o / c); 0 = off.
    condition: 'deep' (only the last block sees labels) or 'all'.
    positions: 'learned' or 'sincos' position embeddings added to the tokens, or 'rope'
      (STARFlow's 2-D rotary embedding of the queries and keys, by position in the block's
      sequence; images only).
    order: 'r2l' (block k flipped for odd k) or 'l2r' (flipped for even k), STARFlow's
      seq_order.
    label_input: 'add' (a label embedding added to every token) or 'token' (the one-hot label
      projected to one token read before the sequence, STARFlow's class conditioning).
    label_null: 'learned' (a table row for the null label) or 'mean' (the null label takes the
      mean of the class rows, TarFlow's dropped label); with label_input='add'.
    final_norm: 'layernorm', 'rmsnorm' (x / rms(x) * (1 + w), STARFlow) or 'none' (TarFlow)
      before proj_out.
    norm_eps: epsilon of the LayerNorms (1e-5 is torch's default).
    gelu: 'tanh' (approximation) or 'exact' (erf) in the MLPs.
    patch_channels: 'last' (a patch flattened (p, p, c), STARFlow) or 'first' ((c, p, p),
      TarFlow's F.unfold).
    text_dim, text_length: 0, or the width and length of the text-encoder features the
      conditioned blocks read as a prefix (STARFlow text-to-image: 2048 and 128 for
      flan-t5-xl); then num_classes must be 0.
    text_layers, text_heads: trainable caption-encoder layers (`layers.TextEncoder`) over the
      frozen features before the projection, 0 = none (the official model's).
    remat: 'none' | 'full' | 'dots': rematerialisation of each transformer layer in training
      (its activations recomputed in the backward pass: 'full' keeps only each layer's input,
      'dots' also the products without batch dimensions); the same values, less memory.
    dtype, param_dtype: compute and parameter dtypes.
  """
  image_shape: tuple
  patch_size: int = 1
  hidden_size: int = 256
  num_blocks: int = 4
  layers_per_block: int = 2
  deep_layers: int = 0
  num_heads: int = 4
  mlp_ratio: float = 4.0
  num_classes: int = 0
  start_token: bool = True
  scale: str = "softplus"
  soft_clip: float = 4.0
  condition: str = "deep"
  positions: str = "learned"
  order: str = "r2l"
  label_input: str = "add"
  label_null: str = "learned"
  final_norm: str = "layernorm"
  norm_eps: float = 1e-6
  gelu: str = "tanh"
  patch_channels: str = "last"
  text_dim: int = 0
  text_length: int = 0
  text_layers: int = 0
  text_heads: int = 4
  remat: str = "none"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  def setup(self):
    length, channels = self.token_shape
    grid = ()
    if len(self.image_shape) == 3:
      grid = (self.image_shape[0] // self.patch_size, self.image_shape[1] // self.patch_size)
    label_tokens = (self.label_input == "token" and self.num_classes > 0) or self.text_dim > 0
    self.blocks = [
        FlowBlock(length, channels, self.hidden_size, self.block_depth(i), self.num_heads,
                  self.mlp_ratio, flip=self.block_flipped(i), start_token=self.start_token,
                  scale=self.scale, soft_clip=self.soft_clip,
                  conditioned=self.block_conditioned(i), num_classes=self.num_classes,
                  positions=self.positions, grid=grid, rope_label_axis=label_tokens,
                  label_input=self.label_input, label_null=self.label_null,
                  final_norm=self.final_norm,
                  norm_eps=self.norm_eps, exact_gelu=self.gelu == "exact",
                  text_dim=self.text_dim, text_length=self.text_length,
                  text_layers=self.text_layers, text_heads=self.text_heads,
                  remat=self.remat, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        for i in range(self.num_blocks)]

  # Static facts, usable on an unbound module.

  @property
  def token_shape(self) -> tuple[int, int]:
    return token_shape(self.image_shape, self.patch_size)

  def block_depth(self, block_index: int) -> int:
    deep = block_index == self.num_blocks - 1 and self.deep_layers > 0
    return self.deep_layers if deep else self.layers_per_block

  def block_flipped(self, block_index: int) -> bool:
    """Whether block `block_index` reads its tokens in flipped order."""
    return block_index % 2 == (1 if self.order == "r2l" else 0)

  def block_prefix(self, block_index: int) -> int:
    """Condition tokens block `block_index` reads before its sequence (its cache has L + these):
    text_length text tokens, or one label token."""
    if self.text_dim > 0:
      return self.text_length if self.block_conditioned(block_index) else 0
    return int(self.label_input == "token" and self.block_conditioned(block_index))

  def block_conditioned(self, block_index: int) -> bool:
    """Whether block `block_index` reads the class label or the text."""
    if self.num_classes <= 0 and self.text_dim <= 0:
      return False
    return self.condition == "all" or block_index == self.num_blocks - 1

  def to_tokens(self, x):
    """[B, *image_shape] -> [B, L, C] tokens in data order (patches in raster order, each
    flattened (p, p, c), or (c, p, p) with patch_channels='first')."""
    if len(self.image_shape) == 3:
      tokens = dit.patchify(x, self.patch_size)
      if self.patch_channels == "first":
        p, channels = self.patch_size, self.image_shape[2]
        tokens = tokens.reshape(tokens.shape[:2] + (p * p, channels)).swapaxes(-1, -2)
        tokens = tokens.reshape(tokens.shape[:2] + (-1,))
      return tokens
    return x[..., None]

  def from_tokens(self, tokens):
    """[B, L, C] -> [B, *image_shape]; the inverse of to_tokens."""
    if len(self.image_shape) == 3:
      height, width, channels = self.image_shape
      if self.patch_channels == "first":
        p = self.patch_size
        tokens = tokens.reshape(tokens.shape[:2] + (channels, p * p)).swapaxes(-1, -2)
        tokens = tokens.reshape(tokens.shape[:2] + (-1,))
      return dit.unpatchify(tokens, self.patch_size, height, width)
    return tokens[..., 0]

  def permute(self, block_index: int, tokens):
    """Data order <-> the order of block `block_index` (its own inverse)."""
    return jnp.flip(tokens, axis=1) if self.block_flipped(block_index) else tokens

  def init_cache(self, batch: int, block_index: int):
    """Zero KV cache of one block: per layer (keys, values) [batch, S, num_heads, head_dim],
    S = L plus the block's label tokens (see `prefill_cache`)."""
    length, _ = self.token_shape
    length += self.block_prefix(block_index)
    shape = (batch, length, self.num_heads, self.hidden_size // self.num_heads)
    return tuple((jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
                 for _ in range(self.block_depth(block_index)))

  # Parameterised maps (call through `model.apply(..., method=...)`).

  def __call__(self, x, cond):
    """Data -> noise. x: [B, *image_shape]; cond: int labels [B], text features [B,
    text_length, text_dim] (text models) or None. Returns (z: [B,
    *image_shape] float32, logdet: [B] float32 per dimension, intermediates: tuple of the
    num_blocks - 1 inner outputs [B, L, C])."""
    if tuple(x.shape[1:]) != tuple(self.image_shape):
      raise ValueError(f"TarFlow was built for examples of shape {tuple(self.image_shape)}; "
                       f"got a batch of shape {list(x.shape)}.")
    tokens = self.to_tokens(x.astype(jnp.float32))
    logdet = jnp.zeros((x.shape[0],), jnp.float32)
    intermediates = []
    for index, block in enumerate(self.blocks):
      tokens, log_scales = block(tokens, cond)
      logdet = logdet + jnp.mean(log_scales, axis=(1, 2))
      if index < self.num_blocks - 1:
        intermediates.append(tokens)
    return self.from_tokens(tokens), logdet, tuple(intermediates)

  def block_forward(self, block_index: int, tokens, cond):
    """One block data -> noise: tokens [B, L, C] (data order) -> (z [B, L, C], logdet [B])."""
    z, log_scales = self.blocks[block_index](tokens, cond)
    return z, jnp.mean(log_scales, axis=(1, 2))

  def block_log_scales(self, block_index: int, tokens, cond):
    """One block data -> noise with its elementwise log-determinant: (z [B, L, C] data order,
    -log sigma [B, L, C] in the block's token order)."""
    return self.blocks[block_index](tokens, cond)

  def prefill_cache(self, block_index: int, cache, cond, batch: int, temperature=None):
    """The cache of block `block_index` with its label tokens' keys and values written (no-op
    for a block that reads no label token); call once after init_cache, before block_chunk."""
    return self.blocks[block_index].prefill(cond, cache, batch, temperature)

  def block_sequence(self, block_index: int, tokens, cond, temperature=None):
    """(mu, sigma) [B, L, C] float32 of every token of `tokens` [B, L, C] (block order)."""
    return self.blocks[block_index].sequence(tokens, cond, temperature)

  def block_chunk(self, block_index: int, inputs, start, cache, cond, temperature=None):
    """(mu, sigma) [B, T, C] float32 of tokens start .. start+T-1 (block order) and the updated
    cache. inputs: [B, T, C], the tokens start-1 .. start+T-2 (row 0 is ignored when start = 0);
    start: int32 scalar (may be traced); cache: from init_cache; temperature: None or [B]
    attention temperatures."""
    slots = start + jnp.arange(inputs.shape[1])
    return self.blocks[block_index].affine(inputs, slots, cond, cache, temperature)

  def block_step(self, block_index: int, previous, position, cache, cond, temperature=None):
    """(mu, sigma) [B, C] of token `position` (block order) given the token before it
    ([B, C]; ignored at position 0), and the updated cache."""
    mu, sigma, cache = self.block_chunk(block_index, previous[:, None], position, cache, cond,
                                        temperature)
    return mu[:, 0], sigma[:, 0], cache


def _choice(key: str, value: str, allowed) -> str:
  if value not in allowed:
    from flowjax.registry import unknown_name_message
    raise ValueError(f"model.{key}: " + unknown_name_message(key, value, list(allowed)))
  return value


@MODELS.register("tarflow")
def build(model_config: ml_collections.ConfigDict, info) -> TarFlow:
  """TarFlow / STARFlow from config.model (keys: see models.DEFAULTS['tarflow'])."""
  c = model_config
  hidden_size, num_heads = int(c.hidden_size), int(c.num_heads)
  if hidden_size % num_heads:
    raise ValueError(f"model.hidden_size={hidden_size} is not divisible by "
                     f"model.num_heads={num_heads}.")
  for key in ("num_blocks", "layers_per_block"):
    if int(c[key]) < 1:
      raise ValueError(f"model.{key}={c[key]} must be at least 1.")
  if int(c.deep_layers) < 0:
    raise ValueError(f"model.deep_layers={c.deep_layers} must be >= 0 (0 = no deep block).")
  token_shape(tuple(info.image_shape), int(c.patch_size))
  positions = _choice("positions", c.positions, POSITIONS)
  label_input = _choice("label_input", c.label_input, LABEL_INPUTS)
  text = layers.text_settings(c, info)
  text_dim, text_length = text["text_dim"], text["text_length"]
  if positions == "rope":
    if len(tuple(info.image_shape)) != 3:
      raise ValueError("model.positions='rope' rotates by 2-D token positions and needs images "
                       f"[H, W, C]; the data have per-example shape {tuple(info.image_shape)}. "
                       "Use positions='learned' or 'sincos'.")
    rope_angles((1, 1), hidden_size // num_heads, 0,
                (label_input == "token" and int(info.num_classes) > 0) or text_dim > 0)
  return TarFlow(
      image_shape=tuple(info.image_shape), patch_size=int(c.patch_size), hidden_size=hidden_size,
      num_blocks=int(c.num_blocks), layers_per_block=int(c.layers_per_block),
      deep_layers=int(c.deep_layers), num_heads=num_heads, mlp_ratio=float(c.mlp_ratio),
      num_classes=int(info.num_classes), start_token=bool(c.start_token),
      scale=_choice("scale", c.scale, SCALES), soft_clip=float(c.soft_clip),
      condition=_choice("condition", c.condition, CONDITIONS),
      positions=positions, order=_choice("order", c.order, ORDERS), label_input=label_input,
      final_norm=_choice("final_norm", c.final_norm, FINAL_NORMS), norm_eps=float(c.norm_eps),
      gelu=_choice("gelu", c.gelu, GELUS),
      label_null=_choice("label_null", c.label_null, LABEL_NULLS),
      patch_channels=_choice("patch_channels", c.patch_channels, PATCH_CHANNELS),
      text_dim=text_dim, text_length=text_length, text_layers=text["text_layers"],
      text_heads=text["text_heads"], remat=_choice("remat", c.get("remat", "none"), REMATS),
      dtype=layers.dtype_from_name(c.dtype, "dtype"),
      param_dtype=layers.dtype_from_name(c.param_dtype, "param_dtype"))
