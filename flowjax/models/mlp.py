"""Residual MLP backbone for flat data (toy 2D points; any [B, *shape] is flattened).

in Dense -> depth x [LN -> FiLM(c) -> Dense -> SiLU -> Dense, residual] -> LN -> out Dense,
with c the sum of the time embeddings and the label embedding. FiLM is zero-initialised
(like adaLN-Zero), so the time dependence is learned from an unmodulated start.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from flowjax.models import layers
from flowjax.registry import MODELS


def layer_norm(param_dtype: layers.Dtype, name: str) -> nn.LayerNorm:
  """float32 LayerNorm over [B, D] with 'embed'-partitioned scale and bias."""
  return nn.LayerNorm(
      dtype=jnp.float32, param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), name=name)


class ResidualBlock(nn.Module):
  """h <- h + Dense(SiLU(Dense(FiLM(LN(h), c)))): [B, D], [B, D] -> [B, D] float32."""
  dropout: float = 0.0
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, c: jax.Array, train: bool) -> jax.Array:
    width = h.shape[-1]
    film = layers.dense(2 * width, ("embed", "mlp"), kernel_init=nn.initializers.zeros,
                        param_dtype=self.param_dtype, name="film")(nn.silu(c))
    shift, scale = jnp.split(film, 2, axis=-1)
    y = layer_norm(self.param_dtype, name="norm")(h)
    y = (y * (1 + scale) + shift).astype(self.dtype)
    y = layers.dense(width, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
                     name="fc1")(y)
    y = nn.with_logical_constraint(nn.silu(y), ("batch", "mlp"))
    y = layers.Dropout(self.dropout, deterministic=not train)(y)
    y = layers.dense(width, ("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                     name="fc2")(y)
    return nn.with_logical_constraint(h + y.astype(jnp.float32), ("batch", "embed"))


class MLP(nn.Module):
  """Residual MLP backbone (the flowjax Backbone contract) for flat vectors.

  Attributes:
    hidden_size: width D of the residual stream.
    depth: number of residual blocks.
    num_classes: 0 = unconditional; else the label table has num_classes + 1 rows.
    time_scale: times are multiplied by this before the sinusoidal embedding.
    dropout: dropout rate inside the blocks when train=True.
    dtype: compute dtype of the block matmuls.
    param_dtype: parameter dtype.
  """
  hidden_size: int
  depth: int
  num_classes: int = 0
  time_scale: float = 1000.0
  dropout: float = 0.0
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, times: tuple[jax.Array, ...], cond: jax.Array | None, *,
               train: bool) -> jax.Array:
    """Predicts a field of the same shape as the input.

    Args:
      x: [B, *shape] float, e.g. [B, 2] toy points.
      times: tuple of 1 to 5 arrays [B] in [0, 1]; one embedder per element.
      cond: int32 labels [B] (num_classes = null label) or None (all null).
      train: enables dropout (rng collection 'dropout').
    Returns:
      [B, *shape] float32.
    """
    batch = x.shape[0]
    features = math.prod(x.shape[1:])
    c = layers.embed_conditioning(times, cond, batch_size=batch, hidden_size=self.hidden_size,
                                  num_classes=self.num_classes, time_scale=self.time_scale,
                                  param_dtype=self.param_dtype)
    h = layers.dense(self.hidden_size, ("conv_in", "embed"), param_dtype=self.param_dtype,
                     name="in")(x.reshape(batch, features).astype(jnp.float32))
    for i in range(self.depth):
      h = ResidualBlock(dropout=self.dropout, dtype=self.dtype, param_dtype=self.param_dtype,
                        name=f"block_{i}")(h, c, train)
    h = layer_norm(self.param_dtype, name="norm_out")(h)
    out = layers.dense(features, ("embed", "conv_out"), param_dtype=self.param_dtype,
                       name="out")(h)
    return out.reshape(x.shape).astype(jnp.float32)


@MODELS.register("mlp")
def build(model_config: ml_collections.ConfigDict, info) -> MLP:
  """MLP from config.model.

  Keys: hidden_size, depth (required); time_scale (1000.0), dropout (0.0),
  dtype ('float32'), param_dtype ('float32').
  """
  return MLP(
      hidden_size=int(model_config.hidden_size),
      depth=int(model_config.depth),
      num_classes=int(info.num_classes),
      time_scale=float(model_config.get("time_scale", 1000.0)),
      dropout=float(model_config.get("dropout", 0.0)),
      dtype=layers.dtype_from_name(model_config.get("dtype", "float32"), "dtype"),
      param_dtype=layers.dtype_from_name(model_config.get("param_dtype", "float32"),
                                         "param_dtype"))
