"""Improved MeanFlow (iMF) on ImageNet-256 SD-VAE latents (32x32x4), class-conditional, 1-NFE.

python -m flowjax.main --config=experiments/imf_imagenet.py:B2 --workdir=DIR
  --config.data.name=latents:DIR names the cached SD-VAE latents (README: Latent space); it has
  no default, so a run never trains on stand-in data by accident. Dry runs and benchmarks take
  random latents of the same shape (32x32x4, 1000 classes) with --config.data.name=synthetic.
Sources: [P] Geng, Lu, Wu, Shechtman, Kolter and He, "Improved Mean Flows", arXiv:2512.02012
(the abstract: a v-loss reparameterised by a network predicting u, guidance as explicit
conditioning variables, in-context conditioning, 1.72 FID at 1-NFE on ImageNet 256);
[C] Lyy-iiis/imeanflow (official JAX code): `configs/default.py`, `configs/train_config.yml`
(iMF-B/2 training, the only training config there), `configs/eval_config.yml` and the README
(the released checkpoints' guidance scales, intervals and 1-NFE FIDs), `imf.py`,
`models/mit.py`.
Objective: the v-loss on V = u + (t - r) sg(du/dt) with the auxiliary head's v_theta (at h = 0)
as the JVP tangent ([C] `imf.py` `iMeanFlow.forward`), (t, r) the max and min of two
logit-normal(-0.4, 1.0) draws with r = t for half of the examples ([C] `imf.py` `sample_tr`,
`configs/default.py` data_proportion 0.5), adaptive weight p = 1, eps = 0.01 on per-example
sums of squares, the head's |v - v_g|^2 with its own weight ([C] `imf.py`), label dropout 0.1,
the guidance scale omega in [1, 8] with density 1/omega and the interval t_min ~ U[0, 0.5],
t_max ~ U[0.5, 1] ([0, 1] where r = t) as network inputs ([C] `imf.py` `sample_cfg_scale` with
s_max = 7, omega = 1 + s, and cfg_beta = 1; `sample_cfg_interval`), and the guided target
v_g = v + (1 - 1/omega') (v_c - v_u) ([C] `imf.py` `guidance_fn`).
Network: model.name='imf_dit', in-context conditioning tokens (8 class tokens; 4 each for t, h and
omega; 2 each for t_min and t_max) and an auxiliary velocity head on the last 8 blocks ([C]
`models/mit.py`), computing in float32 as [C] trains (`configs/default.py`
training.half_precision = False; `imf.py` dtype float32).
Differences from [C]: the official blocks use RMSNorm, SwiGLU (ratio 8/3), RoPE and QK-norm with
N(0, 0.1 / fan_in) linear layers, imf_dit LayerNorm, a GELU MLP of ratio 4 (the same parameter
count), fixed 2D sin-cos positions and xavier layers; the official network conditions on
h = t - r and not on t, imf_dit on both (time_tokens has 5 entries); flowjax draws r = t per
example with probability fraction_r_equals_t = 0.5, [C] `sample_tr` sets it for exactly the
first half of each batch; [C]'s data loader flips the latents, flowjax's cached latents are not
flipped; the :M2, :L2 and :XL2 presets keep B/2's training schedule (optimiser, batch, 640
epochs), as [C] has a training config for B/2 only.
Optimisation: Adam (0.9, 0.95), lr 1e-4 constant after a 10-epoch linear warm-up, EMA 0.9999,
batch 1024 for 640 epochs of 1,281,167 images in full batches: 1251 steps per epoch ([C]
`configs/train_config.yml`, `configs/default.py`).
Sampling: one step at the released iMF-B/2 checkpoint's omega = 8.0 on [0.4, 0.65] (1-NFE FID
3.39; [C] `configs/eval_config.yml`, README); set --config.sample.guidance and
--config.objective.guidance_t_min / guidance_t_max to sweep them, no retraining.
Presets: :B2 (default, iMF-B/2), :M2, :L2, :XL2 (sizes of [C] `models/mit.py`, guidance settings
of [C] `configs/eval_config.yml`), :tiny.
"""

from flowjax import blocks, config as config_lib
from flowjax import models, objectives

STEPS_PER_EPOCH = 1_281_167 // 1024  # full batches of 1024 ([C] drop_last=True)


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("meanflow")
  c.objective.update(dict(variant="imf", imf_velocity="head", time_sampler="logit_normal",
                          time_mean=-0.4, time_std=1.0, pair_sampler="sorted",
                          fraction_r_equals_t=0.5, error_reduction="sum", adaptive_p=1.0,
                          adaptive_eps=0.01, label_dropout=0.1, guidance_scale_max=8.0,
                          guidance_scale_beta=1.0, guidance_interval=True, guidance_t_min=0.4,
                          guidance_t_max=0.65))
  c.model = models.default_config("imf_dit")
  c.model.update(dict(patch_size=2, hidden_size=768, depth=12, num_heads=12, mlp_ratio=4.0,
                      time_scale=1.0, time_tokens=(4, 4, 4, 2, 2), label_tokens=8,
                      aux_head_depth=8, dtype="float32", remat="none", attention_impl="xla"))
  c.data.update(blocks.IMAGENET_LATENTS)
  c.optim.update(dict(lr=1e-4, b2=0.95, weight_decay=0.0, schedule="constant",
                      warmup_steps=10 * STEPS_PER_EPOCH, grad_clip=0.0, ema_decays=(0.9999,)))
  c.train.update(dict(steps=640 * STEPS_PER_EPOCH, batch_size=1024, log_every=100))
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=20_000, num=64, num_steps=1, method="euler", guidance=8.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "B2": {},
    "M2": {"model.depth": 24, "sample.guidance": 10.5, "objective.guidance_t_min": 0.4,
           "objective.guidance_t_max": 0.6},
    "L2": {"model.depth": 32, "model.hidden_size": 1024, "model.num_heads": 16,
           "sample.guidance": 10.5, "objective.guidance_t_min": 0.4,
           "objective.guidance_t_max": 0.6},
    "XL2": {"model.depth": 48, "model.hidden_size": 1024, "model.num_heads": 16,
            "sample.guidance": 8.0, "objective.guidance_t_min": 0.42,
            "objective.guidance_t_max": 0.62},
    "tiny": blocks.tiny_latent_dit(**{"model.depth": 2, "model.aux_head_depth": 1,
                                      "optim.warmup_steps": 0, "sample.num_steps": 1}),
}
