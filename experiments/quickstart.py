"""Quickstart: class-conditional flow matching on scikit-learn's 8x8 digits (CPU, minutes).

python -m flowjax.main --config=experiments/quickstart.py --workdir=workdirs/quickstart
"""

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("flow_matching")
  c.objective.time_sampler = "logit_normal"
  c.model = models.default_config("dit")
  c.model.update(dict(patch_size=2, hidden_size=96, depth=4, num_heads=4, time_scale=1000.0))
  c.data.update(dict(name="digits", conditional=True, image_size=8))
  c.optim.update(dict(lr=1e-3, schedule="cosine", warmup_steps=100, final_lr=1e-5,
                      ema_decays=(0.995,), weight_decay=0.0))
  c.train.update(dict(steps=1500, batch_size=128, log_every=100))
  c.ckpt.every_steps = 500
  c.sample.update(dict(num=100, num_steps=50, method="heun", guidance=2.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "tiny": {"model.hidden_size": 32, "model.depth": 1, "model.num_heads": 2, "train.steps": 4,
             "train.batch_size": 16, "train.log_every": 2, "ckpt.every_steps": 2,
             "sample.num": 16, "sample.num_steps": 4, "optim.warmup_steps": 0},
}
