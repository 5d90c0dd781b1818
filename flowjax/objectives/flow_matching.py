"""Flow matching (rectified flow): regress v_theta(x_t, t, c) on the path velocity.

OT path: x_t = (1 - t) x + t eps, target v = eps - x (Lipman et al., arXiv:2210.02747).

objective.noise='student_t' is t-Flow (Pandey et al., "Heavy-Tailed Diffusion Models",
arXiv:2410.14171): eps is drawn from the multivariate Student-t t_D(0, I_D, nu) (nu =
objective.noise_nu; `common.draw_noise`: eps = n / sqrt(kappa), n ~ N(0, I_D), one
kappa ~ chi^2(nu) / nu per example) both in the loss and as the sampler's prior at t = 1. The
interpolant, the target v = eps - x, the time law and the unweighted squared error are flow
matching's: the Student-t noise is the only change, as in the t-EDM losses of NVIDIA/physicsnemo
(`tEDMResidualLoss`), whose further change, sigma sqrt(nu / (nu - 2)) in EDM's preconditioning,
has no counterpart here (this flow matching has no preconditioning). nu is one scalar for all
dimensions. With nu -> infinity, or
objective.noise='gaussian' (the default), this is flow matching exactly.

REPA (config.repa, arXiv:2410.06940; `repa`) aligns the hidden tokens of the training forward
v_theta(x_t, t, c).

Text-to-image (a backbone with model.text_dim > 0 on captioned data, `flowjax.data.captions`):
c is the batch's caption features, dropped to the empty caption's with probability label_dropout,
and classifier-free guidance contrasts a prompt with the empty caption.
"""

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from flowjax import paths
from flowjax.objectives import common, repa as repa_lib
from flowjax.registry import OBJECTIVES
from flowjax.samplers import ode


@OBJECTIVES.register("flow_matching")
@dataclasses.dataclass(frozen=True)
class FlowMatching(common.Conditioned):
  """model: backbone v_theta(x, (t,), cond); image_shape: per-example shape; num_classes: 0 for
  unconditional models."""
  model: nn.Module
  image_shape: tuple
  num_classes: int
  path: str = "ot"
  time_sampler: str = "uniform"
  logit_mean: float = 0.0
  logit_std: float = 1.0
  label_dropout: float = 0.1
  noise: str = "gaussian"
  noise_nu: float = common.DEFAULT_NU
  repa: repa_lib.Alignment | None = None
  null_text: Any = dataclasses.field(default=None, compare=False, repr=False)

  DEFAULTS: ClassVar[dict] = dict(path="ot", time_sampler="uniform", logit_mean=0.0,
                                  logit_std=1.0, label_dropout=0.1, **common.NOISE_DEFAULTS)

  def __post_init__(self):
    common.check_noise(self.noise, self.noise_nu)

  @classmethod
  def build(cls, config, model, info):
    return cls(model=model, image_shape=tuple(info.image_shape), num_classes=info.num_classes,
               path=config.path, time_sampler=config.time_sampler,
               logit_mean=config.logit_mean, logit_std=config.logit_std,
               label_dropout=config.label_dropout, noise=config.noise,
               noise_nu=config.noise_nu, null_text=common.text_null(model, info))

  def init(self, rng, batch):
    x = batch["image"][:1]
    cond = self.condition(batch)
    cond = None if cond is None else cond[:1]
    return common.init_model(self.model, rng, x, 1, cond), repa_lib.init_extra(self.repa, {})

  def load_extra(self, abstract_extra):
    """REPA's encoder parameters (config.repa with online features), else {}."""
    return repa_lib.load_extra(self.repa, abstract_extra, {})

  def velocity(self, params, x, t, cond, rng=None, train=False, capture=False):
    """v_theta(x_t, t, c); x: [B, ...], t: [B] in [0, 1], cond: [B] or None; with capture,
    (v, REPA tokens) (`common.apply_model`)."""
    return common.apply_model(self.model, params, x, (t,), cond, rng, train, capture)

  def loss(self, params, batch, rng, step, view):
    del step
    x = batch["image"]
    repa_target = repa_lib.target(self.repa, batch, view)
    time_key, noise_key, drop_key, model_key = jax.random.split(rng, 4)
    t = common.sample_time(time_key, (x.shape[0],), self.time_sampler, self.logit_mean,
                           self.logit_std)
    eps = common.draw_noise(noise_key, x.shape, self.noise, self.noise_nu, x.dtype)
    path = paths.get(self.path)
    x_t = path.interpolate(x, eps, t)
    target = path.velocity(x, eps, t)
    cond = self.drop_condition(self.condition(batch), drop_key)
    if repa_target is None:
      v = self.velocity(params, x_t, t, cond, model_key, train=True)
    else:
      v, tokens = self.velocity(params, x_t, t, cond, model_key, train=True, capture=True)
    per_example = common.mean_per_example(jnp.square(v.astype(jnp.float32) - target))
    loss, metrics = jnp.mean(per_example), {"t_mean": jnp.mean(t)}
    if repa_target is None:
      return loss, metrics
    return self.repa.add(loss, metrics, tokens, repa_target)

  def sample(self, params, rng, num, cond=None, *, num_steps=50, method="euler",
             guidance=1.0):
    """num samples from the noise law (N(0, I), or Student-t with objective.noise='student_t')
    at t = 1 integrated to t = 0; cond: [num] labels, caption features [num, T, D] of a text
    model, or None; guidance contrasts with the null label or the null caption."""
    x1 = common.draw_noise(rng, (num,) + self.image_shape, self.noise, self.noise_nu)
    fn = lambda x, t, c: self.velocity(params, x, t, c)
    return ode.solve(ode.guided(fn, cond, guidance, self.null), x1, num_steps, method)

