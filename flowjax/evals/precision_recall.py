"""Precision and recall of generated samples from k-nearest-neighbour manifold estimates
(Kynkaanniemi et al., arXiv:1904.06991), in any feature space (the FID Inception's pool features,
or those of `flowjax.evals.classifier`).

The manifold of a set of feature vectors is the union of balls, one around each vector, whose
radius is the distance to its k-th nearest neighbour among the other vectors of the set (k = 3,
the paper's choice). Precision is the fraction of generated vectors inside the real manifold (how
many samples look real); recall is the fraction of real vectors inside the generated manifold (how
much of the data the model covers). A point on a ball's boundary is inside.

Distances are computed on the default device in blocks of rows with one compiled shape, so memory
grows with block x N, not N^2: 10,000 x 10,000 pairs of 2048-d features never hold more than
_BLOCK_ELEMENTS distances at once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

K = 3
_BLOCK_ELEMENTS = 1 << 25  # float32 distances per block: 128 MiB
_PRECISION = jax.lax.Precision.HIGHEST


def _squared_distances(queries: jax.Array, points: jax.Array) -> jax.Array:
  """queries: [Q, F], points: [N, F] -> [Q, N] squared Euclidean distances, >= 0, in float32
  with full-precision products (TensorFloat-32 would perturb small distances)."""
  cross = jnp.dot(queries, points.T, precision=_PRECISION)
  squared = (jnp.sum(queries * queries, axis=1)[:, None] + jnp.sum(points * points, axis=1)[None]
             - 2.0 * cross)
  return jnp.maximum(squared, 0.0)


@functools.partial(jax.jit, static_argnames=("k",))
def _block_radii(block: jax.Array, start: jax.Array, points: jax.Array, k: int) -> jax.Array:
  """block: [C, F], the rows start .. start + C - 1 of points: [N, F] -> [C] squared distance of
  each to its k-th nearest neighbour among the other rows (its own column is excluded)."""
  squared = _squared_distances(block, points)
  own = (start + jnp.arange(block.shape[0]))[:, None] == jnp.arange(points.shape[0])[None]
  squared = jnp.where(own, jnp.inf, squared)
  # k - 1 rounds of removing each row's nearest, then the minimum: exact with ties, and much
  # faster on CPUs than lax.top_k.
  rows = jnp.arange(block.shape[0])
  for _ in range(k - 1):
    squared = squared.at[rows, jnp.argmin(squared, axis=1)].set(jnp.inf)
  return jnp.min(squared, axis=1)


@jax.jit
def _block_coverage(block: jax.Array, block_radii: jax.Array, real: jax.Array,
                    real_radii: jax.Array) -> tuple[jax.Array, jax.Array]:
  """block: [C, F] generated vectors with squared radii block_radii: [C] (-inf for padding
  rows); real: [N, F] with squared radii real_radii: [N]. Returns ([C] bool: the block's vectors
  inside the real manifold, [N] bool: the real vectors inside the block's balls)."""
  squared = _squared_distances(block, real)
  inside_real = jnp.any(squared <= real_radii[None], axis=1)
  covered = jnp.any(squared <= block_radii[:, None], axis=0)
  return inside_real, covered


def _block_size(num_rows: int, num_columns: int) -> int:
  return max(1, min(num_rows, _BLOCK_ELEMENTS // max(1, num_columns)))


def _padded_blocks(features: np.ndarray, size: int):
  """(start, [size, F] block zero-padded at the end, number of real rows) over the rows."""
  for start in range(0, len(features), size):
    block = features[start:start + size]
    rows = len(block)
    if rows < size:
      block = np.concatenate([block, np.zeros((size - rows, block.shape[1]), block.dtype)])
    yield start, block, rows


def _check(features, name: str, k: int) -> np.ndarray:
  features = np.asarray(features, np.float32)
  if features.ndim != 2 or len(features) <= k:
    raise ValueError(f"{name} must be [N, F] feature vectors with N > k = {k}; got shape "
                     f"{features.shape}.")
  if not np.isfinite(features).all():
    raise ValueError(f"{name} holds {np.sum(~np.isfinite(features))} non-finite values.")
  return features


def kth_neighbour_radii(features, k: int = K) -> np.ndarray:
  """features: [N, F] with N > k -> [N] float32 distance of each vector to its k-th nearest
  neighbour among the other N - 1 (the radii of the manifold estimate)."""
  features = _check(features, "features", k)
  points = jnp.asarray(features)
  size = _block_size(len(features), len(features))
  radii = []
  for start, block, rows in _padded_blocks(features, size):
    radii.append(np.asarray(_block_radii(jnp.asarray(block), jnp.int32(start), points, k))[:rows])
  return np.sqrt(np.concatenate(radii))


def precision_recall(real, fake, k: int = K) -> dict[str, float]:
  """{'precision', 'recall'} in [0, 1] of generated features fake: [M, F] against real: [N, F]
  (M, N > k) with k-nearest-neighbour manifolds (arXiv:1904.06991, Section 2).

  precision = (1/M) sum_g [exists r: ||g - r|| <= rho_k(r)], recall = (1/N) sum_r [exists g:
  ||r - g|| <= rho_k(g)], where rho_k(x) is the distance from x to its k-th nearest neighbour
  within its own set. The paper uses sets of equal size; the estimates depend on N and M.
  """
  real, fake = _check(real, "real", k), _check(fake, "fake", k)
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"real and fake features differ in dimension: {real.shape[1]} and "
                     f"{fake.shape[1]}; compute both with the same network.")
  real_radii = jnp.asarray(kth_neighbour_radii(real, k)**2)
  fake_radii = kth_neighbour_radii(fake, k)**2
  real_points = jnp.asarray(real)
  size = _block_size(len(fake), len(real))
  inside, covered = [], np.zeros(len(real), bool)
  for start, block, rows in _padded_blocks(fake, size):
    block_radii = np.full(size, -np.inf, np.float32)
    block_radii[:rows] = fake_radii[start:start + rows]
    block_inside, block_covered = _block_coverage(jnp.asarray(block), jnp.asarray(block_radii),
                                                  real_points, real_radii)
    inside.append(np.asarray(block_inside)[:rows])
    covered |= np.asarray(block_covered)
  return {"precision": float(np.mean(np.concatenate(inside))), "recall": float(np.mean(covered))}

