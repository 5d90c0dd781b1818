"""Encodes a dataset split once with an autoencoder and writes it as a latent dataset.

python -m flowjax.data.cache_latents --config=experiments/autoencoder_digits.py \
    --weights=workdirs/autoencoder_digits --out=workdirs/digits_latents [--split=train] \
    [--repa_encoder=digits|dinov2 --repa_encoder_path=PATH --repa_encoder_resolution=224]

The config is an experiment whose `model` section is an autoencoder (model.name='autoencoder')
and whose `data` section names the images to encode; --weights is a flowjax workdir that
trained it, a diffusers `diffusion_pytorch_model.safetensors`, or the folder holding one. Train
on the result with data.name='latents:<out>' (see flowjax/data/latents.py for the layout).

Labels are stored when the dataset has them (-1 otherwise). Deterministic: the split is read
in source order without flips (flowjax.data.build with
shuffle=False), and each image is encoded to its posterior mean (--posterior=mean, default) or
to one posterior sample drawn with key fold_in(key(--seed), global batch index), which does not
depend on the number of devices or processes. The batches are sharded over the config's mesh
and encoded by one jitted function. Resumable: shard S is written to a temporary file and
renamed when complete, and a rerun skips the shards that exist; the per-channel statistics are
computed from the shards at the end. With several processes, every process reads and encodes its
rows of each batch, process 0 writes the shards, and --out must be on a filesystem that all
processes see (as for checkpoints).

With --repa_encoder, each record also holds the patch tokens [N, D] (float16) of that REPA
encoder (flowjax.objectives.repa ENCODERS, read from --repa_encoder_path at
--repa_encoder_resolution as config.repa's keys of the same names read it) of the image the
autoencoder encodes, unflipped like the latent, for training with repa.features='cached'
(flowjax/data/latents.py: 384 KiB per image for DINOv2-B at 224).

With data.text.encoder set in the config, each record also holds its caption's features [T, D]
(float16) from that encoder (`flowjax.text`), encoded batch by batch as the latents are, and
<split>/text_features.npz the null caption's and the sample prompts' features: a text-to-image
model then trains on the cache without running the encoder (data.name='latents:<out>' with the
same data.text settings). 2 T D bytes per image: 1 MiB for flan-t5-xl's 128 x 2048.
"""

import dataclasses
import io
import json
import logging
import os
import sys
from typing import Any

import jax
import ml_collections
import numpy as np

from flowjax import config as config_lib, data, models, sharding, storage
from flowjax import text as text_lib
from flowjax.data import captions, latents
from flowjax.models import autoencoder

POSTERIORS = ("mean", "sample")


def _spec(config, data_config, info, model, *, weights: str, split: str, shard_size: int,
          num_shards: int, posterior: str, seed: int, repa_spec: dict | None,
          text_spec: dict | None = None) -> dict[str, Any]:
  """The cache.json of a split: everything that determines its contents."""
  return {
      "format": latents.FORMAT,
      "split": split,
      "num_examples": int(info.num_examples),
      "num_classes": int(info.num_classes),
      "image_shape": list(info.image_shape),
      "latent_shape": list(autoencoder.latent_shape(model, info.image_shape)),
      "shard_size": shard_size,
      "num_shards": num_shards,
      "posterior": posterior,
      "seed": seed if posterior == "sample" else None,
      "dataset": {k: v for k, v in data_config.to_dict().items()
                  if k not in ("num_workers", "prefetch")},
      "autoencoder": {
          "model": config.model.to_dict(),
          "weights": storage.absolute(weights),
          "scaling_factor": float(config.model.scaling_factor),
      },
      "repa": repa_spec,
      "text": text_spec,
  }


def _as_flags(message: str) -> str:
  """An error of flowjax.objectives.repa, which names config.repa.<key>, as this command's
  --repa_<key> flags name the same settings."""
  return message.replace("--config.repa.", "--repa_").replace("config.repa.", "--repa_")


def _repa_encoder(name: str, path: str, resolution: int, image_shape) -> tuple[Any, dict]:
  """(the REPA encoder of the --repa_* flags with its parameters loaded, the cache.json entry
  describing its features of images of `image_shape`)."""
  from flowjax.objectives import repa
  from flowjax.registry import unknown_name_message
  if name not in repa.ENCODERS:
    raise ValueError("--repa_encoder: " + unknown_name_message("REPA encoder", name,
                                                                repa.ENCODERS.names()))
  if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
    raise ValueError(f"--repa_encoder_resolution={resolution!r} must be a positive integer "
                     "(REPA: 224).")
  try:
    found = repa.encoder(name, path, resolution)
    grid_h, grid_w, width = found.feature_shape(tuple(image_shape))
  except ValueError as error:
    raise ValueError(_as_flags(str(error))) from error
  spec = {"encoder": name, "encoder_path": storage.absolute(found.path),
          "encoder_resolution": found.resolution, "grid": [grid_h, grid_w],
          "feature_shape": [grid_h * grid_w, width], "dtype": "float16"}
  return found, spec


def _jsonable(tree):
  return json.loads(json.dumps(tree, default=list))


def _check_or_write_spec(path: str, spec: dict) -> None:
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    new = _jsonable(spec)
    if (isinstance(old.get("dataset"), dict) and isinstance(new.get("dataset"), dict)
        and not config_lib.differences(config_lib.flatten(old["dataset"], "data."),
                                       config_lib.flatten(new["dataset"], "data."))):
      # Data keys flowjax added after the cache was written, at their defaults, change nothing.
      new["dataset"] = old["dataset"]
    if (isinstance(old.get("text"), dict) and isinstance(new.get("text"), dict)
        and "fingerprint" not in old["text"]):
      # Written before caches recorded their encoder's fingerprint.
      new["text"] = {k: v for k, v in new["text"].items() if k != "fingerprint"}
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
      raise ValueError(
          f"{path} was written with other settings ({', '.join(diff)} differ: "
          f"{ {k: old.get(k) for k in diff} } vs { {k: new.get(k) for k in diff} }); use a new "
          "--out, or delete that split's directory to re-encode it.")
    return
  _write_json(path, spec)


def _write_json(path: str, tree) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(_jsonable(tree), f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _write_shard(path: str, latent_rows: np.ndarray, labels: np.ndarray,
                 feature_rows: np.ndarray | None, text_rows: np.ndarray | None = None) -> None:
  from array_record.python.array_record_module import ArrayRecordWriter
  tmp = path + ".tmp"
  writer = ArrayRecordWriter(tmp, "group_size:1")
  for index, (latent, label) in enumerate(zip(latent_rows, labels)):
    features = None if feature_rows is None else feature_rows[index]
    text = None if text_rows is None else text_rows[index]
    writer.write(latents.encode_record(latent, int(label), features, text))
  writer.close()
  os.replace(tmp, path)


def _write_bytes_atomically(path: str, content: bytes) -> None:
  with open(path + ".tmp", "wb") as f:
    f.write(content)
  os.replace(path + ".tmp", path)


def _statistics(paths: list[str], latent_shape: tuple[int, ...]) -> dict[str, Any]:
  """Per-channel mean and std (float64 sums) of every latent in the shards."""
  import grain
  records = grain.sources.ArrayRecordDataSource(paths)
  channels = latent_shape[-1]
  total, total_sq, count = np.zeros(channels), np.zeros(channels), 0
  for index in range(len(records)):
    latent, _ = latents.decode_record(records[index], latent_shape)
    values = latent.reshape(-1, channels).astype(np.float64)
    total += values.sum(0)
    total_sq += np.square(values).sum(0)
    count += values.shape[0]
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
  return {"channel_mean": mean.tolist(), "channel_std": std.tolist(), "num_examples": len(records),
          "values_per_channel": count}


def cache(config: ml_collections.ConfigDict, out: str, *, weights: str, split: str = "train",
          batch_size: int = 0, shard_size: int = 1024, posterior: str = "mean", seed: int = 0,
          repa_encoder: str = "", repa_encoder_path: str = "", repa_encoder_resolution: int = 224,
          devices=None) -> dict[str, Any]:
  """Encodes `split` of config.data with the autoencoder of config.model into `out`/`split`.

  Args:
    config: an experiment config with model.name='autoencoder'.
    out: the latent dataset directory (data.name='latents:<out>').
    weights: flowjax workdir, diffusers .safetensors file, or a folder with one.
    split: the split to encode ('train', 'test', or a TFDS split).
    batch_size: global batch per encode call; 0 = config.train.batch_size.
    shard_size: examples per shard; a multiple of batch_size.
    posterior: 'mean' or 'sample' (one draw per image, keyed by `seed` and batch index).
    seed: see posterior.
    repa_encoder: '' (no REPA features), or a REPA encoder name (flowjax.objectives.repa
      ENCODERS: 'digits', 'dinov2') whose patch tokens of each image are stored with its latent.
    repa_encoder_path: the encoder's weights, as config.repa.encoder_path.
    repa_encoder_resolution: the encoder's input side, as config.repa.encoder_resolution.
    devices: devices of the mesh (default all).

  Returns:
    {'written': shard indices encoded now, 'skipped': shards that existed, 'num_shards': N,
     'stats': the per-channel statistics}.
  """
  storage.check_local_output(out, "--out", "latents:")
  if config.model.name != "autoencoder":
    raise ValueError(f"--config must train an autoencoder (model.name='autoencoder'); it has "
                     f"model.name={config.model.name!r}. Use e.g. experiments/"
                     "autoencoder_digits.py.")
  if posterior not in POSTERIORS:
    raise ValueError(f"--posterior={posterior!r}; use one of {POSTERIORS}.")
  batch_size = batch_size or config.train.batch_size
  if shard_size <= 0 or shard_size % batch_size:
    raise ValueError(f"--shard_size={shard_size} must be a positive multiple of the batch size "
                     f"{batch_size} (--batch_size or train.batch_size).")
  data_config = ml_collections.ConfigDict(config.data.to_dict())
  data_config.random_flip = False
  text_settings = captions.settings(data_config)
  if text_settings.enabled:  # the captions are encoded here, batch by batch, not by the source
    split_captions = data.split_captions(data_config, split)
    data_config.text.encoder = ""
  data_config.conditional = True  # keep the labels of a labelled dataset
  try:
    info = data.data_info(data_config, split)
  except ValueError:  # a dataset without labels
    data_config.conditional = False
    info = data.data_info(data_config, split)
  if info.num_examples is None:
    raise ValueError(f"data.name={data_config.name!r} is an infinite stream; latents can only "
                     "be cached for a finite dataset.")
  mesh = sharding.make_mesh(config.mesh, devices)
  batch_sharding = sharding.batch_sharding(mesh)
  model = models.build(config.model, info)
  params = jax.device_put(autoencoder.load_params(weights, model, info.image_shape),
                          sharding.replicated(mesh))
  repa_encoder_found, repa_spec = None, None
  if repa_encoder:
    repa_encoder_found, repa_spec = _repa_encoder(repa_encoder, repa_encoder_path,
                                                  repa_encoder_resolution, info.image_shape)
    repa_params = jax.device_put(repa_encoder_found.host_params, sharding.replicated(mesh))

  text_encoder, text_spec = None, None
  if text_settings.enabled:
    text_encoder = text_lib.encoder_of(text_settings)
    text_spec = {"settings": dataclasses.asdict(text_settings),
                 "fingerprint": text_lib.encoder_fingerprint(text_settings),
                 "feature_shape": [text_encoder.max_length, text_encoder.dim],
                 "dtype": "float16", "prompts": list(captions.first_distinct(split_captions))}

  num_shards = -(-info.num_examples // shard_size)
  split_dir = os.path.join(out, split)
  os.makedirs(split_dir, exist_ok=True)
  spec = _spec(config, data_config, info, model, weights=weights, split=split,
               shard_size=shard_size, num_shards=num_shards, posterior=posterior, seed=seed,
               repa_spec=repa_spec, text_spec=text_spec)
  is_host0 = jax.process_index() == 0
  if is_host0:
    _check_or_write_spec(os.path.join(split_dir, latents.SPEC_FILE), spec)
    if text_encoder is not None:
      buffer = io.BytesIO()
      np.savez(buffer, null=text_encoder.null(),
               prompts=text_encoder.encode(text_spec["prompts"]))
      _write_bytes_atomically(os.path.join(split_dir, latents.TEXT_FILE), buffer.getvalue())

  sample_key = jax.random.key(seed)

  def encode(params, images, index):
    mean, logvar = model.apply({"params": params}, images, method=model.encode)
    if posterior == "mean":
      return mean
    noise = jax.random.normal(jax.random.fold_in(sample_key, index), mean.shape, mean.dtype)
    return mean + jax.numpy.exp(0.5 * logvar) * noise

  encode = jax.jit(encode, out_shardings=batch_sharding)

  def repa_features(params, images):
    tokens = repa_encoder_found.tokens(params, images)
    return tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]).astype(jax.numpy.float16)

  repa_features = jax.jit(repa_features, out_shardings=batch_sharding)
  batches = data.build(data_config, split=split, global_batch_size=batch_size, seed=0,
                       sharding=batch_sharding, shuffle=False)
  batches_per_shard = shard_size // batch_size
  paths = [latents.shard_path(out, split, s, num_shards) for s in range(num_shards)]
  written, skipped = [], []
  for shard, path in enumerate(paths):
    if os.path.isfile(path):
      skipped.append(shard)
      continue
    first_batch = shard * batches_per_shard
    state = batches.get_state()
    if state["next_batch"] != first_batch:
      batches.set_state(dict(state, next_batch=first_batch))
    latent_rows, labels, feature_rows, text_rows = [], [], [], []
    for index in range(first_batch, first_batch + batches_per_shard):
      valid = min(batch_size, info.num_examples - index * batch_size)
      if valid <= 0:
        break
      batch = next(batches)
      encoded = encode(params, batch["image"], np.int32(index))
      latent_rows.append(np.asarray(jax.device_get(_gather(encoded)))[:valid])
      if repa_encoder_found is not None:
        tokens = np.asarray(jax.device_get(_gather(repa_features(repa_params, batch["image"]))))
        if not np.all(np.isfinite(tokens[:valid])):
          raise ValueError(f"The {repa_encoder} features of batch {index} are not finite in "
                           "float16 (beyond its range of 65504, or NaN); check the encoder "
                           "weights --repa_encoder_path.")
        feature_rows.append(tokens[:valid])
      if text_encoder is not None and is_host0:  # only process 0 writes the records
        start = index * batch_size
        features = text_encoder.encode(split_captions[start:start + valid]).astype(np.float16)
        if not np.all(np.isfinite(features)):
          raise ValueError(f"The caption features of batch {index} are not finite in float16 "
                           "(beyond its range of 65504, or NaN); check the text encoder "
                           f"(data.text: {text_settings}).")
        text_rows.append(features)
      if "label" in batch:
        labels.append(np.asarray(jax.device_get(_gather(batch["label"])))[:valid])
      else:
        labels.append(np.full(valid, latents.NO_LABEL, np.int32))
    if is_host0:
      _write_shard(path, np.concatenate(latent_rows), np.concatenate(labels),
                   np.concatenate(feature_rows) if feature_rows else None,
                   np.concatenate(text_rows) if text_rows else None)
    written.append(shard)
    logging.info("Wrote latent shard %d of %d: %s", shard + 1, num_shards, path)
  batches.close()

  _barrier("flowjax_cache_latents_shards")
  stats_path = os.path.join(split_dir, latents.STATS_FILE)
  if is_host0:
    stats = _statistics(paths, tuple(spec["latent_shape"]))
    _write_json(stats_path, stats)
  _barrier("flowjax_cache_latents_stats")
  with open(stats_path) as f:
    stats = json.load(f)
  return {"written": written, "skipped": skipped, "num_shards": num_shards, "stats": stats}


def _gather(array: jax.Array) -> jax.Array:
  """The whole of a batch-sharded array on every process."""
  if jax.process_count() == 1:
    return array
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(array, tiled=True)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def main(argv):
  del argv
  from absl import flags
  from flowjax import metrics
  metrics.quiet_libraries()
  values = flags.FLAGS
  try:
    result = cache(values.config, values.out, weights=values.weights, split=values.split,
                   batch_size=values.batch_size, shard_size=values.shard_size,
                   posterior=values.posterior, seed=values.seed,
                   repa_encoder=values.repa_encoder, repa_encoder_path=values.repa_encoder_path,
                   repa_encoder_resolution=values.repa_encoder_resolution)
  except (ValueError, FileNotFoundError) as error:
    logging.error("%s: %s", type(error).__name__, error)
    sys.exit(1)
  logging.info("%s/%s: wrote shards %s, skipped %s (already written); channel mean %s, std %s.",
               values.out, values.split, result["written"], result["skipped"],
               np.round(result["stats"]["channel_mean"], 4).tolist(),
               np.round(result["stats"]["channel_std"], 4).tolist())


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Autoencoder experiment config file.",
                                  lock_config=True)
  flags.DEFINE_string("weights", None, "flowjax workdir, diffusers .safetensors, or its folder.")
  flags.DEFINE_string("out", None, "Latent dataset directory (data.name='latents:<out>').")
  flags.DEFINE_string("split", "train", "Split of config.data to encode.")
  flags.DEFINE_integer("batch_size", 0, "Global batch per encode call (0: train.batch_size).")
  flags.DEFINE_integer("shard_size", 1024, "Examples per shard (a multiple of the batch size).")
  flags.DEFINE_enum("posterior", "mean", list(POSTERIORS), "Posterior mean or a seeded sample.")
  flags.DEFINE_integer("seed", 0, "Seed of --posterior=sample.")
  flags.DEFINE_string("repa_encoder", "", "REPA encoder (digits, dinov2) whose patch tokens of "
                      "each image are stored with its latent, for repa.features='cached'; '' = "
                      "none.")
  flags.DEFINE_string("repa_encoder_path", "", "Its weights, as config.repa.encoder_path (the "
                      "DINOv2 checkpoint; '' = the committed digits classifier).")
  flags.DEFINE_integer("repa_encoder_resolution", 224, "Its input side, as "
                       "config.repa.encoder_resolution (DINOv2).")
  flags.mark_flags_as_required(["config", "weights", "out"])
  app.run(main)

