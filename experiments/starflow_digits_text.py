"""Text-to-image STARFlow on scikit-learn's 8x8 digits with captions (CPU, minutes).

python -m flowjax.main --config=experiments/starflow_digits_text.py \
    --workdir=workdirs/starflow_digits_text
python -m flowjax.main --config=experiments/starflow_digits_text.py \
    --workdir=workdirs/starflow_digits_text --mode=sample --prompts=PROMPTS.txt
starflow_digits.py's flow, conditioned on captions instead of labels: each digit's caption ("a
handwritten seven", "a thin handwritten three", "a thick handwritten zero"; flowjax.data.digits)
is encoded once by the offline 'words' encoder (hashed words through a random 2-layer T5 of width
32, 8 tokens; flowjax.text) and read by the deep block as 8 prefix tokens, as STARFlow's
text-to-image model reads flan-t5-xl's features. Captions are dropped to the empty caption's
features with probability 0.1 (objective.label_dropout), for classifier-free guidance on text
(sample.guidance). `--mode=sample --prompts=FILE` writes one grid per prompt line.
Presets: :tiny (a few CPU steps in tests).
"""

import os

from flowjax import blocks, config as config_lib

_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "starflow_digits.py")


def get_config(arg=None):
  return blocks.captioned_experiment(_BASE, arg)


PRESETS = config_lib.experiment_module(_BASE).PRESETS
