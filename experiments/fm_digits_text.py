"""Flow matching text-to-image on scikit-learn's 8x8 digits with captions (CPU, minutes).

python -m flowjax.main --config=experiments/fm_digits_text.py --workdir=workdirs/fm_digits_text
quickstart.py's DiT and training, conditioned on the digits' captions ("a thin handwritten three";
flowjax.data.digits) through the offline 'words' encoder (8 tokens of 32, flowjax.text) instead
of labels: the caption's tokens are prefix tokens of every DiT block and its pooled features join
the time embedding (flowjax.models.dit). Captions are dropped to the empty caption's features with
probability objective.label_dropout; `--mode=sample --prompts=FILE` writes one grid per prompt.
The same data and encoder as starflow_digits_text.py, for the text-to-image comparison in the
README. Presets: as quickstart.py.
"""

import os

from flowjax import blocks, config as config_lib

_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
  return blocks.captioned_experiment(_BASE, arg)


PRESETS = config_lib.experiment_module(_BASE).PRESETS
