"""Flow matching with DiT-XL/2 on ImageNet-256 SD-VAE latents (32x32x4), class-conditional.

python -m flowjax.main --config=experiments/fm_imagenet.py --workdir=DIR
  --config.data.name=latents:DIR names the cached SD-VAE latents (README: Latent space); it has
  no default, so a run never trains on stand-in data by accident. Dry runs and benchmarks take
  random latents of the same shape (32x32x4, 1000 classes) with --config.data.name=synthetic:
python -m flowjax.bench --config=experiments/fm_imagenet.py --config.data.name=synthetic \
  --config.train.dry_run=True
Presets: :XL (default, DiT-XL/2), :B (DiT-B/2), :tiny (a few CPU steps in tests).
"""

from flowjax import blocks, config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("flow_matching")
  c.objective.update(dict(time_sampler="logit_normal", logit_mean=0.0, logit_std=1.0,
                          label_dropout=0.1))
  c.model = models.default_config("dit")
  c.model.update(dict(patch_size=2, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0,
                      dtype="bfloat16", remat="none", attention_impl="xla"))
  c.data.update(blocks.IMAGENET_LATENTS)
  c.optim.update(dict(lr=1e-4, b2=0.95, weight_decay=0.0, schedule="constant", grad_clip=1.0,
                      ema_decays=(0.9999,)))
  c.train.update(dict(steps=400_000, batch_size=256, log_every=100))
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=20_000, num=64, num_steps=50, method="heun", guidance=1.5))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "XL": {},
    "B": blocks.dit_size("B/2"),
    "tiny": blocks.tiny_latent_dit(),
}
