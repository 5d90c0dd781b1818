"""Class-conditional f-distill on ImageNet 64x64: NVlabs/FastGen's f-distill ImageNet-64 run.

Xu et al., arXiv:2502.15681, as NVlabs/FastGen's
fastgen/configs/experiments/EDM/config_f_distill_in64.py with its method defaults
(methods/config_f_distill.py and config_dmd2.py, configs/config.py, opt.py, callbacks.py,
networks/noise_schedule.py): the Jensen-Shannon weighting h(r) of each sample's
distribution-matching gradient, r = exp(logit) of the GAN head clipped to [0.1, 20] and divided by
its running mean per bin of t (10 bins, ratio_ema_rate 0.5), generator GAN weight 3e-3 and an
unweighted discriminator loss, AdamW (lr 2e-6, betas (0.9, 0.999), weight decay 0.01) for
generator, fake score and head at a constant rate without warm-up, the generator's gradients
clipped at norm 10 and the fake score's not, every noise level an index uniform over 2 .. 998 of
the Karras grid, batch 512, 600k iterations, constant EMAs 0.9999, 0.99995 and 0.9996. The
network and the update ratio (5) are dmd2_imagenet64.py's. Every value and its source:
BUILD.md, "Paper presets".

Differences besides dmd2_imagenet64.py's: FastGen's discriminator reads the teacher's features
(Discriminator_EDM_ImageNet64_Config, one head per resolution whose logits are averaged before
r = exp(logit)); flowjax's one head reads the fake score's bottleneck, as DMD2 does; FastGen's
fake score regresses the unweighted denoised image, flowjax's the velocity; FastGen bins t in its
noise scheduler's own time, flowjax in OT time t in [0, 1].
Train the teacher as for dmd2_imagenet64.py, then
python -m flowjax.main --config=experiments/fdistill_imagenet64.py --workdir=DIR \
    --config.objective.teacher_workdir=TEACHER_DIR
Presets: :tiny (as dmd2_imagenet64.py's).
"""

import os

from flowjax import config as config_lib

_DMD2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dmd2_imagenet64.py")


def get_config(arg=None):
  return config_lib.derived_experiment(
      _DMD2, arg, "fdistill",
      overrides={"train.steps": 600_000, "train.batch_size": 512, "optim.warmup_steps": 0,
                 "optim.sets.fake_score.grad_clip": 0.0,
                 "optim.ema_decays": (0.9999, 0.99995, 0.9996), "sample.use_ema": True},
      gan_weight=3e-3, gan_discriminator_weight=1.0, min_step_percent=0.002,
      max_step_percent=0.998, fake_score_levels="dm_range", f_divergence="js", ratio_lower=0.1,
      ratio_upper=20.0, ratio_bins=10, ratio_ema_rate=0.5)


PRESETS = config_lib.experiment_module(_DMD2).PRESETS
