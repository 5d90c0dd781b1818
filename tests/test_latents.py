"""Tests of latent caching (flowjax.data.cache_latents) and the 'latents:<DIR>' data source."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from safetensors import numpy as safetensors_numpy

from flowjax import config as config_lib
from flowjax import data, sharding, train
from flowjax.data import cache_latents, digits, latents
from flowjax.data.pipeline import DataInfo
from flowjax.models import autoencoder
from helpers import random_autoencoder_params, run_batch_errors

BATCH = 64
SHARD = 512  # 1500 digits -> shards of 512, 512, 476


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
  """The digits train split encoded by the tiny autoencoder_digits model, with random weights
  read from a diffusers-layout file."""
  root = tmp_path_factory.mktemp("latents")
  config = config_lib.load_experiment("experiments/autoencoder_digits.py", "tiny",
                                      **{"model.scaling_factor": 0.5})
  model = autoencoder.build(config.model, DataInfo((8, 8, 1), 0, None))
  params = random_autoencoder_params(model, (8, 8, 1))
  weights = str(root / "vae.safetensors")
  safetensors_numpy.save_file(autoencoder.to_diffusers(params), weights)
  out = str(root / "cache")
  result = cache_latents.cache(config, out, weights=weights, batch_size=BATCH, shard_size=SHARD)
  return dict(config=config, model=model, params=params, weights=weights, out=out,
              result=result)


def raw_latents(out, split="train"):
  spec, _ = latents.read_split(out, split)
  rows = []
  for shard in range(spec["num_shards"]):
    reader = ArrayRecordReader(latents.shard_path(out, split, shard, spec["num_shards"]))
    rows += [latents.decode_record(r, tuple(spec["latent_shape"]))
             for r in reader.read_all()]
    reader.close()
  return np.stack([r[0] for r in rows]), np.array([r[1] for r in rows])


def latent_data_config(out, **overrides):
  config = config_lib.base_config().data
  config.update(dict(name=f"latents:{out}", conditional=True, prefetch=0, **overrides))
  return config


def test_cache_holds_the_posterior_means_of_the_split_in_order(cached):
  result, model, params = cached["result"], cached["model"], cached["params"]
  assert result["num_shards"] == 3 and result["written"] == [0, 1, 2]
  raw, labels = raw_latents(cached["out"])
  images, digit_labels = digits.load(8)
  start, stop = digits.SPLITS["train"]
  mean, _ = jax.jit(lambda x: model.apply({"params": params}, x, method=model.encode))(
      images[start:stop])
  assert raw.shape == (1500, 4, 4, 4)
  np.testing.assert_allclose(raw, mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(labels, digit_labels[start:stop])
  stats = result["stats"]
  np.testing.assert_allclose(stats["channel_mean"], raw.reshape(-1, 4).mean(0), atol=1e-5)
  np.testing.assert_allclose(stats["channel_std"], raw.reshape(-1, 4).std(0), rtol=1e-4)
  spec, _ = latents.read_split(cached["out"], "train")
  assert spec["autoencoder"]["weights"] == os.path.abspath(cached["weights"])
  assert spec["latent_shape"] == [4, 4, 4] and spec["num_classes"] == 10


def test_a_second_run_skips_the_written_shards(cached):
  out, config = cached["out"], cached["config"]
  shard = latents.shard_path(out, "train", 1, 3)
  with open(shard, "rb") as f:
    before = f.read()
  os.remove(shard)
  os.remove(os.path.join(out, "train", latents.STATS_FILE))
  with pytest.raises(FileNotFoundError, match="incomplete"):
    data.data_info(latent_data_config(out), "train")
  result = cache_latents.cache(config, out, weights=cached["weights"], batch_size=BATCH,
                               shard_size=SHARD)
  assert result["written"] == [1] and result["skipped"] == [0, 2]
  with open(shard, "rb") as f:
    assert f.read() == before
  assert result["stats"] == cached["result"]["stats"]
  with pytest.raises(ValueError, match="posterior"):
    cache_latents.cache(config, out, weights=cached["weights"], batch_size=BATCH,
                        shard_size=SHARD, posterior="sample")


def test_a_cache_written_before_a_data_key_existed_resumes(cached):
  """A cache.json written before flowjax had a data key (absent from its dataset section)
  resumes when the config leaves the key at its default, and is refused otherwise."""
  import json
  out, config = cached["out"], cached["config"]
  spec_path = os.path.join(out, "train", latents.SPEC_FILE)
  with open(spec_path) as f:
    spec = json.load(f)
  assert spec["dataset"].pop("caption_feature") == ""
  assert spec["dataset"].pop("text")["encoder"] == ""  # a whole section added since
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  result = cache_latents.cache(config, out, weights=cached["weights"], batch_size=BATCH,
                               shard_size=SHARD)
  assert result["written"] == []
  with config.unlocked():
    config.data.caption_feature = "captions/text"
  with pytest.raises(ValueError, match="written with other settings"):
    cache_latents.cache(config, out, weights=cached["weights"], batch_size=BATCH,
                        shard_size=SHARD)
  with config.unlocked():
    config.data.caption_feature = ""


def test_latent_source_serves_scaled_latents_in_the_global_order(cached):
  out = cached["out"]
  raw, labels = raw_latents(out)
  stats = cached["result"]["stats"]
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  config = latent_data_config(out)
  build = lambda **kwargs: data.build(config, split="train", global_batch_size=16, seed=3,
                                      sharding=batch_sharding, **kwargs)
  first, second = build(), build()
  halves = [build(process_index=p, process_count=2) for p in range(2)]
  scaled = (raw - np.asarray(stats["channel_mean"])) / np.asarray(stats["channel_std"])
  seen = []
  for k in range(3):
    batch = next(first)
    np.testing.assert_array_equal(batch["image"], next(second)["image"])
    pieces = [h._local_batch(k) for h in halves]
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in pieces]), batch[key])
    for image, label in zip(np.asarray(batch["image"]), np.asarray(batch["label"])):
      index = int(np.argmin(np.abs(scaled - image).reshape(len(raw), -1).max(1)))
      np.testing.assert_allclose(scaled[index], image, atol=1e-5)
      assert labels[index] == label
      seen.append(index)
  assert len(set(seen)) == len(seen)  # one permutation: no example twice in an epoch
  assert seen[:16] != sorted(seen[:16])  # shuffled

  # A whole epoch in source order, standardised per channel.
  _, epoch = latents.local_batches(config, split="train", seed=0, global_batch_size=1500,
                                   rows=(0, 1500), shuffle=False)
  epoch = epoch(0)["image"].reshape(-1, 4)
  np.testing.assert_allclose(epoch.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(epoch.std(0), 1.0, atol=1e-4)
  for scaling, multiplier in (("factor", 0.5), ("none", 1.0)):
    _, rows = latents.local_batches(latent_data_config(out, latent_scaling=scaling),
                                    split="train", seed=0, global_batch_size=8, rows=(0, 8),
                                    shuffle=False)
    np.testing.assert_allclose(rows(0)["image"], raw[:8] * multiplier, atol=1e-6)


def test_decoding_sampled_latents_inverts_the_scaling(cached, tmp_path):
  model, params = cached["model"], cached["params"]
  raw, _ = raw_latents(cached["out"])
  stats = cached["result"]["stats"]
  scaled = (raw[:4] - np.asarray(stats["channel_mean"])) / np.asarray(stats["channel_std"])
  # A workdir of a latent-space run after --mode=sample.
  (tmp_path / "samples").mkdir()
  np.savez(tmp_path / "samples" / "final.npz", samples=scaled)
  run_config = config_lib.base_config()
  run_config.data = latent_data_config(cached["out"])
  (tmp_path / "config.json").write_text(config_lib.to_json(run_config))
  png = latents.decode_workdir_samples(str(tmp_path))
  assert os.path.getsize(png) > 0
  images = np.load(tmp_path / "samples" / "final_decoded.npz")["samples"]
  want = jax.jit(lambda z: model.apply({"params": params}, z, method=model.decode))(raw[:4])
  assert images.shape == (4, 8, 8, 1)
  np.testing.assert_allclose(images, want, rtol=1e-4, atol=1e-4)


def test_bad_latent_configs_are_explained(cached, tmp_path):
  with pytest.raises(FileNotFoundError, match="cache_latents"):
    data.data_info(latent_data_config(str(tmp_path)), "train")
  with pytest.raises(ValueError, match="random_flip"):
    data.build(latent_data_config(cached["out"], random_flip=True), split="train",
               global_batch_size=8, seed=0,
               sharding=jax.sharding.NamedSharding(
                   jax.make_mesh((1,), ("data",), devices=jax.devices()[:1],
                                 axis_types=(jax.sharding.AxisType.Auto,)),
                   jax.sharding.PartitionSpec("data")))
  bad = ml_collections.ConfigDict(cached["config"].to_dict())
  bad.model.name = "mlp"
  with pytest.raises(ValueError, match="model.name='autoencoder'"):
    cache_latents.cache(bad, str(tmp_path), weights=cached["weights"])


def test_flow_matching_trains_on_cached_latents(cached):
  """The train step on the latents source reports at step 1 the flow-matching loss of the first
  global batch at the initial state (recomputed with that step's key), and its steps fit the
  batches they trained on better: their mean loss falls by over 3%."""
  config = config_lib.load_experiment("experiments/fm_latent_digits.py", "tiny",
                                      **{"data.name": "latents:" + cached["out"],
                                         "train.steps": 8})
  setup = train.build(config, jax.devices()[:1])  # as run_batch_errors: its init is compiled once
  assert setup.info.image_shape == (4, 4, 4) and setup.info.num_classes == 10
  batches = data.build(config.data, split="train", global_batch_size=config.train.batch_size,
                       seed=config.seed, sharding=sharding.batch_sharding(setup.mesh))
  with train.context(setup):
    state = setup.init_fn()
    logged = []
    for _ in range(config.train.steps):
      state, metrics = setup.train_step(state, next(batches))
      logged.append(float(metrics["loss"]))
  assert int(state.step) == config.train.steps and int(state.skipped) == 0
  losses, _ = run_batch_errors(config, [None, state])
  np.testing.assert_allclose(logged[0], losses[0, 0], rtol=1e-5)
  assert losses[1].mean() < 0.97 * losses[0].mean(), losses
  spec_path = os.path.join(cached["out"], "train", latents.SPEC_FILE)
  with open(spec_path) as f:
    assert json.load(f)["dataset"]["name"] == "digits"
  # The trainer's sample grids show decoded images, not latents.
  sampled = np.asarray(next(batches)["image"])[:4]
  pictures = train.as_images(config, sampled)
  assert pictures.shape == (4, 8, 8, 1)
  np.testing.assert_allclose(pictures, latents.decode(sampled, config.data), atol=1e-6)


def test_posterior_samples_are_seeded_draws_from_the_posterior(cached, tmp_path):
  model, params = cached["model"], cached["params"]
  result = cache_latents.cache(cached["config"], str(tmp_path), weights=cached["weights"],
                               split="test", batch_size=BATCH, shard_size=5 * BATCH,
                               posterior="sample", seed=7)
  assert result["num_shards"] == 1
  sampled, labels = raw_latents(str(tmp_path), "test")
  images, digit_labels = digits.load(8)
  start, stop = digits.SPLITS["test"]
  np.testing.assert_array_equal(labels, digit_labels[start:stop])
  mean, logvar = jax.jit(lambda x: model.apply({"params": params}, x, method=model.encode))(
      images[start:stop])
  noise = (sampled - mean) / np.exp(0.5 * np.asarray(logvar))
  assert sampled.shape == (297, 4, 4, 4)
  assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1.0) < 0.05  # 19008 N(0, 1) draws
  spec, _ = latents.read_split(str(tmp_path), "test")
  assert (spec["posterior"], spec["seed"]) == ("sample", 7)
