"""Class-conditional consistency training (iCT) on scikit-learn's 8x8 digits with a small DiT.

python -m flowjax.main --config=experiments/consistency_digits.py --workdir=workdirs/ct_digits
EDM parameterisation with sigma_data = 0.5 (data in [-1, 1]), pseudo-Huber distance
(c = 0.00054 sqrt(D)), no EMA teacher, lognormal(-1.1, 2) intervals of a discretisation that
doubles from 10 to 1280 steps over train.steps (objective.total_steps follows train.steps unless
set). iCT trains with dropout (0.3 on CIFAR-10); here model.dropout stays 0 like the other digits
experiments. Samples take 1 step (--config.sample.num_steps=2 for 2-step consistency sampling).
Sized like meanflow_digits.py (same steps, batch, backbone and optimizer). Presets: :tiny.
"""

from flowjax import blocks, config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("consistency")
  c.objective.update(dict(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                          p_mean=-1.1, p_std=2.0, initial_steps=10, final_steps=1280,
                          huber_c=0.0, label_dropout=0.0))
  c.objective.total_steps = c.train.get_ref("steps") + 0
  c.model = models.default_config("dit")
  blocks.digits_dit(c)
  c.model.attention_impl = "xla"
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=100, num_steps=1, method="multistep", guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "tiny": blocks.tiny_dit(),
}
