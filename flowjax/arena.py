"""python -m flowjax.arena --suite=toy2d|digits --workdir=DIR [--budget=STEPS] [--methods=...]

Trains every method of a suite with the same backbone and the same budget (steps x batch),
evaluates each at its natural step counts, and writes DIR/arena.md (a table) and DIR/arena.png
(metric against network evaluations per sample, one line per method). Each method trains in
DIR/<method>/ with the ordinary trainer, so an interrupted arena resumes where it stopped.
"""

import dataclasses
import io
import json
import logging

import jax
import numpy as np

from flowjax import storage

# Each method: (experiment, sampling step counts, sampler, [config overrides]). An override value
# may name another method's workdir as "{workdir}/<method>" (CTM distils the flow-matching run,
# which therefore trains first).
SUITES = {
    "toy2d": dict(
        methods={"flow_matching": ("fm_toy2d.py", [1, 2, 4, 8, 100], "euler"),
                 "imm": ("imm_toy2d.py", [1, 2, 4, 8], "uniform"),
                 "meanflow": ("meanflow_toy2d.py", [1, 2, 4, 8], "euler"),
                 "shortcut": ("shortcut_toy2d.py", [1, 2, 4, 8, 128], "euler"),
                 "consistency": ("consistency_toy2d.py", [1, 2, 4, 8], "multistep"),
                 "ctm": ("ctm_toy2d.py", [1, 2, 4, 8], "karras",
                         {"objective.teacher_workdir": "{workdir}/flow_matching"}),
                 "starflow": ("starflow_toy2d.py", [1], "kv_cache", {"model.hidden_size": 64})},
        overrides={"model.hidden_size": 256, "model.depth": 4, "train.batch_size": 512,
                   "data.toy_distribution": "checkerboard", "sample.every_steps": 0,
                   "train.log_every": 500, "optim.ema_decays": (0.995,)},
        steps=2000, num_samples=4096, metric="energy_distance"),
    "digits": dict(
        methods={"flow_matching": ("quickstart.py", [1, 2, 4, 8, 100], "euler"),
                 "imm": ("imm_digits.py", [1, 2, 4, 8], "uniform"),
                 "meanflow": ("meanflow_digits.py", [1, 2, 4, 8], "euler"),
                 "shortcut": ("shortcut_digits.py", [1, 2, 4, 8, 128], "euler"),
                 "consistency": ("consistency_digits.py", [1, 2, 4, 8], "multistep"),
                 "ctm": ("ctm_digits.py", [1, 2, 4, 8], "karras",
                         {"objective.teacher_workdir": "{workdir}/flow_matching"})},
        overrides={"model.hidden_size": 96, "model.depth": 4, "model.num_heads": 4,
                   "model.patch_size": 2, "train.batch_size": 128, "sample.every_steps": 0,
                   "train.log_every": 250},
        steps=1500, num_samples=500, metric="fd"),
}
# The digits at 28x28 (upscaled bilinearly, MNIST's size): the same methods and budget with
# patch 4 (49 tokens) at batch 64; samples are scored by the 8x8 digits classifier after a
# resize back to 8x8, against a floor of real images taken through the same round trip.
SUITES["digits28"] = dict(
    SUITES["digits"], overrides=dict(SUITES["digits"]["overrides"], **{
        "data.image_size": 28, "model.patch_size": 4, "train.batch_size": 64}))


@dataclasses.dataclass
class Result:
  method: str
  num_steps: int
  nfe: int
  metrics: dict
  train_steps: int = 0


def earlier_results(workdir: str, steps: int, rerun) -> list[Result]:
  """Results in DIR/arena.json from an earlier arena run at the same training budget, for the
  methods not in `rerun`: running a subset of methods (--methods) adds to the table."""
  path = storage.join(workdir, "arena.json")
  if not storage.exists(path):
    return []
  records = [Result(**r) for r in json.loads(storage.read_text(path))]
  return [r for r in records if r.train_steps == steps and r.method not in rerun]


def evaluate_method(config, workdir: str, method: str, step_counts, sample_method: str,
                    num_samples: int, suite: str) -> list[Result]:
  from flowjax import modes, train
  from flowjax.evals import digits as digits_metric, toy2d as toy_metric
  setup, state = modes.load(config, workdir)
  params = train.sampling_params(state, config)
  labels = train.sample_labels(setup.info, num_samples)
  guided = labels is not None and config.sample.guidance != 1.0
  classifier = digits_metric.load_classifier() if suite.startswith("digits") else None
  results = []
  objective = setup.objective
  for num_steps in step_counts:
    if hasattr(objective, "sample_with_steps"):
      # Autoregressive flows: one exact decoding pass; its cost is the number of sequential
      # network calls it reports (tokens x blocks for token-by-token decoding).
      sample = jax.jit(lambda p, rng, cond: objective.sample_with_steps(
          p, rng, num_samples, cond, method=sample_method, guidance=config.sample.guidance))
    else:
      sample = jax.jit(lambda p, rng, cond, n=num_steps: (objective.sample(
          p, rng, num_samples, cond, num_steps=n, method=sample_method,
          guidance=config.sample.guidance), n))
    with train.context(setup):
      samples, calls = sample(params, jax.random.key(1234), labels)
    samples, calls = np.asarray(jax.device_get(samples)), int(calls)
    if suite == "toy2d":
      values = toy_metric.evaluate(samples, config.data.toy_distribution)
    else:
      values = digits_metric.evaluate(samples, None if labels is None else np.asarray(labels),
                                      classifier=classifier, image_size=samples.shape[1])
    from flowjax import metrics
    metrics.save_png(storage.join(workdir, "samples", f"arena_{calls}_steps.png"),
                     metrics.samples_picture(samples[:100] if suite != "toy2d" else samples))
    results.append(Result(method, calls, calls * (2 if guided else 1), values,
                          int(config.train.steps)))
    logging.info("%s %d steps: %s", method, num_steps, values)
  return results


def run(suite: str, workdir: str, budget: int | None = None, methods=None) -> list[Result]:
  from flowjax import config as config_lib, train
  spec = SUITES[suite]
  steps = budget or spec["steps"]
  unknown = [m for m in (methods or []) if m not in spec["methods"]]
  if unknown:
    from flowjax import registry
    raise ValueError(registry.unknown_name_message(f"--methods entry of suite {suite!r}",
                                                   unknown[0], list(spec["methods"])))
  chosen = [m for m in spec["methods"] if not methods or m in methods]
  results = []
  for method in chosen:
    experiment, step_counts, sample_method, *extra = spec["methods"][method]
    own = {key: value.format(workdir=workdir) if isinstance(value, str) else value
           for key, value in (extra[0] if extra else {}).items()}
    overrides = dict(spec["overrides"], **own, **{"train.steps": steps, "ckpt.every_steps": steps})
    # A shared override that the method's backbone does not have (an MLP's depth for a flow) is
    # left out; the method's own experiment sizes that part.
    keys = config_lib.flatten(config_lib.load_experiment(experiment))
    overrides = {k: v for k, v in overrides.items() if k in keys or k in own}
    config = config_lib.load_experiment(experiment, None, **overrides)
    method_dir = storage.join(workdir, method)
    state = train.run(config, method_dir)
    if int(state.step) < steps:
      # Stopped by a signal (checkpoint saved): report nothing half-trained.
      logging.warning("The arena stopped while training %s at step %d of %d; rerun the same "
                      "command to resume.", method, int(state.step), steps)
      raise SystemExit(1)
    results += evaluate_method(config, method_dir, method, step_counts, sample_method,
                               spec["num_samples"], suite)
  results = earlier_results(workdir, steps, chosen) + results
  write_report(suite, workdir, steps, spec, results)
  return results


def write_report(suite: str, workdir: str, steps: int, spec: dict, results) -> None:
  metric = spec["metric"]
  all_steps = sorted({r.num_steps for r in results})
  floor_key = f"{metric}_floor"
  lines = [f"# flowjax arena: {suite}", "",
           f"Budget: {steps} steps x batch {spec['overrides']['train.batch_size']} for every "
           f"method, the same backbone ({spec['overrides'].get('model.hidden_size')} wide, "
           f"depth {spec['overrides'].get('model.depth')}); {spec['num_samples']} samples per "
           f"entry. Metric: {metric} (lower is better).", "",
           "| method | " + " | ".join(f"{n} steps" for n in all_steps) + " |",
           "|---|" + "---|" * len(all_steps)]
  by_method = {}
  for r in results:
    by_method.setdefault(r.method, {})[r.num_steps] = r
  for method, entries in by_method.items():
    cells = [f"{entries[n].metrics[metric]:.4g}" if n in entries else "" for n in all_steps]
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  if "starflow" in by_method:
    calls = sorted(by_method["starflow"])
    lines += ["", f"STARFlow samples by one exact decoding pass, token by token with a KV cache: "
              f"its entry stands in the column of its {', '.join(map(str, calls))} sequential "
              "network calls (tokens x flow blocks)."]
  floors = [r.metrics[floor_key] for r in results if floor_key in r.metrics]
  if floors:
    lines += ["", f"Noise floor (the metric between two independent sets of real data of the "
              f"same size): {np.mean(floors):.4g}."]
  if suite == "digits" and any("accuracy" in r.metrics for r in results):
    lines += ["", "Classifier accuracy of class-conditional samples:", "",
              "| method | " + " | ".join(f"{n} steps" for n in all_steps) + " |",
              "|---|" + "---|" * len(all_steps)]
    for method, entries in by_method.items():
      cells = [f"{entries[n].metrics['accuracy']:.3f}" if n in entries else "" for n in all_steps]
      lines.append(f"| {method} | " + " | ".join(cells) + " |")
  storage.write_text(storage.join(workdir, "arena.md"), "\n".join(lines) + "\n")
  storage.write_text(storage.join(workdir, "arena.json"),
                     json.dumps([dataclasses.asdict(r) for r in results], indent=1))
  plot(storage.join(workdir, "arena.png"), by_method, metric,
       np.mean(floors) if floors else None, suite)
  samples_figure(storage.join(workdir, "arena_samples.png"), workdir, by_method, metric)


def samples_figure(path: str, workdir: str, by_method: dict, metric: str) -> None:
  """One row of sample pictures per method, one column per step count (DIR/<method>/samples/
  arena_<N>_steps.png, written by the evaluation), each titled with its metric."""
  from PIL import Image

  from flowjax import plot as plot_lib
  columns = sorted({n for entries in by_method.values() for n in entries})
  plt = plot_lib.pyplot()
  fig, axes = plt.subplots(len(by_method), len(columns), squeeze=False,
                           figsize=(1.9 * len(columns), 2.0 * len(by_method)), dpi=100)
  for row, (method, entries) in enumerate(by_method.items()):
    for col, n in enumerate(columns):
      ax = axes[row][col]
      ax.axis("off")
      picture = storage.join(workdir, method, "samples", f"arena_{n}_steps.png")
      if n not in entries or not storage.exists(picture):
        continue
      ax.imshow(Image.open(io.BytesIO(storage.read_bytes(picture))))
      ax.set_title(f"{method}, {n} steps\n{metric} {entries[n].metrics[metric]:.3g}", fontsize=7)
  fig.tight_layout()
  _save_figure(fig, path)
  plt.close(fig)


def _save_figure(fig, path: str) -> None:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  storage.write_bytes(path, buffer.getvalue())


def plot(path: str, by_method: dict, metric: str, floor, title: str) -> None:
  from flowjax import plot as plot_lib
  plt = plot_lib.pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
  series = {method: [(r.nfe, r.metrics[metric]) for r in entries.values()]
            for method, entries in by_method.items()}
  plot_lib.line_chart(ax, series, xlabel="network evaluations per sample", ylabel=metric,
                      title=f"flowjax arena: {title}", log_x=2, log_y=True, markers=True,
                      hline=None if floor is None else (floor, "real-data floor"))
  fig.tight_layout()
  _save_figure(fig, path)
  plt.close(fig)


def main(argv=None):
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--suite", choices=sorted(SUITES), required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--budget", type=int, default=None, help="train steps for every method")
  parser.add_argument("--methods", default="", help="comma-separated subset of the methods")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  from flowjax import metrics
  metrics.quiet_libraries()
  from flowjax import sharding
  sharding.start_runtime()
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [m for m in methods if m not in SUITES[args.suite]["methods"]]
  if unknown:
    from flowjax import registry
    parser.error(registry.unknown_name_message(f"--methods entry of suite {args.suite!r}",
                                               unknown[0], list(SUITES[args.suite]["methods"])))
  run(args.suite, args.workdir, args.budget, methods)
  print(storage.read_text(storage.join(args.workdir, "arena.md")))


if __name__ == "__main__":
  main()
