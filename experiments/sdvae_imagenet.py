"""The SD-VAE (f8, 4 latent channels) on ImageNet 256x256: the autoencoder of the latent
experiments, used to encode the dataset once.

Prepare imagenet2012 (BUILD.md), download `diffusion_pytorch_model.safetensors` of
stabilityai/sd-vae-ft-ema (or sd-vae-ft-mse), then

python -m flowjax.data.cache_latents --config=experiments/sdvae_imagenet.py \\
    --weights=PATH/diffusion_pytorch_model.safetensors --out=workdirs/imagenet256_latents
python -m flowjax.main --config=experiments/starflow_imagenet.py \\
    --config.data.name=latents:workdirs/imagenet256_latents --workdir=workdirs/starflow_imagenet

Adding --repa_encoder=dinov2 --repa_encoder_path=PATH/dinov2-base to the first command also
stores DINOv2-B's patch tokens of each image (256 x 768 float16: 384 KiB per image, 0.5 TB for
the train split), for REPA on the latents with --config.repa.features=cached.

The same config fine-tunes the autoencoder with flowjax's trainer (L1 + KL objective) if wanted.
Presets: :tiny (a width-reduced autoencoder at 64 px on synthetic images, a few CPU steps).
"""

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("autoencoder")
  c.objective.update(dict(reconstruction="l1", kl_weight=1e-6))
  c.model = models.default_config("autoencoder")  # the published SD-VAE widths
  c.data.update(dict(name="tfds:imagenet2012", image_size=256, channels=3, conditional=True,
                     random_flip=False))
  c.optim.update(dict(lr=1e-5, ema_decays=(0.999,), weight_decay=0.0))
  c.train.update(dict(steps=10000, batch_size=64, log_every=100))
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=16, num_steps=1))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "tiny": {"model.block_out_channels": (16, 16, 32, 32), "model.layers_per_block": 1,
             "model.norm_groups": 4, "data.name": "synthetic", "data.image_size": 64,
             "data.num_classes": 10, "train.steps": 2, "train.batch_size": 8,
             "train.log_every": 1, "ckpt.every_steps": 2, "sample.num": 4},
}
