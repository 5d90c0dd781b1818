"""python -m flowjax.catalog: the experiments with their presets, and the objectives, models and
data sources a config may name.

Each experiment line shows what its default config trains (objective, model, data); the presets
are the names `--config=experiments/NAME.py:PRESET` accepts.
"""

import glob
import os
import sys

EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "experiments")


def experiments(directory: str = EXPERIMENTS_DIR) -> list[dict]:
  """[{name, summary, presets, objective, model, data}] of every experiment file."""
  from flowjax import config as config_lib
  out = []
  for path in sorted(glob.glob(os.path.join(directory, "*.py"))):
    name = os.path.basename(path)[:-3]
    module = config_lib.experiment_module(path)
    config = module.get_config(None)
    doc = (module.__doc__ or "").strip().splitlines()
    out.append(dict(name=name, summary=doc[0] if doc else "",
                    presets=sorted(getattr(module, "PRESETS", {})),
                    objective=config.objective.name, model=config.model.name,
                    data=config.data.name))
  return out


def text(directory: str = EXPERIMENTS_DIR) -> str:
  from flowjax import data, registry
  lines = ["Experiments (python -m flowjax.main --config=experiments/NAME.py[:PRESET] "
           "--workdir=DIR [--config.SECTION.KEY=VALUE ...]):"]
  for e in experiments(directory):
    presets = ", ".join(e["presets"]) or "-"
    lines.append(f"  {e['name']:22s} {e['objective']:14s} {e['model']:12s} {e['data']:20s} "
                 f"presets: {presets}")
    if e["summary"]:
      lines.append(f"  {'':22s} {e['summary']}")
  lines.append("Objectives: " + ", ".join(registry.OBJECTIVES.names()))
  lines.append("Models: " + ", ".join(registry.MODELS.names()))
  lines.append("Data sources (data.name): " + ", ".join(data.SOURCE_NAMES))
  return "\n".join(lines)


def main() -> None:
  import flowjax.models  # noqa: F401  (registers)
  import flowjax.objectives  # noqa: F401  (registers)
  sys.stdout.write(text() + "\n")


if __name__ == "__main__":
  main()
