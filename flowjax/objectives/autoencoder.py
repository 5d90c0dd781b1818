"""Training a KL autoencoder (models/autoencoder.py): reconstruction + kl_weight * KL.

loss = E_x [ rec(x, D(z)) + kl_weight * KL(q(z | x) || N(0, I)) ], z = mu + sigma eps ~ q(z | x),
with rec the per-pixel mean |x - D(z)| ('l1') or (x - D(z))^2 ('l2') and the KL averaged over
the latent elements: KL = mean 0.5 (mu^2 + sigma^2 - 1 - log sigma^2). Both terms are
per-element means, so kl_weight trades reconstruction error per pixel against nats per latent
element. `sample` decodes z ~ N(0, I); `reconstruct` maps images through the posterior mean.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from flowjax.models import autoencoder as autoencoder_model
from flowjax.objectives import common
from flowjax.registry import OBJECTIVES

RECONSTRUCTION_LOSSES = ("l1", "l2")


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) per element, in nats; same shape as mean."""
  return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


@OBJECTIVES.register("autoencoder")
@dataclasses.dataclass(frozen=True)
class Autoencoder:
  """model: an AutoencoderKL; image_shape: (H, W, C) of the data; num_classes is ignored."""
  # The unweighted error the trainer logs as "error": the reconstruction error, without the KL
  # term.
  ERROR_METRIC: ClassVar[str] = "reconstruction"
  model: nn.Module
  image_shape: tuple
  num_classes: int
  reconstruction: str = "l1"
  kl_weight: float = 1e-4

  DEFAULTS: ClassVar[dict] = dict(reconstruction="l1", kl_weight=1e-4)

  @classmethod
  def build(cls, config, model, info):
    if config.reconstruction not in RECONSTRUCTION_LOSSES:
      raise ValueError(f"objective.reconstruction={config.reconstruction!r}; use one of "
                       f"{RECONSTRUCTION_LOSSES}.")
    if config.kl_weight < 0:
      raise ValueError(f"objective.kl_weight={config.kl_weight} must be >= 0.")
    if not isinstance(model, autoencoder_model.AutoencoderKL):
      raise ValueError(f"objective 'autoencoder' trains model.name='autoencoder', got a "
                       f"{type(model).__name__}.")
    return cls(model=model, image_shape=tuple(info.image_shape), num_classes=info.num_classes,
               reconstruction=config.reconstruction, kl_weight=float(config.kl_weight))

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    """(H / f, W / f, latent_channels)."""
    return autoencoder_model.latent_shape(self.model, self.image_shape)

  def init(self, rng, batch):
    return self.model.init({"params": rng}, batch["image"][:1])["params"], {}

  def loss(self, params, batch, rng, step, view):
    del step, view
    x = batch["image"]
    reconstruction, mean, logvar = self.model.apply({"params": params}, x, rng)
    error = reconstruction - x
    error = jnp.abs(error) if self.reconstruction == "l1" else jnp.square(error)
    rec = jnp.mean(common.mean_per_example(error))
    kl = jnp.mean(common.mean_per_example(gaussian_kl(mean, logvar)))
    return rec + self.kl_weight * kl, {"reconstruction": rec, "kl": kl,
                                       "latent_std": jnp.std(mean)}

  def reconstruct(self, params, x):
    """x: [B, H, W, C] in [-1, 1] -> D(posterior mean): [B, H, W, C]."""
    return self.model.apply({"params": params}, x)[0]

  def sample(self, params, rng, num, cond=None, **sampler_args):
    """num images D(z), z ~ N(0, I) of the latent shape; cond and sampler settings are unused."""
    del cond, sampler_args
    z = jax.random.normal(rng, (num,) + self.latent_shape)
    return self.model.apply({"params": params}, z, method=self.model.decode)
