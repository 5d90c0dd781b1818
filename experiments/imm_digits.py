"""Class-conditional Inductive Moment Matching on scikit-learn's 8x8 digits with a small DiT.

python -m flowjax.main --config=experiments/imm_digits.py --workdir=workdirs/imm_digits
Samples take 2 pushforward steps with classifier-free guidance 1.5 on the raw network output.
The loss weighting's alpha_t^a uses a = 1, the CIFAR-10 value of arXiv:2503.07565 (Table 5),
not the a = 2 of the ImageNet preset: a = 2 gives the noisiest times, where a sample's class is
decided, little weight, and on these digits its samples follow the label far less often (the
README's digits arenas, row "IMM, weighting a = 2").
Presets: :tiny (a few CPU steps in tests).
"""

from flowjax import blocks, config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("imm")
  c.objective.update(dict(f_type="euler_fm", time_embedding="stride", sigma_d=0.5,
                          group_size=4, weight_a=1.0, label_dropout=0.1))
  c.model = models.default_config("dit")
  blocks.digits_dit(c)
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=100, num_steps=2, method="uniform", guidance=1.5))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "tiny": blocks.tiny_dit(**{"train.batch_size": 32, "sample.num_steps": 2}),
}
