"""Unconditional Inductive Moment Matching on CIFAR-10 (32x32x3), the paper's CIFAR setting.

simple_edm output, the second time embedded as s itself ('identity'), sigma_d = 0.5, groups of
M = 4, on the official network: EDM's DDPM++ U-Net with a second mapping network for s, the two
summed before the last SiLU (flowjax.models.unet.UNET_PRESETS['imm_cifar10'], 56,061,443
parameters), so that lumalabs/imm state dicts convert into it (`python -m flowjax.convert
--format=imm_songunet`). From the network block of the official configs/
cifar10_generate_images.yaml: dropout 0.2, times between eps = 0.006 and T = 0.994 (the
sampler's end points). The repository ships no training code; the training settings are the
paper's (arXiv:2503.07565, App. I.1, Table 5, CIFAR-10): RAdam lr 1e-4, batch 4096, 400K
iterations, EMA 0.9999, loss weight a = 1 and b = 5, r(s, t) with the decrement
(eta_max - eta_min) / 2^15, x-flips. Table 5 also lists EDM's augmentation, which flowjax does not
implement.
Prepare the data once (tfds build cifar10 --file_format=array_record), then
python -m flowjax.main --config=experiments/imm_cifar10.py --workdir=DIR
Samples take 2 pushforward steps through the configs' intermediate noise level mid_nt = 1.4
(eta = sigma / alpha, t = 1.4 / 2.4 on the OT path): sample.times = (0.994, 0.5833, 0.006).
Every value and its source: BUILD.md, "Paper presets".
Presets: :tiny (a one-level U-Net of width 16 on synthetic 8x8x3 data, a few CPU steps);
:bench_full (the full U-Net on synthetic 32x32x3 data at batch 16, float32, for
python -m flowjax.bench); :bench_tiny (the same U-Net at width 32 with 2 blocks per level,
channel_mult (2, 2, 2), dropout 0.2: 2,227,971 parameters, 32x32x3, batch 16, the network the
PyTorch comparison in README "Performance" times); :batch64 (global batch 64; combine as
:bench_tiny,batch64).
"""

from flowjax import config as config_lib
from flowjax import models, objectives
from flowjax.models import unet


# The two-step sampler's intermediate time: eta = sigma / alpha = t / (1 - t) = 1.4.
MID_T = 1.4 / 2.4


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("imm")
  c.objective.update(dict(path="ot", f_type="simple_edm", time_embedding="identity",
                          sigma_d=0.5, t_min=0.006, t_max=0.994, group_size=4, mapping_k=15,
                          weight_a=1.0, weight_b=5.0, label_dropout=0.0))
  c.model = models.default_config("unet")
  c.model.update(unet.UNET_PRESETS["imm_cifar10"])
  c.model.update(dict(dropout=0.2, time_scale=1000.0, dtype="bfloat16", attention_impl="xla"))
  c.data.update(dict(name="tfds:cifar10", image_size=32, channels=3, conditional=False,
                     random_flip=True))
  c.optim.update(dict(name="radam", lr=1e-4, weight_decay=0.0, schedule="constant",
                      grad_clip=0.0, ema_decays=(0.9999,)))
  c.train.update(dict(steps=400_000, batch_size=4096, log_every=100))
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=20_000, num=64, num_steps=2, method="uniform",
                       times=(0.994, MID_T, 0.006)))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


_SYNTHETIC_CIFAR = {"data.name": "synthetic", "data.image_size": 32, "data.channels": 3,
                    "data.random_flip": False}
# The timed steps of README "Performance" (and its PyTorch comparison) used AdamW with clipping.
_BENCH = {**_SYNTHETIC_CIFAR, "model.dtype": "float32", "train.batch_size": 16,
          "train.log_every": 1, "sample.num": 16, "optim.name": "adamw", "optim.grad_clip": 1.0}

PRESETS = {
    "tiny": {"model.model_channels": 16, "model.channel_mult": (1,), "model.num_blocks": 1,
             "model.attn_resolutions": (8,), "model.dtype": "float32",
             "data.name": "synthetic", "data.image_size": 8, "data.random_flip": False,
             "train.steps": 4, "train.batch_size": 32, "train.log_every": 2,
             "ckpt.every_steps": 2, "sample.every_steps": 0, "sample.num": 8,
             "sample.num_steps": 2},
    "bench_full": _BENCH,
    "bench_tiny": {**_BENCH, "model.model_channels": 32, "model.channel_mult": (2, 2, 2),
                   "model.num_blocks": 2},
    "batch64": {"train.batch_size": 64},
}
