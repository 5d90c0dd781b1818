"""A small KL autoencoder on scikit-learn's 8x8 digits: 8x8x1 images -> 4x4x4 latents (CPU).

The SD-VAE architecture (models/autoencoder.py) at reduced width, one downsampling, trained with
L1 reconstruction + kl_weight * KL. It gives latent-space experiments an offline autoencoder:

python -m flowjax.main --config=experiments/autoencoder_digits.py \
    --workdir=workdirs/autoencoder_digits
python -m flowjax.data.cache_latents --config=experiments/autoencoder_digits.py \
    --weights=workdirs/autoencoder_digits --out=workdirs/digits_latents
python -m flowjax.main --config=experiments/fm_latent_digits.py --workdir=workdirs/fm_latent_digits

Sample grids show decoded N(0, I) latents. Presets: :tiny (a few CPU steps in tests).
"""

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("autoencoder")
  c.objective.update(dict(reconstruction="l1", kl_weight=1e-3))
  c.model = models.default_config("autoencoder")
  c.model.update(dict(block_out_channels=(32, 64), layers_per_block=2, latent_channels=4,
                      norm_groups=8, mid_attention=True, scaling_factor=1.0))
  c.data.update(dict(name="digits", conditional=False, image_size=8))
  c.optim.update(dict(lr=1e-3, schedule="cosine", warmup_steps=100, final_lr=1e-5,
                      ema_decays=(0.999,), weight_decay=0.0))
  c.train.update(dict(steps=2000, batch_size=64, log_every=100))
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=64, num_steps=1))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "tiny": {"model.block_out_channels": (16, 16), "model.layers_per_block": 1,
             "model.norm_groups": 4, "train.steps": 4, "train.batch_size": 16,
             "train.log_every": 2, "ckpt.every_steps": 2, "sample.num": 16,
             "optim.warmup_steps": 0},
}
