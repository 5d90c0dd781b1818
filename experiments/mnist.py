"""Class-conditional MNIST-sized images (28x28x1) with a small U-Net, for every few-step method.

The data are your own arrays: MNIST or Fashion-MNIST as distributed (a directory of idx files,
gzipped or not) or an .npz of images and labels (README: Your own data), e.g.
python -m flowjax.main --config=experiments/mnist.py:meanflow --workdir=workdirs/mnist_meanflow \
    --config.data.name=arrays:/data/mnist
The first part of the argument picks the method: :fm (flow matching, the default), :imm,
:meanflow, :shortcut, :consistency, :ctm (distils a flow-matching run of this file, named by
--config.objective.teacher_workdir). Settings follow the digits experiments of each method; the
network is EDM's DDPM++ U-Net at width 64, levels 28, 14 and 7 with attention at 7x7, and one,
two or three time inputs as the method needs. Add ,tiny for a few CPU steps (as the tests do):
--config=experiments/mnist.py:imm,tiny.
"""

from flowjax import blocks, config as config_lib
from flowjax import models, objectives


def _raw_times(c):
  # MeanFlow's target differentiates the network in t: raw times, as its official networks.
  c.model.time_scale = 1.0


def _consistency(c):
  c.objective.total_steps = c.train.get_ref("steps") + 0


# Per method: objective keys, sampler settings, and a final hook for keys that need the config.
METHODS = {
    "fm": (dict(time_sampler="logit_normal", label_dropout=0.1),
           dict(num_steps=50, method="heun", guidance=2.0), None),
    "imm": (dict(f_type="euler_fm", time_embedding="stride", sigma_d=0.5, group_size=4,
                 label_dropout=0.1),
            dict(num_steps=2, method="uniform", guidance=1.5), None),
    "meanflow": (dict(time_sampler="logit_normal", time_mean=-0.4, time_std=1.0,
                      fraction_r_equals_t=0.75, adaptive_p=1.0, adaptive_eps=0.01,
                      label_dropout=0.1),
                 dict(num_steps=1, method="euler", guidance=1.0), _raw_times),
    "shortcut": (dict(finest_steps=128, bootstrap_fraction=0.125, target_ema="current",
                      target_clip=4.0, guidance=1.0, label_dropout=0.1),
                 dict(num_steps=1, method="euler", guidance=1.0), None),
    "consistency": (dict(sigma_data=0.5, label_dropout=0.0),
                    dict(num_steps=1, method="multistep", guidance=1.0), _consistency),
    "ctm": (dict(num_scales=18, max_heun_steps=17, teacher_guidance=2.0, distance="l2",
                 dsm_balance="adaptive", adaptive_layer="dec_28x28_aux_conv", sigma_data=0.5,
                 sample_gamma=0.0),
            dict(num_steps=2, method="karras", guidance=1.0), None),
}
_OBJECTIVE = {"fm": "flow_matching"}


def get_config(arg=None):
  parts = [part.strip() for part in (arg or "").split(",") if part.strip()]
  method = parts[0] if parts and parts[0] in METHODS else "fm"
  objective_keys, sample_keys, hook = METHODS[method]
  c = config_lib.base_config()
  c.objective = objectives.default_config(_OBJECTIVE.get(method, method))
  c.objective.update(objective_keys)
  c.model = models.default_config("unet")
  c.model.update(dict(model_channels=64, channel_mult=(1, 2, 2), num_blocks=2,
                      attn_resolutions=(7,), dropout=0.1, time_scale=1000.0,
                      attention_impl="xla"))
  # No default file: the run names your arrays (data.name='arrays:' alone says how).
  c.data.update(dict(name="arrays:", image_size=28, channels=1, conditional=True,
                     random_flip=False))
  c.optim.update(dict(blocks.DIGITS_OPTIM, lr=2e-4, ema_decays=(0.999,)))
  c.train.update(dict(steps=20_000, batch_size=128, log_every=100))
  c.ckpt.every_steps = 2000
  c.sample.update(dict(every_steps=2000, num=100, **sample_keys))
  if hook:
    hook(c)
  config_lib.apply_preset(c, ",".join(p for p in parts if p not in METHODS), PRESETS)
  if method == "ctm" and "tiny" in parts:
    c.objective.update(dict(num_scales=6, max_heun_steps=2))
  return c.lock()


PRESETS = {
    **{method: {} for method in METHODS},
    "tiny": {"model.model_channels": 8, "model.channel_mult": (1, 2), "model.num_blocks": 1,
             "model.attn_resolutions": (14,), "model.dropout": 0.0, "train.steps": 2,
             "train.batch_size": 8, "train.log_every": 1, "ckpt.every_steps": 2,
             "sample.every_steps": 0, "sample.num": 4, "optim.warmup_steps": 0},
}
