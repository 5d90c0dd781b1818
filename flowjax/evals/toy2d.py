"""Sample quality on 2D toy data: energy distance and sliced Wasserstein-1 to held-out samples.

Both are zero exactly when the two distributions are equal. Their sampling error (the value two
independent sets from the data distribution itself give) is reported beside them as a floor.
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


def evaluate(samples: np.ndarray, distribution: str, seed: int = 1) -> dict:
  """Both metrics of `samples` [N, 2] against N fresh held-out points, plus their noise floor
  (the same metrics between two independent data sets of size N)."""
  n = len(samples)
  reference = toy2d.sample(distribution, n, (seed, 10))
  other = toy2d.sample(distribution, n, (seed, 11))
  return {
      "energy_distance": energy_distance(samples, reference),
      "sliced_wasserstein": sliced_wasserstein(samples, reference),
      "energy_distance_floor": energy_distance(other, reference),
      "sliced_wasserstein_floor": sliced_wasserstein(other, reference),
  }
