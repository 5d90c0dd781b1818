"""t-Flow: flow matching with Student-t noise on the heavy-tailed 2D toy, with an MLP.

python -m flowjax.main --config=experiments/fm_toy2d_heavy.py --workdir=workdirs/fm_toy2d_heavy
python -m flowjax.main --config=experiments/fm_toy2d_heavy.py:gaussian \
    --workdir=workdirs/fm_toy2d_heavy_gaussian   (the same run with Gaussian noise, to compare)

t-Flow (Pandey et al., "Heavy-Tailed Diffusion Models", arXiv:2410.14171): the OT path
x_t = (1 - t) x + t eps and its target eps - x, with eps drawn from the multivariate Student-t
t_2(0, I, nu) in the loss and as the prior of the Euler sampler (objective.noise='student_t',
objective.noise_nu = nu = 3, the data's own tail index). The data (data.toy_distribution=
'student_t') are 0.5 t(3) along x, with tails that Gaussian noise pushed through a smooth MLP
flow reproduces poorly, and two light-tailed modes along y. flowjax.evals.toy2d.evaluate scores
samples by energy distance and by the relative errors of the 0.99 and 0.999 quantiles of |x|
per axis (tail_q99_x, tail_q999_x, ..., tail_error).
Presets: :gaussian (objective.noise='gaussian'), :nu5 and :nu10 (lighter-tailed noise), the
toy2d distributions (:student_t, the default, :checkerboard, ...), :tiny.
"""

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("flow_matching")
  c.objective.update(dict(label_dropout=0.0, noise="student_t", noise_nu=3.0))
  c.model = models.default_config("mlp")
  c.model.update(dict(hidden_size=256, depth=4))
  c.data.update(dict(name="toy2d", toy_distribution="student_t", conditional=False))
  c.optim.update(dict(lr=1e-3, schedule="cosine", warmup_steps=100, final_lr=1e-5,
                      ema_decays=(0.999,)))
  c.train.update(dict(steps=5000, batch_size=256, log_every=100))
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=4096, num_steps=100, method="euler"))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    **config_lib.toy2d_presets(**{"sample.num_steps": 4}),
    "gaussian": {"objective.noise": "gaussian"},
    "nu5": {"objective.noise_nu": 5.0},
    "nu10": {"objective.noise_nu": 10.0},
}
