"""Flow matching on a 2D toy distribution with an MLP (the baseline of the toy2d arena).

python -m flowjax.main --config=experiments/fm_toy2d.py --workdir=workdirs/fm_toy2d
Presets pick the distribution: :checkerboard (default), :8gaussians, :moons, :swissroll,
:student_t (heavy-tailed, see fm_toy2d_heavy.py), :tiny.
"""

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("flow_matching")
  c.objective.label_dropout = 0.0
  c.model = models.default_config("mlp")
  c.model.update(dict(hidden_size=256, depth=4))
  c.data.update(dict(name="toy2d", toy_distribution="checkerboard", conditional=False))
  c.optim.update(dict(lr=1e-3, schedule="cosine", warmup_steps=100, final_lr=1e-5,
                      ema_decays=(0.999,)))
  c.train.update(dict(steps=5000, batch_size=256, log_every=100))
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=4096, num_steps=100, method="euler"))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = config_lib.toy2d_presets(**{"sample.num_steps": 4})
