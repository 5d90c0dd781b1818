"""Class-conditional shortcut model on scikit-learn's 8x8 digits with a small DiT (CPU, minutes).

python -m flowjax.main --config=experiments/shortcut_digits.py --workdir=workdirs/shortcut_digits
The DiT gets two times, t and the step-size level code level / 7; 1/8 of each batch trains the
shortcuts by self-consistency against the current network (stop-gradient, target_ema='current':
EMA targets stack one EMA lag per level, 7 between the finest and the 1-step level, too slow for
a run of 1500-3000 steps), the rest is flow matching at the finest level with label dropout
0.1. Samples take 1 step (--config.sample.num_steps=N for N in {1, 2, 4, ..., 128}). Guidance
is off (objective.guidance=1.0); set e.g. --config.objective.guidance=1.5 to bake CFG into the
targets as the reference does on ImageNet.
Sized like meanflow_digits.py (same steps, batch, backbone and optimizer). Presets: :tiny.
"""

from flowjax import blocks, config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("shortcut")
  c.objective.update(dict(finest_steps=128, bootstrap_fraction=0.125, target_ema="current",
                          target_clip=4.0, guidance=1.0, label_dropout=0.1, sigma_min=1e-5))
  c.model = models.default_config("dit")
  blocks.digits_dit(c)
  c.model.attention_impl = "xla"
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=100, num_steps=1, method="euler", guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "tiny": blocks.tiny_dit(),
}
