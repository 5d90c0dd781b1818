"""The ImageNet latent experiments end to end: mock imagenet2012 encoded by the tiny SD-VAE (random
weights read from a diffusers-layout file) into a latent dataset, then a few real trainer steps
of every `<method>_imagenet.py` on it, as a user runs them: `--config.data.name=latents:<DIR>`.
"""

import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from safetensors import numpy as safetensors_numpy

from flowjax import config as config_lib
from flowjax import metrics, train
from flowjax.data import cache_latents, latents
from flowjax.data.pipeline import DataInfo
from flowjax.models import autoencoder
from helpers import random_autoencoder_params

NUM_IMAGES = 16  # mock imagenet2012 train examples: random sizes, labels in [0, 1000)
IMAGE_SIZE = 64  # the tiny SD-VAE preset's resolution: latents 64 / 8 = 8 x 8 x 4
LATENT_SHAPE = (IMAGE_SIZE // 8, IMAGE_SIZE // 8, 4)
IMAGENET_CLASSES = 1000
STEPS = 2
EXPERIMENTS = ("fm_imagenet", "imm_imagenet", "meanflow_imagenet", "shortcut_imagenet",
               "starflow_imagenet")


@pytest.fixture(scope="module")
def imagenet_latents(tmp_path_factory):
  """The mock imagenet2012 train split encoded by experiments/sdvae_imagenet.py:tiny on its
  ADM-cropped 64 px images, with random weights written to and read from a .safetensors file."""
  root = tmp_path_factory.mktemp("imagenet_latents")
  config = config_lib.load_experiment("experiments/sdvae_imagenet.py", "tiny",
                                      **{"data.name": "tfds:imagenet2012"})
  image_shape = (config.data.image_size, config.data.image_size, 3)
  model = autoencoder.build(config.model, DataInfo(image_shape, 0, None))
  params = random_autoencoder_params(model, image_shape)
  weights = str(root / "diffusion_pytorch_model.safetensors")
  safetensors_numpy.save_file(autoencoder.to_diffusers(params), weights)
  out = str(root / "latents")
  with tfds.testing.mock_data(num_examples=NUM_IMAGES):
    source = tfds.data_source("imagenet2012", split="train")
    mock_labels = np.array([int(source[i]["label"]) for i in range(NUM_IMAGES)])
    image_sizes = {np.asarray(source[i]["image"]).shape[:2] for i in range(NUM_IMAGES)}
    result = cache_latents.cache(config, out, weights=weights, batch_size=8,
                                 shard_size=NUM_IMAGES)
  return dict(out=out, weights=weights, result=result, mock_labels=mock_labels,
              image_sizes=image_sizes)


def test_mock_imagenet_is_cached_with_its_labels(imagenet_latents):
  out, result = imagenet_latents["out"], imagenet_latents["result"]
  assert len(imagenet_latents["image_sizes"]) > 1  # random sizes: the ADM crop makes them 64 px
  assert result["num_shards"] == 1 and result["written"] == [0]
  spec, stats = latents.read_split(out, "train")
  assert tuple(spec["image_shape"]) == (IMAGE_SIZE, IMAGE_SIZE, 3)
  assert tuple(spec["latent_shape"]) == LATENT_SHAPE
  assert spec["num_classes"] == IMAGENET_CLASSES and spec["num_examples"] == NUM_IMAGES
  assert spec["dataset"]["name"] == "tfds:imagenet2012"
  assert spec["autoencoder"]["weights"] == os.path.abspath(imagenet_latents["weights"])
  assert np.all(np.asarray(stats["channel_std"]) > 0)
  _, rows = latents.local_batches(
      config_lib.load_experiment("experiments/fm_imagenet.py", "tiny",
                                 **{"data.name": "latents:" + out}).data,
      split="train", seed=0, global_batch_size=NUM_IMAGES, rows=(0, NUM_IMAGES), shuffle=False)
  batch = rows(0)
  assert batch["image"].shape == (NUM_IMAGES,) + LATENT_SHAPE
  assert np.all(np.isfinite(batch["image"]))
  # In source order, every cached label is the mock example's ImageNet label.
  np.testing.assert_array_equal(batch["label"], imagenet_latents["mock_labels"])
  assert np.all((batch["label"] >= 0) & (batch["label"] < IMAGENET_CLASSES))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_imagenet_experiment_trains_on_cached_latents(name, imagenet_latents, tmp_path):
  """The :tiny preset with only data.name pointing at the cache (and 2 steps, each logged)."""
  config = config_lib.load_experiment(
      f"experiments/{name}.py", "tiny",
      **{"data.name": "latents:" + imagenet_latents["out"], "train.steps": STEPS,
         "train.log_every": 1})
  assert config.eval.every_steps == 0 and config.ckpt.every_steps == STEPS
  state = train.run(config, str(tmp_path))
  assert int(state.step) == STEPS and int(state.skipped) == 0

  # The model conditions on the cache's 1000 ImageNet classes (+ the null label), not on the
  # preset's synthetic 10.
  table_rows = {leaf.shape[0] for leaf in jax.tree.leaves(state.params) if leaf.ndim == 2}
  assert IMAGENET_CLASSES + 1 in table_rows and 11 not in table_rows

  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  for record in records:
    assert {"step", "loss", "steps_per_sec"} <= set(record)
    assert np.isfinite(record["loss"]) and record["steps_per_sec"] > 0

  checkpoints = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                       if p.name.isdigit())
  assert checkpoints == [STEPS]
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["data"]["name"] == "latents:" + imagenet_latents["out"]
  assert config_lib.identity(saved) == config_lib.identity(config)

  # The final grid shows decoded 64 x 64 RGB images, not the 8 x 8 x 4 latents.
  with Image.open(tmp_path / "samples" / f"step_{STEPS}.png") as picture:
    size = picture.size
  num = config.sample.num
  decoded = metrics.image_grid(np.zeros((num, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)).shape
  raw = metrics.image_grid(np.zeros((num,) + LATENT_SHAPE, np.float32)).shape
  assert decoded != raw
  assert size == (decoded[1], decoded[0])
