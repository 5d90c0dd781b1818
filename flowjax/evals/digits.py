"""Sample quality on the embedded digits: Frechet distance in the features of a small committed
classifier, and that classifier's accuracy on class-conditional samples.

The classifier is trained once on the train split and committed, with the feature statistics
of the test split, in `assets/digits_classifier.npz`, so evaluation is offline and reproducible:

  python -m flowjax.evals.digits --retrain [--out=PATH] [--seed=0] [--steps=N]
  python -m flowjax.evals.digits [--out=PATH]     (prints the stored test accuracy)

The Frechet distance of N samples is biased upwards and its bias shrinks with N, so `evaluate`
reports beside it its floor: the same distance for N real train-split images, the value a
perfect model gets at this N.
"""

import argparse
import dataclasses
import functools
import os
import sys
import zipfile
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from flax import traverse_util

from flowjax.data import digits
from flowjax.evals.fid import feature_statistics, frechet_distance

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                            "digits_classifier.npz")
RETRAIN_COMMAND = "python -m flowjax.evals.digits --retrain"
IMAGE_SHAPE = (digits.NATIVE_SIZE, digits.NATIVE_SIZE, 1)
NUM_FEATURES = 64
TRAIN_STEPS = 3000
BATCH_SIZE = 128
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
SHIFT_PIXELS = 1
NOISE_STD = 0.1
_EVAL_BATCH_SIZE = 256
_PARAMS_PREFIX = "params/"


class AssetError(RuntimeError):
  """The classifier file is missing, unreadable or does not match the classifier's shapes."""


class DigitsClassifier(nn.Module):
  """A small CNN: [B, 8, 8, 1] in [-1, 1] -> logits [B, 10]; `features` -> [B, NUM_FEATURES].

  conv 3x3 (32) -> conv 3x3 stride 2 (32) -> flatten [B, 512] -> dense (NUM_FEATURES, the
  feature layer) -> dense (10), GELU between. Flattening keeps where the strokes are: a
  mean-pooled variant of the same size was about 2 points less accurate on the test split. The
  widths keep the committed file under 200 KB.
  """

  def setup(self):
    self.conv1 = nn.Conv(32, (3, 3))
    self.conv2 = nn.Conv(32, (3, 3), strides=2)
    self.hidden = nn.Dense(NUM_FEATURES)
    self.head = nn.Dense(digits.NUM_CLASSES)

  def feature_map(self, images: jax.Array) -> jax.Array:
    """images: [B, 8, 8, 1] in [-1, 1]. Returns the last spatial layer [B, 4, 4, 32] (after the
    strided conv and its GELU), the patch features of REPA's 'digits' encoder."""
    h = nn.gelu(self.conv1(images))
    return nn.gelu(self.conv2(h))

  def features(self, images: jax.Array) -> jax.Array:
    """images: [B, 8, 8, 1] in [-1, 1]. Returns the penultimate layer [B, NUM_FEATURES]."""
    h = self.feature_map(images)
    return nn.gelu(self.hidden(h.reshape(h.shape[0], -1)))

  def features_and_logits(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images: [B, 8, 8, 1] in [-1, 1]. Returns ([B, NUM_FEATURES], logits [B, 10])."""
    features = self.features(images)
    return features, self.head(features)

  def __call__(self, images: jax.Array) -> jax.Array:
    """images: [B, 8, 8, 1] in [-1, 1]. Returns logits [B, 10]."""
    return self.features_and_logits(images)[1]


@jax.jit
def _forward(params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """images: [B, 8, 8, 1]. Returns (features [B, NUM_FEATURES], logits [B, 10])."""
  return DigitsClassifier().apply({"params": params}, images,
                                 method=DigitsClassifier.features_and_logits)


def _check_images(images, name: str = "images") -> np.ndarray:
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or len(images) < 1:
    raise ValueError(f"{name} must have shape [N, 8, 8, 1] with N >= 1 (digits at their native "
                     f"size, in [-1, 1]); got {images.shape}.")
  if not np.isfinite(images).all():
    raise ValueError(f"{name} has {np.sum(~np.isfinite(images))} non-finite values; the digits "
                     f"metrics need finite images in [-1, 1].")
  return images


def _batched_forward(params, images) -> tuple[np.ndarray, np.ndarray]:
  """images: [N, 8, 8, 1]. Returns (features [N, NUM_FEATURES], logits [N, 10]) as NumPy,
  computed in batches of one compiled size."""
  images = _check_images(images)
  features, logits = [], []
  for start in range(0, len(images), _EVAL_BATCH_SIZE):
    chunk = images[start:start + _EVAL_BATCH_SIZE]
    padded = np.pad(chunk, ((0, _EVAL_BATCH_SIZE - len(chunk)), (0, 0), (0, 0), (0, 0)))
    chunk_features, chunk_logits = jax.device_get(_forward(params, padded))
    features.append(chunk_features[:len(chunk)])
    logits.append(chunk_logits[:len(chunk)])
  return np.concatenate(features), np.concatenate(logits)


@dataclasses.dataclass(frozen=True, eq=False)
class Classifier:
  """The committed classifier with the test split's feature statistics.

  params: the DigitsClassifier parameters; test_accuracy: in [0, 1];
  reference_mean: [NUM_FEATURES] and reference_cov: [NUM_FEATURES, NUM_FEATURES] float64,
  the features' mean and covariance over the test split.
  """
  params: dict
  test_accuracy: float
  reference_mean: np.ndarray
  reference_cov: np.ndarray

  def features_and_logits(self, images) -> tuple[np.ndarray, np.ndarray]:
    """images: [N, 8, 8, 1] in [-1, 1]. Returns ([N, NUM_FEATURES], [N, 10]) float32."""
    return _batched_forward(self.params, images)

  def features(self, images) -> np.ndarray:
    """images: [N, 8, 8, 1] in [-1, 1]. Returns [N, NUM_FEATURES] float32."""
    return self.features_and_logits(images)[0]

  def logits(self, images) -> np.ndarray:
    """images: [N, 8, 8, 1] in [-1, 1]. Returns [N, 10] float32."""
    return self.features_and_logits(images)[1]


def _split(name: str) -> tuple[np.ndarray, np.ndarray]:
  """images: [n, 8, 8, 1] in [-1, 1] and labels: [n] of a fixed digits split."""
  images, labels = digits.load()
  start, stop = digits.SPLITS[name]
  return images[start:stop], labels[start:stop]


def _abstract_params():
  return jax.eval_shape(DigitsClassifier().init, jax.random.key(0),
                        jnp.zeros((1, *IMAGE_SHAPE), jnp.float32))["params"]


def load_classifier(path: str = DEFAULT_PATH) -> Classifier:
  """Reads the classifier and its reference statistics written by `python -m
  flowjax.evals.digits --retrain`; raises AssetError when the file is missing or damaged."""
  command = RETRAIN_COMMAND + ("" if os.path.abspath(path) == DEFAULT_PATH else f" --out={path}")
  fix = f"recreate it with `{command}` (about a minute on a CPU)"
  if not os.path.isfile(path):
    raise AssetError(f"The digits classifier file {path} does not exist; {fix}.")
  try:
    with open(path, "rb") as f:
      signature = f.read(4)
    if signature != b"PK\x03\x04":
      raise AssetError(f"The digits classifier file {path} is not an .npz archive (no zip "
                       f"signature); {fix}.")
    with np.load(path, allow_pickle=False) as stored:
      arrays = {key: np.asarray(stored[key]) for key in stored.files}
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
    raise AssetError(f"The digits classifier file {path} is not a readable .npz ({error}); "
                     f"{fix}.") from error
  expected = {_PARAMS_PREFIX + key: value.shape for key, value in
              traverse_util.flatten_dict(_abstract_params(), sep="/").items()}
  expected.update(test_accuracy=(), reference_mean=(NUM_FEATURES,),
                  reference_cov=(NUM_FEATURES, NUM_FEATURES))
  found = {key: value.shape for key, value in arrays.items()}
  if found != expected:
    wrong = sorted(key for key in expected.keys() | found.keys()
                   if expected.get(key) != found.get(key))
    raise AssetError(f"The digits classifier file {path} does not match the classifier: entries "
                     f"{wrong} are missing, unexpected or of the wrong shape; {fix}.")
  if not all(np.isfinite(value).all() for value in arrays.values()):
    raise AssetError(f"The digits classifier file {path} holds non-finite values; {fix}.")
  params = traverse_util.unflatten_dict(
      {key[len(_PARAMS_PREFIX):]: jnp.asarray(value, jnp.float32)
       for key, value in arrays.items() if key.startswith(_PARAMS_PREFIX)}, sep="/")
  return Classifier(params=params, test_accuracy=float(arrays["test_accuracy"]),
                    reference_mean=arrays["reference_mean"].astype(np.float64),
                    reference_cov=arrays["reference_cov"].astype(np.float64))


@functools.cache
def _default_classifier() -> Classifier:
  return load_classifier(DEFAULT_PATH)


def resize(images, size: int) -> np.ndarray:
  """[N, S, S, 1] in [-1, 1] -> [N, size, size, 1], bilinear as flowjax.data.digits resizes."""
  images = np.asarray(images, np.float32)
  if images.shape[1] == size:
    return images
  return np.stack([np.asarray(Image.fromarray(image[..., 0]).resize(
      (size, size), Image.Resampling.BILINEAR))[..., None] for image in images])


def _round_trip(images, image_size: int) -> np.ndarray:
  """8x8 digits taken to image_size and back, as the samples of a model trained at that size
  are (bilinear resizing commutes with the affine map to [-1, 1], so this equals resizing the
  data source's images)."""
  if image_size == digits.NATIVE_SIZE:
    return images
  return np.clip(resize(resize(images, image_size), digits.NATIVE_SIZE), -1.0, 1.0)


def evaluate(samples, labels=None, *, classifier: Classifier | None = None,
             seed: int = 0, image_size: int = digits.NATIVE_SIZE) -> dict:
  """Digits sample quality of `samples` [N, 8, 8, 1] (clipped to [-1, 1]) with N >= 2.

  image_size: the side of `samples` when the model trained on the digits resized to it
  (data.image_size): the samples are resized back to 8x8 for the classifier, and the floor's
  real images go through the same round trip (8 -> image_size -> 8).

  Returns a dict of floats:
    fd: Frechet distance of the samples' features to the test split's;
    fd_floor: the same for min(N, 1500) real train-split images drawn with `seed`, the value of
      a perfect model at this N;
  and when `labels` ([N] int, the classes the samples were conditioned on) are given:
    accuracy: fraction of samples that the classifier assigns to their label;
    accuracy_real: the classifier's accuracy on the test split.
  `classifier` defaults to the committed one.
  """
  if image_size != digits.NATIVE_SIZE:
    samples = resize(np.clip(np.asarray(samples, np.float32), -1.0, 1.0), digits.NATIVE_SIZE)
  samples = np.clip(_check_images(samples, "samples"), -1.0, 1.0)
  if len(samples) < 2:
    raise ValueError(f"The Frechet distance needs at least 2 samples; got {len(samples)}.")
  if labels is not None:
    labels = np.asarray(labels)
    if (labels.shape != (len(samples),) or not np.issubdtype(labels.dtype, np.integer) or
        labels.min() < 0 or labels.max() >= digits.NUM_CLASSES):
      raise ValueError(f"labels must be [N] = [{len(samples)}] integers in [0, "
                       f"{digits.NUM_CLASSES}); got shape {labels.shape}, dtype {labels.dtype}.")
  if classifier is None:
    classifier = _default_classifier()
  reference = (classifier.reference_mean, classifier.reference_cov)
  features, logits = classifier.features_and_logits(samples)
  train_images, _ = _split("train")
  subset = np.random.default_rng(seed).choice(len(train_images),
                                              min(len(samples), len(train_images)), replace=False)
  result = {
      "fd": frechet_distance(*feature_statistics(features), *reference),
      "fd_floor": frechet_distance(*feature_statistics(classifier.features(
          _round_trip(train_images[subset], image_size))), *reference),
  }
  if labels is not None:
    test_images, test_labels = _split("test")
    result["accuracy"] = float(np.mean(np.argmax(logits, -1) == labels))
    result["accuracy_real"] = float(
        np.mean(np.argmax(classifier.logits(test_images), -1) == test_labels))
  return result


def _augment(rng: jax.Array, images: jax.Array) -> jax.Array:
  """Shifts each image by up to SHIFT_PIXELS (background -1 enters) and adds Gaussian noise of
  NOISE_STD, clipped to [-1, 1]; images: [B, 8, 8, 1]."""
  shift_rng, noise_rng = jax.random.split(rng)
  pad = SHIFT_PIXELS
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-1.0)
  offsets = jax.random.randint(shift_rng, (len(images), 2), 0, 2 * pad + 1)
  shifted = jax.vmap(lambda image, offset: jax.lax.dynamic_slice(
      image, (offset[0], offset[1], 0), IMAGE_SHAPE))(padded, offsets)
  noise = NOISE_STD * jax.random.normal(noise_rng, shifted.shape)
  return jnp.clip(shifted + noise, -1.0, 1.0)


def train(seed: int = 0, steps: int = TRAIN_STEPS) -> dict:
  """Trains DigitsClassifier on the train split with AdamW and augmentation; returns params.

  Batch k and its augmentation come from fold_in(key(seed), k), so a seed gives the same
  parameters on every run of the same JAX build and platform.
  """
  images, labels = (jnp.asarray(array) for array in _split("train"))
  init_rng, data_rng = jax.random.split(jax.random.key(seed))
  model = DigitsClassifier()
  schedule = optax.warmup_cosine_decay_schedule(0.0, LEARNING_RATE, steps // 20, steps)
  optimizer = optax.adamw(schedule, weight_decay=WEIGHT_DECAY)

  @jax.jit
  def init():
    params = model.init(init_rng, images[:1])["params"]
    return params, optimizer.init(params)

  def loss_fn(params, batch_images, batch_labels):
    logits = model.apply({"params": params}, batch_images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels).mean()

  @jax.jit
  def step(params, opt_state, index):
    batch_rng, augment_rng = jax.random.split(jax.random.fold_in(data_rng, index))
    batch = jax.random.randint(batch_rng, (BATCH_SIZE,), 0, len(images))
    grads = jax.grad(loss_fn)(params, _augment(augment_rng, images[batch]), labels[batch])
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = init()
  for index in range(steps):
    params, opt_state = step(params, opt_state, index)
  return jax.device_get(params)


def save(path: str, params: dict) -> Classifier:
  """Measures `params` on the test split and writes them with its statistics to `path` (.npz,
  float32: 'params/<module>/<name>' entries, test_accuracy, reference_mean, reference_cov)."""
  test_images, test_labels = _split("test")
  features, logits = _batched_forward(params, test_images)
  mean, cov = feature_statistics(features)
  arrays = {_PARAMS_PREFIX + key: np.asarray(value, np.float32)
            for key, value in traverse_util.flatten_dict(params, sep="/").items()}
  arrays.update(test_accuracy=np.float32(np.mean(np.argmax(logits, -1) == test_labels)),
                reference_mean=mean.astype(np.float32), reference_cov=cov.astype(np.float32))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  partial = path + ".partial"
  with open(partial, "wb") as f:
    np.savez_compressed(f, **arrays)
  os.replace(partial, path)
  return load_classifier(path)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m flowjax.evals.digits",
      description="Retrain the digits classifier (--retrain) or print its stored test accuracy.")
  parser.add_argument("--retrain", action="store_true",
                      help="train on the train split and write --out")
  parser.add_argument("--out", default=DEFAULT_PATH, help="the classifier .npz file")
  parser.add_argument("--seed", type=int, default=0, help="training seed")
  parser.add_argument("--steps", type=int, default=TRAIN_STEPS, help="training steps")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps must be a positive integer; got {args.steps}.")
  try:
    if args.retrain:
      classifier = save(args.out, train(args.seed, args.steps))
      print(f"Wrote {args.out} (seed {args.seed}, {args.steps} steps).")
    else:
      classifier = load_classifier(args.out)
  except AssetError as error:
    sys.exit(f"error: {error}")
  print(f"test accuracy: {classifier.test_accuracy:.4f} "
        f"({digits.NUM_EXAMPLES - digits.NUM_TRAIN} test-split images)")


if __name__ == "__main__":
  main()
