"""Writes the T5 encoder fixtures that tests/test_t5.py checks flowjax.models.t5 against, from
HuggingFace transformers' own `T5EncoderModel` (needs torch, transformers and safetensors; run
once by hand: python tests/reference/make_t5.py). The tests read them without torch.

- t5_tiny (Flan-T5's gated GELU) and t5_relu_tiny (the original T5's ReLU):
  `T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2,
  num_heads=3, relative_attention_num_buckets=8, relative_attention_max_distance=20,
  feed_forward_proj=...))`, every parameter moved off its initial value (seeded), eval mode.
  `<name>/` holds what `save_pretrained` wrote (config.json, model.safetensors).
- `<name>.npz`: input_ids [2, 24] with attention_mask (row 1 padded after 9 tokens, pad id 0)
  and the model's last_hidden_state; 24 tokens reach the logarithmic buckets (distances 2 to 23
  with max_distance 20).
"""

import os
import shutil

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  import torch
  import transformers
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  for name, feed_forward in (("t5_tiny", "gated-gelu"), ("t5_relu_tiny", "relu")):
    config = transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=3,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj=feed_forward, dropout_rate=0.0)
    model = transformers.T5EncoderModel(config).eval()
    with torch.no_grad():
      for parameter in model.parameters():
        parameter.add_(0.3 * torch.randn_like(parameter))
    ids = rng.integers(1, 64, size=(2, 24))
    mask = np.ones((2, 24), np.int64)
    mask[1, 9:] = 0
    ids[1, 9:] = 0
    with torch.no_grad():
      hidden = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    folder = os.path.join(HERE, name)
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, safe_serialization=True)
    np.savez(os.path.join(HERE, name + ".npz"), input_ids=ids.astype(np.int32),
             attention_mask=mask.astype(np.int32),
             last_hidden_state=hidden.last_hidden_state.numpy().astype(np.float32),
             transformers_version=np.array(transformers.__version__),
             torch_version=np.array(torch.__version__))
    print(name, sorted(os.listdir(folder)))


if __name__ == "__main__":
  main()
