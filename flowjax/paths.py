"""Interpolants x_t = alpha_t x + sigma_t eps shared by every continuous-time method.

flowjax's convention: t = 0 is data, t = 1 is noise.
"""

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Path:
  """A noise schedule: `alpha(t)`, `sigma(t)` and their time derivatives; t: [...] in [0, 1]."""
  name: str

  def alpha(self, t):
    if self.name == "ot":
      return 1.0 - t
    return jnp.cos(0.5 * jnp.pi * t)

  def sigma(self, t):
    if self.name == "ot":
      return t
    return jnp.sin(0.5 * jnp.pi * t)

  def d_alpha(self, t):
    if self.name == "ot":
      return -jnp.ones_like(t)
    return -0.5 * jnp.pi * jnp.sin(0.5 * jnp.pi * t)

  def d_sigma(self, t):
    if self.name == "ot":
      return jnp.ones_like(t)
    return 0.5 * jnp.pi * jnp.cos(0.5 * jnp.pi * t)

  def eta(self, t):
    """Noise-to-signal ratio eta_t = sigma_t / alpha_t: t / (1 - t) (OT), tan(pi t / 2) (cosine).

    t: [...] in [0, 1); eta grows without bound as t -> 1, so callers keep t <= T < 1.
    """
    return self.sigma(t) / self.alpha(t)

  def t_of_eta(self, eta):
    """Inverse of `eta`: eta / (1 + eta) (OT), (2 / pi) atan(eta) (cosine); eta: [...] >= 0."""
    if self.name == "ot":
      return eta / (1.0 + eta)
    return jnp.arctan(eta) / (0.5 * jnp.pi)

  def log_snr(self, t):
    """lambda_t = 2 log(alpha_t / sigma_t); t: [...] in (0, 1)."""
    return 2.0 * (jnp.log(self.alpha(t)) - jnp.log(self.sigma(t)))

  def neg_d_log_snr(self, t):
    """-d lambda_t / dt = 2 (sigma'_t / sigma_t - alpha'_t / alpha_t); t: [...] in (0, 1).

    Equals 2 / (t (1 - t)) on the OT path and 2 pi / sin(pi t) on the cosine path.
    """
    return 2.0 * (self.d_sigma(t) / self.sigma(t) - self.d_alpha(t) / self.alpha(t))

  def interpolate(self, x, eps, t):
    """x_t = alpha_t x + sigma_t eps; x, eps: [B, ...], t: [B]."""
    t = expand(t, x)
    return self.alpha(t) * x + self.sigma(t) * eps

  def velocity(self, x, eps, t):
    """d x_t / dt = alpha'_t x + sigma'_t eps (= eps - x on the OT path)."""
    t = expand(t, x)
    return self.d_alpha(t) * x + self.d_sigma(t) * eps

  def ddim(self, x_t, x_hat, t, s):
    """DDIM step from t to s given a data estimate: (alpha_s - alpha_t sigma_s / sigma_t) x_hat
    + (sigma_s / sigma_t) x_t. x_t, x_hat: [B, ...]; t, s: [B] with sigma_t > 0."""
    t, s = expand(t, x_t), expand(s, x_t)
    ratio = self.sigma(s) / self.sigma(t)
    return (self.alpha(s) - self.alpha(t) * ratio) * x_hat + ratio * x_t


PATHS = ("ot", "cosine")


def get(name: str) -> Path:
  if name not in PATHS:
    from flowjax.registry import unknown_name_message
    raise ValueError(unknown_name_message("path", name, list(PATHS)))
  return Path(name)


def expand(t, x):
  """t: [B] -> [B, 1, ..., 1] broadcastable against x: [B, ...]."""
  return jnp.reshape(t, t.shape + (1,) * (x.ndim - t.ndim))
