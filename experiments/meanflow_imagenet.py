"""MeanFlow on ImageNet-256 SD-VAE latents (32x32x4), class-conditional, 1-NFE sampling.

python -m flowjax.main --config=experiments/meanflow_imagenet.py:B4 --workdir=DIR
  --config.data.name=latents:DIR names the cached SD-VAE latents (README: Latent space); it has
  no default, so a run never trains on stand-in data by accident. Dry runs and benchmarks take
  random latents of the same shape (32x32x4, 1000 classes) with --config.data.name=synthetic.
Settings of the paper's ImageNet runs (Geng et al., arXiv:2505.13447): (t, r) from two
logit-normal(-0.4, 1.0) draws, 75% of examples with r = t, adaptive weight p = 1, eps = 0.01 on
the per-example sum of squares (error_reduction='sum'), batch 256, lr 1e-4 constant, EMA 0.9999,
no CFG at inference. Training-time guidance as the official configuration's default, omega =
1.0, kappa = 0.5 (effective scale omega / (1 - kappa) = 2) at every t; the paper tunes omega,
kappa and the guided t-interval per model: set --config.objective.guidance_w / guidance_kappa /
guidance_t_min / guidance_t_max for those. Every value and its source: BUILD.md, "Paper presets".
The network is the official JAX DiT (Gsunshine/meanflow `models_dit.DiT`: separate t and h
embedders of the raw times, time_scale 1), so its checkpoints convert into this preset
(`python -m flowjax.convert --format=meanflow_jax_dit`).
The JVP needs attention with a JVP rule: model.attention_impl must be 'xla'.
Presets: :B4 (default, DiT-B/4, the paper's MF-B/4), :XL (DiT-XL/2), :tiny (a few CPU steps).
"""

from flowjax import blocks, config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("meanflow")
  c.objective.update(dict(time_sampler="logit_normal", time_mean=-0.4, time_std=1.0,
                          fraction_r_equals_t=0.75, error_reduction="sum", adaptive_p=1.0,
                          adaptive_eps=0.01, guidance_w=1.0, guidance_kappa=0.5,
                          guidance_t_min=0.0, guidance_t_max=1.0, label_dropout=0.1))
  c.model = models.default_config("dit")
  c.model.update(dict(patch_size=4, hidden_size=768, depth=12, num_heads=12, mlp_ratio=4.0,
                      dtype="bfloat16", remat="none", attention_impl="xla",
                      time_scale=1.0))
  c.data.update(blocks.IMAGENET_LATENTS)
  c.optim.update(dict(lr=1e-4, b2=0.95, weight_decay=0.0, schedule="constant", grad_clip=0.0,
                      ema_decays=(0.9999,)))
  c.train.update(dict(steps=240 * 5004, batch_size=256, log_every=100))  # 240 epochs
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=20_000, num=64, num_steps=1, method="euler", guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "B4": {},
    "XL": blocks.dit_size("XL/2"),
    "tiny": blocks.tiny_latent_dit(**{"model.patch_size": 2, "sample.num_steps": 1}),
}
