"""Building blocks shared by the backbones: embeddings, attention, partitioned dense layers.

Every parameter is created through `nn.with_logical_partitioning` with names from
`LOGICAL_AXES`; the mesh mapping lives in `flowjax/sharding.py`, never here.
"""

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv", "vocab", "conv_in",
                "conv_out")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

Dtype = Any
AxisNames = tuple[str | None, ...]
Initializer = Callable[..., jax.Array]

xavier_uniform = nn.initializers.xavier_uniform()

# Time-embedding kernels: N(0, 0.02) as DiT, or the Lipschitz initialisation (`spectral_normal`).
TIME_INITS = ("normal", "spectral")


def spectral_normal(fused_columns: int = 1, part: int = 0) -> Initializer:
  """Lipschitz initialisation: a Xavier-normal [in, out] kernel (std sqrt(2 / (in + out)), not
  truncated) divided by its largest singular value, so that its spectral norm is 1 (Qi et al.,
  arXiv:2304.09856; TVM, arXiv:2511.19797 Sec. 4 and Table 6).

  fused_columns > 1: draw one [in, fused_columns * out] kernel, normalise it as a whole and return
  its column block `part` (0-based): the law of one third of a fused [D, 3D] query-key-value
  kernel initialised so (lumalabs/tvm), spectral norm <= 1. Each caller draws its own fused
  kernel from its own key.
  """
  draw = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")

  def init(key, shape, dtype=jnp.float32):
    rows, columns = shape
    kernel = draw(key, (rows, fused_columns * columns), jnp.float32)
    kernel = kernel / jnp.linalg.norm(kernel, ord=2)
    return kernel[:, part * columns:(part + 1) * columns].astype(dtype)

  return init


def rms_norm(x: jax.Array, epsilon: float = 1e-6) -> jax.Array:
  """x / sqrt(mean(x^2) + epsilon) over the last axis, with no learned scale (RMSNorm-, arXiv:
  2511.19797 Sec. 4); computed in float32, returned in the dtype of x."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + epsilon)
  return normed.astype(x.dtype)


# Threefry-2x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): the
# rotation constants of its 20 rounds and the key-schedule parity constant.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_THREEFRY_PARITY = 0x1BD11BDA


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
  return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry_bits(key: jax.Array, shape: Sequence[int]) -> jax.Array | None:
  """uint32 random bits of `shape`, equal to jax.random.bits(key, shape, jnp.uint32) for a
  threefry2x32 key with jax_threefry_partitionable (JAX's default), computed as one elementwise
  program: on XLA:CPU, JAX hashes the counters in a 5-iteration while loop over whole arrays,
  which writes both words back to memory after every 4 rounds (about 6x the time at a
  [16, 32, 32, 64] dropout mask). The counters are the row-major positions, built from
  broadcast iotas so that a sharded mask is computed shard by shard as JAX's is. None where that
  equality does not hold (another PRNG implementation, the non-partitionable layout, 2^32 or
  more elements): the caller then uses jax.random.
  """
  if not all(isinstance(d, (int, np.integer)) for d in shape):
    return None  # symbolic (shape-polymorphic) dimensions
  shape = tuple(int(d) for d in shape)
  if (not jax.config.jax_threefry_partitionable or math.prod(shape) >= 2**32
      or not shape):
    return None
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != () or str(jax.random.key_impl(key)) != "threefry2x32":
      return None
    key = jax.random.key_data(key)
  elif (jax.config.jax_default_prng_impl != "threefry2x32" or key.shape != (2,)
        or key.dtype != jnp.uint32):
    return None
  k0, k1 = key[0].astype(jnp.uint32), key[1].astype(jnp.uint32)
  strides = np.cumprod((1,) + shape[:0:-1])[::-1]
  count = sum(jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
              for axis, stride in enumerate(strides))
  schedule = (k0, k1, k0 ^ k1 ^ np.uint32(_THREEFRY_PARITY))
  # The high word of every count is 0 below 2^32 elements.
  x0 = jnp.zeros(shape, jnp.uint32) + schedule[0]
  x1 = count + schedule[1]
  for block in range(5):
    for rotation in _THREEFRY_ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, rotation) ^ x0
    x0 = x0 + schedule[(block + 1) % 3]
    x1 = x1 + schedule[(block + 2) % 3] + np.uint32(block + 1)
  return x0 ^ x1


def bernoulli(key: jax.Array, p: float, shape: Sequence[int]) -> jax.Array:
  """Boolean samples with P(True) = p, equal to jax.random.bernoulli(key, p, shape), through
  `threefry_bits` where it applies: p a Python float, drawn as float32 (without jax_enable_x64,
  which would make jax.random draw float64 uniforms)."""
  bits = None
  if isinstance(p, (float, np.floating)) and not jax.config.jax_enable_x64:
    bits = threefry_bits(key, shape)
  if bits is None:
    return jax.random.bernoulli(key, p, shape)
  # jax.random.uniform's float32 construction: 23 mantissa bits into [1, 2), minus 1.
  uniform = jax.lax.bitcast_convert_type(
      (bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32) - np.float32(1.0)
  return uniform < np.float32(p)


class Dropout(nn.Dropout):
  """flax.linen.Dropout with the same masks (same key, same bits; the class keeps flax's name, so
  auto-named layers draw the same keys), drawn through `bernoulli`."""

  @nn.compact
  def __call__(self, inputs, deterministic: bool | None = None, rng: jax.Array | None = None):
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep_prob = 1.0 - self.rate
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    shape = list(inputs.shape)
    for dim in self.broadcast_dims:
      shape[dim] = 1
    mask = jnp.broadcast_to(bernoulli(rng, keep_prob, shape), inputs.shape)
    return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


def dtype_from_name(name: str, key: str = "dtype") -> Dtype:
  """Maps a config string ('float32' | 'bfloat16') to a jnp dtype."""
  if name not in DTYPES:
    raise ValueError(f"model.{key}={name!r} is not supported; use one of {sorted(DTYPES)}.")
  return DTYPES[name]


def dense(features: int, names: AxisNames, *,
          kernel_init: Initializer = xavier_uniform,
          bias_init: Initializer = nn.initializers.zeros,
          use_bias: bool = True,
          dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32,
          name: str | None = None) -> nn.Dense:
  """A Dense layer whose [in, out] kernel and [out] bias carry logical axis names.

  Args:
    features: output width.
    names: logical names of the kernel's (input, output) dims, e.g. ('embed', 'mlp');
      the bias takes the output name.
  """
  if len(names) != 2:
    raise ValueError(f"dense: need 2 logical axis names for an [in, out] kernel; got {names}.")
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, tuple(names)),
      bias_init=nn.with_logical_partitioning(bias_init, (names[1],)),
      name=name)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation x * (1 + scale) + shift.

  Args:
    x: [B, L, D] tokens.
    shift, scale: [B, D] per-example modulation (broadcast over L).
  Returns:
    [B, L, D] in the dtype of x.
  """
  shift = shift.astype(x.dtype)[:, None, :]
  scale = scale.astype(x.dtype)[:, None, :]
  return x * (1 + scale) + shift


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal frequency embedding of (scaled) times, as in DiT / ADM.

  Args:
    t: [B] float times (already multiplied by the time scale).
    dim: embedding width.
    max_period: the lowest frequency is 1 / max_period.
  Returns:
    [B, dim] float32, [cos(t f_k) ..., sin(t f_k) ...] with f_k = max_period^(-k / (dim/2)).
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    embedding = jnp.concatenate([embedding, jnp.zeros_like(embedding[:, :1])], axis=-1)
  return embedding


def sincos_pos_embed_2d(embed_dim: int, grid_height: int, grid_width: int) -> np.ndarray:
  """Fixed 2D sin-cos positional embedding (MAE / DiT), not a parameter.

  Half of the channels encode the column, half the row, each as [sin, cos] over
  embed_dim / 4 frequencies 10000^(-k / (embed_dim / 4)).

  Returns:
    [grid_height * grid_width, embed_dim] float32, row-major over the patch grid.
  """
  if embed_dim % 4:
    raise ValueError(f"The 2D sin-cos position embedding needs hidden_size divisible by 4; "
                     f"got {embed_dim}.")

  def embed_1d(dim, positions):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", positions.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid_height, dtype=np.float64),
                           np.arange(grid_width, dtype=np.float64), indexing="ij")
  embedding = np.concatenate([embed_1d(embed_dim // 2, cols), embed_1d(embed_dim // 2, rows)],
                             axis=1)
  return embedding.astype(np.float32)


class TimestepEmbedder(nn.Module):
  """t -> sinusoid(time_scale * t) -> Dense -> SiLU -> Dense: [B] -> [B, hidden_size].

  Runs in float32: it is tiny, and time_scale * t in bfloat16 would lose the
  resolution between nearby times.
  """
  hidden_size: int
  time_scale: float = 1000.0
  frequency_size: int = 256
  param_dtype: Dtype = jnp.float32
  init: str = "normal"

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    """t: [B] in [0, 1]. Returns [B, hidden_size] float32. init: "normal" (N(0, 0.02) kernels)
    or "spectral" (`spectral_normal`)."""
    init = spectral_normal() if self.init == "spectral" else nn.initializers.normal(0.02)
    h = timestep_embedding(self.time_scale * t.astype(jnp.float32), self.frequency_size)
    h = dense(self.hidden_size, (None, "mlp"), kernel_init=init, param_dtype=self.param_dtype,
              name="fc1")(h)
    h = nn.silu(h)
    return dense(self.hidden_size, ("mlp", "embed"), kernel_init=init,
                 param_dtype=self.param_dtype, name="fc2")(h)


class LabelEmbedder(nn.Module):
  """Class labels -> [B, hidden_size], with one extra row for the null label (CFG).

  The table has num_classes + 1 rows; label num_classes is the null label, and
  labels=None means every example is null.
  """
  num_classes: int
  hidden_size: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, labels: jax.Array | None, batch_size: int) -> jax.Array:
    """labels: int [B] in [0, num_classes] or None. Returns [B, hidden_size] float32."""
    if labels is None:
      labels = jnp.full((batch_size,), self.num_classes, jnp.int32)
    if labels.shape != (batch_size,) or not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f"cond must be integer class labels of shape ({batch_size},); got "
                       f"{labels.dtype}{list(labels.shape)}.")
    table = nn.Embed(
        self.num_classes + 1, self.hidden_size, dtype=jnp.float32, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    ("vocab", "embed")),
        name="table")
    return table(labels)


# Time-like inputs a backbone embeds, one embedder each: (t,), (t, s), (t, h), and with iMF's
# guidance conditioning (t, h, 1 - 1/omega, t_min, t_max) (arXiv:2512.02012, Eq. 16).
MAX_TIME_INPUTS = 5


def embed_conditioning(times: Sequence[jax.Array], cond: jax.Array | None, *,
                       batch_size: int, hidden_size: int, num_classes: int,
                       time_scale: float, param_dtype: Dtype,
                       time_init: str = "normal") -> jax.Array:
  """Sum of one TimestepEmbedder per time input and the label embedding.

  Must be called inside a compact module: creates `time_embed_{i}` and
  `label_embed` in the calling module's scope.

  Args:
    times: tuple of 1 to MAX_TIME_INPUTS arrays [B], e.g. (t,), (t, s), (t, h).
    cond: int labels [B] (num_classes = null) or None.
    time_init: the time embedders' kernel initialisation (TIME_INITS).
  Returns:
    c: [B, hidden_size] float32.
  """
  if not isinstance(times, (tuple, list)) or not 1 <= len(times) <= MAX_TIME_INPUTS:
    raise ValueError(f"times must be a tuple of 1 to {MAX_TIME_INPUTS} arrays of shape [B]; "
                     f"got {times!r}.")
  for t in times:
    if jnp.shape(t) != (batch_size,):
      raise ValueError(f"every time input must have shape ({batch_size},); got "
                       f"{list(jnp.shape(t))}.")
  if num_classes == 0 and cond is not None:
    raise ValueError("This model is unconditional (num_classes=0) but received class labels "
                     "(cond is not None); pass cond=None or build it for a labelled dataset.")
  c = sum(TimestepEmbedder(hidden_size, time_scale=time_scale, param_dtype=param_dtype,
                           init=time_init, name=f"time_embed_{i}")(jnp.asarray(t))
          for i, t in enumerate(times))
  if num_classes > 0:
    c = c + LabelEmbedder(num_classes, hidden_size, param_dtype=param_dtype,
                          name="label_embed")(cond, batch_size)
  return c


# How attention scales its logits q.k: by 1 / sqrt(head_dim) (the transformer's) or by
# 1 / head_dim (the reference DiT of Shortcut models, kvfrans/shortcut-models).
ATTENTION_SCALES = ("inverse_sqrt_dim", "inverse_dim")


class Attention(nn.Module):
  """Multi-head self-attention with a switchable kernel.

  impl='xla' is the pure-XLA reference (supports forward-mode jax.jvp);
  impl='cudnn' is the fused cuDNN kernel (GPU, bfloat16/float16 only).
  qk_norm: RMSNorm with a learned per-channel scale on each head's queries and keys (QK-norm,
  arXiv:2511.19797 Sec. 4). spectral_init: the projections start from `spectral_normal`, the
  query, key and value kernels each as one block of a fused [D, 3D] kernel. embed_axis: the
  logical name of the D dimension of the kernels. zero_out: the output projection starts at zero
  (a residual branch that begins as the identity). separate_qkv_init: q, k and v start
  xavier-uniform on their own [D, D] shapes (variance 1 / D) instead of as parts of DiT's fused
  [D, 3D] kernel (variance 1 / (2D)).
  """
  num_heads: int
  impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  qk_norm: bool = False
  spectral_init: bool = False
  embed_axis: str = "embed"
  zero_out: bool = False
  logit_scale: str = "inverse_sqrt_dim"
  separate_qkv_init: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x: [B, L, D] -> [B, L, D]; mask: optional boolean [B, 1, L, L] (True: the query at row i
    may attend to the key at column j)."""
    if self.impl not in ("xla", "cudnn"):
      raise ValueError(f"model.attention_impl={self.impl!r}; use 'xla' or 'cudnn'.")
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"hidden_size={width} is not divisible by num_heads={self.num_heads}.")
    head_dim = width // self.num_heads
    # DiT initialises its fused [D, 3D] qkv kernel with xavier-uniform, i.e. variance
    # 2 / (D + 3D); separate [D, D] projections get the same variance with scale 1/2.
    qkv_init = (xavier_uniform if self.separate_qkv_init else
                nn.initializers.variance_scaling(0.5, "fan_avg", "uniform"))
    batch, length, _ = x.shape
    projections = []
    for part, name in enumerate(("query", "key", "value")):
      init = spectral_normal(3, part) if self.spectral_init else qkv_init
      y = dense(width, (self.embed_axis, "heads"), kernel_init=init, dtype=self.dtype,
                param_dtype=self.param_dtype, name=name)(x)
      y = y.reshape(batch, length, self.num_heads, head_dim)
      if self.qk_norm and name != "value":
        y = nn.RMSNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                       scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("kv",)),
                       name=f"{name}_norm")(y)
      projections.append(nn.with_logical_constraint(y, ("batch", "length", "heads", "kv")))
    q, k, v = projections
    if self.impl == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"model.attention_impl='cudnn' runs in bfloat16 or float16, but the "
                       f"compute dtype is {q.dtype}; set model.dtype='bfloat16' or use 'xla'.")
    if self.logit_scale not in ATTENTION_SCALES:
      raise ValueError(f"model.attention_scale={self.logit_scale!r}; use one of "
                       f"{ATTENTION_SCALES}.")
    scale = 1.0 / head_dim if self.logit_scale == "inverse_dim" else None  # None: 1 / sqrt(d)
    y = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                     implementation=self.impl)
    y = nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))
    y = y.reshape(batch, length, width)
    out_init = (nn.initializers.zeros if self.zero_out else
                spectral_normal() if self.spectral_init else xavier_uniform)
    return dense(width, ("heads", self.embed_axis), kernel_init=out_init, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="out")(y)


class FeedForward(nn.Module):
  """Dense -> GELU -> dropout -> Dense: [B, L, D] -> [B, L, D]; the GELU is the tanh
  approximation unless `exact_gelu` (the erf form); spectral_init: both kernels start from
  `spectral_normal`; embed_axis: the logical name of the D dimension; zero_out: fc2 starts at
  zero."""
  hidden_features: int
  dropout: float = 0.0
  exact_gelu: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  spectral_init: bool = False
  embed_axis: str = "embed"
  zero_out: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    width = x.shape[-1]
    init = spectral_normal() if self.spectral_init else xavier_uniform
    h = dense(self.hidden_features, (self.embed_axis, "mlp"), kernel_init=init,
              dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.gelu(h, approximate=not self.exact_gelu)
    h = Dropout(self.dropout, deterministic=not train)(h)
    return dense(width, ("mlp", self.embed_axis),
                 kernel_init=nn.initializers.zeros if self.zero_out else init,
                 dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(h)


# REPA (Yu et al., "Representation Alignment for Generation", arXiv:2410.06940): the projected
# hidden tokens a backbone with repa_depth > 0 sows into the 'intermediates' collection.
REPA_COLLECTION = "intermediates"
REPA_NAME = "repa"
# The projector's parameters, beside the backbone's own at the top level.
REPA_PROJECTOR = "repa_projector"
# The backbone fields REPA sets (from config.repa, not config.model).
REPA_FIELDS = ("repa_depth", "repa_dim", "repa_projector_dim")


class RepaProjector(nn.Module):
  """REPA's projector h_phi: Dense(hidden) -> SiLU -> Dense(hidden) -> SiLU -> Dense(features),
  xavier-uniform kernels and zero biases (sihyun-yu/REPA `models/sit.py` `build_mlp` and
  `initialize_weights`): [..., D] -> [..., features] float32."""
  features: int
  hidden: int = 2048
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.silu(dense(self.hidden, ("embed", "mlp"), name="fc1", **kw)(x))
    x = nn.silu(dense(self.hidden, ("mlp", "embed"), name="fc2", **kw)(x))
    return dense(self.features, ("embed", "mlp"), name="fc3", **kw)(x).astype(jnp.float32)


def sow_repa_tokens(module: nn.Module, hidden: jax.Array, grid: tuple[int, int], features: int,
                    projector_dim: int, dtype: Dtype, param_dtype: Dtype) -> None:
  """Sows REPA's h_phi(hidden) as [B, grid_h, grid_w, features] float32 under
  intermediates/repa, from a compact `module` (its projector is `repa_projector`).

  hidden: [B, grid_h * grid_w, D] tokens, row-major over the grid. The projector runs only when
  the collection is mutable (`common.apply_model(..., capture=True)`) and at initialisation,
  where its parameters are created; sampling and evaluation skip it.
  """
  if not (module.is_initializing() or module.is_mutable_collection(REPA_COLLECTION)):
    return
  if features < 1:
    raise ValueError(f"REPA needs the encoder's feature width (repa_dim), got {features}.")
  tokens = RepaProjector(features, projector_dim, dtype=dtype, param_dtype=param_dtype,
                         name=REPA_PROJECTOR)(hidden)
  module.sow(REPA_COLLECTION, REPA_NAME, tokens.reshape(tokens.shape[0], *grid, features))


def check_repa_depth(repa_depth: int, blocks: int) -> None:
  """Raises ValueError naming config.repa.depth when it is not in [0, blocks] (0 = no REPA);
  blocks: the backbone's `repa_blocks`."""
  if not 0 <= repa_depth <= blocks:
    raise ValueError(f"config.repa.depth={repa_depth}: REPA aligns the tokens after block "
                     f"repa.depth (1-based) of the backbone's {blocks} alignable blocks; use 1 to "
                     f"{blocks}.")


class TextEncoder(nn.Module):
  """A trainable caption encoder over the frozen caption features [B, T, D]: `depth` pre-norm
  transformer layers (bidirectional attention over the caption's non-padding tokens, GELU MLP of
  4 D), trained with the backbone. Each residual branch's output projection starts at zero, so a
  fresh encoder passes the frozen features through unchanged; padding rows (all zero) stay zero,
  so what reads the features can still tell the caption's tokens from its padding.
  """
  depth: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, text: jax.Array) -> jax.Array:
    """text: [B, T, D] -> [B, T, D] float32."""
    batch, length, width = text.shape
    if width % self.num_heads:
      raise ValueError(f"model.text_heads={self.num_heads} does not divide the caption features' "
                       f"width {width} (model.text_dim).")
    present = jnp.any(text != 0, axis=-1)  # [B, T]
    # A caption with no token at all (zero features) attends everywhere instead of nowhere.
    keys = present | ~jnp.any(present, axis=-1, keepdims=True)
    mask = jnp.broadcast_to(keys[:, None, None, :], (batch, 1, length, length))
    h = text.astype(jnp.float32)
    for index in range(self.depth):
      y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                       name=f"layer_{index}_attention_norm")(h)
      h = h + Attention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                        embed_axis="vocab", zero_out=True,
                        name=f"layer_{index}_attention")(y, mask).astype(jnp.float32)
      y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                       name=f"layer_{index}_mlp_norm")(h)
      h = h + FeedForward(4 * width, dtype=self.dtype, param_dtype=self.param_dtype,
                          embed_axis="vocab", zero_out=True,
                          name=f"layer_{index}_mlp")(y, train=False).astype(jnp.float32)
    return h * present[..., None]


def text_settings(model_config, info) -> dict:
  """{'text_dim', 'text_length', 'text_layers', 'text_heads'} of config.model, checked: text_dim
  and text_length both 0 (no text), or both positive (a text-to-image backbone) on data without
  class labels; text_layers >= 0 trainable encoder layers (`TextEncoder`) of text_heads heads
  over the caption features."""
  text_dim = int(model_config.get("text_dim", 0))
  text_length = int(model_config.get("text_length", 0))
  text_layers = int(model_config.get("text_layers", 0))
  text_heads = int(model_config.get("text_heads", 4))
  if text_layers < 0 or (text_layers and (text_heads < 1 or text_dim % text_heads)):
    raise ValueError(f"model.text_layers={text_layers} and model.text_heads={text_heads}: "
                     "text_layers >= 0 trainable caption-encoder layers, whose text_heads must "
                     f"divide model.text_dim={text_dim}.")
  if text_layers and not text_dim:
    raise ValueError(f"model.text_layers={text_layers} encodes captions, but model.text_dim=0 "
                     "(no text); set model.text_dim and model.text_length, or text_layers=0.")
  if text_dim < 0 or text_length < 0 or (text_dim > 0) != (text_length > 0):
    raise ValueError(f"model.text_dim={text_dim} and model.text_length={text_length}: both 0 "
                     "(no text), or both positive (the text encoder's width and the caption "
                     "length in tokens, data.text.max_length: e.g. 2048 and 128 for flan-t5-xl).")
  if text_dim > 0 and int(info.num_classes) > 0:
    raise ValueError(f"model.text_dim={text_dim} with class labels (data.num_classes="
                     f"{info.num_classes}): a text model reads captions; train on captioned data "
                     "without labels, or set model.text_dim=0 and model.text_length=0.")
  return dict(text_dim=text_dim, text_length=text_length, text_layers=text_layers,
              text_heads=text_heads)
