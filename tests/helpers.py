"""Shared test utilities (importable from the test modules: tests/ is on sys.path)."""

import jax
import numpy as np

from flowjax.models import autoencoder


def random_autoencoder_params(model, image_shape, seed=0):
  """Autoencoder parameters drawn with NumPy in the model's shapes (no compiled init): kernels
  N(0, 1 / fan_in), norm scales near 1 and biases near 0, all distinct from their init values."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(path[-1].key)
    if name == "kernel":
      return rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    return (name == "scale") + 0.1 * rng.normal(size=leaf.shape)

  shapes = autoencoder.abstract_params(model, image_shape)
  return jax.tree_util.tree_map_with_path(lambda p, s: draw(p, s).astype(np.float32), shapes)
