"""Unconditional improved consistency training (iCT) on CIFAR-10 (32x32x3), the paper's setting.

Song and Dhariwal, arXiv:2310.14189: the EDM parameterisation on sigma in [0.002, 80], Karras
discretisation (rho = 7) doubling from s0 = 10 to s1 = 1280 points over K = 400,000 iterations,
intervals drawn with lognormal(-1.1, 2.0) probabilities, weight 1 / (sigma_{i+1} - sigma_i),
pseudo-Huber distance with c = 0.00054 sqrt(d), the current network under stop-gradient as the
teacher (no EMA teacher); EDM's NCSN++ network with dropout 0.3 and Fourier scale 0.02; RAdam lr
1e-4, batch 1024, EMA 0.99993 for sampling.
The Fourier embedding reads iCT's c_noise = ln(sigma) / 4 here as u x time_scale with u =
(ln sigma - ln 0.002) / ln(80 / 0.002) in [0, 1]: time_scale = ln(40000) / 4 gives the same
frequencies on an input shifted by a constant (a fixed phase per frequency, which the first
dense layer absorbs).
Prepare the data once (tfds build cifar10 --file_format=array_record), then
python -m flowjax.main --config=experiments/consistency_cifar10.py --workdir=DIR
Samples take 1 step; :two_step samples through the paper's intermediate sigma = 0.821
(sample.times = (1, u(0.821), 0)). Every value and its source: BUILD.md, "Paper presets".
Presets: :two_step; :tiny (a one-level U-Net of width 16 on synthetic 8x8x3 data, a few CPU
steps).
"""

import math

from flowjax import config as config_lib
from flowjax import models, objectives
from flowjax.models import unet

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
# c_noise = ln(sigma) / 4 spans ln(SIGMA_MAX / SIGMA_MIN) / 4 over the backbone time u in [0, 1].
TIME_SCALE = math.log(SIGMA_MAX / SIGMA_MIN) / 4
# The two-step sampler's intermediate noise level, as a backbone time u.
MID_U = math.log(0.821 / SIGMA_MIN) / math.log(SIGMA_MAX / SIGMA_MIN)


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("consistency")
  c.objective.update(dict(sigma_data=0.5, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=7.0,
                          p_mean=-1.1, p_std=2.0, initial_steps=10, final_steps=1280,
                          huber_c=0.0, label_dropout=0.0))
  c.objective.total_steps = c.train.get_ref("steps") + 0
  c.model = models.default_config("unet")
  c.model.update(unet.UNET_PRESETS["ncsnpp_cifar10"])
  c.model.update(dict(augment_dim=0, dropout=0.3, fourier_scale=0.02, time_scale=TIME_SCALE,
                      dtype="bfloat16", attention_impl="xla"))
  c.data.update(dict(name="tfds:cifar10", image_size=32, channels=3, conditional=False,
                     random_flip=True))
  c.optim.update(dict(name="radam", lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0,
                      schedule="constant", warmup_steps=0, grad_clip=0.0,
                      ema_decays=(0.99993,)))
  c.train.update(dict(steps=400_000, batch_size=1024, log_every=100))
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=20_000, num=64, num_steps=1, method="multistep",
                       guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "two_step": {"sample.num_steps": 2, "sample.times": (1.0, MID_U, 0.0)},
    "tiny": {"model.model_channels": 16, "model.channel_mult": (1,), "model.num_blocks": 1,
             "model.attn_resolutions": (8,), "model.dtype": "float32",
             "data.name": "synthetic", "data.image_size": 8, "data.random_flip": False,
             "train.steps": 4, "train.batch_size": 16, "train.log_every": 2,
             "ckpt.every_steps": 2, "sample.every_steps": 0, "sample.num": 8},
}
