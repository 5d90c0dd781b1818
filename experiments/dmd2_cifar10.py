"""Class-conditional DMD2 on CIFAR-10: a one-step generator, NVlabs/FastGen's CIFAR-10 run.

Yin et al., arXiv:2405.14867 (DMD2), as NVlabs/FastGen's
fastgen/configs/experiments/EDM/config_dmd2_cifar10.py with its method defaults
(fastgen/configs/methods/config_dmd2.py, configs/config.py, configs/opt.py, configs/callbacks.py)
and its DMD2 code (fastgen/methods/distribution_matching/dmd2.py, networks/noise_schedule.py):
generator and fake score started from the teacher (EDM's class-conditional CIFAR-10 DDPM++ there,
dropout 0), each trained by AdamW (lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01) at a
constant rate without warm-up; the generator's gradients clipped at norm 10, the fake score's not;
the generator updated once in every 5 steps; every noise level an index uniform over 2 .. 998 of
the 1000-point Karras grid (sigma 0.002 to 80, rho 7: FastGen's "polynomial" time distribution,
one law for the distribution-matching term, the fake score and the GAN); the GAN with generator
weight 1e-3 and discriminator weight 1; no guidance in the real score; batch 2048; 100k iterations;
constant EMAs 0.9999, 0.99995 and 0.9996 of the generator; float32. FastGen's
distribution-matching README lists a one-step FID of 1.99 for this run. Every value and its
source: BUILD.md, "Paper presets".

Differences: the teacher is a flowjax flow-matching run (experiments/fm_cifar10.py: EDM's network
and training run under flowjax's flow-matching loss), not EDM's checkpoint, so FIDs are not
comparable with FastGen's; FastGen's discriminator reads the frozen teacher's features at 32, 16
and 8 (one head per resolution, three logits) and trains with its own AdamW, flowjax's head the
fake score's 8x8 bottleneck with the fake score's optimizer (DMD2's official convolutional head);
FastGen's fake score regresses the unweighted denoised image, flowjax's the velocity (the
denoised-image error times 1 / t^2); the generator starts at t = 1 (pure noise) where FastGen feeds
noise at sigma = 80; FastGen updates the generator at the first step of each cycle of 5, flowjax
at the last.

Train the teacher (python -m flowjax.main --config=experiments/fm_cifar10.py --workdir=TEACHER_DIR),
then
python -m flowjax.main --config=experiments/dmd2_cifar10.py --workdir=DIR \
    --config.objective.teacher_workdir=TEACHER_DIR
Samples take 1 step from the first EMA. Presets: :tiny (synthetic 8x8x3 data of 10 classes, a
one-level U-Net of width 16, a few CPU steps; its teacher is fm_cifar10.py:tiny).
"""

import os

from flowjax import config as config_lib
from flowjax import objectives

_TEACHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fm_cifar10.py")


def get_config(arg=None):
  teacher = config_lib.load_experiment(_TEACHER)
  c = config_lib.base_config()
  c.objective = objectives.default_config("dmd2")
  c.objective.update(dict(
      generator_steps=1, generator_update_every=5, noise_levels="karras",
      min_step_percent=0.002, max_step_percent=0.998, fake_score_levels="dm_range",
      num_train_timesteps=1000, sigma_min=0.002, sigma_max=80.0, rho=7.0, teacher_guidance=1.0,
      regression_weight=0.0, gan_weight=1e-3, gan_discriminator_weight=1.0, gan_head="conv",
      gan_feature_layer=""))
  with c.unlocked():
    c.model = teacher.model
    c.data = teacher.data
  c.model.update(dict(dropout=0.0, dtype="float32"))
  c.optim.update(dict(name="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                      decay_norms_and_biases=True, schedule="constant", warmup_steps=0,
                      grad_clip=10.0, ema_decays=(0.9999, 0.99995, 0.9996)))
  c.train.update(dict(steps=100_000, batch_size=2048, log_every=100))
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=10_000, num=64, num_steps=1, method="generator",
                       guidance=1.0, use_ema=True))
  config_lib.apply_preset(c, arg, PRESETS)
  config_lib.parameter_sets(c, ("generator", "fake_score"), fake_score=dict(grad_clip=0.0))
  return c.lock()


PRESETS = {
    "tiny": {**{k: v for k, v in config_lib.experiment_module(_TEACHER).TINY.items()
                if k.startswith(("model.", "data."))},
             "optim.warmup_steps": 0, "objective.generator_update_every": 2,
             "train.steps": 4, "train.batch_size": 16, "train.log_every": 1,
             "ckpt.every_steps": 2, "sample.every_steps": 0, "sample.num": 8},
}
