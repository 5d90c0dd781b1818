"""Class-conditional Consistency Trajectory Model on scikit-learn's 8x8 digits, distilled from the
quickstart flow-matching run (CPU, minutes).

First train the teacher, then CTM with that workdir as its teacher:
python -m flowjax.main --config=experiments/quickstart.py --workdir=workdirs/quickstart
python -m flowjax.main --config=experiments/ctm_digits.py --workdir=workdirs/ctm_digits \
    --config.objective.teacher_workdir=workdirs/quickstart
(use :tiny for both for a few CPU steps). The student is the quickstart's DiT with a second time
input; the teacher's classifier-free guidance 2.0 (the quickstart's sampling setting) is distilled
into the student, which samples in 2 steps without guidance. Presets: :tiny.
"""

from flowjax import blocks, config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("ctm")
  c.objective.update(dict(num_scales=18, max_heun_steps=17, heun_step_strategy="weighted",
                          teacher_guidance=2.0, distance="l2", dsm_balance="adaptive",
                          sigma_data=0.5, sample_gamma=0.0))
  c.model = models.default_config("dit")
  blocks.digits_dit(c)
  c.optim.lr = 4e-4
  c.ckpt.every_steps = 500
  c.sample.update(dict(num=100, num_steps=2, method="karras", guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "tiny": blocks.tiny_dit(**{"sample.num_steps": 2, "objective.num_scales": 6,
                               "objective.max_heun_steps": 2}),
}
