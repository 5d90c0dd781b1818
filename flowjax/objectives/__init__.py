"""Objectives, found by name: `build(objective_config, model, info)` -> objective.

An objective is a frozen dataclass with `init(rng, batch) -> (params, extra)`,
`loss(params, batch, rng, step, view) -> (scalar, metrics)` and
`sample(params, rng, num, cond, **sampler_args) -> x`, all pure and jittable. Optional, on
fresh starts only (train.restore_or_init): `load_extra(abstract_extra) -> extra` (state read from
disk, e.g. a teacher's weights), then `initial_params(params, extra) -> params` (parameters set
from it; every EMA is re-copied from the result; returning `params` itself changes nothing).
Objectives with a `repa` field take REPA (config.repa, `flowjax.objectives.repa`).
"""

import dataclasses

import ml_collections

from flowjax.objectives import autoencoder  # noqa: F401  (registers)
from flowjax.objectives import ctm  # noqa: F401  (registers)
from flowjax.objectives import dmd2  # noqa: F401  (registers)
from flowjax.objectives import flow_matching  # noqa: F401  (registers)
from flowjax.objectives import imm  # noqa: F401  (registers)
from flowjax.objectives import meanflow  # noqa: F401  (registers)
from flowjax.objectives import repa
from flowjax.objectives import shortcut  # noqa: F401  (registers)
from flowjax.objectives import starflow  # noqa: F401  (registers)
from flowjax.objectives import consistency  # noqa: F401  (registers)
from flowjax.objectives import scm  # noqa: F401  (registers)
from flowjax.objectives import tvm  # noqa: F401  (registers)
from flowjax.registry import OBJECTIVES


# The objectives that read caption features (a backbone with model.text_dim > 0).
TEXT_OBJECTIVES = ("starflow", "flow_matching", "meanflow")


def build(objective_config, model, info, repa_config=None):
  """The objective of config.objective on `model`; with config.repa on (`repa_config`, None =
  off), on the backbone with REPA's projector and aligning its hidden tokens (`repa.setup`)."""
  alignment, model = repa.setup(repa_config, objective_config.name, model, info)
  objective = OBJECTIVES.get(objective_config.name).build(objective_config, model, info)
  reads_text = getattr(objective, "null_text", None) is not None
  if getattr(info, "text", None) is not None and not reads_text:
    raise ValueError(
        f"data.text.encoder={info.text.settings.encoder!r} serves captions, but objective "
        f"{objective_config.name!r} with this model does not read them (captions condition "
        f"{', '.join(map(repr, TEXT_OBJECTIVES))} on a backbone with model.text_dim = the "
        "encoder's width and model.text_length = data.text.max_length); set "
        "data.text.encoder='' to train without captions.")
  if int(getattr(model, "text_dim", 0) or 0) and not reads_text:
    raise ValueError(
        f"model.text_dim={model.text_dim}: objective {objective_config.name!r} does not train "
        f"on captions (those that do: {', '.join(map(repr, TEXT_OBJECTIVES))}); set "
        "model.text_dim=0 and model.text_length=0.")
  return objective if alignment is None else dataclasses.replace(objective, repa=alignment)


def default_config(name: str) -> ml_collections.ConfigDict:
  """The objective section with every key the named objective reads, at its defaults."""
  return ml_collections.ConfigDict(dict(name=name, **OBJECTIVES.get(name).DEFAULTS))
