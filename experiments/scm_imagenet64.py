"""Class-conditional continuous-time consistency models on ImageNet 64x64 (sCT; :scd distils).

Lu and Song, arXiv:2410.11081 (App. G.1, G.2, Table 4, model size S): TrigFlow with sigma_d =
0.5 and c_noise(t) = t (Sec. 4.1); the proposal tan(t) = e^tau / sigma_d with tau ~ N(-1.0,
1.6^2), tangent warm-up over 10k iterations, tangent normalisation with c = 0.1 and the adaptive
weight w_phi (Sec. 4.2, Algorithm 1); Adam with betas (0.9, 0.99) and eps 1e-11, batch 2048,
400k iterations; no horizontal flips; 2-step sampling through t_mid = 1.1. The paper trains EDM2
networks (S to XL, with its adaptive double normalisation and positional time embeddings);
flowjax has no EDM2, so this preset uses its EDM U-Net at EDM2-S's widths (192 channels,
multipliers (1, 2, 3, 4), 3 blocks per level, attention at 16x16 and 8x8) with positional
embeddings of c_noise = t (model.time_scale = pi/2 on u = t / (pi/2)). What flowjax lacks and
this preset therefore approximates: EDM2's inverse-square-root learning-rate decay (a constant
1e-4 = the paper's alpha_ref here), the power-function EMA (sigma_rel = 0.05; a constant decay
of 0.99995 has the same averaging width at step 400k), dropout restricted to resolutions <= 16
(45% for sCT; off here), and, for sCT, the initialisation from the teacher's EMA weights (pass
--config.objective.init_from_teacher=True --config.objective.teacher_workdir=DIR to start from a
teacher). Every value and its source: BUILD.md, "Paper presets". :scd distils a flowjax
flow-matching run on the same data and starts from its first EMA weights as the paper does
(objective.init_from_teacher: the U-Net runs as the teacher's OT velocity network, its output
converted to TrigFlow's F); the teacher must be a flow_matching run of this file's model section
(model.dropout may differ; any other differing model key is refused by name), and the run needs
--config.objective.teacher_workdir=DIR.
Prepare the data once (tfds build imagenet2012 --file_format=array_record), then
python -m flowjax.main --config=experiments/scm_imagenet64.py --workdir=DIR
Presets: :scd; :tiny (synthetic 8x8x3 data of 10 classes, a one-level U-Net, a few CPU steps).
"""

import math

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("scm")
  c.objective.update(dict(mode="sct", sigma_data=0.5, p_mean=-1.0, p_std=1.6,
                          tangent_warmup_steps=10_000, tangent_normalization="norm",
                          tangent_norm_c=0.1, weighting="adaptive", prior_weighting="none",
                          jvp="autodiff", sigma_max=80.0, mid_time=1.1, label_dropout=0.0))
  c.model = models.default_config("unet")
  c.model.update(dict(model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4,
                      channel_mult_noise=1, num_blocks=3, attn_resolutions=(16, 8),
                      embedding_type="positional", encoder_type="standard",
                      decoder_type="standard", resample_filter=(1, 1), augment_dim=0,
                      dropout=0.0, time_scale=math.pi / 2, dtype="bfloat16",
                      attention_impl="xla"))
  c.data.update(dict(name="tfds:imagenet2012", image_size=64, channels=3, conditional=True,
                     random_flip=False))
  c.optim.update(dict(name="adam", lr=1e-4, b1=0.9, b2=0.99, eps=1e-11, weight_decay=0.0,
                      schedule="constant", warmup_steps=0, grad_clip=0.0,
                      ema_decays=(0.99995,)))
  c.train.update(dict(steps=400_000, batch_size=2048, log_every=100))
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=20_000, num=64, num_steps=2, method="trigflow",
                       guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "scd": {"objective.mode": "scd", "model.dropout": 0.0, "objective.init_from_teacher": True},
    "tiny": {"model.model_channels": 16, "model.channel_mult": (1,), "model.num_blocks": 1,
             "model.attn_resolutions": (8,), "model.dtype": "float32",
             "data.name": "synthetic", "data.image_size": 8, "data.num_classes": 10,
             "data.random_flip": False, "objective.tangent_warmup_steps": 2, "train.steps": 4,
             "train.batch_size": 16, "train.log_every": 2, "ckpt.every_steps": 2,
             "sample.every_steps": 0, "sample.num": 8},
}
