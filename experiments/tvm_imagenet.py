"""Terminal Velocity Matching with DiT-XL/2 on ImageNet-256 SD-VAE latents (32x32x4), 1-NFE.

python -m flowjax.main --config=experiments/tvm_imagenet.py --workdir=DIR
  --config.data.name=latents:DIR names the cached SD-VAE latents (README: Latent space); it has
  no default, so a run never trains on stand-in data by accident. Dry runs and benchmarks take
  random latents of the same shape (32x32x4, 1000 classes) with --config.data.name=synthetic.
Sources: [P] Zhou et al., arXiv:2511.19797 (v1): Table 6 (the ImageNet-256 columns), Sec. 4,
App. F.1; [C] lumalabs/tvm: configs/im256_w2.yaml and im256_w1p75.yaml, training/dit.py,
training/wrapper.py, training/training_loop.py, generate_images.py.
The network is DiT-XL/2 with 18 heads (head dimension 64) and the paper's Lipschitz controls; it
embeds t, t - s and beta = 1 / w (678M parameters, Table 1). Its JVP runs through XLA attention
(model.attention_impl='xla'); the paper's fused Flash-Attention JVP kernel (App. C) is not part
of flowjax. Batch 2048 needs many accelerators; on fewer, raise train.grad_accum_steps.
Presets: :w2 (default; w = 2, 1-NFE FID 3.29 in Table 1), :w1p75 (w = 1.75, 4-NFE FID 1.99),
:tiny (a few CPU steps in tests).
"""

from flowjax import blocks, config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("tvm")
  c.objective.update(dict(
      # [P] Table 6 p(s, t) = gap* (-0.8, 1.0), (-0.4, 1.0); [C] gap_P_mean/std, s_P_mean/std.
      time_sampler="gap", gap_mean=-0.8, gap_std=1.0, s_mean=-0.4, s_std=1.0,
      fm_time="separate",  # [P] gap*: s' drawn anew for the FM term (Sec. 4, 7.3, Table 6)
      fraction_t_equals_s=0.0,  # [P] Table 6 "% t = s" 0%
      scaled_param=True,  # [P] Table 6 scaled param. yes; [C] do_scale_param: true
      guidance_sampler="fixed", guidance_scale=2.0,  # [P] Table 6 w = 2; [C] cfg: 2.0
      label_dropout=0.1,  # [P] Table 6
      target_ema="0.99",  # [P] Table 6 target EMA rate 0.99; [C] ema_target_beta: 0.99
      jvp="autodiff", detach_jvp=False))  # [P] Sec. 4 gradient through the JVP; [C] detach_jvp
  c.model = models.default_config("dit")
  c.model.update(dict(
      patch_size=2, hidden_size=1152, depth=28,  # [P] Table 6 DiT-XL/2, hidden dim 1152
      num_heads=18,  # [P] Table 6 and App. F.1 (head dimension 64); [C] DiT_XL_2_18h
      mlp_ratio=4.0, dropout=0.0,  # [P] App. F.1 DiT-XL otherwise; [C] dropout: 0.
      time_scale=1.0,  # [C] training/dit.py embeds raw t, t - s and beta
      norm="rms", qk_norm=True,  # [P] Table 6 main normalization and QK-norm: RMS Norm
      modulation_norm=True,  # [P] Eq. 16, App. B.2; [C] do_mod_norm: true
      linear_init="spectral", time_init="spectral",  # [P] Table 6; [C] time_specinit: true
      dtype="bfloat16",  # [P] App. F.1 BF16; [C] data_type: bf16
      attention_impl="xla", remat="none"))
  # [P] App. F.1 the IMM latent setting (SD-VAE with a per-channel scale and shift); [C]
  # encoder raw_mean/raw_std. flowjax standardises by the cached per-channel statistics.
  c.data.update(blocks.IMAGENET_LATENTS)
  c.optim.update(dict(
      name="adamw", lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,  # [P] Table 6
      schedule="constant", warmup_steps=0,  # [P] App. F.1 no learning-rate scheduler
      grad_clip=0.0,  # [C] training_loop.py clips only with max_grad_norm, which is unset
      ema_decays=(0.9999, 0.99)))  # [P] Table 6 eval EMA 0.9999, target EMA 0.99
  c.train.update(dict(steps=300_000, batch_size=2048,  # [P] Table 6 300K iterations, 2048
                      log_every=100))
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(
      every_steps=20_000, num=64,
      num_steps=1,  # [P] Table 1 1-NFE
      method="uniform",  # [P] Fig. 3; [C] generate_images.py linspace(1, 0, n + 1)
      guidance=2.0,  # [C] sampling cfg_scale: 2.0, the trained w
      ema_decay=0.9999))  # [P] Table 6 eval EMA; [C] generate_images.py samples data['ema']
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "w2": {},
    # [P] Table 6 second column: w = 1.75, time embedding init N(0, 0.02); Table 1 4-NFE FID 1.99.
    # [C] im256_w1p75.yaml: cfg 1.75, time_specinit: false.
    "w1p75": {"objective.guidance_scale": 1.75, "model.time_init": "normal",
              "sample.guidance": 1.75, "sample.num_steps": 4},
    "tiny": blocks.tiny_latent_dit(**{"sample.num_steps": 1, "optim.ema_decays": (0.9999, 0.99)}),
}
