"""Latent datasets written by `python -m flowjax.data.cache_latents`, served as data.name
'latents:<DIR>', and decoding latents back to images.

Layout of DIR, per split:
  <split>/cache.json          what was encoded and how: dataset, autoencoder (model config,
                              weights path, scaling_factor), latent_shape, num_examples,
                              shard_size, posterior ('mean' or 'sample' with its seed), repa
                              (null, or the REPA features stored with each latent: encoder,
                              encoder_path, encoder_resolution, grid [h', w'], feature_shape
                              [N, D] with N = h' w', dtype 'float16');
  <split>/latents-SSSSS-of-NNNNN.array_record
                              shard S holds examples [S shard_size, (S + 1) shard_size) of the
                              split in source order; one record per example: the unscaled
                              latent [h, w, c] as float32 bytes, then the label as int32 (-1 if
                              the dataset has none), then with repa the encoder's patch tokens
                              [N, D] of the same image as float16 bytes, then with text the
                              caption's features [T, D] as float16 bytes;
  <split>/text_features.npz   with text: the null caption's features 'null' [T, D] and those of
                              the split's first distinct captions 'prompts' [K, T, D] (float32);
  <split>/stats.json          per-channel mean and std of the unscaled latents; written last, so
                              its presence marks a complete split.

REPA features (`cache_latents --repa_encoder=...`) are the patch tokens of a frozen encoder of
flowjax.objectives.repa (ENCODERS) applied to the image the latent encodes, so that REPA
(repa.features='cached') trains on latents, whose train step never sees pixels. REPA's official
code keeps the raw images beside the latents (sihyun-yu/REPA: `dataset.py`) and runs DINOv2 on
them in every step (`train.py`); storing the features once instead is flowjax's choice: no
encoder and no images in the train step, at 2 N D bytes per image (DINOv2-B at 224: 256 x 768
float16, 384 KiB, against 16 KiB for a 32 x 32 x 4 float32 latent; 0.5 TB for ImageNet's 1.28M
training images).

Captions (`cache_latents` of a captioned dataset with data.text.encoder set): each record holds
its caption's text-encoder features, computed batch by batch while caching, so that neither the
cache nor training holds the encoder; cache.json's "text" names the encoder settings, the feature
shape and the sample prompts. Training on the cache with data.text set to the same settings serves
them as 'text' (float16); the settings must match, since prompts at sampling time are encoded
with them.

The source serves {'image': scaled latent [h, w, c] float32, 'label': int32[, 'repa_features':
[N, D] float16][, 'text': [T, D] float16]} through the shared pipeline (same global order and
per-process slices as every other source). The scaling is config.data.latent_scaling: 'channel'
standardises each channel with the statistics of the 'train' split (of the split itself if no
train split is cached), 'factor' multiplies by the autoencoder's scaling_factor (0.18215 for the
SD-VAE), 'none' serves the raw latents. The REPA features are served whenever the cache holds
them.

`decode(latents, data_config)` inverts the scaling and runs the autoencoder's decoder;
`python -m flowjax.data.latents --workdir=W` decodes W/samples/final.npz (written by
`flowjax.main --mode=sample`) into W/samples/final_decoded.png and .npz.
"""

import dataclasses
import functools
import io
import os
from typing import Any, Callable

import numpy as np

from flowjax import storage
from flowjax.data import pipeline

CAPTIONED = True

PREFIX = "latents:"
FORMAT = "flowjax-latents-1"
SPEC_FILE = "cache.json"
STATS_FILE = "stats.json"
SCALINGS = ("channel", "factor", "none")
NO_LABEL = -1
REPA_KEY = "repa_features"
REPA_DTYPE = "<f2"
TEXT_KEY = "text"
TEXT_DTYPE = "<f2"
TEXT_FILE = "text_features.npz"


def directory(name: str) -> str:
  """'latents:<DIR>' -> DIR (local, or on object storage: gs://...)."""
  if not name.startswith(PREFIX) or len(name) == len(PREFIX):
    raise ValueError(f"data.name={name!r} is not a latent dataset; use 'latents:<DIR>' with DIR "
                     "written by python -m flowjax.data.cache_latents.")
  return name[len(PREFIX):]


def shard_path(root: str, split: str, index: int, num_shards: int) -> str:
  return storage.join(root, split, f"latents-{index:05d}-of-{num_shards:05d}.array_record")


def encode_record(latent: np.ndarray, label: int, features: np.ndarray | None = None,
                  text: np.ndarray | None = None) -> bytes:
  """One example as bytes: latent [h, w, c] float32 (C order), then label int32, then the REPA
  features [N, D] float16 and the caption features [T, D] float16 when given."""
  record = np.ascontiguousarray(latent, "<f4").tobytes() + np.asarray(label, "<i4").tobytes()
  if features is not None:
    record += np.ascontiguousarray(features, REPA_DTYPE).tobytes()
  if text is not None:
    record += np.ascontiguousarray(text, TEXT_DTYPE).tobytes()
  return record


def decode_record(record: bytes, latent_shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
  """Inverse of encode_record: (latent [h, w, c] float32, label int)."""
  values = np.frombuffer(record, "<f4", count=int(np.prod(latent_shape)))
  label = int(np.frombuffer(record, "<i4", offset=4 * values.size, count=1)[0])
  return values.reshape(latent_shape), label


def decode_features(record: bytes, latent_shape: tuple[int, ...],
                    feature_shape: tuple[int, ...]) -> np.ndarray:
  """The REPA features [N, D] float16 of a record written with them."""
  offset = 4 * (int(np.prod(latent_shape)) + 1)
  return np.frombuffer(record, REPA_DTYPE, count=int(np.prod(feature_shape)),
                       offset=offset).reshape(feature_shape)


def repa_command(split: str, encoder: str = "", encoder_path: str = "",
                 encoder_resolution: int = 224) -> str:
  """The cache_latents command that writes `split` with the REPA features of `encoder` ('' =
  either encoder), into a new directory (a cache rejects other settings)."""
  command = (f"python -m flowjax.data.cache_latents --config=<autoencoder experiment> "
             f"--weights=<weights> --split={split} --out=<new directory> "
             f"--repa_encoder={encoder or '<digits|dinov2>'}")
  path = encoder_path or ("" if encoder == "digits" else "<DINOv2 checkpoint>")
  if path:
    command += f" --repa_encoder_path={path}"
  if encoder_resolution != 224:
    command += f" --repa_encoder_resolution={encoder_resolution}"
  return command


def read_split(root: str, split: str) -> tuple[dict, dict]:
  """(cache.json, stats.json) of a complete cached split; a clear error otherwise."""
  spec_path = storage.join(root, split, SPEC_FILE)
  command = (f"python -m flowjax.data.cache_latents --config=<autoencoder experiment> "
             f"--weights=<weights> --split={split} --out={root}")
  if not storage.exists(spec_path):
    raise FileNotFoundError(f"No cached latents for split {split!r} in {root} ({spec_path} is "
                            f"missing); write them with: {command}")
  stats_path = storage.join(root, split, STATS_FILE)
  if not storage.exists(stats_path):
    raise FileNotFoundError(f"The latents of split {split!r} in {root} are incomplete (no "
                            f"{STATS_FILE}); rerun the same command to finish them: {command}")
  spec = pipeline.read_json(spec_path)
  if spec.get("format") != FORMAT:
    raise ValueError(f"{spec_path} has format {spec.get('format')!r}, not {FORMAT!r}; rewrite "
                     f"the cache with: {command}")
  return spec, pipeline.read_json(stats_path)


def scaling_of(root: str, split: str, scaling: str) -> tuple[np.ndarray, np.ndarray]:
  """(offset, multiplier), each [c] float32: scaled latent = (latent - offset) * multiplier."""
  if scaling not in SCALINGS:
    raise ValueError(f"data.latent_scaling={scaling!r}; use one of {SCALINGS}.")
  spec, stats = read_split(root, split)
  channels = spec["latent_shape"][-1]
  if scaling == "none":
    return np.zeros(channels, np.float32), np.ones(channels, np.float32)
  if scaling == "factor":
    factor = float(spec["autoencoder"]["scaling_factor"])
    return np.zeros(channels, np.float32), np.full(channels, factor, np.float32)
  if split != "train" and storage.exists(storage.join(root, "train", STATS_FILE)):
    _, stats = read_split(root, "train")
  std = np.asarray(stats["channel_std"], np.float32)
  if np.any(std <= 0):
    raise ValueError(f"The cached latents in {root} have a channel with zero std {std.tolist()}; "
                     "use data.latent_scaling='factor' or 'none'.")
  return np.asarray(stats["channel_mean"], np.float32), 1.0 / std


@dataclasses.dataclass(frozen=True, eq=False)
class _Source(pipeline.ArrayRecordSource):
  """A cached split: i -> {'image': [h, w, c] float32 scaled, 'label': int[, 'repa_features':
  [N, D] float16]}."""
  latent_shape: tuple[int, ...] = ()
  offset: np.ndarray | float = 0.0
  multiplier: np.ndarray | float = 1.0
  feature_shape: tuple[int, ...] | None = None
  text_shape: tuple[int, ...] | None = None
  serve_text: bool = False

  def decode(self, records: list[bytes]) -> list[dict[str, Any]]:
    size = int(np.prod(self.latent_shape))
    features = 0 if self.feature_shape is None else int(np.prod(self.feature_shape))
    text = 0 if self.text_shape is None else int(np.prod(self.text_shape))
    rows = np.frombuffer(b"".join(records), np.uint8).reshape(
        len(records), 4 * (size + 1) + 2 * features + 2 * text)
    latents = rows[:, :4 * size].view("<f4").reshape((len(records),) + self.latent_shape)
    images = (latents - self.offset) * self.multiplier
    labels = rows[:, 4 * size:4 * (size + 1)].view("<i4")[:, 0]
    examples = [{"image": image, "label": int(label)} for image, label in zip(images, labels)]
    start = 4 * (size + 1)
    if self.feature_shape is not None:
      tokens = rows[:, start:start + 2 * features].view(REPA_DTYPE).reshape(
          (len(records),) + self.feature_shape)
      for example, row in zip(examples, tokens):
        example[REPA_KEY] = row
    if self.serve_text:
      captions = rows[:, start + 2 * features:].view(TEXT_DTYPE).reshape(
          (len(records),) + self.text_shape)
      for example, row in zip(examples, captions):
        example[TEXT_KEY] = row
    return examples


def info(data_config, split: str) -> pipeline.DataInfo:
  """A cached split: image_shape = latent shape (h, w, c); labels when data.conditional; the
  extra array 'repa_features' [N, D] float16 when the cache holds REPA features, and 'text'
  [T, D] float16 with `DataInfo.text` when data.text is set (the cache's caption encoder)."""
  root = directory(data_config.name)
  spec, _ = read_split(root, split)
  num_classes = int(spec["num_classes"])
  if data_config.conditional and num_classes == 0:
    raise ValueError(f"data.conditional=True but the latents in {directory(data_config.name)} "
                     "were cached without labels; set data.conditional=False.")
  repa = spec.get("repa")
  extra = () if repa is None else ((REPA_KEY, tuple(repa["feature_shape"]), repa["dtype"]),)
  text = _text_source(data_config, root, split, spec)
  if text is not None:
    extra += ((TEXT_KEY, text.shape, "float16"),)
  return pipeline.DataInfo(image_shape=tuple(spec["latent_shape"]),
                           num_classes=num_classes if data_config.conditional else 0,
                           num_examples=int(spec["num_examples"]), extra_arrays=extra, text=text)


def _text_source(data_config, root: str, split: str, spec: dict):
  """The cache's TextSource when data.text is set (None when it is not); an error naming the fix
  when the cache has no captions or holds another encoder's."""
  from flowjax import text as text_lib
  from flowjax.data import captions
  wanted = captions.settings(data_config)
  cached = spec.get("text")
  if not wanted.enabled:
    return None
  if cached is None:
    raise ValueError(f"data.text.encoder={wanted.encoder!r} but the latents in {root} were "
                     "cached without captions; cache a captioned dataset with data.text set "
                     "(python -m flowjax.data.cache_latents ...), or set data.text.encoder=''.")
  settings = text_lib.TextSettings(**cached["settings"])
  differing = [f"data.text.{k}: cache {getattr(settings, k)!r}, config {getattr(wanted, k)!r}"
               for k in sorted(set(settings.feature_keys()) | set(wanted.feature_keys()))
               if getattr(settings, k) != getattr(wanted, k)]
  if differing:
    raise ValueError(f"The captions in {root} were encoded with other data.text settings ("
                     + "; ".join(differing) + "); set data.text to the cache's.")
  if wanted.path and wanted.encoder != "words":
    width = text_lib.feature_dim(wanted)
    if width != int(cached["feature_shape"][1]):
      raise ValueError(f"data.text.path={wanted.path!r} is a {wanted.encoder} encoder of width "
                       f"{width}, but the captions in {root} are {cached['feature_shape'][1]} "
                       "wide: another encoder's; point data.text.path at the one the cache was "
                       "written with.")
    # A cache written before it recorded its encoder's fingerprint is not checked.
    if cached.get("fingerprint") and text_lib.encoder_fingerprint(wanted) != cached["fingerprint"]:
      raise ValueError(f"data.text.path={wanted.path!r} holds other files than the encoder the "
                       f"captions in {root} were encoded with (another checkpoint or tokenizer "
                       "of the same width): point data.text.path at that one, or cache the "
                       "latents again with this encoder.")
  return captions.TextSource(wanted, tuple(cached["prompts"]),
                             int(cached["feature_shape"][1]),
                             features_file=storage.join(root, split, TEXT_FILE))


def local_batches(data_config, *, split: str, seed: int, global_batch_size: int,
                  rows: tuple[int, int],
                  shuffle: bool) -> tuple[pipeline.DataInfo, pipeline.LocalBatchFn]:
  """The split's DataInfo and k -> this process's rows of global batch k.

  Rows: {'image': [n, h, w, c] float32 scaled latents, 'label': [n] int32 if conditional,
  'repa_features': [n, N, D] float16 if the cache holds them}.
  """
  if data_config.random_flip:
    raise ValueError("data.random_flip=True is not supported for cached latents (a flipped "
                     "latent is not the latent of the flipped image); set it to False.")
  data_info = info(data_config, split)
  root = directory(data_config.name)
  spec, _ = read_split(root, split)
  offset, multiplier = scaling_of(root, split, data_config.get("latent_scaling", "channel"))
  num_shards = int(spec["num_shards"])
  features = data_info.extra_array(REPA_KEY)
  text = spec.get("text")
  source = _Source(tuple(shard_path(root, split, s, num_shards) for s in range(num_shards)),
                   data_info.image_shape, offset, multiplier,
                   None if features is None else features[0],
                   None if text is None else tuple(text["feature_shape"]),
                   serve_text=data_info.text is not None)
  if len(source) != data_info.num_examples:
    raise ValueError(f"The shards of split {split!r} in {root} hold {len(source)} examples but "
                     f"{SPEC_FILE} says {data_info.num_examples}; rerun cache_latents into a new "
                     "directory.")
  transform = pipeline.ExampleTransform(seed=seed, random_flip=False,
                                        with_labels=data_info.num_classes > 0,
                                        extra_keys=tuple(
                                            key for key, _, _ in data_info.extra_arrays))
  examples = pipeline.example_stream(source, transform, seed=seed, shuffle=shuffle)
  return data_info, pipeline.ExampleBatch(examples, global_batch_size, rows)


def decoder(data_config, split: str = "train") -> Callable:
  """A map from scaled latents [B, h, w, c] to images [B, H, W, C] float32 in [-1, 1].

  The autoencoder (model config and weights path) is the one recorded in the cache of
  data_config.name; the scaling is data_config.latent_scaling. The weights are read and the
  decoder compiled once per cache, split and scaling in a process; the weights are an argument of
  the compiled function, not constants baked into it.
  """
  spec_file = storage.join(directory(data_config.name), split, SPEC_FILE)
  # The cache key of a rewritten cache changes: its spec's time (local) or text (object storage).
  if storage.is_remote(spec_file):
    written = storage.read_text(spec_file) if storage.exists(spec_file) else None
  else:
    written = os.path.getmtime(spec_file) if os.path.exists(spec_file) else None
  return _decoder(data_config.name, split, data_config.get("latent_scaling", "channel"), written)


@functools.lru_cache(maxsize=4)
def _decoder(name: str, split: str, scaling: str, written) -> Callable:
  """`decoder` for a cache whose spec file was written at time `written` (a new cache, new key)."""
  del written
  import jax
  import ml_collections

  from flowjax import models
  from flowjax.models import autoencoder

  root = directory(name)
  spec, _ = read_split(root, split)
  offset, multiplier = scaling_of(root, split, scaling)
  image_shape = tuple(spec["image_shape"])
  model_info = pipeline.DataInfo(image_shape=image_shape, num_classes=0, num_examples=None)
  model = models.build(ml_collections.ConfigDict(spec["autoencoder"]["model"]), model_info)
  params = autoencoder.load_params(spec["autoencoder"]["weights"], model, image_shape)

  @jax.jit
  def decode_fn(params, offset, multiplier, latents):
    z = latents / multiplier + offset
    return model.apply({"params": params}, z, method=model.decode)

  return lambda latents: decode_fn(params, offset, multiplier, latents)


def image_decoder(data_config) -> Callable:
  """The data-source hook for sample grids (flowjax.data.image_decoder): `decoder`."""
  return decoder(data_config)


def decode(latents, data_config, split: str = "train") -> np.ndarray:
  """Scaled latents [B, h, w, c] -> images [B, H, W, C] float32 (see `decoder`)."""
  return np.asarray(decoder(data_config, split)(np.asarray(latents, np.float32)))


def decode_workdir_samples(workdir: str, name: str = "final") -> str:
  """Decodes workdir/samples/<name>.npz of a latent-space run; returns the PNG path written."""
  import ml_collections

  from flowjax import metrics
  config = pipeline.read_json(storage.join(workdir, "config.json"))
  data_config = ml_collections.ConfigDict(config["data"])
  if not str(data_config.name).startswith(PREFIX):
    raise ValueError(f"{workdir} trained on data.name={data_config.name!r}, not on cached "
                     "latents; its samples are images already.")
  samples_path = storage.join(workdir, "samples", f"{name}.npz")
  if not storage.exists(samples_path):
    raise FileNotFoundError(f"No {samples_path}; write it with python -m flowjax.main "
                            f"--config=... --workdir={workdir} --mode=sample")
  with np.load(io.BytesIO(storage.read_bytes(samples_path))) as stored:
    images = decode(stored["samples"], data_config)
  buffer = io.BytesIO()
  np.savez(buffer, samples=images)
  storage.write_bytes(storage.join(workdir, "samples", f"{name}_decoded.npz"), buffer.getvalue())
  png = storage.join(workdir, "samples", f"{name}_decoded.png")
  metrics.save_png(png, metrics.samples_picture(images))
  return png


def main(argv):
  del argv
  from absl import flags, logging
  png = decode_workdir_samples(flags.FLAGS.workdir, flags.FLAGS.samples)
  logging.info("Wrote %s", png)


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "Workdir of a run on data.name='latents:<DIR>'.")
  flags.DEFINE_string("samples", "final", "Name of the samples .npz in workdir/samples.")
  flags.mark_flag_as_required("workdir")
  app.run(main)
