"""Inductive Moment Matching with DiT-XL/2 on ImageNet-256 SD-VAE latents (32x32x4).

The paper's ImageNet setting (Zhou et al., arXiv:2503.07565): euler_fm output, the second time
embedded as the stride t - s, loss weight exponent a = 2 and b = 4, groups of M = 4 particles,
r(s, t) with the decrement (eta_max - eta_min) / 2^12 and a minimum t - r gap of 1e-4,
classifier-free guidance 1.5 on the raw output; batch 4096, AdamW lr 1e-4, 1.2M iterations, EMA
0.9999, label dropout 0.1 (App. I.1, Table 5, its DiT-XL t - s column, FID 1.99; that run trained
in FP16, App. I.6, and flowjax computes in bfloat16). The network and its times are those of
the official im256_generate_images.yaml (lumalabs/imm): IMMPrecond with DiT-XL/2, s_embed,
euler_fm, stride, time_scale 1000, sigma_data 0.5, eps = 0 and T = 0.994 (t_min, t_max), so its
checkpoints' state dicts convert into this preset (`python -m flowjax.convert --format=imm_dit`).
The batch must stay divisible by objective.group_size, and batch / group_size by the batch
shards, so every M x M kernel matrix stays on one device. A DiT-XL/2 step at batch 4096 needs
many accelerators; on fewer, raise train.grad_accum_steps (each micro-batch,
batch / grad_accum_steps, must then be divisible by group_size x batch shards).

python -m flowjax.main --config=experiments/imm_imagenet.py --workdir=DIR
  --config.data.name=latents:DIR names the cached SD-VAE latents (README: Latent space); it has
  no default, so a run never trains on stand-in data by accident. Dry runs and benchmarks take
  random latents of the same shape (32x32x4, 1000 classes) with --config.data.name=synthetic:
python -m flowjax.bench --config=experiments/imm_imagenet.py --config.data.name=synthetic \
  --config.train.dry_run=True
Presets: :XL (default, DiT-XL/2), :B (DiT-B/2), :tiny (a few CPU steps in tests).
"""

from flowjax import blocks, config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("imm")
  c.objective.update(dict(path="ot", f_type="euler_fm", time_embedding="stride", sigma_d=0.5,
                          t_min=0.0, t_max=0.994, group_size=4, weight_a=2.0, weight_b=4.0,
                          mapping_k=12, mapping_min_gap=1e-4, label_dropout=0.1))
  c.model = models.default_config("dit")
  c.model.update(dict(patch_size=2, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0,
                      dtype="bfloat16", remat="none", attention_impl="xla"))
  c.data.update(blocks.IMAGENET_LATENTS)
  c.optim.update(dict(name="adamw", lr=1e-4, weight_decay=0.0, schedule="constant",
                      grad_clip=0.0, ema_decays=(0.9999,)))
  c.train.update(dict(steps=1_200_000, batch_size=4096, log_every=100))
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=20_000, num=64, num_steps=8, method="uniform",
                       guidance=1.5))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "XL": {},
    "B": blocks.dit_size("B/2"),
    "tiny": blocks.tiny_latent_dit(**{"train.batch_size": 32}),
}
