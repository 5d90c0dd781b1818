"""STARFlow 3B text-to-image on 256x256 images as SD-VAE latents (32x32x4) with flan-t5-xl captions.

python -m flowjax.data.cache_latents --config=experiments/sdvae_imagenet.py --weights=SDVAE \
    --config.data.name=folder:IMAGES --config.data.text.encoder=t5 \
    --config.data.text.path=FLAN_T5_XL --config.data.text.max_length=128 --out=LATENTS
python -m flowjax.main --config=experiments/starflow_t2i_3b.py --workdir=DIR \
    --config.data.name=latents:LATENTS --config.data.text.path=FLAN_T5_XL
python -m flowjax.main ... --mode=sample --prompts=PROMPTS.txt

apple/ml-starflow's configs/starflow_3B_t2i_256x256.yaml (Gu et al., arXiv:2506.06276): the flow
`tarflow.STARFLOW_3B_T2I` (3,858,281,544 parameters: width 3072, 48 heads, six blocks of 2 layers
with a deep block of 24 that alone reads the caption as 128 prefix tokens of flan-t5-xl's 2048-wide
features, patch 1, L2R, the official architecture), noise_std 0.3 with the denoising step, caption
dropout 0.1 to the empty caption, latent-norm regulariser 1e-4, batch 1024, lr 6.4e-5 cosine to
1e-6, sampling cfg 2.5 (sample.guidance = 1 + 2.5), no flips, FSDP (as every experiment, the
mesh defaults to data parallel: pass --config.mesh.data=1 --config.mesh.fsdp=-1 or a mix; the
state does not fit one accelerator). From the released train.py:
AdamW (0.9, 0.95), weight decay 1e-4 on every parameter, no gradient clipping. The official
warm-up is one epoch of the data set (train.py; the yaml sizes no data set): set
--config.optim.warmup_steps to your number of images / 1024; 2,000 here. bfloat16 compute.
The captions are encoded once into the latent cache (data.text: encoder 't5', max_length 128,
data.text.path the local google/flan-t5-xl folder with its tokenizer.json). data.name has no
default, so a run never trains on stand-in data by accident; a dry run takes random latents and
caption features of the same shapes: --config.data.name=synthetic --config.train.dry_run=True
(data.text.dim = 2048 stands in for the encoder's width when no path is given).
Every value and its source: BUILD.md, "Paper presets".
"""

from flowjax import blocks, config as config_lib
from flowjax import models, objectives
from flowjax.models import tarflow

# The model keys of tarflow.STARFLOW_3B_T2I (its image_shape and num_classes come from the data).
MODEL = {k: v for k, v in tarflow.STARFLOW_3B_T2I.items() if k not in ("image_shape",
                                                                        "num_classes")}


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("starflow")
  c.objective.update(blocks.STARFLOW_OBJECTIVE)
  c.model = models.default_config("tarflow")
  c.model.update(dict(MODEL, dtype="bfloat16"))
  c.data.update(dict(name="latents:", image_size=32, channels=4, num_classes=0,
                     conditional=False, random_flip=False, latent_scaling="factor"))
  c.data.text.update(dict(encoder="t5", path="", max_length=128, dim=2048))
  c.optim.update(dict(lr=6.4e-5, b1=0.9, b2=0.95, weight_decay=1e-4, decay_norms_and_biases=True,
                      schedule="cosine", warmup_steps=2000, final_lr=1e-6, grad_clip=0.0,
                      ema_decays=()))
  c.train.update(dict(steps=1_000_000, batch_size=1024, log_every=100, nonfinite="skip"))
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=20_000, num=64, num_steps=1, method="jacobi",
                       guidance=3.5, use_ema=False))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "3B": {},
}
