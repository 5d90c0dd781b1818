"""STARFlow on ImageNet-256 SD-VAE latents (32x32x4), class-conditional, deep-shallow.

python -m flowjax.main --config=experiments/starflow_imagenet.py --workdir=DIR
  --config.data.name=latents:DIR names the cached SD-VAE latents (README: Latent space); it has
  no default, so a run never trains on stand-in data by accident. Dry runs and benchmarks take
  random latents of the same shape (32x32x4, 1000 classes) with --config.data.name=synthetic.
STARFlow-XL-like (:XL, default): patch 1 (1024 tokens of 4 channels), width 1152, 6 blocks: 5
shallow ones of 2 layers and the last (first inverted) deep one of 24 layers, the only block that
reads the label; learned start token, softplus scale, soft clip 4, intermediate regulariser
1e-4, noise augmentation sigma_n = 0.3 with the Tweedie denoising step, AdamW (0.9, 0.95), wd
1e-4, lr 1e-4 cosine to 1e-6, label dropout 0.1 (Zhai et al., arXiv:2412.06329; Gu et al.,
arXiv:2506.06276). STARFlow samples with cfg 2.5 (w), i.e. sample.guidance = 3.5 here. Neither the
width nor the block count was re-read in the paper (the released text-to-image config uses 6 blocks
of 2,2,2,2,2,24 layers). Presets: :XL, :tiny (a few CPU steps).
"""

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("starflow")
  c.objective.update(dict(noise="gaussian", noise_std=0.3, denoise=True,
                          intermediate_weight=1e-4, label_dropout=0.1, guidance_rule="starflow",
                          guidance_anneal=False, jacobi_chunk=16))
  c.model = models.default_config("tarflow")
  c.model.update(dict(patch_size=1, hidden_size=1152, num_blocks=6, layers_per_block=2,
                      deep_layers=24, num_heads=16, start_token=True, scale="softplus",
                      soft_clip=4.0, condition="deep", positions="learned", dtype="bfloat16"))
  c.data.update(dict(name="latents:", image_size=32, channels=4, num_classes=1000,
                     conditional=True))
  c.optim.update(dict(lr=1e-4, b1=0.9, b2=0.95, weight_decay=1e-4, schedule="cosine",
                      warmup_steps=5000, final_lr=1e-6, grad_clip=1.0, ema_decays=(0.9999,)))
  c.train.update(dict(steps=1_000_000, batch_size=256, log_every=100, nonfinite="skip"))
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=20_000, num=64, num_steps=1, method="jacobi",
                       guidance=3.5))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "XL": {},
    "tiny": {"data.name": "synthetic",
             "model.hidden_size": 16, "model.num_blocks": 2, "model.layers_per_block": 1,
             "model.deep_layers": 1, "model.num_heads": 2, "model.dtype": "float32",
             "data.image_size": 8, "data.num_classes": 10, "optim.warmup_steps": 0,
             "train.steps": 4, "train.batch_size": 16, "train.log_every": 2,
             "ckpt.every_steps": 2, "sample.every_steps": 0, "sample.num": 8,
             "sample.guidance": 1.5},
}
