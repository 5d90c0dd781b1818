"""A feature extractor that needs no downloaded weights: a small CNN trained on the config's own
labelled training split, whose penultimate features replace the FID Inception's for FID and
precision and recall (eval.feature_extractor='classifier').

Train it once per dataset; the file is the feature space, so reference statistics and every
evaluation must use the same file:

  python -m flowjax.evals.classifier --config=experiments/quickstart.py \
      --config.data.name=arrays:/data/mnist.npz --config.data.image_size=28 \
      --out=mnist_classifier.npz [--steps=2000] [--seed=0] [--batch_size=128]

Data without labels (a flat folder, an .npy file) cannot train it: the file then holds the
network at its seeded random initialisation, a fixed random embedding (random networks as
feature extractors for data unlike ImageNet: Naeem et al., arXiv:2002.09797, Section 5);
--steps=0 asks for the random network on labelled data too.

FID and precision/recall in these features compare runs on the same data (with the same file);
they are not comparable to published FIDs, which are measured in Inception features.
"""

import argparse
import dataclasses
import functools
import math
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from flowjax.evals import fid
from flowjax.evals.fid import AssetError

NUM_FEATURES = 128
TRAIN_STEPS = 2000
BATCH_SIZE = 128
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4
MIN_SPATIAL = 4
WIDTHS = (32, 64, 128, 128, 256, 256, 256)
TRAIN_COMMAND = "python -m flowjax.evals.classifier --config=EXPERIMENT.py --out=CLASSIFIER.npz"
_PARAMS_PREFIX = "params/"
_ACCURACY_BATCHES = 50


def num_downsamples(image_shape) -> int:
  """Stride-2 stages that bring min(H, W) to MIN_SPATIAL or below (at least 1)."""
  return max(1, math.ceil(math.log2(max(1, min(image_shape[:2])) / MIN_SPATIAL)))


class FeatureCNN(nn.Module):
  """images [B, H, W, C] in [-1, 1] -> features [B, NUM_FEATURES] (and logits [B, K]).

  conv 3x3 (32) -> `downsamples` convs 3x3 stride 2 (64, 128, 128, 256, ...) -> mean over
  positions -> dense (NUM_FEATURES, the feature layer) -> dense (num_classes, the head; absent
  when num_classes = 0), GELU between.
  """
  num_classes: int
  downsamples: int

  def setup(self):
    widths = [WIDTHS[min(i, len(WIDTHS) - 1)] for i in range(self.downsamples + 1)]
    self.stem = nn.Conv(widths[0], (3, 3))
    self.stages = [nn.Conv(width, (3, 3), strides=2) for width in widths[1:]]
    self.hidden = nn.Dense(NUM_FEATURES)
    if self.num_classes:
      self.head = nn.Dense(self.num_classes)

  def features(self, images: jax.Array) -> jax.Array:
    """images: [B, H, W, C]. Returns the penultimate layer [B, NUM_FEATURES]."""
    h = nn.gelu(self.stem(images))
    for stage in self.stages:
      h = nn.gelu(stage(h))
    return nn.gelu(self.hidden(jnp.mean(h, axis=(1, 2))))

  def __call__(self, images: jax.Array) -> tuple[jax.Array, ...]:
    """images: [B, H, W, C]. Returns (features [B, NUM_FEATURES], logits [B, num_classes]), or
    (features,) without a head."""
    features = self.features(images)
    return (features, self.head(features)) if self.num_classes else (features,)


def _model(image_shape, num_classes: int) -> FeatureCNN:
  return FeatureCNN(num_classes=int(num_classes), downsamples=num_downsamples(image_shape))


def _abstract_params(image_shape, num_classes: int) -> dict:
  dummy = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return jax.eval_shape(_model(image_shape, num_classes).init, jax.random.key(0),
                        dummy)["params"]


@functools.cache
def _forward_fn(image_shape: tuple, num_classes: int, mesh):
  """jitted (params, images [B, H, W, C]) -> (features [B, F], [logits [B, K]]), batch sharded
  over `mesh`."""
  from flowjax import sharding
  model = _model(image_shape, num_classes)
  return jax.jit(lambda params, images: model.apply({"params": params}, images),
                 in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


@dataclasses.dataclass(frozen=True, eq=False)
class Classifier:
  """The loaded network on a mesh, a feature extractor like fid.Inception. Build it with `load`.

  image_shape: (H, W, C) of the images it was made for; num_classes: 0 for the untrained random
  network; steps: training steps (0: random); accuracy: on `accuracy_split` (NaN: not
  measured); digest: fid.params_digest of its parameters; batch_size: images per compiled call.
  """
  params: dict
  image_shape: tuple
  num_classes: int
  steps: int
  accuracy: float
  accuracy_split: str
  digest: str
  batch_size: int
  mesh: object
  path: str = ""
  name = "classifier"
  num_features = NUM_FEATURES

  @property
  def batch_sharding(self):
    from flowjax import sharding
    return sharding.batch_sharding(self.mesh)

  def features_and_logits(self, images) -> tuple[np.ndarray, np.ndarray | None]:
    """images: [N, H, W, C] in [-1, 1] of image_shape (a host array or a global batch sharded like
    batch_sharding). Returns (features [N, NUM_FEATURES], logits [N, num_classes] or None)."""
    if tuple(images.shape[1:]) != self.image_shape:
      raise AssetError(f"The classifier {self.path} was made for images of shape "
                       f"{self.image_shape}; these are {tuple(images.shape[1:])}. Train one on "
                       f"this data (and data.image_size) with `{TRAIN_COMMAND}`.")
    images = images if isinstance(images, jax.Array) else np.clip(images, -1.0, 1.0)
    outputs = fid.batched_outputs(_forward_fn(self.image_shape, self.num_classes, self.mesh),
                                  self.params, images, self.batch_size, self.batch_sharding)
    return outputs[0], outputs[1] if self.num_classes else None


def train_command(config, out: str) -> str:
  """The command that trains the classifier file `out` on this config's data."""
  return (f"python -m flowjax.evals.classifier --config=EXPERIMENT.py "
          f"--config.data.name={config.data.name} --config.data.image_size="
          f"{config.data.image_size} --out={out}")


def load(path: str, *, image_shape=None, mesh=None, batch_size: int = 64,
         fix: str | None = None) -> Classifier:
  """The classifier in `path` (written by `save`) on `mesh` (default: data-parallel over all
  devices); image_shape, when given, must be the one it was made for. Raises AssetError naming
  the file and `fix` (default: the general training command) when the file is missing, damaged
  or made for other images."""
  from flowjax import sharding
  fix = fix or f"train it with `{TRAIN_COMMAND.replace('CLASSIFIER.npz', path)}`"
  arrays = fid.read_npz(path, "classifier weight file", fix)
  for key in ("image_shape", "num_classes", "steps"):
    if key not in arrays:
      raise AssetError(f"The classifier weight file {path} has no entry {key!r}: it was not "
                       f"written by flowjax.evals.classifier; {fix}.")
  stored_shape = tuple(int(n) for n in arrays["image_shape"])
  num_classes = int(arrays["num_classes"])
  if len(stored_shape) != 3 or min(stored_shape) < 1 or num_classes < 0:
    raise AssetError(f"The classifier weight file {path} has image_shape {stored_shape} and "
                     f"num_classes {num_classes}; {fix}.")
  if image_shape is not None and tuple(image_shape) != stored_shape:
    raise AssetError(f"The classifier weight file {path} was made for images of shape "
                     f"{stored_shape}, but the data are {tuple(image_shape)}; {fix}.")
  expected = {_PARAMS_PREFIX + key: tuple(leaf.shape) for key, leaf in traverse_util.flatten_dict(
      _abstract_params(stored_shape, num_classes), sep="/").items()}
  found = {key: tuple(value.shape) for key, value in arrays.items()
           if key.startswith(_PARAMS_PREFIX)}
  if found != expected:
    wrong = sorted(key for key in expected.keys() | found.keys()
                   if expected.get(key) != found.get(key))
    raise AssetError(f"The classifier weight file {path} does not match the network for images "
                     f"{stored_shape}: entries {wrong[:6]} are missing, unexpected or of the "
                     f"wrong shape; {fix}.")
  if not all(np.isfinite(arrays[key]).all() for key in found):
    raise AssetError(f"The classifier weight file {path} holds non-finite values; {fix}.")
  params = traverse_util.unflatten_dict(
      {key[len(_PARAMS_PREFIX):]: arrays[key].astype(np.float32) for key in found}, sep="/")
  mesh = mesh if mesh is not None else fid.default_mesh()
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  return Classifier(
      params=jax.device_put(params, sharding.replicated(mesh)), image_shape=stored_shape,
      num_classes=num_classes, steps=int(arrays["steps"]),
      accuracy=float(arrays.get("accuracy", np.nan)),
      accuracy_split=str(arrays.get("accuracy_split", "")), digest=fid.params_digest(params),
      batch_size=shards * math.ceil(max(1, batch_size) / shards), mesh=mesh, path=path)


def save(path: str, params: dict, *, image_shape, num_classes: int, steps: int, seed: int,
         accuracy: float = float("nan"), accuracy_split: str = "") -> None:
  """Writes the classifier .npz: 'params/<module>/<name>' float32 entries, image_shape [3],
  num_classes, steps, seed, accuracy and accuracy_split."""
  arrays = {_PARAMS_PREFIX + key: np.asarray(value, np.float32)
            for key, value in traverse_util.flatten_dict(jax.device_get(params), sep="/").items()}
  arrays.update(image_shape=np.asarray(image_shape, np.int64), num_classes=np.int64(num_classes),
                steps=np.int64(steps), seed=np.int64(seed), accuracy=np.float64(accuracy),
                accuracy_split=np.array(accuracy_split))
  fid.save_npz(path, arrays)


def labelled_data(config, split: str = "train"):
  """(data config, DataInfo) of a split of config.data read with labels when the source has
  them (num_classes > 0), else without; random flips as configured."""
  from flowjax import data
  data_config = ml_collections.ConfigDict(config.data.to_dict())
  data_config.conditional = True
  if "text" in data_config:
    data_config.text.encoder = ""  # the classifier reads images and labels, not captions
  try:
    info = data.data_info(data_config, split)
  except ValueError:  # a flat folder or an .npy file: no labels
    data_config.conditional = False
    info = data.data_info(data_config, split)
  if not info.num_classes:
    data_config.conditional = False
  return data_config, info


def _shift(rng: jax.Array, images: jax.Array) -> jax.Array:
  """Shifts each image by up to max(1, min(H, W) // 8) pixels (edges repeated); [B, H, W, C]."""
  height, width = images.shape[1:3]
  pad = max(1, min(height, width) // 8)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
  offsets = jax.random.randint(rng, (len(images), 2), 0, 2 * pad + 1)
  return jax.vmap(lambda image, offset: jax.lax.dynamic_slice(
      image, (offset[0], offset[1], 0), images.shape[1:]))(padded, offsets)


def _accuracy(config, params, model, mesh, batch_size: int) -> tuple[float, str]:
  """Accuracy on the test split (else the train split) over at most _ACCURACY_BATCHES batches
  read in order; (NaN, '') without labels."""
  from flowjax import data, sharding
  for split in ("test", "train"):
    try:
      data_config, info = labelled_data(config, split)
    except (ValueError, FileNotFoundError):
      continue
    if not info.num_classes:
      break
    data_config.random_flip = False
    total = info.num_examples or _ACCURACY_BATCHES * batch_size
    total = min(total, _ACCURACY_BATCHES * batch_size)
    batches = data.build(data_config, split=split, global_batch_size=batch_size,
                         seed=config.seed, sharding=sharding.batch_sharding(mesh), shuffle=False)
    correct = 0
    hits = jax.jit(lambda p, x, y: jnp.argmax(model.apply({"params": p}, x)[1], -1) == y,
                   out_shardings=sharding.replicated(mesh))
    try:
      for start in range(0, total, batch_size):
        batch = next(batches)
        correct += int(np.asarray(hits(params, batch["image"], batch["label"]))[
            :total - start].sum())
    finally:
      batches.close()
    return correct / total, split
  return float("nan"), ""


def train(config, *, steps: int = TRAIN_STEPS, seed: int = 0, batch_size: int = BATCH_SIZE,
          mesh=None) -> dict:
  """Trains FeatureCNN on the labelled train split of config.data (AdamW, cosine schedule,
  random shifts) for `steps` global batches of batch_size (rounded up to the mesh's batch
  shards); without labels, or with steps = 0, keeps the seeded random initialisation.

  Returns {'params', 'image_shape', 'num_classes' (0 when untrained), 'steps', 'seed',
  'accuracy', 'accuracy_split'}, the arguments of `save`.
  """
  from flowjax import data, sharding
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  batch_size = shards * math.ceil(max(1, batch_size) / shards)
  data_config, info = labelled_data(config)
  image_shape = tuple(info.image_shape)
  if len(image_shape) != 3:
    raise ValueError(f"data.name={config.data.name!r} serves examples of shape {image_shape}, "
                     "not images [H, W, C]; the classifier needs images.")
  num_classes = info.num_classes if steps > 0 else 0
  init_rng, data_rng = jax.random.split(jax.random.key(seed))
  model = _model(image_shape, num_classes)
  replicated = sharding.replicated(mesh)
  params = jax.jit(lambda: model.init(init_rng, jnp.zeros((1, *image_shape)))["params"],
                   out_shardings=replicated)()
  result = dict(image_shape=image_shape, num_classes=num_classes, seed=seed,
                accuracy=float("nan"), accuracy_split="")
  if not num_classes:
    return dict(result, params=jax.device_get(params), steps=0)
  schedule = optax.warmup_cosine_decay_schedule(0.0, LEARNING_RATE, max(1, steps // 20), steps)
  optimizer = optax.adamw(schedule, weight_decay=WEIGHT_DECAY)
  opt_state = jax.jit(optimizer.init, out_shardings=replicated)(params)

  def loss_fn(params, images, labels):
    logits = model.apply({"params": params}, images)[1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1), out_shardings=replicated)
  def step(params, opt_state, batch, index):
    images = _shift(jax.random.fold_in(data_rng, index), batch["image"])
    loss, grads = jax.value_and_grad(loss_fn)(params, images, batch["label"])
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  batches = data.build(data_config, split="train", global_batch_size=batch_size, seed=seed,
                       sharding=sharding.batch_sharding(mesh))
  window = sharding.DispatchWindow()
  try:
    for index in range(steps):
      params, opt_state, loss = step(params, opt_state, next(batches), index)
      window.add(loss)
  finally:
    batches.close()
  if not np.isfinite(float(loss)):
    raise ValueError(
        f"The feature classifier's training loss is {float(loss)} after {steps} steps on "
        f"data.name={config.data.name!r}: the network diverged and its features would be "
        "meaningless; nothing was written. Check that the images are finite and scaled to "
        "[-1, 1], or train with fewer steps.")
  accuracy, split = _accuracy(config, params, model, mesh, batch_size)
  return dict(result, params=jax.device_get(params), steps=steps, accuracy=accuracy,
              accuracy_split=split)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m flowjax.evals.classifier",
      description="Train the feature classifier of eval.feature_extractor='classifier' on the "
                  "train split of --config's data and write it to --out. --config.KEY=VALUE "
                  "overrides any config key, as for flowjax.main (e.g. "
                  "--config.data.name=arrays:/data/mnist.npz).")
  parser.add_argument("--config", required=True, help="experiment file[:preset]")
  parser.add_argument("--out", required=True, help="the classifier .npz to write")
  parser.add_argument("--steps", type=int, default=TRAIN_STEPS,
                      help=f"training steps (default {TRAIN_STEPS}; 0: the seeded random network)")
  parser.add_argument("--seed", type=int, default=0, help="initialisation and data order")
  parser.add_argument("--batch_size", type=int, default=BATCH_SIZE, help="global batch size")
  args, overrides = parser.parse_known_args(argv)
  if args.steps < 0 or args.batch_size < 1 or args.seed < 0:
    parser.error(f"--steps must be >= 0, --batch_size >= 1 and --seed >= 0; got {args.steps}, "
                 f"{args.batch_size} and {args.seed}.")
  try:
    config = fid.load_cli_config(args.config, overrides)
  except ValueError as error:
    parser.error(str(error))
  from flowjax import sharding
  sharding.start_runtime()
  result = train(config, steps=args.steps, seed=args.seed, batch_size=args.batch_size)
  if jax.process_index() == 0:
    save(args.out, **result)
  if result["num_classes"]:
    print(f"Wrote {args.out}: trained {result['steps']} steps on {config.data.name} split "
          f"'train' ({result['num_classes']} classes, images {result['image_shape']}); accuracy "
          f"{result['accuracy']:.4f} on split {result['accuracy_split']!r}.")
  else:
    reason = "--steps=0" if args.steps == 0 else f"{config.data.name} has no labels"
    print(f"Wrote {args.out}: the untrained network of seed {args.seed} ({reason}), a fixed "
          f"random embedding of images {result['image_shape']}.")
  print("Its FID and precision/recall compare runs on this data; they are not comparable to "
        "published (Inception) FIDs.", file=sys.stderr)


if __name__ == "__main__":
  main()
