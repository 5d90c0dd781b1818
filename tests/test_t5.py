"""flowjax.models.t5 against HuggingFace transformers' T5EncoderModel (fixtures written by
tests/reference/make_t5.py at tiny random sizes): outputs, padding, the relative-position
buckets, and load errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowjax.models import t5

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")


@pytest.mark.parametrize("name, feed_forward", [("t5_tiny", "gated-gelu"),
                                                ("t5_relu_tiny", "relu")])
def test_encoder_matches_transformers(name, feed_forward):
  """The last hidden state of every token the mask keeps equals T5EncoderModel's (padding
  masked out of the attention), and features() zeroes the padding as ml-starflow does."""
  config, module, params = t5.load(os.path.join(REFERENCE, name))
  assert config.feed_forward_proj == feed_forward and config.num_heads * config.d_kv == 12
  data = np.load(os.path.join(REFERENCE, name + ".npz"))
  ids, mask = jnp.asarray(data["input_ids"]), jnp.asarray(data["attention_mask"])
  hidden = jax.jit(lambda p: module.apply({"params": p}, ids, mask))(params)
  keep = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(hidden)[keep], data["last_hidden_state"][keep],
                             rtol=2e-5, atol=2e-5)
  out = t5.features(module, params, ids, mask)
  np.testing.assert_array_equal(np.asarray(out)[~keep], 0.0)
  np.testing.assert_allclose(np.asarray(out)[keep], np.asarray(hidden)[keep], rtol=1e-4,
                             atol=1e-6)
  # The padded row's 9 tokens encode as those 9 tokens alone: the padding is masked out.
  padded = module.apply({"params": params}, ids[1:], mask[1:])
  alone = module.apply({"params": params}, ids[1:, :9], mask[1:, :9])
  np.testing.assert_allclose(np.asarray(padded)[0, :9], np.asarray(alone)[0], rtol=1e-5,
                             atol=1e-5)


def test_a_checkpoint_in_shards_loads_as_one(tmp_path):
  """model.safetensors.index.json and its shards (how save_pretrained writes a large model such
  as google/flan-t5-xl) load to the same parameters as the single file."""
  from safetensors import numpy as safetensors_numpy
  source = os.path.join(REFERENCE, "t5_tiny")
  tensors = safetensors_numpy.load_file(os.path.join(source, t5.HF_WEIGHTS))
  names = sorted(tensors)
  halves = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for shard, keys in halves.items():
    safetensors_numpy.save_file({k: tensors[k] for k in keys}, str(tmp_path / shard))
  index = {"weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
  (tmp_path / t5.HF_INDEX).write_text(json.dumps(index))
  (tmp_path / t5.HF_CONFIG).write_text(open(os.path.join(source, t5.HF_CONFIG)).read())
  _, _, sharded = t5.load(str(tmp_path))
  _, _, single = t5.load(source)
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_relative_position_buckets_by_hand():
  """Bidirectional, 8 buckets, max distance 20: 4 per sign; distances 0 and 1 exact, then
  2 + floor(log(d / 2) / log(10) * 2) capped at 3; positive distances (key after query) offset
  by 4."""
  buckets = t5.relative_position_buckets(1, 24, 8, 20)[0]  # query 0: distances 0 .. 23
  want = [0] + [4 + min(3, d if d < 2 else 2 + int(np.log(d / 2) / np.log(10) * 2))
                for d in range(1, 24)]
  np.testing.assert_array_equal(buckets, want)
  backwards = t5.relative_position_buckets(24, 1, 8, 20)[:, 0]  # distances 0 .. -23
  np.testing.assert_array_equal(backwards, [b - 4 if i else 0 for i, b in enumerate(want)])


def test_load_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="No T5 weights"):
    t5.load(str(tmp_path))
  folder = tmp_path / "t5"
  folder.mkdir()
  source = os.path.join(REFERENCE, "t5_tiny")
  (folder / "model.safetensors").write_bytes(open(os.path.join(source, t5.HF_WEIGHTS),
                                                  "rb").read())
  config = json.load(open(os.path.join(source, t5.HF_CONFIG)))
  config["num_layers"] = 3
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="missing"):
    t5.load(str(folder))
