"""Consistency Trajectory Model on a 2D toy distribution, distilled from fm_toy2d (toy2d arena).

First train the flow-matching teacher, then CTM with that workdir as its teacher:
python -m flowjax.main --config=experiments/fm_toy2d.py --workdir=workdirs/fm_toy2d
python -m flowjax.main --config=experiments/ctm_toy2d.py --workdir=workdirs/ctm_toy2d \
    --config.objective.teacher_workdir=workdirs/fm_toy2d
(use the same preset, e.g. :moons or :tiny, for both). The MLP gets two times, ln(t) / 4 and
ln(s) / 4 in EDM sigma units; samples take 1 step (gamma = 0). L2 distance, adaptive DSM weight.
The teacher takes 1 or 2 Heun steps per example (CIFAR-10 and digits: up to 17, weighted), so a
CTM step costs about 5x a flow-matching step on 2 CPU cores instead of 12x;
`--config.objective.max_heun_steps=17 --config.objective.heun_step_strategy=weighted` restores
the long teacher jumps.
Presets pick the distribution: :checkerboard (default), :8gaussians, :moons, :swissroll,
:student_t (heavy-tailed, see fm_toy2d_heavy.py), :tiny.
"""

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("ctm")
  c.objective.update(dict(num_scales=18, max_heun_steps=2, heun_step_strategy="uniform",
                          distance="l2", dsm_balance="adaptive", sigma_data=0.5,
                          sample_gamma=0.0))
  c.model = models.default_config("mlp")
  c.model.update(dict(hidden_size=256, depth=4))
  c.data.update(dict(name="toy2d", toy_distribution="checkerboard", conditional=False))
  c.optim.update(dict(lr=1e-3, schedule="cosine", warmup_steps=100, final_lr=1e-5,
                      ema_decays=(0.999,)))
  c.train.update(dict(steps=5000, batch_size=256, log_every=100))
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=4096, num_steps=1, method="karras", guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = config_lib.toy2d_presets(**{"sample.num_steps": 2, "objective.num_scales": 6,
                                      "objective.max_heun_steps": 2})
