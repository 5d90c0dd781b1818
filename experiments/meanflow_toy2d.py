"""MeanFlow on a 2D toy distribution with an MLP: one-step samples (toy2d arena).

python -m flowjax.main --config=experiments/meanflow_toy2d.py --workdir=workdirs/meanflow_toy2d
The MLP gets two times, t and h = t - r. Samples take 1 step, z_0 = z_1 - u(z_1, 1, 1).
Presets pick the distribution: :checkerboard (default), :8gaussians, :moons, :swissroll,
:student_t (heavy-tailed, see fm_toy2d_heavy.py), :tiny.
"""

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("meanflow")
  c.objective.update(dict(time_sampler="logit_normal", time_mean=-0.4, time_std=1.0,
                          fraction_r_equals_t=0.75, adaptive_p=1.0, adaptive_eps=0.01,
                          label_dropout=0.0))
  c.model = models.default_config("mlp")
  c.model.update(dict(hidden_size=256, depth=4, time_scale=1.0))
  c.data.update(dict(name="toy2d", toy_distribution="checkerboard", conditional=False))
  c.optim.update(dict(lr=1e-3, schedule="cosine", warmup_steps=100, final_lr=1e-5,
                      ema_decays=(0.999,)))
  c.train.update(dict(steps=10000, batch_size=256, log_every=100))
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=4096, num_steps=1, method="euler", guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = config_lib.toy2d_presets(**{"sample.num_steps": 1})
