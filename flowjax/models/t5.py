"""The T5 encoder (Raffel et al., arXiv:1910.10683; T5 v1.1 / Flan-T5, Chung et al.,
arXiv:2210.11416) in linen with its released weights: the frozen text encoder of STARFlow's
text-to-image model (apple/ml-starflow reads google/flan-t5-xl's encoder, 2048 wide).

The forward pass is that of HuggingFace transformers' `T5EncoderModel`
(models/t5/modeling_t5.py) in evaluation: token embeddings; per layer a pre-norm self-attention
with T5's relative position bias (bucketed signed distances, the bias table in the first layer
only and shared by every layer; scores not scaled by 1/sqrt(d_kv)) and a pre-norm feed-forward
(ReLU, or for v1.1 / Flan-T5 the gated GELU with the tanh approximation); T5's RMS norm (no mean,
no bias, statistics in float32) before each and at the end; no biases anywhere. Padding tokens
(attention_mask 0) are masked out of every attention, as the HF model does with its mask.

`load` reads a HF checkpoint folder (config.json + model.safetensors, as `save_pretrained` writes
them) or a weights file with a config; `features` is ml-starflow's caption encoding: the last
hidden state times the attention mask.
"""

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flowjax import state_dicts, storage

Params = Any
HF_CONFIG, HF_WEIGHTS = "config.json", "model.safetensors"
HF_INDEX = state_dicts.HF_INDEX  # a checkpoint saved in shards (google/flan-t5-xl)
FEED_FORWARDS = ("relu", "gated-gelu")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The encoder's sizes (HF T5Config names)."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"

  def __post_init__(self):
    if self.feed_forward_proj not in FEED_FORWARDS:
      raise ValueError(f"T5 feed_forward_proj={self.feed_forward_proj!r}: flowjax reads "
                       f"{list(FEED_FORWARDS)} (T5 and T5 v1.1 / Flan-T5).")

  @classmethod
  def from_hf_json(cls, config: Mapping) -> "T5Config":
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in config.items() if k in names}
    if "gated-gelu" == config.get("feed_forward_proj") or (
        config.get("is_gated_act") and config.get("dense_act_fn") == "gelu_new"):
      values["feed_forward_proj"] = "gated-gelu"
    return cls(**values)


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """[query_length, key_length] int32 buckets of the signed distance key - query, bidirectional
  (the encoder's): half of the buckets per sign, the first half of those exact distances, the rest
  logarithmic up to max_distance (HF `T5Attention._relative_position_bucket`)."""
  relative = (np.arange(key_length)[None, :] - np.arange(query_length)[:, None])
  half = num_buckets // 2
  buckets = (relative > 0).astype(np.int64) * half
  distance = np.abs(relative)
  max_exact = half // 2
  with np.errstate(divide="ignore"):
    large = max_exact + (np.log(np.maximum(distance, 1).astype(np.float32) / max_exact)
                         / math.log(max_distance / max_exact)
                         * (half - max_exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  buckets += np.where(distance < max_exact, distance, large)
  return buckets.astype(np.int32)


class T5RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * weight, statistics in float32 (HF T5LayerNorm)."""
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return (weight * (x32 * jax.lax.rsqrt(variance + self.eps))).astype(x.dtype)


def _dense(features: int, name: str, dtype) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32, name=name)


class T5Layer(nn.Module):
  config: T5Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, bias):
    """h: [B, T, d_model]; bias: [B or 1, heads, T, T] position bias plus the padding mask."""
    c = self.config
    batch, length, _ = h.shape
    x = T5RMSNorm(c.layer_norm_epsilon, name="attention_norm")(h)
    inner = c.num_heads * c.d_kv
    split = lambda y: y.reshape(batch, length, c.num_heads, c.d_kv)
    q = split(_dense(inner, "q", self.dtype)(x))
    k = split(_dense(inner, "k", self.dtype)(x))
    v = split(_dense(inner, "v", self.dtype)(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + bias
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, inner)
    h = h + _dense(c.d_model, "o", self.dtype)(attended).astype(h.dtype)
    x = T5RMSNorm(c.layer_norm_epsilon, name="feed_forward_norm")(h)
    if c.feed_forward_proj == "gated-gelu":
      gate = nn.gelu(_dense(c.d_ff, "wi_0", self.dtype)(x), approximate=True)
      hidden = gate * _dense(c.d_ff, "wi_1", self.dtype)(x)
    else:
      hidden = nn.relu(_dense(c.d_ff, "wi", self.dtype)(x))
    return h + _dense(c.d_model, "wo", self.dtype)(hidden).astype(h.dtype)


class T5Encoder(nn.Module):
  """input_ids [B, T] int, attention_mask [B, T] (1 = token, 0 = padding; None = all tokens) ->
  last hidden state [B, T, d_model] float32."""
  config: T5Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    c = self.config
    length = input_ids.shape[1]
    embed = self.param("embed_tokens", nn.initializers.normal(1.0), (c.vocab_size, c.d_model),
                       jnp.float32)
    h = jnp.take(embed, input_ids, axis=0).astype(jnp.float32)
    table = self.param("relative_attention_bias", nn.initializers.normal(1.0),
                       (c.relative_attention_num_buckets, c.num_heads), jnp.float32)
    buckets = relative_position_buckets(length, length, c.relative_attention_num_buckets,
                                        c.relative_attention_max_distance)
    bias = jnp.transpose(jnp.take(table, jnp.asarray(buckets), axis=0), (2, 0, 1))[None]
    if attention_mask is not None:
      masked = jnp.asarray(attention_mask)[:, None, None, :] == 0
      bias = jnp.where(masked, jnp.finfo(jnp.float32).min, bias)
    for index in range(c.num_layers):
      h = T5Layer(c, self.dtype, name=f"layer_{index}")(h, bias)
    return T5RMSNorm(c.layer_norm_epsilon, name="final_norm")(h).astype(jnp.float32)


def features(module: nn.Module, params: Params, input_ids, attention_mask):
  """ml-starflow's caption features: the last hidden state times the attention mask (zeros at
  padding), [B, T, width] float32, of an encoder module called with (input_ids,
  attention_mask) (T5Encoder, gemma.GemmaEncoder)."""
  hidden = module.apply({"params": params}, input_ids, attention_mask)
  return hidden * jnp.asarray(attention_mask, jnp.float32)[..., None]


def abstract_params(module: nn.Module) -> Params:
  variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  return nn.meta.unbox(variables["params"])


def _hf_targets(config: T5Config) -> dict:
  """flowjax path -> (HF state-dict key, transform) for `T5EncoderModel` / `T5Model` weights."""
  same = np.asarray
  targets = {("embed_tokens",): ("shared.weight", same),
             ("relative_attention_bias",):
                 ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", same),
             ("final_norm", "weight"): ("encoder.final_layer_norm.weight", same)}
  feed_forward = ("wi_0", "wi_1", "wo") if config.feed_forward_proj == "gated-gelu" \
      else ("wi", "wo")
  for index in range(config.num_layers):
    ours, theirs = f"layer_{index}", f"encoder.block.{index}.layer"
    for name in ("q", "k", "v", "o"):
      targets[(ours, name, "kernel")] = (f"{theirs}.0.SelfAttention.{name}.weight",
                                         state_dicts.linear)
    for name in feed_forward:
      targets[(ours, name, "kernel")] = (f"{theirs}.1.DenseReluDense.{name}.weight",
                                         state_dicts.linear)
    targets[(ours, "attention_norm", "weight")] = (f"{theirs}.0.layer_norm.weight", same)
    targets[(ours, "feed_forward_norm", "weight")] = (f"{theirs}.1.layer_norm.weight", same)
  return targets


def _ignored(name: str) -> bool:
  """Entries without a parameter here: the decoder and LM head of a full T5 checkpoint, and the
  encoder's copy of the shared embedding."""
  return name.startswith(("decoder.", "lm_head.")) or name == "encoder.embed_tokens.weight"


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], module: T5Encoder,
                           source: str = "the checkpoint") -> Params:
  """flowjax parameters of `module` from a HF T5 state dict of NumPy arrays (the encoder's
  embedding may be stored as `shared.weight` or `encoder.embed_tokens.weight`)."""
  tensors = dict(state_dict)
  if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:
    tensors["shared.weight"] = tensors.pop("encoder.embed_tokens.weight")
  expected = {path: leaf.shape for path, leaf in
              traverse_util.flatten_dict(abstract_params(module)).items()}
  try:
    return state_dicts.assemble(tensors, _hf_targets(module.config), expected, _ignored,
                                f"T5 state dict in {source}")
  except state_dicts.ConversionError as error:
    raise ValueError(f"{error}\nThe T5 config must be the checkpoint's config.json; it was "
                     f"{module.config}.") from error


def load(path: str, config: "T5Config | str | None" = None,
         dtype: Any = jnp.float32) -> tuple[T5Config, T5Encoder, Params]:
  """(config, module, params) of a T5 encoder checkpoint: a HF folder (config.json and
  model.safetensors, or its shards with model.safetensors.index.json, as save_pretrained writes
  them; e.g. google/flan-t5-xl) or a weights file
  (.safetensors, .npz, .pt/.pth with torch) with config= its config.json (None: the one beside
  it) or a T5Config. On object storage (gs://...) the folder or file (with the config beside it)
  is read through a local copy (`storage.local_weights`)."""
  local, config = storage.local_weights(path, config, HF_CONFIG)
  with storage.naming_copy(local, path):
    return _load(local, config, dtype)


def _load(path, config, dtype):
  weights = path
  if os.path.isdir(path):
    index = os.path.join(path, HF_INDEX)
    weights = index if os.path.isfile(index) else os.path.join(path, HF_WEIGHTS)
  if not os.path.isfile(weights):
    raise FileNotFoundError(f"No T5 weights at {weights!r}; give a HF checkpoint folder "
                            f"(config.json + {HF_WEIGHTS}, or the shards with {HF_INDEX}) or a "
                            "weights file.")
  if not isinstance(config, T5Config):
    config_path = config or os.path.join(os.path.dirname(os.path.abspath(weights)), HF_CONFIG)
    if not os.path.isfile(config_path):
      raise FileNotFoundError(f"No T5 config at {config_path!r}; pass config= the checkpoint's "
                              "config.json or a T5Config.")
    with open(config_path) as f:
      config = T5Config.from_hf_json(json.load(f))
  module = T5Encoder(config, dtype=dtype)
  return config, module, params_from_state_dict(state_dicts.read_shards(weights, "T5"), module,
                                                weights)
