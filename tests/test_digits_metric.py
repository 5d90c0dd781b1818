"""Digits metrics: Frechet distance identities and closed forms; the committed classifier
separates real digits from noise and corrupted digits and reads the conditioning labels."""

import numpy as np
import pytest

from flowjax.data import digits
from flowjax.evals import digits as digits_metric


def _random_covariance(rng, dim, rank=None):
  factor = rng.standard_normal((dim, rank or 2 * dim))
  return factor @ factor.T / factor.shape[1]


def _real(num, seed=1):
  """num train-split images and labels, the split the reference statistics do not come from."""
  images, labels = digits.load()
  index = np.random.default_rng(seed).choice(digits.NUM_TRAIN, num, replace=False)
  return images[index], labels[index]


def test_frechet_distance_is_zero_for_identical_statistics_and_symmetric():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
  cov1, cov2 = _random_covariance(rng, 16), _random_covariance(rng, 16)
  assert abs(digits_metric.frechet_distance(mu1, cov1, mu1, cov1)) < 1e-9
  np.testing.assert_allclose(digits_metric.frechet_distance(mu1, cov1, mu2, cov2),
                             digits_metric.frechet_distance(mu2, cov2, mu1, cov1), rtol=1e-9)


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
  var1, var2 = rng.uniform(0.1, 3.0, 32), rng.uniform(0.1, 3.0, 32)
  expected = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(var1) - np.sqrt(var2))**2)
  np.testing.assert_allclose(
      digits_metric.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)), expected, rtol=1e-9)


@pytest.mark.parametrize("rank", [None, 5])
def test_frechet_distance_matches_symmetric_square_root_for_full_covariances(rank):
  """tr((C1 C2)^(1/2)) = sum of sqrt(eigenvalues) of C1^(1/2) C2 C1^(1/2), also when C1, C2 are
  singular (rank 5 of 24, as when there are fewer samples than features)."""
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.standard_normal(24), rng.standard_normal(24)
  cov1, cov2 = _random_covariance(rng, 24, rank), _random_covariance(rng, 24, rank)
  values, vectors = np.linalg.eigh(cov1)
  root1 = (vectors * np.sqrt(np.maximum(values, 0.0))) @ vectors.T
  trace_root = np.sum(np.sqrt(np.maximum(np.linalg.eigvalsh(root1 @ cov2 @ root1), 0.0)))
  expected = np.sum((mu1 - mu2)**2) + np.trace(cov1) + np.trace(cov2) - 2 * trace_root
  np.testing.assert_allclose(digits_metric.frechet_distance(mu1, cov1, mu2, cov2), expected,
                             rtol=1e-4)


def test_committed_classifier_classifies_the_test_split_and_matches_its_statistics():
  classifier = digits_metric.load_classifier()
  images, labels = digits.load()
  test_images, test_labels = images[digits.NUM_TRAIN:], labels[digits.NUM_TRAIN:]
  features = classifier.features(test_images)
  accuracy = np.mean(np.argmax(classifier.logits(test_images), -1) == test_labels)
  assert features.shape == (len(test_images), digits_metric.NUM_FEATURES)
  assert accuracy >= 0.95
  np.testing.assert_allclose(accuracy, classifier.test_accuracy, atol=1.5 / len(test_images))
  mean, cov = digits_metric.feature_statistics(features)
  np.testing.assert_allclose(mean, classifier.reference_mean, atol=1e-3 * np.abs(mean).max())
  np.testing.assert_allclose(cov, classifier.reference_cov, atol=1e-3 * np.abs(cov).max())


def test_fd_ranks_real_digits_far_below_noise_blurred_shuffled_and_mode_dropped_digits():
  rng = np.random.default_rng(3)
  images, labels = _real(500)
  real = digits_metric.evaluate(images)
  assert real["fd"] < 1.5 * real["fd_floor"]
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  blurred = sum(padded[:, i:i + 8, j:j + 8] for i in range(3) for j in range(3)) / 9
  shuffled = np.stack([image.reshape(-1)[rng.permutation(64)] for image in images])
  corrupted = {
      "noise": rng.standard_normal(images.shape),
      "blurred": blurred,
      "shuffled": shuffled.reshape(images.shape),
  }
  for name, samples in corrupted.items():
    fd = digits_metric.evaluate(samples)["fd"]
    assert fd > 5 * real["fd_floor"] and fd > 5 * real["fd"], (name, fd, real)
  all_images, all_labels = digits.load()
  train_images, train_labels = all_images[:digits.NUM_TRAIN], all_labels[:digits.NUM_TRAIN]
  mode_dropped = digits_metric.evaluate(train_images[train_labels < 5][:500])
  assert mode_dropped["fd"] > 2 * real["fd_floor"], (mode_dropped, real)


def test_accuracy_follows_the_conditioning_labels():
  images, labels = _real(300)
  right = digits_metric.evaluate(images, labels)
  wrong = digits_metric.evaluate(images, (labels + 1) % digits.NUM_CLASSES)
  assert right["accuracy"] >= 0.95 and right["accuracy_real"] >= 0.95
  assert wrong["accuracy"] <= 0.05
  assert right["fd"] == wrong["fd"] and "accuracy" not in digits_metric.evaluate(images)


def test_evaluate_rejects_bad_shapes_and_labels():
  images, labels = _real(10)
  with pytest.raises(ValueError, match=r"\[N, 8, 8, 1\]"):
    digits_metric.evaluate(images[..., 0])
  with pytest.raises(ValueError, match="labels"):
    digits_metric.evaluate(images, labels[:5])
  with pytest.raises(ValueError, match="labels"):
    digits_metric.evaluate(images, labels + 10)


def test_missing_or_damaged_classifier_file_raises_one_clear_error(tmp_path):
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not an npz file" * 100)
  committed = open(digits_metric.DEFAULT_PATH, "rb").read()
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(committed[:len(committed) // 2])
  stranger = tmp_path / "stranger.npz"
  np.savez(stranger, weights=np.zeros(3, np.float32))
  for path in (tmp_path / "missing.npz", garbage, truncated, stranger):
    with pytest.raises(digits_metric.AssetError) as error:
      digits_metric.load_classifier(str(path))
    assert str(path) in str(error.value)
    assert digits_metric.RETRAIN_COMMAND in str(error.value)


def test_retrain_command_writes_a_loadable_file_and_prints_its_accuracy(tmp_path, capsys):
  path = str(tmp_path / "classifier.npz")
  digits_metric.main(["--retrain", f"--out={path}", "--seed=3", "--steps=20"])
  classifier = digits_metric.load_classifier(path)
  assert 0.0 <= classifier.test_accuracy <= 1.0
  capsys.readouterr()
  digits_metric.main([f"--out={path}"])
  assert f"test accuracy: {classifier.test_accuracy:.4f}" in capsys.readouterr().out


def test_samples_of_a_28x28_model_are_scored_through_the_same_round_trip():
  """The digits at 28x28 (data.image_size=28) scored with image_size=28: real ones are at the
  floor and keep their labels; noise is far above it."""
  images, labels = digits.load(28)
  test = images[digits.NUM_TRAIN:]
  result = digits_metric.evaluate(test, labels[digits.NUM_TRAIN:], image_size=28)
  assert result["fd"] < 2.0 * result["fd_floor"] + 1.0
  assert result["accuracy"] > 0.9
  noise = np.random.default_rng(0).uniform(-1, 1, test.shape).astype(np.float32)
  assert digits_metric.evaluate(noise, image_size=28)["fd"] > 5 * result["fd_floor"]
  # Without the round trip, 28x28 images are refused (the classifier reads 8x8).
  with pytest.raises(ValueError):
    digits_metric.evaluate(test)
