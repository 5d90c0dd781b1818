"""f-distill on scikit-learn's 8x8 digits: dmd2_digits.py with the f-divergence weighting.

Xu et al., arXiv:2502.15681, as NVlabs/FastGen's FdistillModel: DMD2 with its GAN (gan_weight
3e-3, the head on the fake score's middle block) whose head also estimates the density ratio
r = exp(logit) at the distribution-matching samples; each sample's gradient is weighted by
h(r) (objective.f_divergence, 'js' as FastGen's default), clipped to [0.1, 20], normalised
per bin of t and to mean 1. Everything else is dmd2_digits.py's. Train the teacher first:
python -m flowjax.main --config=experiments/quickstart.py --workdir=workdirs/quickstart
python -m flowjax.main --config=experiments/fdistill_digits.py --workdir=workdirs/fdistill_digits \
    --config.objective.teacher_workdir=workdirs/quickstart
Presets: as dmd2_digits.py.
"""

import os

from flowjax import config as config_lib

_DMD2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dmd2_digits.py")


def get_config(arg=None):
  return config_lib.derived_experiment(_DMD2, arg, "fdistill", gan_weight=3e-3)


PRESETS = config_lib.experiment_module(_DMD2).PRESETS
