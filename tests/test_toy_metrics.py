"""Toy 2D metrics: zero for identical sets, separate near and far distributions."""

import numpy as np

from flowjax.data import toy2d
from flowjax.evals import toy2d as toy_metrics


def test_metrics_are_zero_for_identical_sets_and_symmetric():
  x = toy2d.sample("8gaussians", 500, 0)
  y = toy2d.sample("8gaussians", 500, 1)
  assert abs(toy_metrics.energy_distance(x, x)) < 1e-9
  assert toy_metrics.sliced_wasserstein(x, x) == 0.0
  np.testing.assert_allclose(toy_metrics.energy_distance(x, y),
                             toy_metrics.energy_distance(y, x), rtol=1e-9)


def test_energy_distance_matches_closed_form_for_shifted_points():
  # Two point masses at distance d: 2 d - 0 - 0.
  x = np.zeros((10, 2))
  y = np.full((10, 2), 3.0)
  np.testing.assert_allclose(toy_metrics.energy_distance(x, y), 2 * np.sqrt(18.0), rtol=1e-9)


def test_metrics_rank_distributions_and_report_their_floor():
  data = toy_metrics.evaluate(toy2d.sample("checkerboard", 2000, 5), "checkerboard")
  gaussian = toy_metrics.evaluate(np.random.default_rng(0).standard_normal((2000, 2)),
                                  "checkerboard")
  assert data["energy_distance"] < 3 * data["energy_distance_floor"] + 1e-3
  assert gaussian["energy_distance"] > 5 * data["energy_distance"]
  assert gaussian["sliced_wasserstein"] > 2 * data["sliced_wasserstein"]
