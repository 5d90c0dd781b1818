"""DMD2 on scikit-learn's 8x8 digits: a one-step generator distilled from the quickstart run.

First train the flow-matching teacher, then DMD2 with that workdir as its teacher:
python -m flowjax.main --config=experiments/quickstart.py --workdir=workdirs/quickstart
python -m flowjax.main --config=experiments/dmd2_digits.py --workdir=workdirs/dmd2_digits \
    --config.objective.teacher_workdir=workdirs/quickstart
Generator and fake score are the teacher's DiT started from its EMA weights; the real score is
the teacher with classifier-free guidance 2.0 (the quickstart's sampling scale), which the
generator distils, so it samples with guidance 1.0. The fake score updates every step, the
generator every 5th (DMD2's two time-scale rule), each with its own AdamW (optim.sets).
Presets: :tiny.
"""

from flowjax import blocks, config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("dmd2")
  c.objective.teacher_guidance = 2.0
  c.model = models.default_config("dit")
  blocks.digits_dit(c, steps=1500)
  c.optim.update(dict(lr=1e-4, schedule="constant", warmup_steps=0, grad_clip=10.0))
  config_lib.parameter_sets(c, ("generator", "fake_score"))
  c.ckpt.every_steps = 500
  c.sample.update(dict(num=100, num_steps=1, method="generator", guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "tiny": blocks.tiny_dit(),
}
