"""Class-conditional MeanFlow on scikit-learn's 8x8 digits with a small DiT (CPU, minutes).

python -m flowjax.main --config=experiments/meanflow_digits.py --workdir=workdirs/meanflow_digits
The DiT gets two times, t and h = t - r, embedded raw (time_scale 1, as the official MeanFlow
networks): the target's du/dt runs through the time embedding, and the digits DiT's usual 1000 t
makes it 1000 times larger, which diverges at this learning rate (the unweighted error grows
while the adaptive weight keeps the loss near 1). Samples take 1 step (sample.num_steps=2 for
2-NFE).
Training-time guidance is off (guidance_w=1, guidance_kappa=0): MeanFlow has no CFG at
inference, so a guided model is trained with e.g. --config.objective.guidance_w=2.0.
Presets: :tiny (a few CPU steps in tests).
"""

from flowjax import blocks, config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("meanflow")
  c.objective.update(dict(time_sampler="logit_normal", time_mean=-0.4, time_std=1.0,
                          fraction_r_equals_t=0.75, adaptive_p=1.0, adaptive_eps=0.01,
                          guidance_w=1.0, guidance_kappa=0.0, label_dropout=0.1))
  c.model = models.default_config("dit")
  blocks.digits_dit(c)
  c.model.update(dict(attention_impl="xla", time_scale=1.0))
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=100, num_steps=1, method="euler", guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "tiny": blocks.tiny_dit(),
}
