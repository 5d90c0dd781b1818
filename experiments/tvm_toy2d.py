"""Terminal Velocity Matching on a 2D toy distribution with an MLP: one- and few-step samples.

python -m flowjax.main --config=experiments/tvm_toy2d.py --workdir=workdirs/tvm_toy2d
The MLP gets two times, t and t - s, embedded raw (model.time_scale = 1, as lumalabs/tvm), and
the loss differentiates through dF/ds (Zhou et al., arXiv:2511.19797, Eq. 17). The paper's
settings otherwise: gap* times (t - s ~ LN(-0.8, 1), s and the flow-matching s' ~ LN(-0.4, 1)),
targets from an EMA of rate 0.99 (Table 4b), AdamW beta2 = 0.95 (Sec. 4). The data are
unconditional, so there is no guidance (w = 1).
Samples take 1 step, x_0 = x_1 - F(x_1, 1, 0); --config.sample.num_steps=2 (or 4, 8) takes more.
Presets pick the distribution: :checkerboard (default), :8gaussians, :moons, :swissroll,
:student_t (heavy-tailed, see fm_toy2d_heavy.py), :tiny.
"""

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("tvm")
  c.objective.update(dict(time_sampler="gap", gap_mean=-0.8, gap_std=1.0, s_mean=-0.4,
                          s_std=1.0, fm_time="separate", label_dropout=0.0, target_ema="0.99"))
  c.model = models.default_config("mlp")
  c.model.update(dict(hidden_size=256, depth=4, time_scale=1.0))
  c.data.update(dict(name="toy2d", toy_distribution="checkerboard", conditional=False))
  c.optim.update(dict(lr=1e-3, b2=0.95, schedule="cosine", warmup_steps=100, final_lr=1e-5,
                      ema_decays=(0.999, 0.99)))
  c.train.update(dict(steps=10000, batch_size=256, log_every=100))
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=4096, num_steps=1, method="uniform", guidance=1.0, ema_decay=0.999))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = config_lib.toy2d_presets(**{"sample.num_steps": 1})
