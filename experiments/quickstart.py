"""Quickstart: class-conditional flow matching on scikit-learn's 8x8 digits (CPU, minutes).

python -m flowjax.main --config=experiments/quickstart.py --workdir=workdirs/quickstart
"""

from flowjax import blocks, config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("flow_matching")
  c.objective.time_sampler = "logit_normal"
  c.model = models.default_config("dit")
  blocks.digits_dit(c, steps=1500)
  c.ckpt.every_steps = 500
  c.sample.update(dict(num=100, num_steps=50, method="heun", guidance=2.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "tiny": blocks.tiny_dit(**{"sample.num_steps": 4}),
}
