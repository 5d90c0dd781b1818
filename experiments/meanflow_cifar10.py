"""Unconditional MeanFlow on CIFAR-10 (32x32x3), the py-meanflow setting, 1-NFE sampling.

Prepare the data once (tfds build cifar10 --file_format=array_record), then
python -m flowjax.main --config=experiments/meanflow_cifar10.py --workdir=DIR
Network: the U-Net of Gsunshine/py-meanflow (flowjax.models.unet.UNET_PRESETS['meanflow_cifar10'],
55,929,347 parameters): DDPM++ with 256-wide positional embeddings of t and h = t - r,
concatenated into one mapping network, FIR resampling (1, 3, 3, 1), dropout 0.2; raw times are
embedded (time_scale 1). Objective (Geng et al., arXiv:2505.13447): adaptive weight p = 0.75,
eps = 1e-3 on the per-example sum of squares, 75% of examples with r != t
(fraction_r_equals_t = 0.25), no guidance. py-meanflow draws both times from
logit-normal(-2, 2) (its CIFAR-10 script's P_mean -2.0, P_std 2.0) and interpolates
z_t = (1 - t) x + t e, the flowjax convention (t = 0 is data), so the law is the same here: most
times lie near the data, with t the larger and r the smaller draw.
Optimizer and schedule as in py-meanflow's CIFAR-10 run (8 GPUs x 128): Adam (0.9, 0.999), no
weight decay, no gradient clipping, lr 6e-4 with a linear warm-up over 200 epochs (9,600 steps
of 1,024 images) then constant, 16,000 epochs (768,000 steps), EMA decays 0.9999 (sampled),
0.99995 and 0.9996. py-meanflow also trains with EDM's augmentation pipeline and feeds its
labels to the network; flowjax has no such pipeline, so this preset uses horizontal flips only
and no augmentation input. Float32, as py-meanflow trains (TF32 matmuls where the GPU has them).
A long EMA (0.99995) moves by less than float32 resolves in one step when the parameters move
slowly; --config.optim.ema_every=K folds K steps into one update. Every value and its source:
BUILD.md, "Paper presets".
Presets: :v1 (py-meanflow's improved cifar10_v1.sh time law: t ~ logit-normal(-0.6, 1.6) and
r = min(t, r') with r' ~ logit-normal(-4.0, 1.6)); :tiny (a one-level U-Net of width 16 on
synthetic 8x8x3 data, a few CPU steps); :bench_full, :bench_tiny (width 32, 2 blocks per level,
channel_mult (2, 2, 2), dropout 0.2: 2,219,523 parameters), :batch64 (synthetic 32x32x3 data at
batch 16 / 64 for python -m flowjax.bench).
"""

from flowjax import config as config_lib
from flowjax import models, objectives
from flowjax.models import unet


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("meanflow")
  c.objective.update(dict(time_sampler="logit_normal", time_mean=-2.0, time_std=2.0,
                          fraction_r_equals_t=0.25, error_reduction="sum", adaptive_p=0.75,
                          adaptive_eps=1e-3, guidance_w=1.0, guidance_kappa=0.0,
                          guidance_t_min=0.0, guidance_t_max=1.0, label_dropout=0.0))
  c.model = models.default_config("unet")
  c.model.update(unet.UNET_PRESETS["meanflow_cifar10"])
  c.model.update(dict(time_scale=1.0, dtype="float32", attention_impl="xla"))
  c.data.update(dict(name="tfds:cifar10", image_size=32, channels=3, conditional=False,
                     random_flip=True))
  c.optim.update(dict(name="adam", lr=6e-4, b1=0.9, b2=0.999, weight_decay=0.0,
                      schedule="constant", warmup_steps=9600, grad_clip=0.0,
                      ema_decays=(0.9999, 0.99995, 0.9996)))
  c.train.update(dict(steps=768_000, batch_size=1024, log_every=100))
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=20_000, num=64, num_steps=1, method="euler", guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


_SYNTHETIC_CIFAR = {"data.name": "synthetic", "data.image_size": 32, "data.channels": 3,
                    "data.random_flip": False}
_BENCH = {**_SYNTHETIC_CIFAR, "model.dtype": "float32", "train.batch_size": 16,
          "train.log_every": 1, "optim.warmup_steps": 0, "sample.num": 16}

PRESETS = {
    "v1": {"objective.pair_sampler": "separate", "objective.time_mean": -0.6,
           "objective.time_std": 1.6, "objective.r_mean": -4.0, "objective.r_std": 1.6},
    "tiny": {"model.model_channels": 16, "model.channel_mult": (1,), "model.num_blocks": 1,
             "model.attn_resolutions": (8,), "model.dtype": "float32",
             "data.name": "synthetic", "data.image_size": 8, "data.random_flip": False,
             "optim.warmup_steps": 0, "train.steps": 4, "train.batch_size": 16,
             "train.log_every": 2, "ckpt.every_steps": 2, "sample.every_steps": 0,
             "sample.num": 8, "sample.num_steps": 1},
    "bench_full": _BENCH,
    "bench_tiny": {**_BENCH, "model.model_channels": 32, "model.channel_mult": (2, 2, 2),
                   "model.num_blocks": 2},
    "batch64": {"train.batch_size": 64},
}
