"""TarFlow in pixel space on ImageNet 64x64, class-conditional (Zhai et al., arXiv:2412.06329).

Prepare the data once (tfds build imagenet2012 --file_format=array_record; data.image_size=64
centre-crops and resizes), then
python -m flowjax.main --config=experiments/tarflow_imagenet64.py --workdir=DIR

The official architecture (`tarflow.TARFLOW_OPTIONS`: the one-token shift, exp scale, learned
positions, a class embedding added to every token of every block with the class mean for a
dropped label, no final norm, LayerNorm eps 1e-5, exact GELU, channel-first patches, 64 channels
per head), so that apple/ml-tarflow checkpoints convert into it (`python -m flowjax.convert
--format=tarflow`). :P2 (default) is the conditional ImageNet-64 command of the official README,
patch-width-blocks-layers-noise 2-768-8-8-0.05: batch 256, 200 epochs (1,000,800 steps of
5,004 per epoch), lr 1e-4, label dropout 0.1; train.py: AdamW (0.9, 0.95), weight decay 1e-4 on
every parameter, no gradient clipping, a linear warm-up over one epoch (5,004 steps) then cosine
to 1e-6, no EMA (samples use the trained parameters); the FID command samples with cfg 2.3
(sample.guidance = 1 + 2.3), and evaluate_fid.py always anneals the guidance, with attention
temperature 1 and the self-denoising step at lr 1 (the Tweedie step). Every value and its
source: BUILD.md, "Paper presets". :P4 is 4-1024-8-8 (the official ImageNet-128 shape, noise
0.05 here). For bits/dim train with --config.objective.noise=dequantize (data_levels 256).
Presets: :P2, :P4, :tiny (the architecture at the size of the reference fixture: 8x8x3 synthetic
data, width 128, 2 blocks of 1 layer, 2 heads, patch 2, 10 classes; a few CPU steps).
"""

from flowjax import config as config_lib
from flowjax import models, objectives
from flowjax.models import tarflow


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("starflow")
  c.objective.update(dict(noise="gaussian", noise_std=0.05, denoise=True, data_levels=256,
                          intermediate_weight=0.0, label_dropout=0.1, guidance_rule="tarflow",
                          guidance_anneal=True))
  c.model = models.default_config("tarflow")
  c.model.update(dict(patch_size=2, hidden_size=768, num_blocks=8, layers_per_block=8,
                      deep_layers=0, num_heads=12, dtype="bfloat16", **tarflow.TARFLOW_OPTIONS))
  c.data.update(dict(name="tfds:imagenet2012", image_size=64, channels=3, conditional=True,
                     random_flip=True))
  c.optim.update(dict(lr=1e-4, b1=0.9, b2=0.95, weight_decay=1e-4, decay_norms_and_biases=True,
                      schedule="cosine", warmup_steps=5004, final_lr=1e-6, grad_clip=0.0,
                      ema_decays=()))
  c.train.update(dict(steps=1_000_800, batch_size=256, log_every=100, nonfinite="skip"))
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=20_000, num=64, num_steps=1, method="kv_cache",
                       guidance=3.3, use_ema=False))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "P2": {},
    "P4": {"model.patch_size": 4, "model.hidden_size": 1024, "model.num_heads": 16},
    "tiny": {"model.patch_size": 2, "model.hidden_size": 128, "model.num_blocks": 2,
             "model.layers_per_block": 1, "model.num_heads": 2, "model.dtype": "float32",
             "data.name": "synthetic", "data.image_size": 8, "data.num_classes": 10,
             "data.random_flip": False, "optim.warmup_steps": 0, "train.steps": 4,
             "train.batch_size": 16, "train.log_every": 2, "ckpt.every_steps": 2,
             "sample.every_steps": 0, "sample.num": 8},
}
