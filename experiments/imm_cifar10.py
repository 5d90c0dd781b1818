"""Unconditional Inductive Moment Matching on CIFAR-10 (32x32x3), the paper's CIFAR setting.

simple_edm output, the second time embedded as s itself ('identity'), sigma_d = 0.5, groups of
M = 4. The paper trains the DDPM++ U-Net, which flowjax does not have yet: this preset uses a
DiT-B/2 on 32x32x3 images instead, so its FIDs are not comparable with the paper's.
Prepare the data once (tfds build cifar10 --file_format=array_record), then
python -m flowjax.main --config=experiments/imm_cifar10.py --workdir=DIR
Samples take 2 pushforward steps. Presets: :tiny (synthetic 8x8x3 data, a few CPU steps).
"""

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("imm")
  c.objective.update(dict(path="ot", f_type="simple_edm", time_embedding="identity",
                          sigma_d=0.5, group_size=4, label_dropout=0.0))
  c.model = models.default_config("dit")
  c.model.update(dict(patch_size=2, hidden_size=768, depth=12, num_heads=12, mlp_ratio=4.0,
                      dropout=0.0, dtype="bfloat16", attention_impl="xla"))
  c.data.update(dict(name="tfds:cifar10", image_size=32, channels=3, conditional=False,
                     random_flip=True))
  c.optim.update(dict(lr=1e-4, weight_decay=0.0, schedule="constant", grad_clip=1.0,
                      ema_decays=(0.9999,)))
  c.train.update(dict(steps=400_000, batch_size=512, log_every=100))
  c.ckpt.update(dict(every_steps=5000, max_to_keep=3))
  c.sample.update(dict(every_steps=20_000, num=64, num_steps=2, method="uniform"))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = {
    "tiny": {"model.hidden_size": 32, "model.depth": 1, "model.num_heads": 2,
             "model.dtype": "float32", "data.name": "synthetic", "data.image_size": 8,
             "data.random_flip": False, "train.steps": 4, "train.batch_size": 32,
             "train.log_every": 2, "ckpt.every_steps": 2, "sample.every_steps": 0,
             "sample.num": 8, "sample.num_steps": 2},
}
