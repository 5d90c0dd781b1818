"""Class-conditional continuous-time consistency training (sCT) on scikit-learn's 8x8 digits.

Lu and Song, arXiv:2410.11081 (Algorithm 1): TrigFlow with sigma_d = 0.5 (data in [-1, 1]),
tan(t) = e^tau / 0.5 with tau ~ N(-1.0, 1.4^2), tangent warm-up over the first 10% of the steps,
tangent normalisation (c = 0.1), the learned adaptive weight, c_noise(t) = t (the DiT embeds
u = t / (pi/2) times model.time_scale = pi/2). Samples take 1 step (--config.sample.num_steps=2
goes through t_mid = 1.1). sCD instead distils the quickstart flow-matching run:
python -m flowjax.main --config=experiments/scm_digits.py --workdir=workdirs/scm_digits \
    --config.objective.mode=scd --config.objective.teacher_workdir=workdirs/quickstart
Sized like meanflow_digits.py (same steps, batch, backbone and optimizer). Presets: :tiny.
"""

import math

from flowjax import blocks, config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("scm")
  c.objective.update(dict(mode="sct", sigma_data=0.5, p_mean=-1.0, p_std=1.4,
                          tangent_warmup_steps=300, tangent_norm_c=0.1, weighting="adaptive",
                          jvp="autodiff", sigma_max=80.0, mid_time=1.1, label_dropout=0.0))
  c.model = models.default_config("dit")
  blocks.digits_dit(c)
  c.model.update(dict(attention_impl="xla", time_scale=math.pi / 2))
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=100, num_steps=1, method="trigflow", guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "tiny": blocks.tiny_dit(**{"objective.tangent_warmup_steps": 2}),
}
