"""f-distill on a 2D toy distribution: dmd2_toy2d.py with the f-divergence weighting.

Xu et al., arXiv:2502.15681, as NVlabs/FastGen's FdistillModel: DMD2 with its GAN (gan_weight
3e-3, the head on the fake score's middle block) whose head also estimates the density ratio
r = exp(logit) at the distribution-matching samples; each sample's gradient is weighted by
h(r) (objective.f_divergence, 'js' as FastGen's default), clipped to [0.1, 20], normalised
per bin of t and to mean 1. Everything else is dmd2_toy2d.py's. Train the teacher first:
python -m flowjax.main --config=experiments/fm_toy2d.py --workdir=workdirs/fm_toy2d
python -m flowjax.main --config=experiments/fdistill_toy2d.py --workdir=workdirs/fdistill_toy2d \
    --config.objective.teacher_workdir=workdirs/fm_toy2d
Presets: as dmd2_toy2d.py.
"""

import os

from flowjax import config as config_lib

_DMD2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dmd2_toy2d.py")


def get_config(arg=None):
  return config_lib.derived_experiment(_DMD2, arg, "fdistill", gan_weight=3e-3)


PRESETS = config_lib.experiment_module(_DMD2).PRESETS
