"""Shortcut model on a 2D toy distribution with an MLP: 1 to 128 sampling steps (toy2d arena).

python -m flowjax.main --config=experiments/shortcut_toy2d.py --workdir=workdirs/shortcut_toy2d
The MLP gets two times, t and the step-size level code level / 7. 1/8 of each batch trains the
shortcuts by self-consistency against the current network (stop-gradient; objective.target_ema
='current'), the rest is flow matching at the finest level. Each level learns from the next finer
one, so EMA targets (the reference's choice for runs of 10^5+ steps) would stack 7 EMA lags
between the finest and the 1-step level; in a run of a few thousand steps that lag is most of the
run. Samples take 1 step (any power of two up to 128 with --config.sample.num_steps).
target_clip is 8, not the reference's 4: velocities of the toy data (in [-2, 2]^2) plus N(0, I)
noise reach beyond 4. Sized like meanflow_toy2d.py (same steps, batch and optimizer).
Presets pick the distribution: :checkerboard (default), :8gaussians, :moons, :swissroll,
:student_t (heavy-tailed, see fm_toy2d_heavy.py), :tiny.
"""

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("shortcut")
  c.objective.update(dict(finest_steps=128, bootstrap_fraction=0.125, target_ema="current",
                          target_clip=8.0, guidance=1.0, label_dropout=0.0, sigma_min=1e-5))
  c.model = models.default_config("mlp")
  c.model.update(dict(hidden_size=256, depth=4))
  c.data.update(dict(name="toy2d", toy_distribution="checkerboard", conditional=False))
  c.optim.update(dict(lr=1e-3, schedule="cosine", warmup_steps=100, final_lr=1e-5,
                      ema_decays=(0.999,)))
  c.train.update(dict(steps=10000, batch_size=256, log_every=100))
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=4096, num_steps=1, method="euler", guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = config_lib.toy2d_presets(**{"sample.num_steps": 1})
