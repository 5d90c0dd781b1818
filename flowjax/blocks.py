"""Config blocks the experiments share: the digits DiT with its data, optimizer and schedule, the
ImageNet-256 latent data, DiT sizes and the tiny CPU presets.

An experiment applies a block and then sets what differs, so that a change to a shared setting
is one edit here. Blocks are plain dicts of section keys (`c.model.update(DIGITS_DIT)`) or of
dotted preset overrides (`PRESETS = {"tiny": tiny_dit(...)}`).
"""

from flowjax.models import dit

# The small class-conditional DiT of the digits experiments (8x8 images, 16 tokens of 2x2).
DIGITS_DIT = dict(patch_size=2, hidden_size=96, depth=4, num_heads=4, time_scale=1000.0)
DIGITS_DATA = dict(name="digits", conditional=True, image_size=8)
# AdamW lr 1e-3 with a 100-step warm-up and a cosine to 1e-5; a short EMA for short runs.
DIGITS_OPTIM = dict(lr=1e-3, schedule="cosine", warmup_steps=100, final_lr=1e-5,
                    ema_decays=(0.995,), weight_decay=0.0)
DIGITS_TRAIN = dict(steps=3000, batch_size=128, log_every=100)

# SD-VAE latents of ImageNet-256 (32x32x4, 1000 classes). No default directory: a run names the
# cached latents with --config.data.name=latents:DIR (flowjax.data stops with the command that
# caches them), or trains on stand-in data only by choosing data.name='synthetic'.
IMAGENET_LATENTS = dict(name="latents:", image_size=32, channels=4, num_classes=1000,
                        conditional=True)

# The STARFlow objective of apple/ml-starflow's latent-space models (train.py and its configs,
# cited in BUILD.md): Gaussian noise augmentation at 0.3 with the learned denoiser, intermediate
# regularisation 1e-4, caption or label dropout 0.1, STARFlow's guidance rule without annealing,
# Jacobi decoding in chunks of 64.
STARFLOW_OBJECTIVE = dict(noise="gaussian", noise_std=0.3, denoise=True, intermediate_weight=1e-4,
                          label_dropout=0.1, guidance_rule="starflow", guidance_anneal=False,
                          jacobi_chunk=64, jacobi_tolerance=0.005, jacobi_max_iterations=32)


def digits_dit(c, **train):
  """Applies the digits DiT, data, optimizer and training length to config `c` (train: keys of
  the train section that differ, e.g. steps=1500)."""
  c.model.update(DIGITS_DIT)
  c.data.update(DIGITS_DATA)
  c.optim.update(DIGITS_OPTIM)
  c.train.update(dict(DIGITS_TRAIN, **train))


# The digits' captions through the offline 'words' encoder (flowjax.text): 8 tokens of 32.
DIGITS_TEXT = dict(encoder="words", max_length=8, dim=32, layers=2, heads=4, seed=0)


def digits_captions(c):
  """Trains config `c` (a digits experiment) on the digits' captions instead of their labels: the
  'words' encoder's features (DIGITS_TEXT) as the model's text input."""
  with c.unlocked():
    c.data.conditional = False
    c.data.text.update(DIGITS_TEXT)
    c.model.update(dict(text_dim=DIGITS_TEXT["dim"], text_length=DIGITS_TEXT["max_length"]))
  return c


def captioned_experiment(path: str, arg=None):
  """The experiment file at `path` trained on the digits' captions (`digits_captions`), with its
  preset `arg`; locked."""
  from flowjax import config as config_lib
  c = digits_captions(config_lib.load_experiment(path))
  with c.unlocked():
    config_lib.apply_preset(c, arg, config_lib.experiment_module(path).PRESETS)
  return c.lock()


def dit_size(name: str) -> dict:
  """Preset overrides selecting a DiT size of `flowjax.models.dit.DIT_PRESETS` (e.g. "XL/2")."""
  return {f"model.{key}": value for key, value in dit.DIT_PRESETS[name].items()}


def tiny_dit(**overrides) -> dict:
  """The tiny preset of a digits DiT experiment: width 32, one block, 4 steps at batch 16."""
  return {"model.hidden_size": 32, "model.depth": 1, "model.num_heads": 2, "train.steps": 4,
          "train.batch_size": 16, "train.log_every": 2, "ckpt.every_steps": 2,
          "sample.num": 16, "sample.num_steps": 1, "optim.warmup_steps": 0, **overrides}


def tiny_latent_dit(**overrides) -> dict:
  """The tiny preset of an ImageNet-latent DiT experiment: synthetic 8x8x4 data of 10 classes,
  width 32, one block, 4 steps at batch 16, float32."""
  return {"data.name": "synthetic", "model.hidden_size": 32, "model.depth": 1,
          "model.num_heads": 2, "model.dtype": "float32", "data.image_size": 8,
          "data.num_classes": 10, "train.steps": 4, "train.batch_size": 16,
          "train.log_every": 2, "ckpt.every_steps": 2, "sample.every_steps": 0, "sample.num": 8,
          "sample.num_steps": 2, **overrides}


def edm_training(c, *, lr: float, batch_size: int, duration_mimg: float,
                 ema_halflife_mimg: float, rampup_mimg: float = 10.0) -> None:
  """Applies EDM's training run (Karras et al., arXiv:2206.00364; NVlabs/edm train.py and
  training/training_loop.py), given in images, to config `c` in steps: Adam (0.9, 0.999, eps
  1e-8) without weight decay or clipping, lr ramped up linearly over rampup_mimg million images
  (lr_rampup_kimg) and constant after, duration_mimg million images, and the EMA half-life as the
  constant per-step decay 0.5^(batch_size / half-life images), rounded to 7 decimals (EDM also
  ramps the half-life up early on, ema_rampup_ratio 0.05). Step counts are rounded down."""
  c.optim.update(dict(name="adam", lr=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                      schedule="constant", warmup_steps=int(rampup_mimg * 1e6) // batch_size,
                      grad_clip=0.0,
                      ema_decays=(round(0.5 ** (batch_size / (ema_halflife_mimg * 1e6)), 7),)))
  c.train.update(dict(steps=int(duration_mimg * 1e6) // batch_size, batch_size=batch_size))
