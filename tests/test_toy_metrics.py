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


def test_tail_errors_are_zero_for_identical_sets_and_scale_with_an_axis():
  x = toy2d.sample("student_t", 3000, 0)
  errors = toy_metrics.tail_errors(x, x)
  assert set(errors) == {"tail_q99_x", "tail_q99_y", "tail_q999_x", "tail_q999_y", "tail_error"}
  assert all(value == 0.0 for value in errors.values())
  # Quantiles of |x| scale with x: doubling the x axis makes its tails 100% too heavy, and a
  # sign flip changes nothing.
  stretched = toy_metrics.tail_errors(x * np.array([2.0, -1.0]), x)
  np.testing.assert_allclose([stretched["tail_q99_x"], stretched["tail_q999_x"]], 1.0,
                             rtol=1e-12)
  assert stretched["tail_q99_y"] == stretched["tail_q999_y"] == 0.0
  np.testing.assert_allclose(stretched["tail_error"], 0.5, rtol=1e-12)


def test_tail_errors_tell_a_gaussian_of_the_same_variance_from_heavy_tailed_data():
  """A Gaussian with the data's mean and variance along x (and the data's own y): its x tail
  errors are far outside the real-data floor and negative (tails too light); its y errors are
  not."""
  n = 4096
  data = toy2d.sample("student_t", 20_000, 3)
  rng = np.random.default_rng(0)
  fit = data.mean(0) + data.std(0) * rng.standard_normal((n, 2))
  fit[:, 1] = data[:n, 1]  # the light-tailed axis exactly as the data
  real = toy_metrics.evaluate(toy2d.sample("student_t", n, 4), "student_t")
  gaussian = toy_metrics.evaluate(fit, "student_t")
  assert real["tail_error"] < 0.15 and real["tail_error_floor"] < 0.15
  assert gaussian["tail_q999_x"] < -0.4 and gaussian["tail_q99_x"] < -0.1
  assert gaussian["tail_error"] > 2 * real["tail_error_floor"]
  assert abs(gaussian["tail_q99_y"]) < 0.15
