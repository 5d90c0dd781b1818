"""Class-conditional flow matching on CIFAR-10 (32x32x3) with EDM's DDPM++ network and training run.

The teacher of dmd2_cifar10.py and fdistill_cifar10.py (and of any distillation on CIFAR-10 that
reads a flow-matching workdir). Network and training follow EDM's class-conditional CIFAR-10
command (Karras et al., arXiv:2206.00364; NVlabs/edm train.py with --cond=1 --arch=ddpmpp): the
DDPM++ U-Net (flowjax.models.unet.UNET_PRESETS['ddpmpp_cifar10'], 128 channels, multipliers
(2, 2, 2), 4 blocks per level, attention at 16x16, positional noise embedding), dropout 0.13,
Adam (0.9, 0.999, eps 1e-8) at lr 1e-3 ramped up linearly over the first 10 Mimg, batch 512,
200 Mimg (390,625 steps), EMA half-life 0.5 Mimg (a per-step decay of 0.5^(512 / 500,000)),
float32, no x-flips. Every value and its source: BUILD.md, "Paper presets".

Differences: the loss is flowjax's flow matching (velocity on x_t = (1 - t) x + t eps, t uniform,
no label dropout since EDM trains no guidance) rather than EDM's preconditioned denoiser loss;
EDM's non-leaking augmentations (probability 0.12, augment_dim 9) are not reproduced, so the
network has no augmentation-label input (augment_dim 0); the EMA is a constant per-step decay
(EDM ramps the half-life up over the first 10 Mimg, ema_rampup_ratio 0.05).

Prepare the data once (tfds build cifar10 --file_format=array_record), then
python -m flowjax.main --config=experiments/fm_cifar10.py --workdir=TEACHER_DIR
Samples take 50 Heun steps. Presets: :tiny (a one-level U-Net of width 16 on synthetic 8x8x3
data of 10 classes, a few CPU steps: the teacher of the distillation experiments' :tiny).
"""

from flowjax import blocks, config as config_lib
from flowjax import models, objectives
from flowjax.models import unet


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("flow_matching")
  c.objective.update(dict(path="ot", time_sampler="uniform", label_dropout=0.0))
  c.model = models.default_config("unet")
  c.model.update(unet.UNET_PRESETS["ddpmpp_cifar10"])
  c.model.update(dict(augment_dim=0, dropout=0.13, dtype="float32", attention_impl="xla"))
  c.data.update(dict(name="tfds:cifar10", image_size=32, channels=3, conditional=True,
                     random_flip=False))
  blocks.edm_training(c, lr=1e-3, batch_size=512, duration_mimg=200, ema_halflife_mimg=0.5)
  c.train.log_every = 100
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=20_000, num=64, num_steps=50, method="heun", guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


TINY = {"model.model_channels": 16, "model.channel_mult": (1,), "model.num_blocks": 1,
        "model.attn_resolutions": (8,), "data.name": "synthetic", "data.image_size": 8,
        "data.num_classes": 10, "optim.warmup_steps": 0, "train.steps": 4,
        "train.batch_size": 16, "train.log_every": 2, "ckpt.every_steps": 2,
        "sample.every_steps": 0, "sample.num": 8, "sample.num_steps": 2}

PRESETS = {"tiny": TINY}
