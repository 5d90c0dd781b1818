"""Class-conditional improved MeanFlow (iMF) on scikit-learn's 8x8 digits (CPU, minutes).

python -m flowjax.main --config=experiments/imf_digits.py --workdir=workdirs/imf_digits
objective.variant='imf' (Geng, Lu et al., arXiv:2512.02012; official code Lyy-iiis/imeanflow)
with iMF's network at digits size: model.name='imf_dit' (in-context conditioning tokens instead
of adaLN-Zero, `models/mit.py`; an auxiliary velocity head of the last 2 of 4 blocks that gives
the JVP tangent, `imf.py` `iMeanFlow.forward`), fed t, h = t - r, 1 - 1/omega, t_min and t_max
as raw times (time_scale 1; the official network has no t input). Training draws the guidance
scale omega in [1, 8] with density 1/omega and the guidance interval (t_min ~ U[0, 0.5],
t_max ~ U[0.5, 1]) per example (`imf.py` `sample_cfg_scale`, `sample_cfg_interval`); each
example has r = t with probability 0.5 (`imf.py` `sample_tr`: the first half of the batch).
Sampling sets the guidance as network inputs, one call per step: --config.sample.guidance=OMEGA
and --config.objective.guidance_t_min / guidance_t_max for the interval. The defaults (omega 2
on [0, 1]) are not tuned for digits. Samples take 1 step (sample.num_steps=2 for 2-NFE).
Presets: :tiny (a few CPU steps in tests).
"""

from flowjax import blocks, config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("meanflow")
  c.objective.update(dict(variant="imf", imf_velocity="head", time_sampler="logit_normal",
                          time_mean=-0.4, time_std=1.0, fraction_r_equals_t=0.5,
                          adaptive_p=1.0, adaptive_eps=0.01, label_dropout=0.1,
                          guidance_scale_max=8.0, guidance_scale_beta=1.0,
                          guidance_interval=True, guidance_t_min=0.0, guidance_t_max=1.0))
  c.model = models.default_config("imf_dit")
  blocks.digits_dit(c)
  c.model.update(dict(attention_impl="xla", time_scale=1.0, time_tokens=(4, 4, 4, 2, 2),
                      label_tokens=8, aux_head_depth=2))
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=100, num_steps=1, method="euler", guidance=2.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "tiny": blocks.tiny_dit(**{"model.depth": 2, "model.aux_head_depth": 1}),
}
