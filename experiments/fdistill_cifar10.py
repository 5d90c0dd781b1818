"""Class-conditional f-distill on CIFAR-10: dmd2_cifar10.py with the forward-KL weights.

Xu et al., arXiv:2502.15681 (f-distill), as NVlabs/FastGen's
fastgen/configs/experiments/EDM/config_f_distill_cifar10.py and methods/config_f_distill.py: the
forward-KL weighting h(r) = r of each sample's distribution-matching gradient (the CIFAR-10
config's f_div = "kl"; the method's default is Jensen-Shannon), r = exp(logit) of the GAN head
clipped to [0.1, 20] and divided by its mean per bin of t within the batch (10 bins,
ratio_ema_rate 0), h normalised to mean 1. Everything else is FastGen's DMD2 CIFAR-10 run
(dmd2_cifar10.py: batch 2048, 100k iterations, AdamW lr 1e-4, GAN weights 1e-3 and 1, constant
EMAs 0.9999, 0.99995 and 0.9996). FastGen's distribution-matching README lists a one-step FID of
1.85 for this run.
Every value and its source: BUILD.md, "Paper presets".

Differences besides dmd2_cifar10.py's: FastGen's discriminator averages the logits of its three
heads before r = exp(logit) (and clamps the mean to [-10, 10]), flowjax's one head gives one
logit; FastGen bins t over its noise levels sigma in [0.002, 80], flowjax over OT time in [0, 1].
Train the teacher as for dmd2_cifar10.py, then
python -m flowjax.main --config=experiments/fdistill_cifar10.py --workdir=DIR \
    --config.objective.teacher_workdir=TEACHER_DIR
Presets: :tiny (as dmd2_cifar10.py's).
"""

import os

from flowjax import config as config_lib

_DMD2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dmd2_cifar10.py")


def get_config(arg=None):
  return config_lib.derived_experiment(
      _DMD2, arg, "fdistill", f_divergence="kl", ratio_lower=0.1, ratio_upper=20.0,
      ratio_bins=10, ratio_ema_rate=0.0)


PRESETS = config_lib.experiment_module(_DMD2).PRESETS
