"""TrainState: arrays only. The model's apply function and the optimizer live in closures."""

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  """step: number of updates applied so far (int32 []); params, opt_state: the trained model;
  ema: {"0.999": params-shaped tree} one per decay; extra: objective-owned state (teachers,
  auxiliary networks); skipped: number of updates not applied because of non-finite values."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema: dict
  extra: dict
  skipped: jax.Array
