"""Curves as PNG: `python -m flowjax.plot --workdir=DIR` renders DIR/metrics.jsonl.

  python -m flowjax.plot --workdir=workdirs/quickstart              # every logged metric
  python -m flowjax.plot --workdir=workdirs/quickstart --keys=loss  # one panel
writes DIR/plots/metrics.png (or --out). The same `line_chart` draws the arena's comparison plot.

  python -m flowjax.plot --compare=W1,W2 --keys=error,loss --out=FIG.png [--window=100]
draws one line per workdir in each panel and writes FIG.json beside the picture: the command,
the commit, each workdir's seed and config fingerprint, and the median of each key over every
window of steps, the numbers a README quotes next to the figure.
"""

import json
import math
import sys

from absl import app
from absl import flags

# Columns of metrics.jsonl that are bookkeeping rather than curves worth a panel.
_NOT_CURVES = ("step", "time", "epoch")


def pyplot():
  """matplotlib.pyplot; drawing off screen (Agg) unless inside a notebook kernel."""
  import matplotlib
  if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def line_chart(ax, series: dict, *, xlabel: str, ylabel: str, title: str = "",
               log_x: int | None = None, log_y: bool = False, hline=None, markers: bool = False,
               bands: dict | None = None):
  """Draws one line per entry of `series` {label: [(x, y), ...]} on a matplotlib axis.

  log_x: base of a logarithmic x axis (None: linear); hline: (y, label) of a reference line;
  bands: {label: [(x, low, high), ...]} shaded in the colour of that label's line (a spread over
  seeds). Non-finite points are dropped (a NaN step does not hide the rest of a curve).
  """
  for label, points in series.items():
    points = sorted((x, y) for x, y in points if math.isfinite(x) and math.isfinite(y))
    if points:
      line, = ax.plot(*zip(*points), marker="o" if markers else None, label=label)
      band = sorted(p for p in (bands or {}).get(label, []) if all(map(math.isfinite, p)))
      if band:
        ax.fill_between(*zip(*band), color=line.get_color(), alpha=0.2, linewidth=0)
  if hline is not None:
    ax.axhline(hline[0], color="gray", linestyle="--", label=hline[1])
  if log_x:
    ax.set_xscale("log", base=log_x)
  if log_y:
    ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  if len(series) > 1 or hline is not None:
    ax.legend()
  ax.grid(alpha=0.3)


def metric_series(records: list[dict], keys=None) -> dict[str, list[tuple[float, float]]]:
  """{metric: [(step, value), ...]} from metrics.jsonl records; keys=None takes every numeric
  metric that is logged at least twice. Records may carry different keys (eval_* only at
  evaluation steps)."""
  series: dict[str, list[tuple[float, float]]] = {}
  for record in records:
    step = record.get("step")
    if step is None:
      continue
    for key, value in record.items():
      if key in _NOT_CURVES or (keys is not None and key not in keys):
        continue
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        series.setdefault(key, []).append((float(step), float(value)))
  if keys is not None:
    missing = [k for k in keys if k not in series]
    if missing:
      known = sorted({k for r in records for k in r} - set(_NOT_CURVES))
      raise ValueError(f"--keys names {missing}, which metrics.jsonl does not log; logged: "
                       f"{', '.join(known)}.")
    return {k: series[k] for k in keys}
  return {k: v for k, v in sorted(series.items()) if len(v) > 1}


def metrics_figure(workdir: str, keys=None):
  """A matplotlib figure with one panel per metric of `workdir`/metrics.jsonl (loss on a log
  axis when it stays positive)."""
  from flowjax import metrics, storage
  path = storage.join(workdir, "metrics.jsonl")
  if not storage.exists(path):
    raise FileNotFoundError(f"{path} does not exist; --workdir must be a flowjax training workdir "
                            "(python -m flowjax.main --config=... --workdir=DIR writes it).")
  series = metric_series(metrics.read_metrics(workdir), keys)
  if not series:
    raise ValueError(f"{path} has fewer than two logged steps; train longer or lower "
                     "train.log_every.")
  plt = pyplot()
  columns = min(3, len(series))
  rows = math.ceil(len(series) / columns)
  fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), dpi=100,
                           squeeze=False)
  for ax, (key, points) in zip(axes.flat, series.items()):
    positive = all(y > 0 for _, y in points)
    line_chart(ax, {key: points}, xlabel="step", ylabel=key, title=key,
               log_y=positive and key.endswith("loss"))
  for ax in list(axes.flat)[len(series):]:
    ax.axis("off")
  fig.suptitle(str(workdir).rstrip("/").rsplit("/", 1)[-1])
  fig.tight_layout()
  return fig


def plot_workdir(workdir: str, keys=None, out: str | None = None) -> str:
  """Writes the metrics figure of `workdir` as PNG (default DIR/plots/metrics.png); returns its
  path."""
  import io

  from flowjax import storage
  fig = metrics_figure(workdir, keys)
  out = out or storage.join(workdir, "plots", "metrics.png")
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  pyplot().close(fig)
  storage.write_bytes(out, buffer.getvalue())
  return out


def window_medians(points, window: int) -> list[list[float]]:
  """[[first step of the window, median value], ...] over windows of `window` steps."""
  import numpy as np
  buckets: dict[int, list[float]] = {}
  for step, value in points:
    buckets.setdefault(int((step - 1) // window), []).append(value)
  return [[index * window + 1, float(np.median(values))] for index, values in sorted(
      buckets.items())]


def compare_workdirs(workdirs, keys, out: str, window: int = 100) -> dict:
  """One panel per key with a line per workdir, written to `out` (PNG), and its numbers to the
  .json beside it; returns that record."""
  import io

  from flowjax import config as config_lib, metrics, storage
  if not keys:
    raise ValueError("--compare needs --keys (e.g. --keys=error,loss).")
  curves, runs = {key: {} for key in keys}, {}
  for workdir in workdirs:
    label = str(workdir).rstrip("/").rsplit("/", 1)[-1]
    series = metric_series(metrics.read_metrics(workdir), keys)
    config = config_lib.with_defaults(
        config_lib.from_json(storage.read_text(storage.join(workdir, "config.json"))))
    runs[label] = {"workdir": str(workdir), "seed": int(config.seed),
                   "fingerprint": config_lib.fingerprint(config),
                   "medians": {key: window_medians(series[key], window) for key in keys}}
    for key in keys:
      curves[key][label] = series[key]
  plt = pyplot()
  fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.2), dpi=100, squeeze=False)
  for ax, key in zip(axes.flat, keys):
    positive = all(y > 0 for points in curves[key].values() for _, y in points)
    line_chart(ax, curves[key], xlabel="step", ylabel=key, title=key, log_y=positive)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  plt.close(fig)
  storage.write_bytes(out, buffer.getvalue())
  from flowjax import provenance
  record = {"command": "python -m flowjax.plot " + " ".join(sys.argv[1:]),
            **provenance.commit(), "window": window, "runs": runs}
  storage.write_text(out.rsplit(".", 1)[0] + ".json", json.dumps(record, indent=1))
  return record


def _define_flags() -> None:
  """The command line's flags, defined only when this module runs as the command: flowjax.bench
  defines flags of the same names, and both modules are imported in one process by tests and
  the arena."""
  flags.DEFINE_string("workdir", None, "A training workdir (holds metrics.jsonl).")
  flags.DEFINE_list("compare", None, "Workdirs side by side (with --keys and --out).")
  flags.DEFINE_integer("window", 100, "Steps per median in the --compare record.")
  flags.DEFINE_list("keys", None, "Metrics to plot (default: every logged metric).")
  flags.DEFINE_string("out", None, "PNG path (default: WORKDIR/plots/metrics.png).")


def main(argv):
  del argv
  args = flags.FLAGS
  try:
    if args.compare:
      if not args.out:
        raise ValueError("--compare needs --out=FIG.png.")
      compare_workdirs(args.compare, args.keys, args.out, args.window)
      path = args.out
    elif not args.workdir:
      raise ValueError("give --workdir=DIR (or --compare=DIR1,DIR2 --keys=... --out=FIG.png).")
    else:
      path = plot_workdir(args.workdir, args.keys, args.out)
  except (FileNotFoundError, ValueError) as error:
    sys.stderr.write(f"flowjax.plot: {error}\n")
    sys.exit(1)
  print(json.dumps({"png": path}))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
