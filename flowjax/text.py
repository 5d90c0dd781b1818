"""Caption encoders: captions -> frozen text features [N, T, D], the condition of text models.

A text-to-image STARFlow reads its captions as the features of a frozen text encoder (apple/
ml-starflow: google/flan-t5-xl's last hidden state times the attention mask, 128 tokens padded to
full length; Gu et al., arXiv:2506.06276). flowjax computes them once, where the captions are read
(`flowjax.data`: in memory for a small captioned source, batch by batch into a latent cache for a
large one), so training never runs the encoder. The null caption of classifier-free guidance and
of caption dropout is the encoding of the empty caption "", as the official code encodes it.

The `data.text` config section picks the encoder:
- encoder="t5": a HF T5 / Flan-T5 folder at `path` (config.json, model.safetensors or its shards,
  and the tokenizer's tokenizer.json, as save_pretrained writes them): tokens padded and truncated
  to `max_length` (the tokenizer's own post-processing appends T5's end-of-sequence token);
  features = `flowjax.models.t5.features`.
- encoder="gemma_embed": ml-starflow's gemma2_2b / gemma3_* text path (utils/model_setup.py
  TextEmbedder): a HF Gemma 2 or Gemma 3 folder at `path` (config.json, the safetensors file or
  shards holding the token embedding, tokenizer.json, tokenizer_config.json); each caption is
  wrapped in Gemma's chat template asking for an image (`GEMMA_TEMPLATE`), tokenized as
  transformers' GemmaTokenizer does (<bos> first, padded to `max_length` on the tokenizer's
  padding side, left unless tokenizer_config.json says otherwise, truncated on the right);
  features = the frozen token embedding times sqrt(hidden_size), with no mask: the padding
  positions hold the <pad> embedding, as the official code feeds them. Only the embedding
  table is read from the checkpoint (for Gemma 3, its first image_token_index rows).
- encoder="gemma": ml-starflow's 'gemma' text path (a Lumina-style folder: text_encoder/ holding a
  HF Gemma or Gemma 2 decoder, tokenizer/ its tokenizer; or one folder with both): the plain
  caption tokenized as above (no template), features = `flowjax.models.gemma.features`, the
  decoder's last hidden state times the attention mask.
- encoder="words": an offline encoder for CPU runs and tests: each lower-cased word hashed
  (CRC-32) into `vocab_size` ids, then an end-of-sequence id, through a randomly initialised T5
  encoder (v1.1 layout: gated GELU) of width `dim`, `layers` layers and `heads` heads whose
  weights come from `seed`. No download and no state besides the config: the same config gives
  the same features on every machine.
"""

import contextlib
import dataclasses
import functools
import json
import os
import re
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flowjax import storage
from flowjax.registry import unknown_name_message

ENCODERS = ("words", "t5", "gemma_embed", "gemma")
TOKENIZER_FILE = "tokenizer.json"
PAD_ID, EOS_ID = 0, 1  # T5's
NULL_CAPTION = ""
TOKENIZER_CONFIG = "tokenizer_config.json"
# apple/ml-starflow utils/common.py preprocess_text(use_template=True), mode "an image".
GEMMA_TEMPLATE = ("<start_of_turn>user\nPlease generate an image about: {prompt}<end_of_turn>\n"
                  "<start_of_turn>model\n")


class TextConfigError(ValueError):
  """A data.text setting that cannot work; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class TextSettings:
  """The data.text section: encoder ('' = no captions), path, max_length, and the 'words'
  encoder's vocab_size, dim, layers, heads and seed."""
  encoder: str = ""
  path: str = ""
  max_length: int = 16
  vocab_size: int = 4096
  dim: int = 32
  layers: int = 2
  heads: int = 4
  seed: int = 0

  @classmethod
  def of(cls, data_config) -> "TextSettings":
    section = data_config.get("text", None)
    if section is None:
      return cls()
    values = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise TextConfigError(f"data.text has no key {unknown[0]!r}; its keys are "
                            f"{[f.name for f in dataclasses.fields(cls)]}.")
    return cls(**values)

  def __post_init__(self):
    if self.encoder and self.encoder not in ENCODERS:
      raise TextConfigError("data.text.encoder: " + unknown_name_message(
          "text encoder", self.encoder, list(ENCODERS)) + " ('' = no captions)")
    for key in ("max_length", "vocab_size", "dim", "layers", "heads"):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TextConfigError(f"data.text.{key}={value!r} must be a positive integer.")
    if self.encoder == "words" and (self.dim % self.heads or self.vocab_size < 3):
      raise TextConfigError(f"data.text.dim={self.dim} must be a multiple of data.text.heads="
                            f"{self.heads}, and data.text.vocab_size={self.vocab_size} >= 3.")

  @property
  def enabled(self) -> bool:
    return bool(self.encoder)

  def feature_keys(self) -> tuple[str, ...]:
    """The settings that determine the features: every 'words' setting but the path; for 't5',
    'gemma_embed' and 'gemma' the encoder and max_length (their weights are the folder's,
    wherever it lies; the width is the folder's, checked against a cache's feature shape)."""
    if self.encoder in ("t5", "gemma_embed", "gemma"):
      return ("encoder", "max_length")
    return tuple(f.name for f in dataclasses.fields(self) if f.name != "path")


def words(caption: str) -> list[str]:
  """The lower-cased words of a caption (runs of letters and digits)."""
  return re.findall(r"[a-z0-9]+", caption.lower())


def word_ids(caption: str, vocab_size: int, max_length: int) -> list[int]:
  """The 'words' encoder's tokens: CRC-32 of each word into [2, vocab_size), at most
  max_length - 1 of them, then the end-of-sequence id (as T5's tokenizer truncates)."""
  ids = [2 + zlib.crc32(w.encode()) % (vocab_size - 2) for w in words(caption)]
  return ids[:max_length - 1] + [EOS_ID]


def pad(sequences: Sequence[Sequence[int]], max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids [N, max_length] int32 padded with T5's pad id, attention mask [N, max_length])."""
  ids = np.full((len(sequences), max_length), PAD_ID, np.int32)
  mask = np.zeros((len(sequences), max_length), np.int32)
  for row, sequence in enumerate(sequences):
    sequence = list(sequence)[:max_length]
    ids[row, :len(sequence)] = sequence
    mask[row, :len(sequence)] = 1
  return ids, mask


def hf_tokenizer(path: str, max_length: int):
  """A `tokenizers.Tokenizer` from `path`/tokenizer.json, truncating to max_length (its
  post-processor still appends the end-of-sequence token) and padding to exactly max_length."""
  import tokenizers
  file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise FileNotFoundError(
        f"No tokenizer at {file!r}: data.text.path must be a HF T5 folder with its "
        f"{TOKENIZER_FILE} (AutoTokenizer.from_pretrained(...).save_pretrained(folder) writes it).")
  tokenizer = tokenizers.Tokenizer.from_file(file)
  pad_token = tokenizer.id_to_token(PAD_ID) or "<pad>"
  tokenizer.enable_truncation(max_length)
  tokenizer.enable_padding(length=max_length, pad_id=PAD_ID, pad_token=pad_token)
  return tokenizer


def hf_tokenize(tokenizer, texts: Sequence[str], rows: int,
                source: str) -> tuple[np.ndarray, np.ndarray]:
  """(ids, attention mask) [N, max_length] int32 of `texts` through a `tokenizers.Tokenizer`,
  refusing an id beyond the `rows` embedding rows of the weights in `source`."""
  encodings = tokenizer.encode_batch(list(texts))
  ids = np.asarray([e.ids for e in encodings], np.int32)
  if ids.size and ids.max() >= rows:
    raise TextConfigError(f"A caption has token id {int(ids.max())}, beyond the {rows} "
                          f"embedding rows of {source}: are the tokenizer and the weights one "
                          "model's?")
  return ids, np.asarray([e.attention_mask for e in encodings], np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoder:
  """A frozen encoder: `tokenize(captions) -> (ids, mask)` [N, max_length] and a jitted
  `features(params, ids, mask) -> [N, max_length, dim]`."""
  settings: TextSettings
  dim: int
  tokenize: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]
  params: Any
  apply: Callable

  @property
  def max_length(self) -> int:
    return self.settings.max_length

  def encode(self, captions: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Features [N, max_length, dim] float32 of N captions (each distinct caption once)."""
    table, index = self.encode_distinct(captions, batch_size)
    return table[index]

  def encode_distinct(self, captions: Sequence[str],
                      batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(table [U, max_length, dim] float32 of the U distinct captions, index [N] int64): caption
    i's features are table[index[i]]. Chunks are padded to a power of two (at most batch_size),
    so the encoder compiles for a few sizes only. The empty caption's row is `null()` exactly,
    computed alone, so that a dropped caption and an empty one are the same features."""
    captions = [str(c) for c in captions]
    distinct = sorted(set(captions))
    position = {caption: i for i, caption in enumerate(distinct)}
    table = np.zeros((len(distinct), self.max_length, self.dim), np.float32)
    for start in range(0, len(distinct), batch_size):
      chunk = distinct[start:start + batch_size]
      size = len(chunk)
      padded = min(batch_size, 1 << (size - 1).bit_length())
      ids, mask = self.tokenize(chunk + [chunk[-1]] * (padded - size))
      table[start:start + size] = np.asarray(self.apply(self.params, ids, mask))[:size]
    if NULL_CAPTION in position and len(distinct) > 1:
      table[position[NULL_CAPTION]] = self.null()
    return table, np.asarray([position[c] for c in captions], np.int64)

  def null(self) -> np.ndarray:
    """Features [max_length, dim] of the null (empty) caption, encoded alone."""
    return self.encode_distinct([NULL_CAPTION])[0][0]


def _jitted_features(module):
  """The jitted caption features of an encoder module taking (ids, mask): T5 or Gemma."""
  from flowjax.models import t5
  return jax.jit(lambda params, ids, mask: t5.features(module, params, ids, mask))


def _words_encoder(settings: TextSettings) -> TextEncoder:
  from flowjax.models import t5
  config = t5.T5Config(vocab_size=settings.vocab_size, d_model=settings.dim,
                       d_kv=settings.dim // settings.heads, d_ff=2 * settings.dim,
                       num_layers=settings.layers, num_heads=settings.heads,
                       feed_forward_proj="gated-gelu")
  module = t5.T5Encoder(config)
  params = module.init(jax.random.key(settings.seed), jnp.zeros((1, 2), jnp.int32))["params"]

  def tokenize(captions):
    return pad([word_ids(c, settings.vocab_size, settings.max_length) for c in captions],
               settings.max_length)

  return TextEncoder(settings, settings.dim, tokenize, params, _jitted_features(module))


def _t5_encoder(settings: TextSettings) -> TextEncoder:
  from flowjax.models import t5
  if not settings.path:
    raise TextConfigError("data.text.encoder='t5' needs data.text.path: a local HF T5 folder "
                          "(config.json, model.safetensors, tokenizer.json; e.g. "
                          "google/flan-t5-xl saved with save_pretrained).")
  tokenizer = hf_tokenizer(settings.path, settings.max_length)
  config, module, params = t5.load(settings.path)
  if tokenizer.get_vocab_size() > config.vocab_size:
    raise TextConfigError(f"The tokenizer in {settings.path} has {tokenizer.get_vocab_size()} "
                          f"tokens but the T5 there embeds {config.vocab_size}: they are not "
                          "one model's.")

  def tokenize(captions):
    return hf_tokenize(tokenizer, captions, config.vocab_size, settings.path)

  return TextEncoder(settings, config.d_model, tokenize, params, _jitted_features(module))


def _json_file(path: str, name: str, required: bool = True) -> dict:
  file = storage.join(path, name)
  if not storage.isfile(file):
    if not required:
      return {}
    raise FileNotFoundError(f"data.text.path={path!r} has no {name}: give a HF Gemma folder "
                            "(save_pretrained writes config.json, the weights, "
                            f"{TOKENIZER_FILE} and {TOKENIZER_CONFIG}).")
  return json.loads(storage.read_text(file))


def gemma_sizes(path: str) -> tuple[int, int]:
  """(vocabulary rows read, hidden_size) of the Gemma config.json in `path`: a Gemma 3
  multimodal config reads its text_config's width and the rows below image_token_index, as
  ml-starflow's TextEmbedder does; Gemma 2 and text-only Gemma 3 read vocab_size rows."""
  config = _json_file(path, "config.json")
  if "text_config" in config:
    return int(config["image_token_index"]), int(config["text_config"]["hidden_size"])
  return int(config["vocab_size"]), int(config["hidden_size"])


def gemma_tokenizer(path: str, max_length: int):
  """A `tokenizers.Tokenizer` that tokenizes as transformers 5's GemmaTokenizer reads the folder:
  the vocabulary, merges, added tokens and post-processor of tokenizer.json (transformers 5 then
  ignores tokenizer_config.json's add_bos_token / add_eos_token), spaces as '▁'; padding to
  exactly max_length with <pad> on tokenizer_config.json's padding_side, else tokenizer.json's
  padding direction, else 'left' (GemmaTokenizer's); truncation likewise on its truncation_side,
  else 'right'."""
  import tokenizers
  from tokenizers import normalizers, pre_tokenizers
  file = os.path.join(path, TOKENIZER_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"No tokenizer at {file!r}: data.text.path must be a HF Gemma "
                            f"folder with its {TOKENIZER_FILE} (AutoTokenizer.from_pretrained(...)"
                            ".save_pretrained(folder) writes it).")
  settings = _json_file(path, TOKENIZER_CONFIG, required=False)
  tokenizer = tokenizers.Tokenizer.from_file(file)
  saved_padding, saved_truncation = tokenizer.padding or {}, tokenizer.truncation or {}
  tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
  tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
  pad_token = settings.get("pad_token", "<pad>")
  pad_token = pad_token["content"] if isinstance(pad_token, dict) else pad_token
  pad_id = tokenizer.token_to_id(pad_token)
  if pad_id is None:
    raise TextConfigError(f"The tokenizer in {path} has no pad token {pad_token!r}.")
  tokenizer.enable_truncation(max_length, direction=settings.get(
      "truncation_side", saved_truncation.get("direction", "right")))
  tokenizer.enable_padding(direction=settings.get(
      "padding_side", saved_padding.get("direction", "left")), length=max_length,
      pad_id=pad_id, pad_token=pad_token)
  return tokenizer


def gemma_embedding(path: str) -> np.ndarray:
  """The token embedding [vocabulary rows, hidden_size] of the Gemma checkpoint in `path`, in its
  stored dtype: the one tensor named '...embed_tokens.weight' of model.safetensors or of the
  shard the index names for it (the rest of the checkpoint is not read)."""
  from safetensors import safe_open
  rows, width = gemma_sizes(path)
  import ml_dtypes  # noqa: F401  (NumPy reads a bfloat16 tensor through it)
  from flowjax import state_dicts
  index = os.path.join(path, state_dicts.HF_INDEX)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted({os.path.join(path, shard) for name, shard in weight_map.items()
                    if name.endswith("embed_tokens.weight")})
  else:
    files = [os.path.join(path, "model.safetensors")]
  for file in files:
    if not os.path.isfile(file):
      raise FileNotFoundError(f"data.text.path={path!r}: no {os.path.basename(file)}; give the "
                              "Gemma checkpoint's safetensors weights (save_pretrained writes "
                              "them).")
    with safe_open(file, framework="np") as weights:
      names = [n for n in weights.keys() if n.endswith("embed_tokens.weight")]
      if len(names) == 1:
        table = weights.get_tensor(names[0])
        break
  else:
    raise TextConfigError(f"data.text.path={path!r}: no single '...embed_tokens.weight' tensor "
                          "in its weights; is it a Gemma checkpoint?")
  if table.ndim != 2 or table.shape[0] < rows or table.shape[1] != width:
    raise TextConfigError(f"data.text.path={path!r}: the token embedding is {table.shape}, but "
                          f"config.json asks for {rows} rows of width {width}.")
  return table[:rows]


def _gemma_embed_encoder(settings: TextSettings) -> TextEncoder:
  if not settings.path:
    raise TextConfigError("data.text.encoder='gemma_embed' needs data.text.path: a local HF "
                          "Gemma folder (config.json, model.safetensors or its shards, "
                          f"{TOKENIZER_FILE}, {TOKENIZER_CONFIG}; e.g. google/gemma-2-2b-it saved "
                          "with save_pretrained).")
  tokenizer = gemma_tokenizer(settings.path, settings.max_length)
  table = gemma_embedding(settings.path)
  scale = np.float32(float(table.shape[1]) ** 0.5)

  def tokenize(captions):
    return hf_tokenize(tokenizer, [GEMMA_TEMPLATE.format(prompt=c) for c in captions],
                       table.shape[0], settings.path)

  def apply(params, ids, mask):
    del mask  # ml-starflow feeds every position, the padding's <pad> embedding included
    return np.asarray(params[np.asarray(ids)], np.float32) * scale

  template_tokens = int(tokenize([NULL_CAPTION])[1].sum())
  if template_tokens >= settings.max_length:
    raise TextConfigError(f"data.text.max_length={settings.max_length} leaves no token for the "
                          f"caption: Gemma's chat template alone takes {template_tokens}; raise "
                          "it (ml-starflow reads 128).")
  return TextEncoder(settings, table.shape[1], tokenize, table, apply)


def gemma_folders(path: str) -> tuple[str, str]:
  """(decoder folder, tokenizer folder) of a 'gemma' path: its text_encoder/ and tokenizer/ when
  it has them (a Lumina-style pipeline folder), else the folder itself for both."""
  nested = [storage.join(path, name) for name in ("text_encoder", "tokenizer")]
  found = [storage.isdir(folder) for folder in nested]
  if all(found):
    return nested[0], nested[1]
  if any(found):
    raise FileNotFoundError(f"data.text.path={path!r} holds one of text_encoder/ and tokenizer/ "
                            "but not the other: a Lumina-style folder needs both (the decoder "
                            "and its tokenizer).")
  return path, path


def _gemma_encoder(settings: TextSettings) -> TextEncoder:
  from flowjax.models import gemma
  if not settings.path:
    raise TextConfigError("data.text.encoder='gemma' needs data.text.path: a local folder with a "
                          "HF Gemma decoder (config.json, model.safetensors or its shards) and its "
                          f"{TOKENIZER_FILE}, or a Lumina-style folder holding them in "
                          "text_encoder/ and tokenizer/.")
  decoder, tokenizer_folder = gemma_folders(settings.path)
  tokenizer = gemma_tokenizer(tokenizer_folder, settings.max_length)
  config, module, params = gemma.load(decoder)

  def tokenize(captions):
    return hf_tokenize(tokenizer, captions, config.vocab_size, decoder)

  return TextEncoder(settings, config.hidden_size, tokenize, params, _jitted_features(module))


# The encoders whose data.text.path is a folder of files.
FILE_ENCODERS = ("t5", "gemma_embed", "gemma")


@contextlib.contextmanager
def on_disk(settings: TextSettings):
  """`settings` with a data.text.path on object storage (gs://...) replaced by its local copy
  (`storage.local_copy`: the folder's configs, tokenizers and .safetensors, once per host; of a
  Lumina-style 'gemma' folder only text_encoder/ and tokenizer/); errors inside the block name
  the path as given."""
  if settings.encoder not in FILE_ENCODERS or not storage.is_remote(settings.path):
    yield settings
    return
  folders = None
  if settings.encoder == "gemma" and gemma_folders(settings.path)[0] != settings.path:
    folders = ("text_encoder", "tokenizer")
  local = dataclasses.replace(settings,
                              path=storage.local_copy(settings.path, folders=folders))
  with storage.naming_copy(local.path, settings.path):
    yield local


def encoder_of(settings: TextSettings) -> TextEncoder:
  """The encoder of a setting (built once; a data.text.path on object storage is read through a
  local copy, `on_disk`)."""
  with on_disk(settings) as local:
    return _encoder_of(local)


@functools.lru_cache(maxsize=4)
def _encoder_of(settings: TextSettings) -> TextEncoder:
  if not settings.enabled:
    raise TextConfigError("data.text.encoder is not set: there is no caption encoder (choose "
                          f"one of {list(ENCODERS)}).")
  return {"words": _words_encoder, "t5": _t5_encoder,
          "gemma_embed": _gemma_embed_encoder, "gemma": _gemma_encoder}[settings.encoder](settings)


def encoder(data_config) -> TextEncoder:
  """The configured encoder (built once per setting), or a TextConfigError without one."""
  return encoder_of(TextSettings.of(data_config))


def feature_dim(settings: TextSettings) -> int:
  """The feature width D without building the encoder: 'words': data.text.dim; 't5': d_model of
  the config.json in data.text.path, 'gemma_embed' and 'gemma': its hidden_size (data.text.dim
  when there is no path: a synthetic dry run). A folder on object storage is read there (its
  config.json only; once per process)."""
  return _remote_once(_feature_dim, settings)


_REMOTE_ANSWERS: dict = {}


def _remote_once(function, settings: TextSettings):
  """function(settings), remembered in this process when data.text.path is on object storage
  (each call would read the bucket again; local files are read each time)."""
  if not storage.is_remote(settings.path):
    return function(settings)
  key = (function.__name__, settings)
  if key not in _REMOTE_ANSWERS:
    _REMOTE_ANSWERS[key] = function(settings)
  return _REMOTE_ANSWERS[key]


def _feature_dim(settings: TextSettings) -> int:
  if settings.encoder == "gemma_embed" and settings.path:
    return gemma_sizes(settings.path)[1]
  if settings.encoder == "gemma" and settings.path:
    return gemma_sizes(gemma_folders(settings.path)[0])[1]
  if settings.encoder == "t5" and settings.path:
    from flowjax.models import t5
    config = storage.join(settings.path, t5.HF_CONFIG)
    if not storage.isfile(config):
      raise FileNotFoundError(f"data.text.path={settings.path!r} has no {t5.HF_CONFIG}: give a "
                              "HF T5 folder (save_pretrained writes config.json, the weights "
                              f"and {TOKENIZER_FILE}).")
    return int(json.loads(storage.read_text(config))["d_model"])
  return settings.dim


FINGERPRINT_SUFFIXES = (".json", ".safetensors", ".model", ".npz")
FINGERPRINT_BYTES = 1 << 20


def encoder_fingerprint(settings: TextSettings) -> str:
  """'' for an encoder without files ('words': its settings are all of it); else a hash of the
  files in data.text.path that make the encoder (for 'gemma', its text_encoder/ and tokenizer/):
  each config, tokenizer and weights file's name, size and first MiB. Two checkpoints of one
  architecture (a model and its fine-tune) differ in it; the same files anywhere do not (a folder
  on object storage is read there: sizes and first MiBs, not whole files)."""
  if not settings.path or settings.encoder not in FILE_ENCODERS:
    return ""
  return _remote_once(_fingerprint, settings)


def _fingerprint(settings: TextSettings) -> str:
  import hashlib
  folders = list(dict.fromkeys(gemma_folders(settings.path))) if settings.encoder == "gemma" \
      else [settings.path]
  digest = hashlib.sha256()
  for folder in folders:
    files = [folder] if storage.isfile(folder) else sorted(
        storage.join(folder, name) for name in storage.listdir(folder)
        if name.endswith(FINGERPRINT_SUFFIXES))
    if not files:
      raise FileNotFoundError(
          f"data.text.path={settings.path!r}: {folder} holds no config, tokenizer or weights "
          f"file (none ending in {', '.join(FINGERPRINT_SUFFIXES)}); give the encoder's folder.")
    for file in files:
      name = str(file).rstrip("/").rsplit("/", 1)[-1]
      head = storage.read_head(file, FINGERPRINT_BYTES)
      digest.update(f"{name}:{storage.getsize(file)}:".encode() + head)
  return digest.hexdigest()[:16]


def read_prompts(path: str) -> list[str]:
  """The prompts of a text file: one per non-empty line (surrounding spaces stripped)."""
  if not storage.exists(path):
    raise FileNotFoundError(f"--prompts={path}: no such file; write one prompt per line.")
  prompts = [line.strip() for line in storage.read_text(path).splitlines() if line.strip()]
  if not prompts:
    raise ValueError(f"--prompts={path} holds no prompt; write one prompt per line.")
  return prompts
