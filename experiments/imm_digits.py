"""Class-conditional Inductive Moment Matching on scikit-learn's 8x8 digits with a small DiT.

python -m flowjax.main --config=experiments/imm_digits.py --workdir=workdirs/imm_digits
Samples take 2 pushforward steps with classifier-free guidance 1.5 on the raw network output.
Presets: :tiny (a few CPU steps in tests).
"""

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("imm")
  c.objective.update(dict(f_type="euler_fm", time_embedding="stride", sigma_d=0.5,
                          group_size=4, label_dropout=0.1))
  c.model = models.default_config("dit")
  c.model.update(dict(patch_size=2, hidden_size=96, depth=4, num_heads=4, time_scale=1000.0))
  c.data.update(dict(name="digits", conditional=True, image_size=8))
  c.optim.update(dict(lr=1e-3, schedule="cosine", warmup_steps=100, final_lr=1e-5,
                      ema_decays=(0.995,), weight_decay=0.0))
  c.train.update(dict(steps=3000, batch_size=128, log_every=100))
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=100, num_steps=2, method="uniform", guidance=1.5))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "tiny": {"model.hidden_size": 32, "model.depth": 1, "model.num_heads": 2, "train.steps": 4,
             "train.batch_size": 32, "train.log_every": 2, "ckpt.every_steps": 2,
             "sample.num": 16, "sample.num_steps": 2, "optim.warmup_steps": 0},
}
