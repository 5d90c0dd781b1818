"""Captions and text-to-image STARFlow: the caption encoders (flowjax.text, the 't5' and
'gemma_embed' ones against HuggingFace transformers), captioned data sources (digits, image
folders, synthetic), caption dropout and text CFG in the objective, and sampling from prompts."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from flowjax import config as config_lib, data, modes, objectives, sharding, text
from flowjax.data import captions, digits
from flowjax.models import tarflow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "tests", "reference")
EXPERIMENT = os.path.join(ROOT, "experiments", "starflow_digits_text.py")


def words_settings(**values):
  return text.TextSettings(**{**dict(encoder="words", max_length=8, dim=16, layers=1, heads=2),
                              **values})


def data_config(name="digits", **text_values):
  c = config_lib.base_config().data
  c.name = name
  c.text.update(dict(encoder="words", max_length=8, dim=16, layers=1, heads=2))
  c.text.update(text_values)
  return c


def batches(config, split="train", batch_size=8, shuffle=False):
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
                            jax.devices()[:1])
  return data.build(config, split=split, global_batch_size=batch_size, seed=0,
                    sharding=sharding.batch_sharding(mesh), shuffle=shuffle)


# --- encoders -----------------------------------------------------------------------------------

def test_t5_encoder_matches_transformers():
  """Tokens (padding, truncation, the appended </s>) and features (last hidden state times the
  mask) of the 't5' encoder on the t5_tiny checkpoint with its tokenizer.json equal what
  transformers' AutoTokenizer and T5EncoderModel make of the same captions."""
  reference = np.load(os.path.join(REFERENCE, "t5_tiny_text.npz"))
  _check_encoder_against(reference, "t5", os.path.join(REFERENCE, "t5_tiny"))


def _check_encoder_against(reference, encoder_name, path):
  """The encoder's tokens, mask, features, null caption and width equal transformers' in
  `reference` (captions, input_ids, attention_mask, features; caption 2 is the empty one);
  returns (settings, encoder, captions)."""
  settings = text.TextSettings(encoder=encoder_name, path=path,
                               max_length=reference["input_ids"].shape[1])
  encoder = text.encoder_of(settings)
  captions_list = [str(c) for c in reference["captions"]]
  ids, mask = encoder.tokenize(captions_list)
  np.testing.assert_array_equal(ids, reference["input_ids"])
  np.testing.assert_array_equal(mask, reference["attention_mask"])
  np.testing.assert_allclose(encoder.encode(captions_list), reference["features"], atol=2e-5,
                             rtol=1e-4)
  assert text.feature_dim(settings) == encoder.dim == 16
  np.testing.assert_allclose(encoder.null(), reference["features"][2], atol=2e-5, rtol=1e-4)
  return settings, encoder, captions_list


def test_t5_encoder_errors_name_the_fix(tmp_path):
  with pytest.raises(text.TextConfigError, match="needs data.text.path"):
    text.encoder_of(text.TextSettings(encoder="t5"))
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    text.encoder_of(text.TextSettings(encoder="t5", path=str(tmp_path)))
  with pytest.raises(FileNotFoundError, match="config.json"):
    text.feature_dim(text.TextSettings(encoder="t5", path=str(tmp_path)))


def _gemma_folder(tmp_path, tokenizer_config=None, config=None, rename=None, shards=False,
                  tokenizer_json=None, dtype=None):
  """A copy of the gemma_tiny fixture with its tokenizer_config / config.json / tokenizer.json
  updated, the embedding renamed (`rename`), the weights written as two shards with an index,
  or stored in `dtype`."""
  import shutil
  from safetensors.numpy import load_file, save_file
  source, folder = os.path.join(REFERENCE, "gemma_tiny"), tmp_path / "gemma"
  shutil.copytree(source, folder)
  for name, update in (("tokenizer_config.json", tokenizer_config), ("config.json", config),
                       ("tokenizer.json", tokenizer_json)):
    if update is not None:
      values = json.loads((folder / name).read_text())
      values.update(update)
      (folder / name).write_text(json.dumps(values))
  weights = load_file(str(folder / "model.safetensors"))
  if dtype is not None:
    weights = {k: v.astype(dtype) for k, v in weights.items()}
  if rename:
    weights = {rename if k == "embed_tokens.weight" else k: v for k, v in weights.items()}
  if shards:
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    parts = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in parts.items():
      save_file({k: weights[k] for k in keys}, str(folder / file))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: file for file, keys in parts.items() for k in keys}}))
  else:
    save_file(weights, str(folder / "model.safetensors"))
  return str(folder)


def test_gemma_embed_encoder_matches_transformers(tmp_path):
  """The 'gemma_embed' encoder (ml-starflow's gemma2_2b / gemma3 text path) on the gemma_tiny
  checkpoint: tokens of the captions in Gemma's chat template (<bos>, left padding by default,
  right when tokenizer_config.json asks, truncation, byte fallback) equal transformers'
  AutoTokenizer's, and features equal the token embedding times sqrt(hidden_size) with no mask
  (Gemma's own first hidden state); a Gemma 3 layout (text_config, image_token_index, the
  embedding in a shard under its multimodal name) reads the same rows."""
  reference = np.load(os.path.join(REFERENCE, "gemma_tiny_text.npz"))
  captions_list = [str(c) for c in reference["captions"]]
  max_length = reference["input_ids_left"].shape[1]
  settings = text.TextSettings(encoder="gemma_embed", path=os.path.join(REFERENCE, "gemma_tiny"),
                               max_length=max_length)
  encoder = text.encoder_of(settings)
  ids, mask = encoder.tokenize(captions_list)
  np.testing.assert_array_equal(ids, reference["input_ids_left"])
  np.testing.assert_array_equal(mask, reference["attention_mask_left"])
  features = encoder.encode(captions_list)
  np.testing.assert_allclose(features, reference["features"], rtol=1e-6)
  np.testing.assert_allclose(encoder.null(), reference["features"][2], rtol=1e-6)
  assert encoder.dim == 16 and text.feature_dim(settings) == 16
  right = text.encoder_of(dataclasses_replace(settings, path=_gemma_folder(
      tmp_path / "right", tokenizer_config={"padding_side": "right"})))
  np.testing.assert_array_equal(right.tokenize(captions_list)[0], reference["input_ids_right"])
  # As transformers 5 reads them: add_bos_token in tokenizer_config.json is ignored beside a
  # tokenizer.json, a tokenizer.json without a post-processor adds nothing, and its saved
  # padding direction holds when tokenizer_config.json names no side.
  for name, config_update, json_update in (
      ("no_bos_config", {"add_bos_token": False}, None),
      ("no_post", None, {"post_processor": None}),
      ("file_padding", None, {"padding": {
          "strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
          "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"}})):
    variant = text.encoder_of(dataclasses_replace(settings, path=_gemma_folder(
        tmp_path / name, tokenizer_config=config_update, tokenizer_json=json_update)))
    np.testing.assert_array_equal(variant.tokenize(captions_list)[0],
                                  reference[f"input_ids_{name}"], err_msg=name)
  # Released Gemma weights are bfloat16: the embedding is read as stored, then scaled in float32.
  import ml_dtypes
  bf16 = text.encoder_of(dataclasses_replace(settings, path=_gemma_folder(
      tmp_path / "bf16", dtype=ml_dtypes.bfloat16)))
  assert bf16.params.dtype == ml_dtypes.bfloat16
  table = np.asarray(encoder.params, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(bf16.encode(captions_list),
                                table[reference["input_ids_left"]] * np.float32(4.0))
  rows = int(reference["input_ids_left"].max()) + 1
  gemma3 = _gemma_folder(tmp_path / "gemma3", config={
      "text_config": {"hidden_size": 16}, "image_token_index": rows},
      rename="language_model.model.embed_tokens.weight", shards=True)
  gemma3_encoder = text.encoder_of(dataclasses_replace(settings, path=gemma3))
  assert gemma3_encoder.params.shape == (rows, 16)
  np.testing.assert_allclose(gemma3_encoder.encode(captions_list), reference["features"],
                             rtol=1e-6)
  with pytest.raises(text.TextConfigError, match="beyond the"):
    gemma3_encoder.encode(["a \u20ac note"])  # byte 0xE2 lies past the rows read


@pytest.mark.parametrize("fixture", ["gemma_tiny", "gemma1_tiny"])
def test_gemma_encoder_matches_transformers(fixture, tmp_path):
  """The 'gemma' encoder (ml-starflow's 'gemma' path: a Gemma decoder's last hidden state times
  the attention mask, plain captions) on a tiny Gemma 2 (sliding window, soft capping,
  query_pre_attn_scalar, the four norms; one folder) and a tiny Gemma (grouped key/value heads,
  rope_theta 100; Lumina's text_encoder/ + tokenizer/ layout): tokens and features equal
  transformers' AutoTokenizer and Gemma2Model / GemmaModel, left padding included."""
  npz = "gemma_tiny_text.npz" if fixture == "gemma_tiny" else "gemma1_tiny_text.npz"
  reference = dict(np.load(os.path.join(REFERENCE, npz)))
  if fixture == "gemma_tiny":
    reference = {k.removeprefix("full_"): v for k, v in reference.items()}
  settings, _, captions_list = _check_encoder_against(reference, "gemma",
                                                      os.path.join(REFERENCE, fixture))
  if fixture == "gemma_tiny":  # the same weights saved in two shards with an index
    sharded = text.encoder_of(dataclasses_replace(settings, path=_gemma_folder(
        tmp_path, shards=True)))
    np.testing.assert_allclose(sharded.encode(captions_list), reference["features"], atol=2e-5,
                               rtol=1e-4)


def dataclasses_replace(settings, **values):
  import dataclasses
  return dataclasses.replace(settings, **values)


def test_gemma_embed_encoder_errors_name_the_fix(tmp_path):
  with pytest.raises(text.TextConfigError, match="needs data.text.path"):
    text.encoder_of(text.TextSettings(encoder="gemma_embed"))
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    text.encoder_of(text.TextSettings(encoder="gemma_embed", path=str(tmp_path)))
  with pytest.raises(FileNotFoundError, match="config.json"):
    text.feature_dim(text.TextSettings(encoder="gemma_embed", path=str(tmp_path)))
  with pytest.raises(text.TextConfigError, match="template alone takes 17"):
    text.encoder_of(text.TextSettings(encoder="gemma_embed", max_length=17,
                                      path=os.path.join(REFERENCE, "gemma_tiny")))
  with pytest.raises(text.TextConfigError, match="needs data.text.path"):
    text.encoder_of(text.TextSettings(encoder="gemma"))
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    text.encoder_of(text.TextSettings(encoder="gemma", path=str(tmp_path)))
  (tmp_path / "lumina" / "text_encoder").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="needs both"):
    text.encoder_of(text.TextSettings(encoder="gemma", path=str(tmp_path / "lumina")))
  from flowjax.models import gemma
  config = json.loads(open(os.path.join(REFERENCE, "gemma_tiny", "config.json")).read())
  for change, match in (({"use_bidirectional_attention": True}, "causal"),
                        ({"hidden_activation": "silu"}, "hidden_activation='silu'"),
                        ({"model_type": "gemma3_text"}, "model_type"),
                        ({"rope_parameters": {"rope_type": "linear", "factor": 8.0}}, "rope")):
    with pytest.raises(ValueError, match=match):
      gemma.GemmaConfig.from_hf_json({**config, **change})
  # transformers 5's readings: Gemma 2's hidden_activation 'gelu' is the erf form and its soft
  # cap defaults to 50; Gemma's legacy hidden_act 'gelu' is the tanh form.
  assert gemma.GemmaConfig.from_hf_json({**config, "hidden_activation": "gelu"}).exact_gelu
  assert gemma.GemmaConfig.from_hf_json(
      {k: v for k, v in config.items() if k != "attn_logit_softcapping"}
  ).attn_logit_softcapping == 50.0
  gemma1 = json.loads(open(os.path.join(REFERENCE, "gemma1_tiny", "text_encoder",
                                        "config.json")).read())
  assert not gemma.GemmaConfig.from_hf_json({**gemma1, "hidden_act": "gelu"}).exact_gelu
  folder = _gemma_folder(tmp_path, rename="encoder.tokens.weight")
  with pytest.raises(text.TextConfigError, match="embed_tokens.weight"):
    text.encoder_of(text.TextSettings(encoder="gemma_embed", path=folder))


def test_settings_are_checked():
  with pytest.raises(text.TextConfigError, match="data.text.encoder"):
    text.TextSettings(encoder="bert")
  with pytest.raises(text.TextConfigError, match="max_length"):
    text.TextSettings(encoder="words", max_length=0)
  with pytest.raises(text.TextConfigError, match="multiple of data.text.heads"):
    text.TextSettings(encoder="words", dim=10, heads=4)
  config = data_config()
  with config.text.unlocked() if hasattr(config.text, "unlocked") else config.text:
    config.text.colour = 1
  with pytest.raises(text.TextConfigError, match="no key 'colour'"):
    text.TextSettings.of(config)


def test_words_encoder_is_deterministic_and_masks_padding():
  encoder = text.encoder_of(words_settings())
  again = text._words_encoder(words_settings())  # a fresh build: same weights from the seed
  other_seed = text._words_encoder(words_settings(seed=1))
  prompts = ["a handwritten seven", "a thin handwritten seven", "A handwritten, SEVEN!", ""]
  features = encoder.encode(prompts)
  assert features.shape == (4, 8, 16) and features.dtype == np.float32
  np.testing.assert_array_equal(features, again.encode(prompts))
  assert np.abs(features - other_seed.encode(prompts)).max() > 0.1
  # Words are lower-cased runs of letters and digits: prompts 0 and 2 are the same tokens.
  np.testing.assert_array_equal(features[0], features[2])
  assert np.abs(features[0] - features[1]).max() > 0.1
  # Three words and </s> are 4 tokens; the padding rows are zero (features times the mask).
  assert np.all(np.abs(features[0, :4]).sum(-1) > 0) and np.all(features[0, 4:] == 0)
  # The null caption is </s> alone.
  np.testing.assert_array_equal(encoder.null(), features[3])
  assert np.abs(features[3, 0]).sum() > 0 and np.all(features[3, 1:] == 0)
  # A long caption keeps its first max_length - 1 words and ends with </s>.
  ids, mask = encoder.tokenize(["one two three four five six seven eight nine ten"])
  assert ids[0, -1] == text.EOS_ID and mask.sum() == 8
  assert list(ids[0, :-1]) == text.word_ids("one two three four five six seven", 4096, 8)[:-1]


def test_encode_distinct_holds_each_caption_once():
  encoder = text.encoder_of(words_settings())
  prompts = ["b", "a", "b", "c", "a"] * 30  # more distinct batches than one
  table, index = encoder.encode_distinct(prompts, batch_size=2)
  assert table.shape[0] == 3
  np.testing.assert_allclose(table[index], encoder.encode(prompts), atol=1e-6)
  for i in (0, 1, 3):
    np.testing.assert_allclose(table[index[i]], encoder.encode([prompts[i]])[0], atol=1e-6)
  # An empty caption among others is the null caption's features exactly (what dropout uses).
  table, index = encoder.encode_distinct(["x y", "", "a b c"])
  np.testing.assert_array_equal(table[index[1]], encoder.null())


# --- captioned data -----------------------------------------------------------------------------

def test_digits_captions_follow_label_and_ink():
  all_captions = digits.captions()
  _, labels = digits.load()
  assert len(all_captions) == digits.NUM_EXAMPLES and len(set(all_captions)) == 30
  assert [digits.label_of(c) for c in all_captions] == list(labels)
  from flowjax.evals import text_digits
  ink = text_digits.real_ink_by_style()
  assert ink["thin"] < ink["plain"] < ink["thick"]
  assert digits.label_of("A thin three") == 3 and digits.label_of("a cat") is None


@pytest.mark.parametrize("encoder", ["words", "gemma_embed"])
def test_digits_batches_carry_caption_features(encoder):
  config = data_config()
  tokens = 8
  if encoder == "gemma_embed":
    tokens = 28  # the chat template takes 17
    config.text.update(dict(encoder=encoder, path=os.path.join(REFERENCE, "gemma_tiny"),
                            max_length=tokens))
  info = data.data_info(config)
  assert info.extra_array("text") == ((tokens, 16), "float32")
  assert info.text.prompts == captions.first_distinct(digits.captions()[:1500])
  assert data.describe(config, info).endswith(
      f"(8, 8, 1), captioned ('{encoder}' caption features, {tokens} tokens of 16).")
  batch = next(batches(config, batch_size=8))
  assert set(batch) == {"image", "text"}
  expected = text.encoder(config).encode(digits.captions()[:8])
  np.testing.assert_allclose(np.asarray(batch["text"]), expected, atol=1e-6)
  test_batch = next(batches(config, split="test", batch_size=4))
  np.testing.assert_allclose(np.asarray(test_batch["text"]),
                             text.encoder(config).encode(digits.captions()[1500:1504]),
                             atol=1e-6)


def _write_folder(root, names, channels=3):
  rng = np.random.default_rng(0)
  for name in names:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 255, (8, 8, channels), np.uint8)
    Image.fromarray(pixels if channels == 3 else pixels[..., 0]).save(path)


def test_folder_captions_from_sidecars_and_manifest(tmp_path):
  _write_folder(tmp_path, ["cats/a.png", "cats/b.png", "dogs/c.png"])
  (tmp_path / "cats" / "a.txt").write_text("a red square\n")
  (tmp_path / "captions.jsonl").write_text(
      json.dumps({"file": "cats/b.png", "caption": "a blue circle"}) + "\n\n" +
      json.dumps({"file": "dogs/c.png", "caption": "a green line"}) + "\n" +
      json.dumps({"file": "cats/a.png", "caption": "the sidecar wins"}) + "\n")
  config = data_config(f"folder:{tmp_path}")
  config.image_size = 8
  from flowjax.data import folder
  listing = folder.list_folder(str(tmp_path))
  order = [os.path.relpath(p, tmp_path) for p in listing.paths]
  expected = {os.path.join("cats", "a.png"): "a red square",
              os.path.join("cats", "b.png"): "a blue circle",
              os.path.join("dogs", "c.png"): "a green line"}
  assert folder.split_captions(config, "train") == [expected[name] for name in order]
  batch = next(batches(config, batch_size=3))
  np.testing.assert_allclose(
      np.asarray(batch["text"]),
      text.encoder(config).encode([expected[name] for name in order]), atol=1e-6)
  # An image without a caption is named with both ways to give one.
  _write_folder(tmp_path, ["dogs/d.png"])
  with pytest.raises(FileNotFoundError, match=r"No caption for .*d\.png.*d\.txt.*captions\.jsonl"):
    data.data_info(config)
  (tmp_path / "dogs" / "d.txt").write_text("a dot")
  (tmp_path / "captions.jsonl").write_text('{"file": "cats/b.png"}\n')
  with pytest.raises(ValueError, match=r"captions.jsonl, line 1: not a JSON object"):
    data.data_info(config)


class CaptionedTestSet(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset made here (no TensorFlow needed to build it): 8x8 images of one grey level
  each, a 'captions' sequence of {'text', 'id'} as coco_captions has (the first names the grey
  level), a single 'caption', and a label."""
  VERSION = tfds.core.Version("1.0.0")
  LEVELS = (0, 40, 80, 120, 160, 200, 240, 40, 80, 0)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 8, 3)),
        "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": np.int64}),
        "caption": tfds.features.Text(),
        "tags": tfds.features.Sequence(tfds.features.Text()),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    folder = self.data_dir_root
    for i, level in enumerate(self.LEVELS):
      path = os.path.join(folder, f"image{i}.png")
      Image.fromarray(np.full((8, 8, 3), level, np.uint8)).save(path)
      yield i, {"image": path, "label": i % 3, "caption": f"example {i}",
                "tags": [f"tag {level}", "second tag"],
                "captions": [{"text": f"grey level {level}", "id": 0},
                             {"text": f"another caption {i}", "id": 1}]}


def test_tfds_captions_from_a_text_feature(tmp_path, monkeypatch):
  """A prepared TFDS dataset with a coco_captions-style sequence of captions: each example's
  features are those of its first caption (checked row by row against the image's grey level),
  prompts are the split's first distinct captions, and a missing feature is named with the fix."""
  CaptionedTestSet(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  config = data_config("tfds:captioned_test_set")
  config.tfds_data_dir, config.image_size = str(tmp_path), 8
  config.caption_feature = "captions/text"
  from flowjax.data import tfds as tfds_source
  source = tfds.data_source("captioned_test_set", split="train", data_dir=str(tmp_path))
  order = [int(np.asarray(source[i]["image"])[0, 0, 0]) for i in range(len(source))]
  assert sorted(order) == sorted(CaptionedTestSet.LEVELS)
  captions_in_order = tuple(f"grey level {level}" for level in order)
  # The captions are read without decoding a single image.
  def no_decoding(*args, **kwargs):
    raise AssertionError("an image was decoded to read captions")
  monkeypatch.setattr(tfds.features.Image, "decode_example", no_decoding)
  monkeypatch.setattr(tfds.features.Image, "decode_example_np", no_decoding, raising=False)
  assert tfds_source.split_captions(config, "train") == captions_in_order
  config.caption_feature = "tags"  # a list of captions, Sequence(Text())
  assert tfds_source.split_captions(config, "train") == tuple(f"tag {level}" for level in order)
  monkeypatch.undo()
  config.caption_feature = "captions/text"
  info = data.data_info(config)
  assert info.text.prompts == captions.first_distinct(captions_in_order)
  batch = next(batches(config, batch_size=8, shuffle=True))
  levels = np.round((np.asarray(batch["image"])[:, 0, 0, 0] + 1) * 127.5).astype(int)
  np.testing.assert_allclose(
      np.asarray(batch["text"]),
      text.encoder(config).encode([f"grey level {level}" for level in levels]), atol=1e-6)
  config.caption_feature = ""  # 'caption' comes first among the features looked for
  assert tfds_source.split_captions(config, "train")[0].startswith("example ")
  config.caption_feature = "label"
  with pytest.raises(ValueError, match=r"data.caption_feature='label' is not a Text feature \(its "
                                       r"text features: \['caption', 'captions/text', 'tags'\]\).*"
                                       r"--config.data.caption_feature=<path>"):
    data.data_info(config)


def test_sources_without_captions_refuse_text():
  config = data_config("toy2d")
  with pytest.raises(ValueError, match="has no captions"):
    data.data_info(config)


def test_synthetic_text_for_dry_runs():
  config = data_config("synthetic", encoder="t5", path="", dim=24, max_length=6)
  config.image_size, config.channels = 4, 2
  info = data.data_info(config)
  assert info.text.shape == (6, 24) and np.all(info.text.null() == 0)
  batch = next(batches(config, batch_size=4))
  assert batch["text"].shape == (4, 6, 24) and float(jnp.std(batch["text"])) > 0.5


# --- the objective ------------------------------------------------------------------------------

def text_config(**overrides):
  return config_lib.load_experiment(EXPERIMENT, "tiny", **overrides)


def built(config):
  info = data.data_info(config.data)
  model = tarflow.build(config.model, info)
  return objectives.build(config.objective, model, info), info


def perturbed(params):
  """Parameters moved off their initial values (the zero-initialised output layers of a fresh
  flow otherwise make it ignore its condition)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  return jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                   for p, k in zip(leaves, keys)])


def test_objective_reads_captions_and_drops_them_to_the_null_caption():
  objective, info = built(text_config())
  null = text.encoder_of(info.text.settings).null()
  np.testing.assert_array_equal(objective.null_text, null)
  cond = jnp.broadcast_to(jnp.asarray(text.encoder_of(info.text.settings).encode(
      ["a handwritten seven"])), (4000,) + info.text.shape)
  dropped = objective.drop_condition(cond, jax.random.key(0))
  is_null = np.all(np.asarray(dropped) == null, axis=(1, 2))
  kept = np.all(np.asarray(dropped) == np.asarray(cond), axis=(1, 2))
  assert np.all(is_null | kept)
  assert abs(is_null.mean() - 0.1) < 0.015  # objective.label_dropout of the experiment
  # The loss depends on the captions.
  batch = next(batches(text_config().data, batch_size=8))
  params = perturbed(objective.init(jax.random.key(0), batch)[0])
  no_drop = objective.__class__(**{**objective.__dict__, "label_dropout": 0.0})
  loss_of = jax.jit(lambda b: no_drop.loss(params, b, jax.random.key(1), 0, None)[0])
  loss = loss_of(batch)
  other_loss = loss_of({**batch, "text": jnp.roll(batch["text"], 1, axis=0)})
  assert abs(float(loss) - float(other_loss)) > 1e-6


def test_guided_sampling_contrasts_with_the_null_caption():
  """CFG with the null caption as the prompt is the unguided model: the guided and unguided
  passes agree only if guidance uses that same null caption."""
  objective, info = built(text_config())
  batch = next(batches(text_config().data, batch_size=4))
  params = perturbed(objective.init(jax.random.key(0), batch)[0])
  null = jnp.broadcast_to(jnp.asarray(objective.null_text), (4,) + objective.null_text.shape)
  sample = jax.jit(objective.sample, static_argnums=2, static_argnames="guidance")
  plain = sample(params, jax.random.key(1), 4, null)
  guided = sample(params, jax.random.key(1), 4, null, guidance=3.0)
  np.testing.assert_allclose(np.asarray(guided), np.asarray(plain), atol=1e-4)
  prompt = jnp.asarray(info.text.encode(["a thin handwritten three"] * 4))
  prompted = sample(params, jax.random.key(1), 4, prompt)
  prompted_guided = sample(params, jax.random.key(1), 4, prompt, guidance=3.0)
  assert np.abs(np.asarray(prompted_guided) - np.asarray(prompted)).max() > 1e-3


def test_evaluation_samples_follow_the_eval_splits_captions():
  """Periodic evaluations (FID) sample each batch from the captions of the next examples of
  eval.split, not from the 10 prompts of the sample grids."""
  from flowjax import train
  config = text_config()
  setup = train.build(config, devices=jax.devices()[:1])
  conditions = train.evaluation_conditions(setup, 16)
  rows = np.concatenate([np.asarray(conditions()) for _ in range(6)])
  assert rows.shape == (96,) + setup.info.text.shape
  distinct = sorted(set(digits.captions()[1500:]))
  table = text.encoder(config.data).encode(distinct)
  nearest = np.abs(rows[:, None] - table[None]).max(axis=(2, 3)).argmin(axis=1)
  np.testing.assert_allclose(rows, table[nearest], atol=1e-6)
  assert len(set(nearest.tolist())) > len(setup.info.text.prompts)


def test_text_model_and_captions_must_meet():
  with pytest.raises(ValueError, match="trains on captions; set data.text.encoder"):
    built(text_config(**{"data.text.encoder": ""}))
  with pytest.raises(ValueError, match="must equal the caption features' shape"):
    built(text_config(**{"data.text.max_length": 6}))
  config = text_config(**{"model.text_dim": 0, "model.text_length": 0})
  with pytest.raises(ValueError, match="does not read them"):
    built(config)


# --- training and sampling from prompts ---------------------------------------------------------

def test_train_then_sample_one_grid_per_prompt(tmp_path):
  from flowjax import api
  config = text_config()
  workdir = str(tmp_path / "run")
  api.train(config, workdir)
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a handwritten seven\n\n  a thin handwritten three  \n")
  samples = modes.run_sample(config, workdir, prompts=str(prompts))
  assert samples.shape == (2, config.sample.num, 8, 8, 1)
  written = json.loads((tmp_path / "run" / "samples" / "prompts.json").read_text())
  assert written["prompts"] == {"prompt_00": "a handwritten seven",
                                "prompt_01": "a thin handwritten three"}
  for name in ("prompt_00.png", "prompt_00.npz", "prompt_01.png", "prompt_01.npz"):
    assert (tmp_path / "run" / "samples" / name).is_file()
  stored = np.load(tmp_path / "run" / "samples" / "prompt_01.npz")["samples"]
  np.testing.assert_array_equal(stored, samples[1])
  # The same prompt through the Python API: the same encoder features condition the samples.
  model = api.load(workdir)
  with pytest.raises(ValueError, match="reads captions: pass prompts"):
    model.sample(4, labels=[1, 2, 3, 4])
  with pytest.raises(ValueError, match="5 prompts for 4 samples"):
    model.sample(4, prompts=["a"] * 5)
  one = model.sample(4, prompts="a handwritten seven", seed=0)
  other = model.sample(4, prompts="a thick handwritten zero", seed=0)
  assert one.shape == (4, 8, 8, 1) and np.abs(one - other).max() > 1e-4
  # The prompt-following evaluation of the README's demonstration, at a tiny size.
  from flowjax.evals import text_digits
  scores = text_digits.evaluate(model, guidance=(1.0, 2.0), num=2)
  assert len(scores["prompts"]) == 30 and set(scores) >= {"guidance=1", "guidance=2"}
  assert 0.0 <= scores["guidance=2"]["accuracy"] <= 1.0
  assert set(scores["guidance=1"]["ink_by_style"]) == {"thin", "plain", "thick"}
  table = text_digits.report([scores, scores])
  assert table.count("\n") == 3 and "| 2 | " in table and " ± 0.000" in table
  (tmp_path / "empty.txt").write_text("\n \n")
  with pytest.raises(modes.PromptError, match="holds no prompt"):
    modes.run_sample(config, workdir, prompts=str(tmp_path / "empty.txt"))
  with pytest.raises(FileNotFoundError, match="no such file"):
    modes.run_sample(config, workdir, prompts=str(tmp_path / "missing.txt"))


def test_prompts_flag_only_samples(tmp_path):
  done = subprocess.run(
      [sys.executable, "-m", "flowjax.main", f"--config={EXPERIMENT}:tiny",
       f"--workdir={tmp_path}", "--num_cpu_devices=1", "--prompts=p.txt"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2 and "--prompts is read by --mode=sample only" in done.stderr


# --- captions in a latent cache -----------------------------------------------------------------

def _captioned_autoencoder(tmp_path, settings):
  """(the tiny digits autoencoder experiment with data.text = settings, its weights file)."""
  from safetensors import numpy as safetensors_numpy

  from flowjax.data.pipeline import DataInfo
  from flowjax.models import autoencoder
  from helpers import random_autoencoder_params
  config = config_lib.load_experiment(
      "experiments/autoencoder_digits.py", "tiny",
      **{f"data.text.{k}": v for k, v in settings.items()})
  model = autoencoder.build(config.model, DataInfo((8, 8, 1), 0, None))
  weights = str(tmp_path / "vae.safetensors")
  safetensors_numpy.save_file(autoencoder.to_diffusers(
      random_autoencoder_params(model, (8, 8, 1))), weights)
  return config, weights


def test_latent_cache_holds_caption_features(tmp_path):
  """cache_latents of captioned digits stores each record's caption features (float16) and the
  null and prompt features; the cache serves them only to a config with the same data.text."""
  from flowjax.data import cache_latents, latents
  settings = dict(encoder="words", max_length=8, dim=16, layers=1, heads=2)
  config, weights = _captioned_autoencoder(tmp_path, settings)
  out = str(tmp_path / "cache")
  result = cache_latents.cache(config, out, weights=weights, batch_size=64, shard_size=512)
  assert result["written"] == [0, 1, 2]
  spec, _ = latents.read_split(out, "train")
  assert spec["text"]["feature_shape"] == [8, 16] and spec["text"]["settings"]["encoder"] == "words"
  encoder = text.encoder_of(text.TextSettings(**settings))
  config_data = latent_config(out, settings)
  info = data.data_info(config_data)
  assert info.extra_array("text") == ((8, 16), "float16")
  assert info.text.prompts == captions.first_distinct(digits.captions()[:1500])
  np.testing.assert_array_equal(info.text.null(), encoder.null())
  np.testing.assert_allclose(info.text.prompt_features(), encoder.encode(info.text.prompts),
                             atol=1e-6)
  # Rows 504..515 straddle shards 0 and 1: each record holds its own caption's features.
  batch_list = batches(config_data, batch_size=12)
  for _ in range(43):
    batch = next(batch_list)
  assert batch["text"].dtype == jnp.float16
  np.testing.assert_allclose(np.asarray(batch["text"], np.float32),
                             encoder.encode(digits.captions()[504:516]), atol=2e-3, rtol=2e-3)
  # Without data.text the cache serves latents alone; other settings are refused.
  assert "text" not in next(batches(latent_config(out, dict(encoder=""))))
  with pytest.raises(ValueError, match=r"data.text.dim: cache 16, config 32"):
    data.data_info(latent_config(out, {**settings, "dim": 32}))
  with pytest.raises(ValueError, match=r"data.text.encoder: cache 'words', config 't5'"):
    data.data_info(latent_config(out, {**settings, "encoder": "t5"}))
  assert data.data_info(latent_config(out, {**settings, "path": "/elsewhere"})).text is not None
  # The command line writes the same records (the test split, into a second cache).
  command = [sys.executable, "-m", "flowjax.data.cache_latents",
             "--config=experiments/autoencoder_digits.py:tiny", f"--weights={weights}",
             f"--out={tmp_path / 'cli'}", "--split=test", "--batch_size=64", "--shard_size=320"]
  command += [f"--config.data.text.{k}={v}" for k, v in settings.items()]
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  written = np.load(tmp_path / "cli" / "test" / latents.TEXT_FILE)
  np.testing.assert_array_equal(written["null"], encoder.null())
  test_info = data.data_info(latent_config(str(tmp_path / "cli"), settings), "test")
  assert test_info.num_examples == 297 and test_info.text.prompts[0] == digits.captions()[1500]
  # A text STARFlow builds on the cache (its null caption read from text_features.npz).
  tiny = text_config(**{"model.text_dim": 16})
  model = tarflow.build(tiny.model, info)
  objective = objectives.build(tiny.objective, model, info)
  np.testing.assert_array_equal(objective.null_text, encoder.null())


def test_latent_cache_knows_its_encoder_checkpoint(tmp_path):
  """A cache of caption features from a checkpoint folder (here the tiny Gemma's embedding)
  serves a config naming the same files anywhere, and refuses another checkpoint of the same
  width (the same weights stored in bfloat16) with the fix; a cache written before caches kept
  their encoder's fingerprint resumes and serves as before."""
  import json as json_lib
  import shutil

  import ml_dtypes

  from flowjax.data import cache_latents, latents
  settings = dict(encoder="gemma_embed", path=os.path.join(REFERENCE, "gemma_tiny"),
                  max_length=20)
  config, weights = _captioned_autoencoder(tmp_path, settings)
  out = str(tmp_path / "cache")
  cache_latents.cache(config, out, weights=weights, batch_size=256, shard_size=2048)
  moved = shutil.copytree(settings["path"], tmp_path / "moved")
  assert data.data_info(latent_config(out, {**settings, "path": str(moved)})).text is not None
  other = _gemma_folder(tmp_path / "other", dtype=ml_dtypes.bfloat16)
  assert text.feature_dim(text.TextSettings(encoder="gemma_embed", path=other)) == 16
  with pytest.raises(ValueError, match="holds other files than the encoder"):
    data.data_info(latent_config(out, {**settings, "path": other}))
  spec_path = os.path.join(out, "train", latents.SPEC_FILE)
  spec = json_lib.loads(open(spec_path).read())
  assert spec["text"].pop("fingerprint")
  with open(spec_path, "w") as f:
    json_lib.dump(spec, f)
  assert data.data_info(latent_config(out, {**settings, "path": other})).text is not None
  result = cache_latents.cache(config, out, weights=weights, batch_size=256, shard_size=2048)
  assert result["written"] == []


def latent_config(out, settings):
  c = config_lib.base_config().data
  c.update(dict(name=f"latents:{out}", conditional=False, prefetch=0))
  c.text.update(settings)
  return c


def test_text_digits_figure_puts_each_prompt_in_its_column_and_style_rows():
  from flowjax.evals import text_digits
  num = 5
  # Sample value encodes its prompt: style s, digit d -> (10 s + d) / 30 * 2 - 1.
  values = np.repeat(np.arange(30, dtype=np.float32) / 30 * 2 - 1, num)
  samples = np.broadcast_to(values[:, None, None, None], (30 * num, 8, 8, 1))
  picture = text_digits.figure(samples, num)
  cell, pad = 32, 2
  for style in range(3):
    for row in range(text_digits.FIGURE_ROWS):
      for digit in range(10):
        r = pad + (style * text_digits.FIGURE_ROWS + row) * (cell + pad)
        c = pad + digit * (cell + pad)
        expected = (10 * style + digit) / 30 * 255
        assert abs(int(picture[r + 5, c + 5, 0]) - expected) <= 1, (style, row, digit)


# --- flow matching and MeanFlow on captions (the DiT's text input) ------------------------------

FM_TEXT = os.path.join(ROOT, "experiments", "fm_digits_text.py")
MEANFLOW_TEXT = os.path.join(ROOT, "experiments", "meanflow_digits_text.py")


def test_dit_reads_captions_as_prefix_tokens_and_a_pooled_embedding():
  from flowjax.models import dit
  model = dit.DiT(patch_size=2, hidden_size=16, depth=2, num_heads=2, text_dim=6, text_length=3)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  t = jnp.array([0.3, 0.7])
  captions_features = jax.random.normal(jax.random.key(1), (2, 3, 6))
  from flax import linen as nn
  params = perturbed(nn.meta.unbox(model.init(jax.random.key(2), x, (t,), captions_features,
                                              train=False)["params"]))
  assert params["text_proj"]["kernel"].shape == (6, 16) and "bias" in params["text_proj"]
  assert params["text_pos"].shape == (3, 16) and "text_pool" in params
  out = model.apply({"params": params}, x, (t,), captions_features, train=False)
  assert out.shape == x.shape
  # Each example reads its own caption only.
  swapped = model.apply({"params": params}, x, (t,), captions_features.at[1].set(
      captions_features[0]), train=False)
  np.testing.assert_allclose(swapped[0], out[0], atol=1e-6)
  assert float(jnp.abs(swapped[1] - out[1]).max()) > 1e-4
  # The pooled embedding is the projected mean of the non-padding (non-zero) tokens.
  padded = captions_features.at[:, 2].set(0.0)
  _, captured = model.apply({"params": params}, x, (t,), padded, train=False,
                            capture_intermediates=lambda m, _: m.name == "text_pool",
                            mutable=["intermediates"])
  pooled = captured["intermediates"]["text_pool"]["__call__"][0]
  mean = padded[:, :2].mean(axis=1)
  expected = mean @ params["text_pool"]["kernel"] + params["text_pool"]["bias"]
  np.testing.assert_allclose(pooled, expected, atol=1e-5)
  with pytest.raises(ValueError, match=r"caption features of shape \[B, 3, 6\]"):
    model.apply({"params": params}, x, (t,), None, train=False)


@pytest.mark.parametrize("experiment", [FM_TEXT, MEANFLOW_TEXT], ids=["fm", "meanflow"])
def test_dit_objectives_train_on_captions_and_guide_against_the_null_caption(experiment):
  config = config_lib.load_experiment(experiment, "tiny")
  info = data.data_info(config.data)
  from flowjax import models
  objective = objectives.build(config.objective, models.build(config.model, info), info)
  encoder = text.encoder_of(info.text.settings)
  np.testing.assert_array_equal(objective.null_text, encoder.null())
  batch = next(batches(config.data, batch_size=8))
  params = perturbed(objective.init(jax.random.key(0), batch)[0])
  no_drop = objective.__class__(**{**objective.__dict__, "label_dropout": 0.0})
  loss_of = jax.jit(lambda b: no_drop.loss(params, b, jax.random.key(1), 0, None)[0])
  other = {**batch, "text": jnp.roll(batch["text"], 1, axis=0)}
  assert abs(float(loss_of(batch)) - float(loss_of(other))) > 1e-6
  # Caption dropout: whole captions become the null caption's features.
  cond = jnp.broadcast_to(jnp.asarray(encoder.encode(["a handwritten two"])),
                          (2000,) + info.text.shape)
  from flowjax.objectives import common
  dropped = common.drop_condition(cond, jax.random.key(2), 0.25, 0, objective.null_text)
  is_null = np.asarray(common.is_null(dropped, objective.null_text))
  assert abs(is_null.mean() - 0.25) < 0.03
  assert np.all(np.asarray(common.is_null(cond, objective.null_text)) == 0)
  prompt = jnp.asarray(encoder.encode(["a thin handwritten three"] * 2))
  null = common.null_like(prompt, objective.null_text)
  if isinstance(objective, objectives.flow_matching.FlowMatching):
    # Guidance contrasts with the null caption: with the null caption as the prompt it is the
    # unguided sampler.
    plain = objective.sample(params, jax.random.key(3), 2, null, num_steps=2)
    guided = objective.sample(params, jax.random.key(3), 2, null, num_steps=2, guidance=3.0)
    np.testing.assert_allclose(np.asarray(guided), np.asarray(plain), atol=1e-5)
    a = objective.sample(params, jax.random.key(3), 2, prompt, num_steps=2)
    b = objective.sample(params, jax.random.key(3), 2, prompt, num_steps=2, guidance=3.0)
    assert float(jnp.abs(a - b).max()) > 1e-4
  else:
    # MeanFlow's training-time guidance leaves null-caption examples unguided.
    guided = objective.__class__(**{**objective.__dict__, "guidance_w": 2.0})
    z = jax.random.normal(jax.random.key(4), (2, 8, 8, 1))
    t = jnp.array([0.5, 0.5])
    v = jax.random.normal(jax.random.key(5), (2, 8, 8, 1))
    np.testing.assert_array_equal(guided.guided_velocity(params, z, t, v, null), v)
    assert float(jnp.abs(guided.guided_velocity(params, z, t, v, prompt) - v).max()) > 1e-4


def test_trainable_text_encoder_reads_only_the_caption_tokens():
  """model.text_layers' encoder: the identity at initialisation (zero output projections),
  attention over the caption's tokens only (the same caption padded to 8 or to 5 tokens gives the
  same features), padding kept at zero, and an all-zero caption (synthetic text's null) finite."""
  from flowjax.models import layers
  encoder = layers.TextEncoder(depth=2, num_heads=2)
  rng = np.random.default_rng(0)
  caption = np.zeros((3, 8, 16), np.float32)
  for row, tokens in enumerate((3, 5, 1)):
    caption[row, :tokens] = rng.standard_normal((tokens, 16))
  params = encoder.init(jax.random.key(0), caption)["params"]
  np.testing.assert_array_equal(encoder.apply({"params": params}, caption), caption)
  params = perturbed(params)
  long = np.asarray(encoder.apply({"params": params}, caption))
  short = np.asarray(encoder.apply({"params": params}, caption[:, :5]))
  assert np.abs(long - caption).max() > 0.1
  np.testing.assert_allclose(long[:, :5], short, atol=1e-5)
  np.testing.assert_array_equal(long[0, 3:], 0.0)
  empty = np.asarray(encoder.apply({"params": params}, np.zeros((1, 8, 16), np.float32)))
  np.testing.assert_array_equal(empty, 0.0)


@pytest.mark.parametrize("experiment", [EXPERIMENT, FM_TEXT], ids=["starflow", "fm"])
def test_trainable_text_encoder_trains_with_the_backbone(experiment):
  """With model.text_layers the caption features pass through encoder layers the loss trains:
  their gradients are non-zero and the loss depends on them."""
  config = config_lib.load_experiment(experiment, "tiny",
                                      **{"model.text_layers": 1, "model.text_heads": 2})
  info = data.data_info(config.data)
  from flowjax import models
  objective = objectives.build(config.objective, models.build(config.model, info), info)
  batch = next(batches(config.data, batch_size=8))
  params = perturbed(objective.init(jax.random.key(0), batch)[0])
  found = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
           if "text_encoder" in jax.tree_util.keystr(path)]
  assert len(found) == 16  # 2 LayerNorms (scale, bias), 6 Dense layers (kernel, bias)
  grads = jax.jit(jax.grad(
      lambda p: objective.loss(p, batch, jax.random.key(1), 0, None)[0]))(params)
  for path, grad in jax.tree_util.tree_flatten_with_path(grads)[0]:
    if "text_encoder" in jax.tree_util.keystr(path):
      assert float(jnp.abs(grad).max()) > 0, jax.tree_util.keystr(path)
  with pytest.raises(ValueError, match="text_heads must divide model.text_dim"):
    models.build(config_lib.load_experiment(experiment, "tiny", **{
        "model.text_layers": 1, "model.text_heads": 5}).model, info)


@pytest.mark.parametrize("method", ["starflow", "fm", "meanflow"])
def test_text_eval_reports_the_committed_results(method):
  """The README's tables come from `python -m flowjax.text_eval --report=...` on the committed
  result files (three seeds of each method)."""
  files = [os.path.join(ROOT, "experiments", "results", f"{method}_digits_text_seed{s}.json")
           for s in range(3)]
  done = subprocess.run([sys.executable, "-m", "flowjax.text_eval", "--report=" + ",".join(files)],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.splitlines()[0].startswith("| guidance | label accuracy |")
  assert done.stdout.strip() in open(os.path.join(ROOT, "README.md")).read()
