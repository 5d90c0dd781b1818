"""Shortcut model on ImageNet-256 SD-VAE latents (32x32x4), class-conditional, 1 to 128 steps.

python -m flowjax.main --config=experiments/shortcut_imagenet.py:B --workdir=DIR
  --config.data.name=latents:DIR names the cached SD-VAE latents (README: Latent space); it has
  no default, so a run never trains on stand-in data by accident. Dry runs and benchmarks take
  random latents of the same shape (32x32x4, 1000 classes) with --config.data.name=synthetic.
Settings of the reference (Frans et al., arXiv:2410.12557, kvfrans/shortcut-models): M = 128 finest
steps, 1/8 of each batch self-consistency with targets from the EMA (0.999) network clipped to
[-4, 4], CFG 1.5 baked into the targets, label dropout 0.1, AdamW lr 1e-4 with weight decay 0.1
on every parameter and a constant schedule, no gradient clipping, batch 256, 810,000 steps.
The reference DiT embeds the raw time in [0, 1] and, beside it, log2 of the step count (its
dt_base), scales its attention logits by 1 / d, and starts each block's adaLN modulation and
separate q, k, v kernels xavier-uniform (model.time_scale=1, objective.level_code='log2_steps',
model.attention_scale='inverse_dim', model.block_init='xavier').
Sampling uses the trained-in guidance (sample.guidance=1.0) and the trained parameters (the
reference evaluates without its EMA, which only makes the targets); --config.sample.num_steps
picks 1, 2, 4, ..., 128 steps. Every value and its source: BUILD.md, "Paper presets".
Presets: :B (default, DiT-B/2), :XL (DiT-XL/2), :tiny (a few CPU steps in tests).
"""

from flowjax import blocks, config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("shortcut")
  c.objective.update(dict(finest_steps=128, bootstrap_fraction=0.125, target_ema="",
                          target_clip=4.0, guidance=1.5, label_dropout=0.1, sigma_min=1e-5,
                          level_code="log2_steps"))
  c.model = models.default_config("dit")
  c.model.update(dict(patch_size=2, hidden_size=768, depth=12, num_heads=12, mlp_ratio=4.0,
                      dtype="bfloat16", remat="none", attention_impl="xla", time_scale=1.0,
                      attention_scale="inverse_dim", block_init="xavier"))
  c.data.update(blocks.IMAGENET_LATENTS)
  c.optim.update(dict(name="adamw", lr=1e-4, weight_decay=0.1, decay_norms_and_biases=True,
                      schedule="constant", grad_clip=0.0, ema_decays=(0.999,)))
  c.train.update(dict(steps=810_000, batch_size=256, log_every=100))
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=20_000, num=64, num_steps=1, method="euler", guidance=1.0,
                       use_ema=False))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "B": {},
    "XL": blocks.dit_size("XL/2"),
    "tiny": blocks.tiny_latent_dit(),
}
