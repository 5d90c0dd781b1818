"""Class-conditional f-distill on ImageNet 64x64: dmd2_imagenet64.py with the f-divergence weights.

Xu et al., arXiv:2502.15681, as NVlabs/FastGen's fastgen/configs/experiments/EDM/config_f_distill
(ImageNet-64) and methods/config_f_distill: the Jensen-Shannon weighting h(r) of each sample's
distribution-matching gradient, r = exp(logit) of the GAN head clipped to [0.1, 20] and divided by
its running mean per bin of t (10 bins, ratio_ema_rate 0.5), generator GAN weight 3e-3, lr 2e-6
for generator, fake score and head, batch 512, 600k iterations, constant EMAs 0.9999, 0.99995 and
0.9996. Values FastGen's method defaults set that were not reachable (the optimizer's betas and
weight decay, its warm-up and clipping, the update ratio, the classifier's loss weight) stay at
DMD2's official ImageNet run (dmd2_imagenet64.py). Every value and its source: BUILD.md,
"Paper presets".

Differences besides dmd2_imagenet64.py's: FastGen's discriminator reads the teacher's features
(Discriminator_EDM_ImageNet64_Config); flowjax's head reads the fake score's bottleneck, as DMD2
does; FastGen bins t in its noise scheduler's own time, flowjax in OT time t in [0, 1].
Train the teacher as for dmd2_imagenet64.py, then
python -m flowjax.main --config=experiments/fdistill_imagenet64.py --workdir=DIR \
    --config.objective.teacher_workdir=TEACHER_DIR
Presets: :tiny (as dmd2_imagenet64.py's).
"""

import os

from flowjax import config as config_lib

_DMD2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dmd2_imagenet64.py")


def get_config(arg=None):
  c = config_lib.derived_experiment(_DMD2, None, "fdistill", gan_weight=3e-3, f_divergence="js",
                                    ratio_lower=0.1, ratio_upper=20.0, ratio_bins=10,
                                    ratio_ema_rate=0.5)
  with c.unlocked():
    c.train.update(dict(steps=600_000, batch_size=512))
    c.optim.ema_decays = (0.9999, 0.99995, 0.9996)
    c.sample.use_ema = True
    config_lib.apply_preset(c, arg, PRESETS)
    config_lib.parameter_sets(c, ("generator", "fake_score"))
  return c.lock()


PRESETS = config_lib.experiment_module(_DMD2).PRESETS
