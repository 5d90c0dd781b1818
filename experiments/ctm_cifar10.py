"""Unconditional Consistency Trajectory Model on CIFAR-10 (32x32x3), CTM's CIFAR-10 setting.

The student is EDM's DDPM++ U-Net (flowjax.models.unet.UNET_PRESETS['ddpmpp_cifar10'] without
augmentation labels) with sony/ctm's inputs for s: a second mapping network, and a Dense of its
embedding in every block (model.time_mapping='per_block'). CTM's training grid (N = 18 Karras
levels, sigma in [0.002, 80], rho = 7), up to 17 teacher Heun steps drawn with probability
proportional to k, s uniform on the grid below u, the inner target map the current network
under stop-gradient and the outer one an EMA with decay 0.999 (sony/ctm's model_sg and
target_model), DSM with the adaptive weight on the output convolution's weight, half-lognormal
DSM noise levels, RAdam lr 4e-4 without gradient clipping, batch 128, 600,000 steps. Every
value and its source: BUILD.md, "Paper presets". Differences from the paper: the distance is
pseudo-Huber, not LPIPS (no LPIPS weights are available offline), there is no GAN term, and the
teacher is a flowjax flow-matching model rather than EDM's, so the FIDs are not comparable with
the paper's.

Prepare the data once (tfds build cifar10 --file_format=array_record). Train the teacher: any
flow_matching run on data.name='tfds:cifar10' (unconditional, 32x32x3; e.g. this file's model
section under objective flow_matching) with
python -m flowjax.main --config=<that flow-matching experiment> --workdir=TEACHER_DIR
then
python -m flowjax.main --config=experiments/ctm_cifar10.py --workdir=DIR \
    --config.objective.teacher_workdir=TEACHER_DIR
Samples take 1 step (gamma = 0). Presets: :tiny (a one-level U-Net of width 16 on synthetic 8x8x3
data, a few CPU steps; its teacher is a flow-matching run on the same synthetic data).
"""

from flowjax import config as config_lib
from flowjax import models, objectives
from flowjax.models import unet


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("ctm")
  c.objective.update(dict(
      sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5, num_scales=18,
      max_heun_steps=17, heun_step_strategy="weighted", target_inner="model_sg",
      target_decay="0.999", distance="pseudo_huber", huber_c=0.0, dsm_weight=1.0,
      dsm_balance="adaptive", adaptive_layer="dec_32x32_aux_conv",
      dsm_sigma_sampler="halflognormal", dsm_p_mean=-1.2, dsm_p_std=1.2,
      dsm_uniform_fraction=0.7, dsm_weighting="karras", label_dropout=0.0, sample_gamma=0.0))
  c.model = models.default_config("unet")
  c.model.update(unet.UNET_PRESETS["ddpmpp_cifar10"])
  c.model.update(dict(augment_dim=0, dropout=0.0, time_scale=1.0, time_mapping="per_block",
                      dtype="bfloat16", attention_impl="xla"))
  c.data.update(dict(name="tfds:cifar10", image_size=32, channels=3, conditional=False,
                     random_flip=True))
  c.optim.update(dict(name="radam", lr=4e-4, weight_decay=0.0, schedule="constant",
                      grad_clip=0.0, ema_decays=(0.999, 0.9999)))
  c.train.update(dict(steps=600_000, batch_size=128, log_every=100))
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=20_000, num=64, num_steps=1, method="karras"))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "tiny": {"model.model_channels": 16, "model.channel_mult": (1,), "model.num_blocks": 1,
             "model.attn_resolutions": (8,), "model.dtype": "float32",
             "objective.adaptive_layer": "dec_8x8_aux_conv", "objective.num_scales": 6,
             "objective.max_heun_steps": 2, "data.name": "synthetic", "data.image_size": 8,
             "data.random_flip": False, "train.steps": 4, "train.batch_size": 16,
             "train.log_every": 2, "ckpt.every_steps": 2, "sample.every_steps": 0,
             "sample.num": 8, "sample.num_steps": 2},
}
