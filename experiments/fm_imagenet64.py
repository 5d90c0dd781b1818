"""Class-conditional flow matching on ImageNet 64x64 with EDM's ImageNet-64 training run.

The teacher of dmd2_imagenet64.py and fdistill_imagenet64.py: their network (flowjax's EDM U-Net
at the widths of EDM's ADM: 192 channels, multipliers (1, 2, 3, 4), 3 blocks per level, attention
at 32, 16 and 8; bfloat16) trained as EDM trains its class-conditional ImageNet-64 model
(Karras et al., arXiv:2206.00364; NVlabs/edm README, imagenet-64x64-cond-adm: --cond=1
--arch=adm --duration=2500 --batch=4096 --lr=1e-4 --ema=50 --dropout=0.10 --augment=0 --fp16=1):
Adam (0.9, 0.999, eps 1e-8) at lr 1e-4 ramped up linearly over the first 10 Mimg, batch 4096,
2500 Mimg (610,351 steps), EMA half-life 50 Mimg (a per-step decay of 0.5^(4096 / 50,000,000)),
dropout 0.10, no augmentation. Every value and its source: BUILD.md, "Paper presets".

Differences: the loss is flowjax's flow matching (velocity on x_t = (1 - t) x + t eps, t uniform,
no label dropout since EDM trains no guidance) rather than EDM's preconditioned denoiser loss; the
network is flowjax's EDM U-Net at ADM's widths, not ADM itself (dmd2_imagenet64.py); the EMA is a
constant per-step decay (EDM ramps the half-life up, ema_rampup_ratio 0.05).

EDM ran this batch on 32 GPUs (128 examples each); on 8 fake CPU devices (data 2 x fsdp 4) the
full-size step compiles (train.dry_run) with an XLA:CPU temporary-memory estimate of 446 GB per
device at 512 examples each, so give it as many devices or train.grad_accum_steps.

Prepare the data once (tfds build imagenet2012 --file_format=array_record), then
python -m flowjax.main --config=experiments/fm_imagenet64.py --workdir=TEACHER_DIR
Samples take 50 Heun steps. Presets: :tiny (dmd2_imagenet64.py:tiny's network and data, a few
CPU steps).
"""

import os

from flowjax import blocks, config as config_lib
from flowjax import objectives

_DMD2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dmd2_imagenet64.py")


def get_config(arg=None):
  student = config_lib.load_experiment(_DMD2)
  c = config_lib.base_config()
  c.objective = objectives.default_config("flow_matching")
  c.objective.update(dict(path="ot", time_sampler="uniform", label_dropout=0.0))
  with c.unlocked():
    c.model = student.model
    c.data = student.data
  c.model.update(dict(dropout=0.10))
  blocks.edm_training(c, lr=1e-4, batch_size=4096, duration_mimg=2500, ema_halflife_mimg=50)
  c.train.log_every = 100
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=20_000, num=64, num_steps=50, method="heun", guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "tiny": {**{k: v for k, v in config_lib.experiment_module(_DMD2).PRESETS["tiny"].items()
                if k.startswith(("model.", "data."))},
             "optim.warmup_steps": 0, "train.steps": 4, "train.batch_size": 16,
             "train.log_every": 2, "ckpt.every_steps": 2, "sample.every_steps": 0,
             "sample.num": 8, "sample.num_steps": 2},
}
