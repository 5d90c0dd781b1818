"""Writes the caption-encoding fixture that tests/test_text.py checks flowjax.text's 't5'
encoder against: a small T5-style tokenizer for the t5_tiny checkpoint (written into
tests/reference/t5_tiny/ as tokenizer.json and tokenizer_config.json), and what HuggingFace
transformers makes of a few captions with it, as apple/ml-starflow encodes captions
(AutoTokenizer with padding='max_length', truncation; the T5 encoder's last_hidden_state times
the attention mask). Needs tokenizers, torch and transformers; run once by hand:
python tests/reference/make_t5_tokenizer.py (after make_t5.py). The tests read it without torch.

The tokenizer is a hand-built Unigram model in T5's layout: ids 0, 1, 2 = <pad>, </s>, <unk>;
whitespace split then Metaspace ('▁' word starts), no normaliser (what transformers 5's
T5Tokenizer builds around a tokenizer.json's vocabulary, so both read the file alike); a template
post-processor appending </s>; 64 pieces, the t5_tiny vocabulary size.
"""

import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FOLDER = os.path.join(HERE, "t5_tiny")
MAX_LENGTH = 8
CAPTIONS = ["a handwritten seven", "a thin handwritten three", "", "A THICK zero!",
            "seven seven seven seven seven seven seven seven seven", "an unseen xylophone"]
WORDS = ["a", "handwritten", "seven", "thin", "thick", "three", "zero", "one", "two", "four",
         "five", "six", "eight", "nine", "hand", "written"]


def build_tokenizer():
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors
  pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
  pieces += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(WORDS)]
  letters = "abcdefghijklmnopqrstuvwxyz!"
  pieces += [(c, -5.0 - 0.01 * i) for i, c in enumerate(letters)]
  pieces += [("\u2581" + c, -4.0 - 0.01 * i) for i, c in enumerate("eiostxz")]
  pieces += [(p, -4.5) for p in ("er", "en", "th", "in", "ee", "on", "ve", "ck", "ht", "xy")]
  assert len(pieces) == 64, len(pieces)
  tokenizer = tokenizers.Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.WhitespaceSplit(),
      pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")])
  tokenizer.post_processor = processors.TemplateProcessing(
      single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
  tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
  for token in ("<pad>", "</s>", "<unk>"):
    tokenizer.add_special_tokens([tokenizers.AddedToken(token, special=True)])
  return tokenizer


def main():
  import torch
  import transformers
  build_tokenizer().save(os.path.join(FOLDER, "tokenizer.json"))
  with open(os.path.join(FOLDER, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>",
               "unk_token": "<unk>", "extra_ids": 0, "model_max_length": 512}, f, indent=2)
  tokenizer = transformers.AutoTokenizer.from_pretrained(FOLDER)
  encoded = tokenizer(CAPTIONS, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                      return_tensors="pt")
  model = transformers.T5EncoderModel.from_pretrained(FOLDER).eval()
  with torch.no_grad():
    hidden = model(input_ids=encoded.input_ids,
                   attention_mask=encoded.attention_mask).last_hidden_state
  features = hidden * encoded.attention_mask[..., None]
  np.savez(os.path.join(HERE, "t5_tiny_text.npz"), captions=np.asarray(CAPTIONS),
           input_ids=encoded.input_ids.numpy(), attention_mask=encoded.attention_mask.numpy(),
           features=features.numpy())
  print(type(tokenizer).__name__, encoded.input_ids.numpy())


if __name__ == "__main__":
  main()
