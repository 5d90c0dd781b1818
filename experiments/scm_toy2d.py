"""Continuous-time consistency models (sCM: sCT, or sCD from fm_toy2d) on a 2D toy distribution.

Lu and Song, arXiv:2410.11081: TrigFlow with sigma_d = 1 (the toy data have about unit scale,
not the images' 0.5), tan(t) = e^tau / sigma_d with tau ~ N(-1.0, 1.4^2), the JVP of the
stop-gradient network, tangent warm-up over the first 10% of the steps, tangent normalisation
(c = 0.1) and the learned adaptive weight. Samples take 1 step (--config.sample.num_steps=2
goes through t_mid = 1.1).
python -m flowjax.main --config=experiments/scm_toy2d.py --workdir=workdirs/scm_toy2d
sCD distils the flow-matching baseline: train it first, then
python -m flowjax.main --config=experiments/fm_toy2d.py --workdir=workdirs/fm_toy2d
python -m flowjax.main --config=experiments/scm_toy2d.py:scd --workdir=workdirs/scd_toy2d \
    --config.objective.teacher_workdir=workdirs/fm_toy2d
(use the same distribution for both). Sized like meanflow_toy2d.py (steps, batch, optimizer).
Presets pick the distribution: :checkerboard (default), :8gaussians, :moons, :swissroll,
:student_t; :scd distils; :tiny (a few CPU steps; :tiny_scd with a teacher).
"""

import math

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("scm")
  c.objective.update(dict(mode="sct", sigma_data=1.0, p_mean=-1.0, p_std=1.4,
                          tangent_warmup_steps=1000, tangent_norm_c=0.1, weighting="adaptive",
                          jvp="autodiff", sigma_max=80.0, mid_time=1.1, label_dropout=0.0))
  c.model = models.default_config("mlp")
  # c_noise(t) = t (arXiv:2410.11081, Sec. 4.1): the backbone gets u = t / (pi/2).
  c.model.update(dict(hidden_size=256, depth=4, time_scale=math.pi / 2))
  c.data.update(dict(name="toy2d", toy_distribution="checkerboard", conditional=False))
  c.optim.update(dict(lr=1e-3, schedule="cosine", warmup_steps=100, final_lr=1e-5,
                      ema_decays=(0.999,)))
  c.train.update(dict(steps=10000, batch_size=256, log_every=100))
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=4096, num_steps=1, method="trigflow", guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


SCD = {"objective.mode": "scd"}
PRESETS = config_lib.toy2d_presets(**{"sample.num_steps": 2,
                                      "objective.tangent_warmup_steps": 2})
PRESETS["scd"] = SCD
PRESETS["tiny_scd"] = {**PRESETS["tiny"], **SCD}
