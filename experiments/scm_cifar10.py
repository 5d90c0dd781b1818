"""Unconditional continuous-time consistency training (sCT) on CIFAR-10, the paper's setting.

Lu and Song, arXiv:2410.11081 (App. G.1, G.2): TrigFlow with sigma_d = 0.5 and c_noise(t) = t
(Sec. 4.1); the DDPM++ network of Score SDE (EDM's CIFAR-10 configuration) with positional time
embeddings; the proposal tan(t) = e^tau / sigma_d with tau ~ N(-1.0, 1.4^2), tangent warm-up
over 10k iterations, tangent normalisation with c = 0.1 and the adaptive weight w_phi (Sec. 4.2,
Algorithm 1); RAdam at a constant 1e-4 with betas (0.9, 0.99) and eps 1e-8, batch 512, dropout
0.20, EMA half-life 0.5 Mimg (a per-step decay of 0.5^(512 / 500000) at batch 512: recompute
it when changing train.batch_size); 2-step sampling through t_mid = 1.1. flowjax's DDPM++ lacks
the paper's adaptive double normalisation. Its positional embedding reads u = t / (pi/2) times
model.time_scale = pi/2, that is c_noise = t. The paper starts both sCT and sCD from its
teacher's EMA weights: :scd does so (objective.init_from_teacher=True: the U-Net runs as the
teacher's OT velocity network, its output converted to TrigFlow's F, and starts from the
teacher's first EMA), while sCT here starts from random weights unless given a teacher with
--config.objective.init_from_teacher=True --config.objective.teacher_workdir=DIR. Every value
and its source: BUILD.md, "Paper presets".
Prepare the data once (tfds build cifar10 --file_format=array_record), then
python -m flowjax.main --config=experiments/scm_cifar10.py --workdir=DIR
Presets: :one_step; :scd (distils a flowjax flow-matching run and starts from its weights,
without dropout as the paper's sCD; also pass --config.objective.teacher_workdir=DIR; the
teacher must be a flow_matching run on tfds:cifar10 with this file's model section, where
model.dropout may differ and any other differing model key is refused by name); :tiny (a
one-level U-Net of width 16 on synthetic 8x8x3 data, a few CPU steps).
"""

import math

from flowjax import config as config_lib
from flowjax import models, objectives
from flowjax.models import unet

# The paper's EMA half-life, 0.5 Mimg (App. G.2, after EDM).
EMA_HALFLIFE_IMAGES = 500_000


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("scm")
  c.objective.update(dict(mode="sct", sigma_data=0.5, p_mean=-1.0, p_std=1.4,
                          tangent_warmup_steps=10_000, tangent_normalization="norm",
                          tangent_norm_c=0.1, weighting="adaptive", prior_weighting="none",
                          jvp="autodiff", sigma_max=80.0, mid_time=1.1, label_dropout=0.0))
  c.model = models.default_config("unet")
  c.model.update(unet.UNET_PRESETS["ddpmpp_cifar10"])
  c.model.update(dict(augment_dim=0, dropout=0.2, time_scale=math.pi / 2, dtype="bfloat16",
                      attention_impl="xla"))
  c.data.update(dict(name="tfds:cifar10", image_size=32, channels=3, conditional=False,
                     random_flip=True))
  batch_size = 512
  c.optim.update(dict(name="radam", lr=1e-4, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0,
                      schedule="constant", warmup_steps=0, grad_clip=0.0,
                      ema_decays=(0.5 ** (batch_size / EMA_HALFLIFE_IMAGES),)))
  c.train.update(dict(steps=400_000, batch_size=batch_size, log_every=100))
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=20_000, num=64, num_steps=2, method="trigflow",
                       guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "one_step": {"sample.num_steps": 1},
    "scd": {"objective.mode": "scd", "model.dropout": 0.0, "objective.init_from_teacher": True},
    "tiny": {"model.model_channels": 16, "model.channel_mult": (1,), "model.num_blocks": 1,
             "model.attn_resolutions": (8,), "model.dtype": "float32",
             "data.name": "synthetic", "data.image_size": 8, "data.random_flip": False,
             "objective.tangent_warmup_steps": 2, "train.steps": 4, "train.batch_size": 16,
             "train.log_every": 2, "ckpt.every_steps": 2, "sample.every_steps": 0,
             "sample.num": 8},
}
