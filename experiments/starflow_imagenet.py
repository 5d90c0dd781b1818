"""STARFlow on ImageNet-256 SD-VAE latents (32x32x4), class-conditional, deep-shallow.

python -m flowjax.main --config=experiments/starflow_imagenet.py --workdir=DIR
  --config.data.name=latents:DIR names the cached SD-VAE latents (README: Latent space); it has
  no default, so a run never trains on stand-in data by accident. Dry runs and benchmarks take
  random latents of the same shape (32x32x4, 1000 classes) with --config.data.name=synthetic.

:XL (default) is the paper's class-conditional ImageNet-256 model, "18(6)-2048", about 1.4B
parameters (Gu et al., arXiv:2506.06276, Sec. 4.1, App. B.1, Table 5): 6 flow blocks, five
shallow ones of 2 layers and the deep one of 18 (the last data -> noise, first inverted), width
2048, 64 channels per head (32 heads), patch 1 (1024 tokens of 4 channels), built with the
official architecture (`tarflow.STARFLOW_OPTIONS`: 2-D RoPE, a learned start token, the label as
a one-hot prefix token read by the deep block only, softplus scale, soft clip 4, final RMSNorm,
LayerNorm eps 1e-5, exact GELU), so that apple/ml-starflow checkpoints convert into it
(`python -m flowjax.convert --format=starflow`). Noise augmentation sigma_n = 0.3 (Sec. 3.3) with
the score-based denoising step of the released sample.py; latent-norm regulariser 1e-4; AdamW
(0.9, 0.95), lr 1e-4 cosine to 1e-6, weight decay 1e-4, batch 512 (App. B.2). Not stated in the
paper and taken from the released code: seq_order L2R, label dropout 0.1
(configs/starflow_3B_t2i_256x256.yaml), latents scaled by the SD-VAE factor 0.18215, no gradient
clipping, weight decay on every parameter, a warm-up of one epoch (2,502 steps at batch 512) and
no EMA (train.py). Sampling guidance: the paper's samples use omega = 3.0 (Fig. 7), i.e.
sample.guidance = 1 + 3.0 here. Every value and its source: BUILD.md, "Paper presets".
Presets: :XL, :tiny (the architecture at the size of the reference fixture: 8x8x3 synthetic
data, width 64, 3 blocks of 1, 1 and 2 layers, 2 heads, patch 2, 10 classes; a few CPU steps),
:bench_tiny (for python -m flowjax.bench: the architecture in pixel space on synthetic 32x32x3
data, unconditional, patch 2 (256 tokens of 12 channels), width 128, 2 heads of 64 channels,
4 blocks of 1, 1, 1 and 4 layers, float32, batch 16: 1,407,504 parameters, LayerNorm biases
included; the network the PyTorch comparison in README "Performance" times).
"""

from flowjax import blocks, config as config_lib
from flowjax import models, objectives
from flowjax.models import tarflow


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("starflow")
  c.objective.update(blocks.STARFLOW_OBJECTIVE)
  c.model = models.default_config("tarflow")
  c.model.update(dict(patch_size=1, hidden_size=2048, num_blocks=6, layers_per_block=2,
                      deep_layers=18, num_heads=32, order="l2r", dtype="bfloat16",
                      **tarflow.STARFLOW_OPTIONS))
  c.data.update(dict(blocks.IMAGENET_LATENTS, random_flip=False, latent_scaling="factor"))
  c.optim.update(dict(lr=1e-4, b1=0.9, b2=0.95, weight_decay=1e-4, decay_norms_and_biases=True,
                      schedule="cosine", warmup_steps=2502, final_lr=1e-6, grad_clip=0.0,
                      ema_decays=()))
  c.train.update(dict(steps=1_000_000, batch_size=512, log_every=100, nonfinite="skip"))
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=20_000, num=64, num_steps=1, method="jacobi",
                       guidance=4.0, use_ema=False))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "XL": {},
    "tiny": {"data.name": "synthetic",
             "model.patch_size": 2, "model.hidden_size": 64, "model.num_blocks": 3,
             "model.layers_per_block": 1, "model.deep_layers": 2, "model.num_heads": 2,
             "model.dtype": "float32",
             "data.image_size": 8, "data.channels": 3, "data.num_classes": 10,
             "optim.warmup_steps": 0,
             "train.steps": 4, "train.batch_size": 16, "train.log_every": 2,
             "ckpt.every_steps": 2, "sample.every_steps": 0, "sample.num": 8,
             "sample.guidance": 1.5},
    "bench_tiny": {"data.name": "synthetic", "data.image_size": 32, "data.channels": 3,
                   "data.conditional": False, "data.num_classes": 0,
                   "model.patch_size": 2, "model.hidden_size": 128, "model.num_heads": 2,
                   "model.num_blocks": 4, "model.layers_per_block": 1, "model.deep_layers": 4,
                   "model.dtype": "float32", "optim.warmup_steps": 0, "train.batch_size": 16,
                   "train.log_every": 1, "sample.num": 16, "sample.guidance": 1.0},
}
