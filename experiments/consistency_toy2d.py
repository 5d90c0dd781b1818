"""Consistency training (iCT) on a 2D toy distribution with an MLP: 1-step samples (toy2d arena).

python -m flowjax.main --config=experiments/consistency_toy2d.py --workdir=workdirs/ct_toy2d
EDM parameterisation with sigma_data = 1 (the toy data have about unit scale, not the images'
0.5), pseudo-Huber distance, no EMA teacher, lognormal(-1.1, 2) intervals of a discretisation
that doubles from 10 to 1280 steps over train.steps (objective.total_steps follows train.steps
unless set). Samples take 1 step (--config.sample.num_steps=N for N-step consistency sampling).
Sized like meanflow_toy2d.py (same steps, batch and optimizer).
Presets pick the distribution: :checkerboard (default), :8gaussians, :moons, :swissroll,
:student_t (heavy-tailed, see fm_toy2d_heavy.py), :tiny.
"""

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("consistency")
  c.objective.update(dict(sigma_data=1.0, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                          p_mean=-1.1, p_std=2.0, initial_steps=10, final_steps=1280,
                          huber_c=0.0, label_dropout=0.0))
  c.objective.total_steps = c.train.get_ref("steps") + 0
  c.model = models.default_config("mlp")
  c.model.update(dict(hidden_size=256, depth=4))
  c.data.update(dict(name="toy2d", toy_distribution="checkerboard", conditional=False))
  c.optim.update(dict(lr=1e-3, schedule="cosine", warmup_steps=100, final_lr=1e-5,
                      ema_decays=(0.999,)))
  c.train.update(dict(steps=10000, batch_size=256, log_every=100))
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=4096, num_steps=1, method="multistep", guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = config_lib.toy2d_presets(**{"sample.num_steps": 1})
