"""TarFlow in pixel space on ImageNet 64x64, class-conditional (Zhai et al., 2024).

Prepare the data once (tfds build imagenet2012 --file_format=array_record; data.image_size=64
centre-crops and resizes), then
python -m flowjax.main --config=experiments/tarflow_imagenet64.py --workdir=DIR
The paper's P-Ch-T-K notation (patch, width, blocks, layers per block): :P4 (default) is
4-1024-8-8 (256 tokens of 48 channels), :P2 is 2-768-8-8 (1024 tokens of 12 channels); both
with Gaussian noise augmentation sigma_n = 0.05 and the Tweedie denoising step, TarFlow's exp
scale and one-token shift, labels read by every block, TarFlow's linear guidance rule. For
bits/dim train with --config.objective.noise=dequantize (data_levels 256). Values recalled from
the paper and public retrainings, not re-read in the paper.
Presets: :P4, :P2, :tiny (synthetic 8x8x3 data, a few CPU steps).
"""

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("starflow")
  c.objective.update(dict(noise="gaussian", noise_std=0.05, denoise=True, data_levels=256,
                          intermediate_weight=0.0, label_dropout=0.1, guidance_rule="tarflow",
                          guidance_anneal=False))
  c.model = models.default_config("tarflow")
  c.model.update(dict(patch_size=4, hidden_size=1024, num_blocks=8, layers_per_block=8,
                      deep_layers=0, num_heads=16, start_token=False, scale="exp",
                      soft_clip=0.0, condition="all", positions="learned", dtype="bfloat16"))
  c.data.update(dict(name="tfds:imagenet2012", image_size=64, channels=3, conditional=True,
                     random_flip=True))
  c.optim.update(dict(lr=1e-4, b1=0.9, b2=0.95, weight_decay=1e-4, schedule="cosine",
                      warmup_steps=5000, final_lr=1e-6, grad_clip=1.0, ema_decays=(0.9999,)))
  c.train.update(dict(steps=1_000_000, batch_size=256, log_every=100, nonfinite="skip"))
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=20_000, num=64, num_steps=1, method="kv_cache",
                       guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "P4": {},
    "P2": {"model.patch_size": 2, "model.hidden_size": 768, "model.num_heads": 12},
    "tiny": {"model.patch_size": 2, "model.hidden_size": 16, "model.num_blocks": 2,
             "model.layers_per_block": 1, "model.num_heads": 2, "model.dtype": "float32",
             "data.name": "synthetic", "data.image_size": 8, "data.num_classes": 10,
             "data.random_flip": False, "optim.warmup_steps": 0, "train.steps": 4,
             "train.batch_size": 16, "train.log_every": 2, "ckpt.every_steps": 2,
             "sample.every_steps": 0, "sample.num": 8},
}
