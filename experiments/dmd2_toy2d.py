"""DMD2 on a 2D toy distribution: a one-step generator distilled from fm_toy2d (toy2d arena).

First train the flow-matching teacher, then DMD2 with that workdir as its teacher:
python -m flowjax.main --config=experiments/fm_toy2d.py --workdir=workdirs/fm_toy2d
python -m flowjax.main --config=experiments/dmd2_toy2d.py --workdir=workdirs/dmd2_toy2d \
    --config.objective.teacher_workdir=workdirs/fm_toy2d
(use the same preset, e.g. :moons or :tiny, for both). Generator and fake score are the teacher's
MLP started from its EMA weights; the fake score updates every step, the generator every 5th
(DMD2's two time-scale rule), each with its own Adam (optim.sets.generator / .fake_score).
Presets pick the distribution: :checkerboard (default), :8gaussians, :moons, :swissroll,
:student_t, :tiny.
"""

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("dmd2")
  c.model = models.default_config("mlp")
  c.model.update(dict(hidden_size=256, depth=4))
  c.data.update(dict(name="toy2d", toy_distribution="checkerboard", conditional=False))
  c.optim.update(dict(lr=1e-4, schedule="constant", grad_clip=10.0, ema_decays=(0.999,)))
  config_lib.parameter_sets(c, ("generator", "fake_score"))
  c.train.update(dict(steps=5000, batch_size=256, log_every=100))
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=4096, num_steps=1, method="generator", guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = config_lib.toy2d_presets(**{"sample.num_steps": 1})
