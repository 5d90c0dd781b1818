"""Class-conditional flow matching in the latent space of experiments/autoencoder_digits.py.

The digits are encoded once (4x4x4 posterior means, standardised per channel) and a residual MLP
learns the velocity field on the 64 latent values:

python -m flowjax.main --config=experiments/autoencoder_digits.py \
    --workdir=workdirs/autoencoder_digits
python -m flowjax.data.cache_latents --config=experiments/autoencoder_digits.py \
    --weights=workdirs/autoencoder_digits --out=workdirs/digits_latents
python -m flowjax.main --config=experiments/fm_latent_digits.py --workdir=workdirs/fm_latent_digits
python -m flowjax.main --mode=sample --config=experiments/fm_latent_digits.py \
    --workdir=workdirs/fm_latent_digits
python -m flowjax.data.latents --workdir=workdirs/fm_latent_digits

The trainer's sample grids are decoded through the cached autoencoder; the last command also
decodes samples/final.npz into samples/final_decoded.png and .npz. Another cache:
--config.data.name=latents:<DIR>.
Presets: :tiny (a few CPU steps in tests).
"""

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("flow_matching")
  c.objective.time_sampler = "logit_normal"
  c.model = models.default_config("mlp")
  c.model.update(dict(hidden_size=256, depth=4, time_scale=1000.0))
  c.data.update(dict(name="latents:workdirs/digits_latents", conditional=True,
                     latent_scaling="channel"))
  c.optim.update(dict(lr=1e-3, schedule="cosine", warmup_steps=100, final_lr=1e-5,
                      ema_decays=(0.995,), weight_decay=0.0))
  c.train.update(dict(steps=3000, batch_size=128, log_every=100))
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=100, num_steps=50, method="heun", guidance=2.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "tiny": {"model.hidden_size": 32, "model.depth": 1, "train.steps": 4,
             "train.batch_size": 16, "train.log_every": 2, "ckpt.every_steps": 2,
             "sample.num": 16, "sample.num_steps": 4, "optim.warmup_steps": 0},
}
