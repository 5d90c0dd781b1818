"""The Gemma text encoder (Gemma Team, arXiv:2403.08295; Gemma 2, arXiv:2408.00118) in linen with
its released weights: the caption encoder of ml-starflow's 'gemma' text path (a Lumina-style
folder whose text_encoder is a Gemma decoder; apple/ml-starflow utils/model_setup.py reads its last
hidden state times the attention mask).

The forward pass is that of HuggingFace transformers' `GemmaModel` / `Gemma2Model` in evaluation
with the eager attention: token embeddings times sqrt(hidden_size); per layer a pre-norm causal
self-attention with rotary position embeddings (positions 0..T-1 whatever the padding, as the HF
model numbers them), grouped key/value heads, keys restricted to the caption's tokens (padding
masked) and a pre-norm gated GELU feed-forward (the tanh approximation of the released models);
Gemma's RMS norm x / rms(x) * (1 + w) in float32, before each block and at the end. Gemma 2
adds a norm after the attention and after the feed-forward, scales the scores by
query_pre_attn_scalar^-1/2 instead of head_dim^-1/2, soft-caps them (cap * tanh(scores / cap)),
and restricts its sliding-window layers to the last `sliding_window` keys. No biases anywhere.

`load` reads a HF folder (config.json + model.safetensors or its shards); `features` is the
caption encoding: the last hidden state times the attention mask.
"""

import dataclasses
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flowjax import state_dicts
from flowjax.models import t5

Params = Any
HF_CONFIG, HF_WEIGHTS = "config.json", "model.safetensors"
HF_INDEX = state_dicts.HF_INDEX
MODEL_TYPES = ("gemma", "gemma2")


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """The decoder's sizes (HF GemmaConfig / Gemma2Config names)."""
  model_type: str = "gemma"
  vocab_size: int = 256000
  hidden_size: int = 2048
  intermediate_size: int = 16384
  num_hidden_layers: int = 18
  num_attention_heads: int = 8
  num_key_value_heads: int = 1
  head_dim: int = 256
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  query_pre_attn_scalar: float | None = None  # Gemma 2
  attn_logit_softcapping: float | None = None  # Gemma 2
  sliding_window: int | None = None  # Gemma 2
  layer_types: tuple[str, ...] = ()  # Gemma 2: 'sliding_attention' | 'full_attention' per layer
  exact_gelu: bool = False  # the feed-forward's GELU: erf form, else the tanh approximation

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"Gemma model_type={self.model_type!r}: flowjax reads {list(MODEL_TYPES)} "
                       "(Gemma and Gemma 2 decoders).")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"Gemma num_key_value_heads={self.num_key_value_heads} does not divide "
                       f"num_attention_heads={self.num_attention_heads}.")

  @property
  def scale(self) -> float:
    return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

  def sliding(self, index: int) -> bool:
    return bool(self.layer_types) and self.layer_types[index] == "sliding_attention"

  @classmethod
  def from_hf_json(cls, config: Mapping) -> "GemmaConfig":
    if config.get("use_bidirectional_attention"):
      raise ValueError("A Gemma config with use_bidirectional_attention: flowjax reads the causal "
                       "Gemma decoders only.")
    # transformers 5: Gemma reads hidden_act (its legacy "gelu" meaning the tanh form), Gemma 2
    # reads hidden_activation ("gelu" being the erf form).
    gemma2 = config.get("model_type") == "gemma2"
    key = "hidden_activation" if gemma2 else "hidden_act"
    activation = config.get(key) or "gelu_pytorch_tanh"
    tanh = ("gelu_pytorch_tanh",) if gemma2 else ("gelu", "gelu_pytorch_tanh")
    if activation not in tanh + (("gelu",) if gemma2 else ()):
      raise ValueError(f"Gemma {key}={activation!r}: flowjax reads the GELU of the released "
                       "Gemma models ('gelu_pytorch_tanh', or for Gemma 2 'gelu').")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
      raise ValueError(f"Gemma rope {rope or config.get('rope_scaling')}: flowjax reads the "
                       "default rotary embedding.")
    names = {f.name for f in dataclasses.fields(cls)} - {"layer_types", "rope_theta"}
    values = {k: v for k, v in config.items() if k in names}
    values["rope_theta"] = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    values.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    values["exact_gelu"] = activation not in tanh
    if gemma2:
      layers = config["num_hidden_layers"]
      values["query_pre_attn_scalar"] = config.get("query_pre_attn_scalar", 256)
      values["attn_logit_softcapping"] = config.get("attn_logit_softcapping", 50.0)
      values["sliding_window"] = config.get("sliding_window", 4096)
      # Gemma2Config's default: sliding windows on the even layers (0, 2, ...).
      values["layer_types"] = tuple(config.get("layer_types") or [
          "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)])
    else:
      for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "sliding_window"):
        values.pop(key, None)
    return cls(**values)


class GemmaRMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * (1 + weight), in float32 (HF GemmaRMSNorm)."""
  epsilon: float

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    return (normed * (1.0 + weight)).astype(x.dtype)


def _dense(features: int, name: str, dtype) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32, name=name)


def rotary(x, positions, theta: float):
  """Rotary embedding of x [B, T, H, D] at positions [T] (HF's rotate_half layout)."""
  half = x.shape[-1] // 2
  inverse = 1.0 / (theta ** (np.arange(0, x.shape[-1], 2, dtype=np.float32) / x.shape[-1]))
  angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inverse)[None]
  angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


class GemmaLayer(nn.Module):
  config: GemmaConfig
  index: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, allowed):
    """h: [B, T, hidden]; allowed: [B, 1, T, T] bool (causal and padding; the window added
    here for a sliding layer)."""
    c = self.config
    batch, length, _ = h.shape
    norm = lambda name: GemmaRMSNorm(c.rms_norm_eps, name=name)
    x = norm("input_norm")(h)
    positions = jnp.arange(length)
    heads = lambda y, n: y.reshape(batch, length, n, c.head_dim)
    q = rotary(heads(_dense(c.num_attention_heads * c.head_dim, "q", self.dtype)(x),
                     c.num_attention_heads), positions, c.rope_theta)
    k = rotary(heads(_dense(c.num_key_value_heads * c.head_dim, "k", self.dtype)(x),
                     c.num_key_value_heads), positions, c.rope_theta)
    v = heads(_dense(c.num_key_value_heads * c.head_dim, "v", self.dtype)(x),
              c.num_key_value_heads)
    groups = c.num_attention_heads // c.num_key_value_heads
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * c.scale
    if c.attn_logit_softcapping:
      scores = jnp.tanh(scores / c.attn_logit_softcapping) * c.attn_logit_softcapping
    if c.sliding(self.index):
      query, key = np.arange(length)[:, None], np.arange(length)[None, :]
      allowed = allowed & jnp.asarray(key > query - c.sliding_window)
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, -1)
    y = _dense(c.hidden_size, "o", self.dtype)(attended)
    if c.model_type == "gemma2":
      y = norm("post_attention_norm")(y)
    h = h + y.astype(h.dtype)
    x = norm("pre_feedforward_norm" if c.model_type == "gemma2" else "post_attention_norm")(h)
    gate = nn.gelu(_dense(c.intermediate_size, "gate", self.dtype)(x),
                   approximate=not c.exact_gelu)
    y = _dense(c.hidden_size, "down", self.dtype)(
        gate * _dense(c.intermediate_size, "up", self.dtype)(x))
    if c.model_type == "gemma2":
      y = norm("post_feedforward_norm")(y)
    return h + y.astype(h.dtype)


class GemmaEncoder(nn.Module):
  """input_ids [B, T] int, attention_mask [B, T] (1 = token, 0 = padding; None = all tokens) ->
  last hidden state [B, T, hidden_size] float32."""
  config: GemmaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    c = self.config
    length = input_ids.shape[1]
    embed = self.param("embed_tokens", nn.initializers.normal(1.0),
                       (c.vocab_size, c.hidden_size), jnp.float32)
    h = jnp.take(embed, input_ids, axis=0) * jnp.float32(c.hidden_size ** 0.5)
    allowed = jnp.asarray(np.tril(np.ones((length, length), bool)))[None, None]
    if attention_mask is not None:
      allowed = allowed & (jnp.asarray(attention_mask)[:, None, None, :] != 0)
    h = h.astype(self.dtype)
    for index in range(c.num_hidden_layers):
      h = GemmaLayer(c, index, self.dtype, name=f"layer_{index}")(h, allowed)
    return GemmaRMSNorm(c.rms_norm_eps, name="final_norm")(h).astype(jnp.float32)


# ml-starflow's caption features (the last hidden state times the attention mask) and the
# parameter shapes are read the same way as the T5 encoder's: both modules take (ids, mask).
features = t5.features
abstract_params = t5.abstract_params


def _hf_targets(config: GemmaConfig) -> dict:
  """flowjax path -> (HF state-dict key, transform) for `GemmaModel` / `Gemma2Model` weights
  (a causal LM's 'model.' prefix is removed before)."""
  same = np.asarray
  targets = {("embed_tokens",): ("embed_tokens.weight", same),
             ("final_norm", "weight"): ("norm.weight", same)}
  norms = {"input_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm"}
  if config.model_type == "gemma2":
    norms.update(pre_feedforward_norm="pre_feedforward_layernorm",
                 post_feedforward_norm="post_feedforward_layernorm")
  for index in range(config.num_hidden_layers):
    ours, theirs = f"layer_{index}", f"layers.{index}"
    for name in ("q", "k", "v", "o"):
      targets[(ours, name, "kernel")] = (f"{theirs}.self_attn.{name}_proj.weight",
                                         state_dicts.linear)
    for name in ("gate", "up", "down"):
      targets[(ours, name, "kernel")] = (f"{theirs}.mlp.{name}_proj.weight", state_dicts.linear)
    for ours_norm, theirs_norm in norms.items():
      targets[(ours, ours_norm, "weight")] = (f"{theirs}.{theirs_norm}.weight", same)
  return targets


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], module: GemmaEncoder,
                           source: str = "the checkpoint") -> Params:
  """flowjax parameters of `module` from a HF Gemma state dict of NumPy arrays (a
  GemmaForCausalLM's 'model.' prefix and its lm_head are dropped)."""
  tensors = {name.removeprefix("model."): value for name, value in state_dict.items()}
  expected = {path: leaf.shape for path, leaf in
              traverse_util.flatten_dict(abstract_params(module)).items()}
  try:
    return state_dicts.assemble(tensors, _hf_targets(module.config), expected,
                                lambda name: name.startswith("lm_head."),
                                f"Gemma state dict in {source}")
  except state_dicts.ConversionError as error:
    raise ValueError(f"{error}\nThe Gemma config must be the checkpoint's config.json; it was "
                     f"{module.config}.") from error


def load(path: str, dtype: Any = jnp.float32) -> tuple[GemmaConfig, GemmaEncoder, Params]:
  """(config, module, params) of a HF Gemma / Gemma 2 folder: config.json and model.safetensors,
  or its shards with model.safetensors.index.json (as save_pretrained writes them)."""
  config_path = os.path.join(path, HF_CONFIG)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"No Gemma config at {config_path!r}; give a HF Gemma folder "
                            f"(save_pretrained writes {HF_CONFIG} and the weights).")
  with open(config_path) as f:
    config = GemmaConfig.from_hf_json(json.load(f))
  index = os.path.join(path, HF_INDEX)
  weights = index if os.path.isfile(index) else os.path.join(path, HF_WEIGHTS)
  if not os.path.isfile(weights):
    raise FileNotFoundError(f"No Gemma weights at {weights!r}; give a HF Gemma folder "
                            f"({HF_WEIGHTS}, or the shards with {HF_INDEX}).")
  state_dict = state_dicts.read_shards(weights, "Gemma")
  module = GemmaEncoder(config, dtype=dtype)
  return config, module, params_from_state_dict(state_dict, module, path)
