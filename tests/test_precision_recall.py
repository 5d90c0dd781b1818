"""Precision and recall from k-nearest-neighbour manifolds (arXiv:1904.06991): identities at the
boundaries, a hand-computed example, mode dropping, and blockwise computation equal to the
whole distance matrix."""

import numpy as np
import pytest

from flowjax.evals import precision_recall as pr


def brute_force(real, fake, k):
  """The definition with the whole distance matrices in float64."""
  def radii(x):
    distances = np.linalg.norm(x[:, None] - x[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    return np.sort(distances, axis=1)[:, k - 1]

  cross = np.linalg.norm(fake[:, None] - real[None], axis=-1)  # [M, N]
  precision = np.mean(np.any(cross <= radii(real)[None], axis=1))
  recall = np.mean(np.any(cross <= radii(fake)[:, None], axis=0))
  return precision, recall


def test_identical_sets_have_precision_and_recall_one():
  features = np.random.default_rng(0).standard_normal((300, 16))
  shuffled = features[np.random.default_rng(1).permutation(300)]
  assert pr.precision_recall(features, shuffled) == {"precision": 1.0, "recall": 1.0}


def test_far_apart_sets_have_precision_and_recall_zero():
  rng = np.random.default_rng(0)
  real = rng.standard_normal((200, 16))
  fake = rng.standard_normal((150, 16)) + 100.0
  assert pr.precision_recall(real, fake) == {"precision": 0.0, "recall": 0.0}


def test_a_hand_computed_example_in_one_dimension():
  """real = {0, 1, 2, 3, 4}, fake = {-3, 0, 0.5, 1, 1.5}, k = 3; a point on a ball's boundary is
  inside.

  Real radii (3rd nearest other point): 3, 2, 2, 2, 3: balls [-3, 3], [-1, 3], [0, 4], [1, 5],
  [1, 7], union [-3, 7], which holds all five fake points (-3 on its boundary): precision 1.
  Fake radii: -3 -> 4 (to 1), 0 -> 1.5, 0.5 -> 1, 1 -> 1, 1.5 -> 1.5: balls [-7, 1],
  [-1.5, 1.5], [-0.5, 1.5], [0, 2], [0, 3], union [-7, 3], which holds 0, 1, 2 and 3 (on the
  boundary) but not 4: recall 4/5.
  With k = 2 the same sets give (0.8, 0.6) and with k = 4 (1, 1).
  """
  real = np.array([0.0, 1, 2, 3, 4])[:, None]
  fake = np.array([-3.0, 0, 0.5, 1, 1.5])[:, None]
  np.testing.assert_array_equal(pr.kth_neighbour_radii(real), [3, 2, 2, 2, 3])
  np.testing.assert_array_equal(pr.kth_neighbour_radii(fake), [4, 1.5, 1, 1, 1.5])
  assert pr.precision_recall(real, fake) == {"precision": 1.0, "recall": 0.8}
  assert pr.precision_recall(real, fake, k=2) == {"precision": 0.8, "recall": 0.6}
  assert pr.precision_recall(real, fake, k=4) == {"precision": 1.0, "recall": 1.0}


def test_mode_dropping_lowers_recall_but_not_precision():
  """Real: two separated Gaussian modes. A model of both modes has high precision and recall; a
  model of one mode keeps its precision and loses about half the recall."""
  rng = np.random.default_rng(0)
  centres = np.zeros((2, 4))
  centres[1, 0] = 20.0
  def draw(num, modes):
    return centres[rng.choice(modes, num)] + rng.standard_normal((num, 4))

  real = draw(600, [0, 1])
  both = pr.precision_recall(real, draw(600, [0, 1]))
  dropped = pr.precision_recall(real, draw(600, [0]))
  assert both["precision"] > 0.9 and both["recall"] > 0.9
  assert abs(dropped["precision"] - both["precision"]) < 0.05
  assert 0.35 < dropped["recall"] < 0.6


def test_blockwise_computation_equals_the_whole_matrix(monkeypatch):
  """Blocks of 7 x N distances (ragged last block, padded rows) give the brute-force result, and
  so do different set sizes."""
  rng = np.random.default_rng(3)
  real = rng.standard_normal((53, 5))
  fake = rng.standard_normal((41, 5)) * 1.3 + 0.4
  whole = pr.precision_recall(real, fake)
  assert tuple(whole.values()) == pytest.approx(brute_force(real, fake, pr.K), abs=1e-12)
  monkeypatch.setattr(pr, "_BLOCK_ELEMENTS", 7 * 53)
  assert pr.precision_recall(real, fake) == whole
  assert 0.0 < whole["precision"] < 1.0 and 0.0 < whole["recall"] < 1.0


def test_inputs_are_checked():
  with pytest.raises(ValueError, match=r"N > k = 3; got shape \(3, 2\)"):
    pr.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))
  with pytest.raises(ValueError, match="differ in dimension: 2 and 4"):
    pr.precision_recall(np.zeros((10, 2)), np.zeros((10, 4)))
  with pytest.raises(ValueError, match="non-finite"):
    pr.kth_neighbour_radii(np.full((10, 2), np.nan))
