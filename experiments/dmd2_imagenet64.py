"""Class-conditional DMD2 on ImageNet 64x64: a one-step generator, the official ImageNet setting.

Yin et al., arXiv:2405.14867, as tianweiy/DMD2's
experiments/imagenet/imagenet_gan_classifier_genloss3e-3_diffusion1000_lr2e-6_scratch.sh with
main/edm/train_edm.py and main/edm/edm_guidance.py: generator and fake score started from the
teacher, each trained by AdamW (lr 2e-6, betas (0.9, 0.999), weight decay 0.01 on every
parameter) warmed up linearly to a constant rate and gradients clipped at norm 10 (the
scheduler's 500 warm-up steps advance once per GPU on each iteration: 500 / 7, about 72
iterations); the fake
score updates every step, the generator every 5th (dfake_gen_update_ratio 5); noise levels on the
1000-point Karras grid (sigma 0.002 to 80, rho 7; 2%-98% for distribution matching); no guidance
in the real score; the GAN classifier on the fake score's bottleneck (the encoder's last 8x8 block)
with its convolutional head, generator weight 3e-3 and classifier weight 1e-2, real images noised
over the whole grid (--diffusion_gan); batch 280 (40 on each of 7 GPUs); 200k iterations (the
paper's appendix; the released FID 1.51 checkpoint is at iteration 193,500); no EMA. Every value
and its source: BUILD.md, "Paper presets".

Differences: the official teacher is EDM's ImageNet-64 ADM network (DhariwalUNet, 192 channels,
multipliers (1, 2, 3, 4), 3 blocks per level, attention at 32, 16 and 8); flowjax has no ADM, so
generator, fake score and teacher are flowjax's EDM U-Net at those widths, and the teacher is a
flowjax flow-matching run (velocity on x_t = (1 - t) x + t eps) rather than EDM's denoiser, so
FIDs are not comparable with the paper's. The generator starts at
t = 1 (pure noise) where the official code feeds noise at sigma = 80; labels for the generator
come from the batch (the official code draws them uniformly).

Prepare the data once (tfds build imagenet2012 --file_format=array_record). Train the teacher,
flow matching on this file's model and data sections with EDM's ImageNet-64 training run:
python -m flowjax.main --config=experiments/fm_imagenet64.py --workdir=TEACHER_DIR
Then
python -m flowjax.main --config=experiments/dmd2_imagenet64.py --workdir=DIR \
    --config.objective.teacher_workdir=TEACHER_DIR
Samples take 1 step. Presets: :tiny (synthetic 8x8x3 data of 10 classes, a one-level U-Net of
width 16, a few CPU steps; its teacher is fm_imagenet64.py:tiny).
"""

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("dmd2")
  c.objective.update(dict(
      generator_steps=1, generator_update_every=5, noise_levels="karras", min_step_percent=0.02,
      max_step_percent=0.98, num_train_timesteps=1000, sigma_min=0.002, sigma_max=80.0, rho=7.0,
      teacher_guidance=1.0, regression_weight=0.0, gan_weight=3e-3, gan_discriminator_weight=1e-2,
      gan_head="conv", gan_feature_layer=""))
  c.model = models.default_config("unet")
  c.model.update(dict(model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4,
                      channel_mult_noise=1, num_blocks=3, attn_resolutions=(32, 16, 8),
                      embedding_type="positional", encoder_type="standard",
                      decoder_type="standard", resample_filter=(1, 1), augment_dim=0,
                      dropout=0.0, dtype="bfloat16", attention_impl="xla"))
  c.data.update(dict(name="tfds:imagenet2012", image_size=64, channels=3, conditional=True,
                     random_flip=False))
  c.optim.update(dict(name="adamw", lr=2e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                      decay_norms_and_biases=True, schedule="constant", warmup_steps=72,
                      grad_clip=10.0, ema_decays=()))
  c.train.update(dict(steps=200_000, batch_size=280, log_every=100))
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=20_000, num=64, num_steps=1, method="generator",
                       guidance=1.0, use_ema=False))
  config_lib.apply_preset(c, arg, PRESETS)
  config_lib.parameter_sets(c, ("generator", "fake_score"))
  return c.lock()


PRESETS = {
    "tiny": {"model.model_channels": 16, "model.channel_mult": (1,), "model.num_blocks": 1,
             "model.attn_resolutions": (8,), "model.dtype": "float32",
             "data.name": "synthetic", "data.image_size": 8, "data.num_classes": 10,
             "optim.lr": 1e-4, "optim.warmup_steps": 0, "objective.generator_update_every": 2,
             "train.steps": 4, "train.batch_size": 16, "train.log_every": 1,
             "ckpt.every_steps": 2, "sample.every_steps": 0, "sample.num": 8},
}
