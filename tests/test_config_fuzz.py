"""Fuzzing the config validation: any combination of values either passes, with the invariants
the trainer relies on, or raises one ConfigError; never another exception."""

import math

from hypothesis import given, settings, strategies as st

from flowjax import config as config_lib

BASE = config_lib.load_experiment("experiments/fm_toy2d.py", "tiny")

sizes = st.sampled_from([-1, -2, 0, 1, 2, 3, 4, 8, 16])


@settings(max_examples=300, deadline=None)
@given(data=sizes, fsdp=sizes, tensor=sizes, batch=st.integers(-4, 96),
       accum=st.integers(-1, 5), devices=st.sampled_from([1, 2, 4, 8]),
       lr=st.floats(-1.0, 1.0, allow_nan=False), steps=st.integers(-2, 10),
       nonfinite=st.sampled_from(["stop", "skip", "halt", ""]),
       decay=st.floats(-0.5, 1.5, allow_nan=False))
def test_validation_passes_or_raises_one_config_error(data, fsdp, tensor, batch, accum, devices,
                                                       lr, steps, nonfinite, decay):
  config = BASE.copy_and_resolve_references()
  with config.unlocked():
    config.mesh.update(dict(data=data, fsdp=fsdp, tensor=tensor))
    config.train.update(dict(batch_size=batch, grad_accum_steps=accum, steps=steps,
                             nonfinite=nonfinite))
    config.optim.lr = lr
    config.optim.ema_decays = (decay,)
  try:
    config_lib.validate(config, devices)
  except config_lib.ConfigError as error:
    assert str(error).startswith("config"), str(error)
    return
  mesh = [data, fsdp, tensor]
  fixed = math.prod(s for s in mesh if s > 0)
  sizes_ = [s if s > 0 else devices // fixed for s in mesh]
  assert all(s >= 1 for s in sizes_) and math.prod(sizes_) == devices
  assert batch > 0 and accum > 0 and steps > 0 and lr >= 0 and 0 <= decay < 1
  assert batch % accum == 0 and (batch // accum) % (sizes_[0] * sizes_[1]) == 0
  assert nonfinite in ("stop", "skip")
