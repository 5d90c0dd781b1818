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

Flow-model contract (one sampler, `flowjax.samplers.autoregressive`, serves any model with it):
- `__call__(x, cond) -> (z, logdet, intermediates)`: data -> noise. z has the shape of x;
  logdet: [B] float32, the sum over blocks of each block's -mean(log sigma) over tokens and
  channels (a log-determinant per dimension: log|det dz/dx| / D); intermediates: the outputs of
  blocks 0 .. num_blocks-2 as token arrays [B, L, C].
- `to_tokens(x)` / `from_tokens(tokens)` and `permute(block_index, tokens)` (its own inverse)
  move between data layout, data token order and a block's token order;
- `init_cache(batch, block_index)`: an explicit KV cache for one block, a tuple with one
  (keys, values) pair of zeros [batch, L, num_heads, head_dim] per layer (no mutable collections);
- `block_chunk(block_index, inputs, start, cache, cond) -> (mu, sigma, cache)`: the affine
  parameters [B, T, C] of tokens start .. start+T-1 (block order) from the transformer inputs
  [B, T, C], i.e. the tokens start-1 .. start+T-2 (the entry for token -1 is ignored), reading
  and writing the cache; `block_step` is the one-token case ([B, C] in and out);
- `block_sequence(block_index, tokens, cond) -> (mu, sigma)`: the full causal pass over a block's
  tokens [B, L, C] without a cache (naive decoding), and `block_forward` the block's own
  data -> noise map.
Inside the cache every token has a slot: token t's transformer input (token t-1, or the start
token) is written at slot t. Without a start token the input of slot 0 is a placeholder that no
other token attends to.
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
POSITIONS = ("learned", "sincos")
TOKENS = ("batch", "length", "embed")


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


def _layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=1e-6, dtype=jnp.float32, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class CausalAttention(nn.Module):
  """Causal multi-head self-attention over token slots, with an optional explicit KV cache.

  Slot s may attend to slots <= s; with `hide_first_slot` slot 0 is attended by itself only.
  """
  num_heads: int
  hide_first_slot: bool = False
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, slots, cache):
    """x: [B, T, D] tokens at the consecutive slots `slots` ([T] int32); cache: None (the T
    tokens attend among themselves) or (keys, values) [B, L, heads, head_dim], into which this
    call's keys and values are written at slots[0] .. slots[0]+T-1 before attending over all L
    slots. Returns ([B, T, D], the updated cache or None)."""
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
    if self.hide_first_slot:
      mask = mask & ((key_slots[None, :] > 0) | (slots[:, None] == 0))
    y = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype),
                                     mask=mask[None, None])
    y = y.reshape(batch, length, width)
    out = layers.dense(width, ("heads", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                       name="out")(y)
    return out, cache


class TransformerLayer(nn.Module):
  """Pre-LayerNorm causal transformer layer: h + Attn(LN(h)), then h + MLP(LN(h))."""
  num_heads: int
  mlp_ratio: float = 4.0
  hide_first_slot: bool = False
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, slots, cache):
    """h: [B, T, D] float32 residual stream; slots, cache: as in CausalAttention."""
    a, cache = CausalAttention(self.num_heads, self.hide_first_slot, self.dtype,
                               self.param_dtype, name="attn")(
                                   _layer_norm("norm1")(h).astype(self.dtype), slots, cache)
    h = nn.with_logical_constraint(h + a.astype(jnp.float32), TOKENS)
    m = layers.FeedForward(int(h.shape[-1] * self.mlp_ratio), dtype=self.dtype,
                           param_dtype=self.param_dtype, name="mlp")(
                               _layer_norm("norm2")(h).astype(self.dtype), False)
    return nn.with_logical_constraint(h + m.astype(jnp.float32), TOKENS), cache


class FlowBlock(nn.Module):
  """One affine autoregressive block over L tokens of C channels (see the module docstring)."""
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
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

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
    if self.conditioned and self.num_classes > 0:
      self.label_embed = layers.LabelEmbedder(self.num_classes, self.hidden_size,
                                              param_dtype=self.param_dtype)
    self.layers = [TransformerLayer(self.num_heads, self.mlp_ratio,
                                    hide_first_slot=not self.start_token, dtype=self.dtype,
                                    param_dtype=self.param_dtype) for _ in range(self.depth)]
    self.final_norm = _layer_norm("final_norm")

  def position_table(self):
    if self.positions == "learned":
      return jnp.asarray(self.pos_embed, jnp.float32)
    return jnp.asarray(sincos_positions(self.length, self.hidden_size))

  def affine(self, inputs, slots, cond, cache):
    """(mu, sigma) [B, T, C] float32 of the tokens at `slots` ([T], consecutive, block order)
    from their transformer inputs [B, T, C] (the preceding tokens), and the updated cache."""
    batch = inputs.shape[0]
    if self.start_token:
      start = jnp.broadcast_to(jnp.asarray(self.start, inputs.dtype), inputs.shape)
      inputs = jnp.where((slots == 0)[None, :, None], start, inputs)
    h = self.proj_in(inputs.astype(self.dtype)).astype(jnp.float32)
    # The position embedding of the data token each input stands for (the input itself in
    # TarFlow, the predicted token with a start token), in data order.
    source = slots if self.start_token else jnp.maximum(slots - 1, 0)
    if self.flip:
      source = self.length - 1 - source
    h = h + jnp.take(self.position_table(), source, axis=0)[None]
    if self.conditioned and self.num_classes > 0:
      h = h + self.label_embed(cond, batch)[:, None, :]
    h = nn.with_logical_constraint(h, TOKENS)
    new_cache = []
    for index, layer in enumerate(self.layers):
      h, layer_cache = layer(h, slots, None if cache is None else cache[index])
      new_cache.append(layer_cache)
    out = self.proj_out(self.final_norm(h).astype(self.dtype)).astype(jnp.float32)
    if self.soft_clip > 0:
      out = self.soft_clip * jnp.tanh(out / self.soft_clip)
    a, mu = jnp.split(out, 2, axis=-1)
    sigma = jnp.exp(a) if self.scale == "exp" else jax.nn.softplus(a + INV_SOFTPLUS_ONE)
    if not self.start_token:
      first = (slots == 0)[None, :, None]
      mu, sigma = jnp.where(first, 0.0, mu), jnp.where(first, 1.0, sigma)
    return mu, sigma, (None if cache is None else tuple(new_cache))

  def sequence(self, tokens, cond):
    """(mu, sigma) [B, L, C] of every token of `tokens` [B, L, C] (block order), no cache."""
    inputs = jnp.concatenate([jnp.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
    mu, sigma, _ = self.affine(inputs, jnp.arange(self.length), cond, None)
    return mu, sigma

  def __call__(self, tokens, cond):
    """Data -> noise: tokens [B, L, C] in data order -> (z [B, L, C] float32 in data order,
    logdet [B] = -mean(log sigma))."""
    x = jnp.flip(tokens, axis=1) if self.flip else tokens
    x = x.astype(jnp.float32)
    mu, sigma = self.sequence(x, cond)
    z = (x - mu) / sigma
    logdet = -jnp.mean(jnp.log(sigma), axis=(1, 2))
    return (jnp.flip(z, axis=1) if self.flip else z), logdet


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
    positions: 'learned' or 'sincos' position embeddings.
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
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  def setup(self):
    length, channels = self.token_shape
    self.blocks = [
        FlowBlock(length, channels, self.hidden_size, self.block_depth(i), self.num_heads,
                  self.mlp_ratio, flip=i % 2 == 1, start_token=self.start_token,
                  scale=self.scale, soft_clip=self.soft_clip,
                  conditioned=self.block_conditioned(i), num_classes=self.num_classes,
                  positions=self.positions, dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_blocks)]

  # Static facts, usable on an unbound module.

  @property
  def token_shape(self) -> tuple[int, int]:
    return token_shape(self.image_shape, self.patch_size)

  def block_depth(self, block_index: int) -> int:
    deep = block_index == self.num_blocks - 1 and self.deep_layers > 0
    return self.deep_layers if deep else self.layers_per_block

  def block_conditioned(self, block_index: int) -> bool:
    """Whether block `block_index` reads the class label."""
    if self.num_classes <= 0:
      return False
    return self.condition == "all" or block_index == self.num_blocks - 1

  def to_tokens(self, x):
    """[B, *image_shape] -> [B, L, C] tokens in data order."""
    if len(self.image_shape) == 3:
      return dit.patchify(x, self.patch_size)
    return x[..., None]

  def from_tokens(self, tokens):
    """[B, L, C] -> [B, *image_shape]; the inverse of to_tokens."""
    if len(self.image_shape) == 3:
      height, width, _ = self.image_shape
      return dit.unpatchify(tokens, self.patch_size, height, width)
    return tokens[..., 0]

  def permute(self, block_index: int, tokens):
    """Data order <-> the order of block `block_index` (flip for odd blocks; its own inverse)."""
    return jnp.flip(tokens, axis=1) if block_index % 2 else tokens

  def init_cache(self, batch: int, block_index: int):
    """Zero KV cache of one block: per layer (keys, values) [batch, L, num_heads, head_dim]."""
    length, _ = self.token_shape
    shape = (batch, length, self.num_heads, self.hidden_size // self.num_heads)
    return tuple((jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
                 for _ in range(self.block_depth(block_index)))

  # Parameterised maps (call through `model.apply(..., method=...)`).

  def __call__(self, x, cond):
    """Data -> noise. x: [B, *image_shape]; cond: int labels [B] or None. Returns (z: [B,
    *image_shape] float32, logdet: [B] float32 per dimension, intermediates: tuple of the
    num_blocks - 1 inner outputs [B, L, C])."""
    if tuple(x.shape[1:]) != tuple(self.image_shape):
      raise ValueError(f"TarFlow was built for examples of shape {tuple(self.image_shape)}; "
                       f"got a batch of shape {list(x.shape)}.")
    tokens = self.to_tokens(x.astype(jnp.float32))
    logdet = jnp.zeros((x.shape[0],), jnp.float32)
    intermediates = []
    for index, block in enumerate(self.blocks):
      tokens, block_logdet = block(tokens, cond)
      logdet = logdet + block_logdet
      if index < self.num_blocks - 1:
        intermediates.append(tokens)
    return self.from_tokens(tokens), logdet, tuple(intermediates)

  def block_forward(self, block_index: int, tokens, cond):
    """One block data -> noise: tokens [B, L, C] (data order) -> (z [B, L, C], logdet [B])."""
    return self.blocks[block_index](tokens, cond)

  def block_sequence(self, block_index: int, tokens, cond):
    """(mu, sigma) [B, L, C] float32 of every token of `tokens` [B, L, C] (block order)."""
    return self.blocks[block_index].sequence(tokens, cond)

  def block_chunk(self, block_index: int, inputs, start, cache, cond):
    """(mu, sigma) [B, T, C] float32 of tokens start .. start+T-1 (block order) and the updated
    cache. inputs: [B, T, C], the tokens start-1 .. start+T-2 (row 0 is ignored when start = 0);
    start: int32 scalar (may be traced); cache: from init_cache."""
    slots = start + jnp.arange(inputs.shape[1])
    return self.blocks[block_index].affine(inputs, slots, cond, cache)

  def block_step(self, block_index: int, previous, position, cache, cond):
    """(mu, sigma) [B, C] of token `position` (block order) given the token before it
    ([B, C]; ignored at position 0), and the updated cache."""
    mu, sigma, cache = self.block_chunk(block_index, previous[:, None], position, cache, cond)
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
  return TarFlow(
      image_shape=tuple(info.image_shape), patch_size=int(c.patch_size), hidden_size=hidden_size,
      num_blocks=int(c.num_blocks), layers_per_block=int(c.layers_per_block),
      deep_layers=int(c.deep_layers), num_heads=num_heads, mlp_ratio=float(c.mlp_ratio),
      num_classes=int(info.num_classes), start_token=bool(c.start_token),
      scale=_choice("scale", c.scale, SCALES), soft_clip=float(c.soft_clip),
      condition=_choice("condition", c.condition, CONDITIONS),
      positions=_choice("positions", c.positions, POSITIONS),
      dtype=layers.dtype_from_name(c.dtype, "dtype"),
      param_dtype=layers.dtype_from_name(c.param_dtype, "param_dtype"))
