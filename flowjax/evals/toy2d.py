"""Sample quality on 2D toy data: energy distance and sliced Wasserstein-1 to held-out samples,
and the tails' quantile errors.

The first two are zero exactly when the two distributions are equal; both weigh the bulk of the
distribution and barely see its tails. The tail errors compare the 0.99 and 0.999 quantiles of
|x| per axis, which is where a heavy-tailed distribution (data.toy_distribution='student_t') and
a model with Gaussian noise part ways. Every metric's sampling error (the value two independent
sets from the data distribution itself give) is reported beside it as a floor.
"""

import numpy as np

from flowjax.data import toy2d


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
  """2 E|X - Y| - E|X - X'| - E|Y - Y'| (V-statistic); x: [N, D], y: [M, D]."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

  def mean_distance(a, b):
    total = 0.0
    for start in range(0, len(a), 1024):
      chunk = a[start:start + 1024]
      total += np.sqrt(np.maximum(
          np.sum(chunk**2, 1)[:, None] + np.sum(b**2, 1)[None] - 2 * chunk @ b.T, 0.0)).sum()
    return total / (len(a) * len(b))

  return float(2 * mean_distance(x, y) - mean_distance(x, x) - mean_distance(y, y))


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, num_projections: int = 256,
                       seed: int = 0) -> float:
  """Mean over random directions of the 1-D Wasserstein-1 distance; x, y: [N, D] (same N)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n = min(len(x), len(y))
  rng = np.random.default_rng(seed)
  directions = rng.standard_normal((x.shape[1], num_projections))
  directions /= np.linalg.norm(directions, axis=0, keepdims=True)
  px = np.sort(x[:n] @ directions, axis=0)
  py = np.sort(y[:n] @ directions, axis=0)
  return float(np.mean(np.abs(px - py)))


TAIL_QUANTILES = (0.99, 0.999)
AXES = ("x", "y")


def tail_errors(x: np.ndarray, y: np.ndarray, quantiles=TAIL_QUANTILES) -> dict:
  """Relative errors of the tail quantiles of |x| per axis, x against the reference y.

  For each axis a and quantile q: "tail_q<digits of q>_<a>" = (Q_q(|x_a|) - Q_q(|y_a|)) /
  Q_q(|y_a|) (e.g. "tail_q999_x"; negative: the tail of x is too light), with Q_q the empirical
  quantile (linear interpolation), and "tail_error" = the mean of their absolute values.
  x: [N, D], y: [M, D] with D <= len(AXES); a 0.999 quantile needs N, M of several thousands to
  rest on more than a few points.
  """
  x, y = np.abs(np.asarray(x, np.float64)), np.abs(np.asarray(y, np.float64))
  errors = {}
  for q in quantiles:
    reference = np.quantile(y, q, axis=0)
    relative = (np.quantile(x, q, axis=0) - reference) / reference
    for axis, value in zip(AXES, relative):
      errors[f"tail_q{str(q)[2:]}_{axis}"] = float(value)
  errors["tail_error"] = float(np.mean(np.abs(list(errors.values()))))
  return errors


def evaluate(samples: np.ndarray, distribution: str, seed: int = 1) -> dict:
  """The metrics of `samples` [N, 2] against N fresh held-out points, plus their noise floor
  (the same metrics between two independent data sets of size N): energy_distance,
  sliced_wasserstein, the tail errors of `tail_errors` and tail_error_floor."""
  n = len(samples)
  reference = toy2d.sample(distribution, n, (seed, 10))
  other = toy2d.sample(distribution, n, (seed, 11))
  return {
      "energy_distance": energy_distance(samples, reference),
      "sliced_wasserstein": sliced_wasserstein(samples, reference),
      "energy_distance_floor": energy_distance(other, reference),
      "sliced_wasserstein_floor": sliced_wasserstein(other, reference),
      **tail_errors(samples, reference),
      "tail_error_floor": tail_errors(other, reference)["tail_error"],
  }
