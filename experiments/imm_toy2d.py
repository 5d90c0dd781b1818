"""Inductive Moment Matching on a 2D toy distribution with an MLP: one- and few-step samples.

python -m flowjax.main --config=experiments/imm_toy2d.py --workdir=workdirs/imm_toy2d
Presets pick the distribution: :checkerboard (default), :8gaussians, :moons, :swissroll,
:student_t (heavy-tailed, see fm_toy2d_heavy.py), :tiny.
The toy data have std about 1, so sigma_d = 1 (the image default is 0.5). Two departures from
the image defaults suit a few thousand CPU steps (checked on the checkerboard): mapping_k = 8
(r sits (eta_max - eta_min) / 2^8 below t in eta, a 16x longer step than with k = 12, so the
induction from short to long jumps needs fewer updates) and weight_a = 1 (more weight near
t = T, where the one-step jump starts).
Samples use the 1-step pushforward; --config.sample.num_steps=2 (or 4, 8) takes more steps.
"""

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("imm")
  c.objective.update(dict(f_type="euler_fm", time_embedding="stride", sigma_d=1.0,
                          group_size=4, mapping_k=8, weight_a=1.0, label_dropout=0.0))
  c.model = models.default_config("mlp")
  c.model.update(dict(hidden_size=256, depth=4))
  c.data.update(dict(name="toy2d", toy_distribution="checkerboard", conditional=False))
  c.optim.update(dict(lr=1e-3, schedule="cosine", warmup_steps=100, final_lr=1e-5,
                      ema_decays=(0.999,)))
  c.train.update(dict(steps=4000, batch_size=512, log_every=100))
  c.ckpt.every_steps = 2000
  c.sample.update(dict(num=4096, num_steps=1, method="uniform", every_steps=1000))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = config_lib.toy2d_presets(**{"train.batch_size": 32, "sample.num_steps": 2})
