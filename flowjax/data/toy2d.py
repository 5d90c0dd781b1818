"""Toy 2D distributions (checkerboard, 8 Gaussians, moons, Swiss roll, and the heavy-tailed
student_t), generated in-process.

The stream is infinite: global batch k is drawn from a NumPy generator keyed by
(seed, split, k), so every process cuts its rows out of the same global batch and the
data do not depend on the number of processes.
"""

import dataclasses
from typing import Sequence

import numpy as np

from flowjax import registry
from flowjax.data import pipeline

DISTRIBUTIONS = ("checkerboard", "8gaussians", "moons", "swissroll", "student_t")
# The distributions with heavy (power-law) tails, for which the tail metrics of
# flowjax.evals.toy2d are the informative ones.
HEAVY_TAILED = ("student_t",)
SPLITS = ("train", "test")

_EIGHT_GAUSSIANS_RADIUS = 2.0
_EIGHT_GAUSSIANS_STD = 0.1
_MOONS_NOISE = 0.05
_MOONS_SCALE = 1.5
_SWISSROLL_NOISE = 0.05
_SWISSROLL_TURNS = (1.5 * np.pi, 4.5 * np.pi)
# student_t: x is Student-t with STUDENT_T_NU degrees of freedom times STUDENT_T_SCALE (P(|x| > r)
# falls as r^-nu: finite variance, infinite fourth moment); y is +-1 with Gaussian noise.
STUDENT_T_NU = 3.0
STUDENT_T_SCALE = 0.5
_STUDENT_T_Y_STD = 0.2


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
  """Uniform on the 8 squares of a 4x4 board in [-2, 2]^2 where floor(x) + floor(y) is even."""
  x = rng.uniform(-2.0, 2.0, n)
  y = rng.uniform(0.0, 1.0, n) - 2.0 * rng.integers(0, 2, n) + np.floor(x) % 2
  return np.stack([x, y], axis=1)


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
  """Eight Gaussians (std 0.1) centred on a circle of radius 2, at angles k * pi / 4."""
  angles = rng.integers(0, 8, n) * (np.pi / 4)
  centers = _EIGHT_GAUSSIANS_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  return centers + _EIGHT_GAUSSIANS_STD * rng.standard_normal((n, 2))


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
  """sklearn's two interleaving half circles, centred at the origin and scaled by 1.5."""
  t = rng.uniform(0.0, np.pi, n)
  inner = rng.integers(0, 2, n).astype(bool)
  x = np.where(inner, 1.0 - np.cos(t), np.cos(t))
  y = np.where(inner, 0.5 - np.sin(t), np.sin(t))
  points = np.stack([x, y], axis=1) + _MOONS_NOISE * rng.standard_normal((n, 2))
  return _MOONS_SCALE * (points - np.array([0.5, 0.25]))


def _swissroll(n: int, rng: np.random.Generator) -> np.ndarray:
  """sklearn's 2D Swiss roll t (cos t, sin t), t in [1.5 pi, 4.5 pi], scaled to radius <= 2."""
  t = rng.uniform(*_SWISSROLL_TURNS, n)
  points = t[:, None] * np.stack([np.cos(t), np.sin(t)], axis=1)
  points *= 2.0 / _SWISSROLL_TURNS[1]
  return points + _SWISSROLL_NOISE * rng.standard_normal((n, 2))


def _student_t(n: int, rng: np.random.Generator) -> np.ndarray:
  """Heavy-tailed along x, two light-tailed modes along y: x = 0.5 T with T ~ t(3) (variance
  0.75; |x| exceeds 2.92 with probability 1% and 6.46 with probability 0.1%), y = +-1 (equally
  likely) + N(0, 0.2^2), independent of x."""
  x = STUDENT_T_SCALE * rng.standard_t(STUDENT_T_NU, n)
  y = (2.0 * rng.integers(0, 2, n) - 1.0) + _STUDENT_T_Y_STD * rng.standard_normal(n)
  return np.stack([x, y], axis=1)


_SAMPLERS = {
    "checkerboard": _checkerboard,
    "8gaussians": _eight_gaussians,
    "moons": _moons,
    "swissroll": _swissroll,
    "student_t": _student_t,
}


def check_distribution(distribution: str) -> None:
  """Raises ValueError with a did-you-mean hint if `distribution` is not a known toy."""
  if distribution not in _SAMPLERS:
    raise ValueError(
        registry.unknown_name_message("data.toy_distribution", distribution, list(DISTRIBUTIONS)))


def sample(distribution: str, n: int, rng_seed: int | Sequence[int]) -> np.ndarray:
  """Draws n points from a toy distribution.

  Args:
    distribution: one of DISTRIBUTIONS.
    n: number of points.
    rng_seed: a non-negative int, or a sequence of them (entropy of a NumPy SeedSequence),
      that fully determines the points.

  Returns:
    [n, 2] float32 points, roughly unit scale (student_t: unbounded along x).
  """
  check_distribution(distribution)
  rng = np.random.default_rng(rng_seed)
  return _SAMPLERS[distribution](n, rng).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _LocalBatch:
  """Global batch k -> this process's rows of it: {'image': [stop - start, 2] float32}."""
  distribution: str
  seed: int
  split_stream: int
  global_batch_size: int
  rows: tuple[int, int]

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    points = sample(self.distribution, self.global_batch_size, (self.seed, self.split_stream, k))
    start, stop = self.rows
    return {"image": points[start:stop]}


def _check_split(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(
        f"split={split!r} is not a toy2d split; use one of {SPLITS} ('test' draws held-out "
        "points from a different random stream).")
  return SPLITS.index(split)


def info(data_config, split: str) -> pipeline.DataInfo:
  """Toy 2D data: image_shape (2,), no labels, infinite."""
  _check_split(split)
  check_distribution(data_config.toy_distribution)
  if data_config.conditional:
    raise ValueError(
        "data.conditional=True but data.name='toy2d' has no labels; set "
        "data.conditional=False or use a labelled dataset ('digits', 'tfds:<name>').")
  return pipeline.DataInfo(image_shape=(2,), num_classes=0, num_examples=None)


def local_batches(data_config, *, split: str, seed: int, global_batch_size: int,
                  rows: tuple[int, int],
                  shuffle: bool) -> tuple[pipeline.DataInfo, pipeline.LocalBatchFn]:
  """The split's DataInfo and k -> this process's rows of global batch k.

  The rows are {'image': [stop - start, 2] float32}. `shuffle` has no effect: every batch is
  a fresh draw.
  """
  del shuffle
  data_info = info(data_config, split)
  return data_info, _LocalBatch(data_config.toy_distribution, seed, _check_split(split),
                                global_batch_size, rows)
