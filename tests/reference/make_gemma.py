"""Writes the fixture that tests/test_text.py checks flowjax.text's 'gemma_embed' encoder against:
a tiny random Gemma 2 checkpoint with a small Gemma-style tokenizer (tests/reference/gemma_tiny/:
config.json, model.safetensors, tokenizer.json, tokenizer_config.json), and what transformers
makes of a few captions with it, as apple/ml-starflow encodes captions for its gemma2_2b /
gemma3_* text paths (utils/common.py encode_text with a TextEmbedder): the caption wrapped in
Gemma's chat template asking for "an image", AutoTokenizer with padding='max_length' and
truncation, then the frozen token embedding times sqrt(hidden_size), no mask.

Needs tokenizers, torch and transformers; run once by hand: python tests/reference/make_gemma.py.
The tests read it without torch.

The same checkpoint (two layers: a sliding-window one with a window of 3 and a global one; soft
capping at 5 and query_pre_attn_scalar 32 so that each matters; weights drawn with std 0.3) gives
the 'gemma' encoder's reference: Gemma2Model's last hidden state times the attention mask on the
plain captions (ml-starflow's 'gemma' path: no template). tests/reference/gemma1_tiny/ holds a
Gemma (1) decoder in the Lumina folder layout (text_encoder/, tokenizer/) with its features.

The tokenizer is a byte-fallback BPE in Gemma's layout (ids 0-4 = <pad>, <eos>, <bos>, <unk>,
<mask>; <start_of_turn>, <end_of_turn> special; '▁' for spaces; a template post-processor
prepending <bos>), trained on the captions' words with tokenizers' BpeTrainer, then the 256
<0xNN> byte tokens. The captions include one with a character outside the vocabulary (byte
fallback), an empty one (the null caption), and one longer than max_length (truncation).
"""

import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FOLDER = os.path.join(HERE, "gemma_tiny")
GEMMA1 = os.path.join(HERE, "gemma1_tiny")
MAX_LENGTH = 24
MAX_LENGTH_FULL = 8
HIDDEN = 16
TEMPLATE = ("<start_of_turn>user\nPlease generate an image about: {prompt}<end_of_turn>\n"
            "<start_of_turn>model\n")
CAPTIONS = ["a handwritten seven", "a thin handwritten three", "", "A THICK zero!",
            "seven seven seven seven seven seven seven seven seven seven seven", "une clé"]
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
CORPUS = ["user", "model", "Please generate an image about:", "a handwritten seven",
          "thin three thick zero one two four five six eight nine", "A THICK", "!"]


def build_tokenizer():
  import tokenizers
  from tokenizers import models, normalizers, pre_tokenizers, processors, trainers
  tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True,
                                              byte_fallback=True))
  tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
  tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
  trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=SPECIAL, show_progress=False)
  tokenizer.train_from_iterator([line.replace(" ", "\u2581") for line in CORPUS] + ["\n"],
                                trainer=trainer)
  state = json.loads(tokenizer.to_str())
  vocab = state["model"]["vocab"]
  for byte in range(256):
    vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
  tokenizer = tokenizers.Tokenizer.from_str(json.dumps(state))
  tokenizer.post_processor = processors.TemplateProcessing(
      single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)])
  return tokenizer


def perturb(model, torch):
  torch.manual_seed(1)
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.normal_(0.0, 0.3)


def full_features(model, folder, torch, transformers):
  """(input_ids, attention_mask, last hidden state times the mask) of the plain captions."""
  auto = transformers.AutoTokenizer.from_pretrained(folder)
  encoded = auto(CAPTIONS, padding="max_length", truncation=True, max_length=MAX_LENGTH_FULL,
                 return_tensors="pt")
  with torch.no_grad():
    hidden = model(input_ids=encoded.input_ids,
                   attention_mask=encoded.attention_mask).last_hidden_state
  features = hidden * encoded.attention_mask[..., None]
  assert torch.isfinite(features).all()
  return encoded.input_ids.numpy(), encoded.attention_mask.numpy(), features.numpy()


def main():
  import shutil
  import torch
  import transformers
  os.makedirs(FOLDER, exist_ok=True)
  tokenizer = build_tokenizer()
  tokenizer.save(os.path.join(FOLDER, "tokenizer.json"))
  with open(os.path.join(FOLDER, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
               "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 8192}, f, indent=2)
  torch.manual_seed(0)
  config = transformers.Gemma2Config(
      vocab_size=tokenizer.get_vocab_size(), hidden_size=HIDDEN, intermediate_size=32,
      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
      sliding_window=3, attn_logit_softcapping=5.0, query_pre_attn_scalar=32)
  model = transformers.Gemma2Model(config).eval()
  perturb(model, torch)
  model.save_pretrained(FOLDER)
  prompts = [TEMPLATE.format(prompt=c) for c in CAPTIONS]
  out = {"captions": np.asarray(CAPTIONS)}
  for side in ("left", "right"):
    auto = transformers.AutoTokenizer.from_pretrained(FOLDER, padding_side=side)
    encoded = auto(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                   return_tensors="pt")
    out[f"input_ids_{side}"] = encoded.input_ids.numpy()
    out[f"attention_mask_{side}"] = encoded.attention_mask.numpy()
  default = transformers.AutoTokenizer.from_pretrained(FOLDER)
  assert default.padding_side == "left", default.padding_side
  # How transformers 5 reads variants of the folder: add_bos_token=False in tokenizer_config.json
  # (ignored beside a tokenizer.json), a tokenizer.json without a post-processor (nothing added),
  # and one whose saved padding is on the right (used when tokenizer_config.json names no side).
  import tempfile
  variants = {"no_bos_config": ({"add_bos_token": False}, {}),
              "no_post": ({}, {"post_processor": None}),
              "file_padding": ({}, {"padding": {
                  "strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                  "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"}})}
  for name, (config_update, json_update) in variants.items():
    with tempfile.TemporaryDirectory() as folder:
      shutil.copy(os.path.join(FOLDER, "tokenizer.json"), folder)
      shutil.copy(os.path.join(FOLDER, "tokenizer_config.json"), folder)
      for file, update in (("tokenizer_config.json", config_update),
                           ("tokenizer.json", json_update)):
        with open(os.path.join(folder, file)) as f:
          values = json.load(f)
        values.update(update)
        with open(os.path.join(folder, file), "w") as f:
          json.dump(values, f)
      auto = transformers.AutoTokenizer.from_pretrained(folder)
      out[f"input_ids_{name}"] = auto(prompts, padding="max_length", truncation=True,
                                      max_length=MAX_LENGTH, return_tensors="np").input_ids
  ids = torch.from_numpy(out["input_ids_left"])
  with torch.no_grad():
    # ml-starflow's TextEmbedder: nn.Embedding(ids) * float(hidden_size) ** 0.5.
    weight = model.embed_tokens.weight.float()
    features = torch.nn.functional.embedding(ids, weight) * float(HIDDEN) ** 0.5
    # Gemma's own first hidden state is the same scaled embedding.
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[0]
  np.testing.assert_allclose(features.numpy(), hidden.numpy(), rtol=1e-6)
  out["features"] = features.numpy()
  (out["full_input_ids"], out["full_attention_mask"],
   out["full_features"]) = full_features(model, FOLDER, torch, transformers)
  np.savez(os.path.join(HERE, "gemma_tiny_text.npz"), **out)

  shutil.rmtree(GEMMA1, ignore_errors=True)
  os.makedirs(os.path.join(GEMMA1, "tokenizer"))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(FOLDER, name), os.path.join(GEMMA1, "tokenizer", name))
  torch.manual_seed(2)
  config = transformers.GemmaConfig(
      vocab_size=tokenizer.get_vocab_size(), hidden_size=HIDDEN, intermediate_size=32,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
      rope_parameters={"rope_type": "default", "rope_theta": 100.0})
  model = transformers.GemmaModel(config).eval()
  perturb(model, torch)
  model.save_pretrained(os.path.join(GEMMA1, "text_encoder"))
  ids, mask, features = full_features(model, os.path.join(GEMMA1, "tokenizer"), torch,
                                      transformers)
  np.savez(os.path.join(HERE, "gemma1_tiny_text.npz"), captions=np.asarray(CAPTIONS),
           input_ids=ids, attention_mask=mask, features=features)
  print(type(default).__name__, out["input_ids_left"], ids)


if __name__ == "__main__":
  main()
