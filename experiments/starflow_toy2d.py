"""STARFlow (autoregressive normalizing flow) on a 2D toy distribution (toy2d arena).

python -m flowjax.main --config=experiments/starflow_toy2d.py --workdir=workdirs/starflow_toy2d
The two coordinates are two tokens of one channel; 8 blocks alternate their order, each with a
learned start token, so both coordinates are transformed by every block. Continuous data: no
noise augmentation (noise_std=0) and no denoising. Samples decode token by token with a KV cache.
Presets pick the distribution: :checkerboard (default), :8gaussians, :moons, :swissroll,
:student_t (heavy-tailed, see fm_toy2d_heavy.py), :tiny.
"""

from flowjax import config as config_lib
from flowjax import models, objectives


def get_config(arg=None):
  c = config_lib.base_config()
  c.objective = objectives.default_config("starflow")
  c.objective.update(dict(noise="gaussian", noise_std=0.0, denoise=False,
                          intermediate_weight=1e-4, label_dropout=0.0))
  c.model = models.default_config("tarflow")
  c.model.update(dict(hidden_size=64, num_blocks=8, layers_per_block=1, deep_layers=0,
                      num_heads=2, start_token=True, scale="softplus", soft_clip=4.0))
  c.data.update(dict(name="toy2d", toy_distribution="checkerboard", conditional=False))
  c.optim.update(dict(lr=1e-3, b2=0.95, weight_decay=1e-4, schedule="cosine",
                      warmup_steps=100, final_lr=1e-5, ema_decays=(0.999,)))
  c.train.update(dict(steps=10000, batch_size=256, log_every=100, nonfinite="skip",
                      matmul_precision="float32"))
  c.ckpt.every_steps = 1000
  c.sample.update(dict(num=4096, num_steps=1, method="kv_cache", guidance=1.0))
  config_lib.apply_preset(c, arg, PRESETS)
  return c.lock()


PRESETS = config_lib.toy2d_presets(**{"model.num_blocks": 2, "model.num_heads": 2,
                                      "sample.num_steps": 1})
# The flow has no `depth` key: its depth is model.num_blocks x model.layers_per_block.
del PRESETS["tiny"]["model.depth"]
