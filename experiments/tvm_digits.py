"""Class-conditional Terminal Velocity Matching on scikit-learn's 8x8 digits with a small DiT.

python -m flowjax.main --config=experiments/tvm_digits.py --workdir=workdirs/tvm_digits
The DiT has the paper's Lipschitz controls (Zhou et al., arXiv:2511.19797, Sec. 4 and Table 6):
RMSNorm for LayerNorm, RMSNorm QK-norm, normalised adaLN modulation and spectral-norm-1
initialisation; it gets the times t, t - s and beta = 1 / w, embedded raw (model.time_scale = 1,
as lumalabs/tvm). Guidance is trained in at a constant w = 1.5 (the paper finds a constant w
better than random ones, Table 4a), so samples use sample.guidance = 1.5, the trained w.
Targets come from an EMA of rate 0.99 (Table 4b); AdamW beta2 = 0.95 (Sec. 4).
Samples take 1 step (sample.num_steps=2 or 4 for more).
Presets: :tiny (a few CPU steps in tests).
"""

from flowjax import blocks, config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("tvm")
  c.objective.update(dict(time_sampler="gap", fm_time="separate", scaled_param=True,
                          guidance_sampler="fixed", guidance_scale=1.5, label_dropout=0.1,
                          target_ema="0.99"))
  c.model = models.default_config("dit")
  blocks.digits_dit(c)
  c.model.update(dict(attention_impl="xla", time_scale=1.0, norm="rms", qk_norm=True,
                      modulation_norm=True, linear_init="spectral", time_init="spectral"))
  c.optim.update(dict(b2=0.95, ema_decays=(0.995, 0.99)))
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=100, num_steps=1, method="uniform", guidance=1.5, ema_decay=0.995))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "tiny": blocks.tiny_dit(),
}
