"""An arena result file (DIR/arena.json, committed as experiments/results/arena_*.json) as the
markdown tables the README shows, the README blocks generated from such files, and the
comparison of a rerun with a committed file.

  python -m flowjax.arena --report=experiments/results/arena_toy2d.json [--readme=README.md]

The file holds the suite, its budget and methods, one header per arena command that contributed
(command, commit, date, machine, seeds), the real-data floor at several evaluation seeds and one
record per method, step count and seed. A README block is the text between
`<!-- arena report: FILE -->` and `<!-- end arena report -->`: `markdown` of that file, verbatim.
"""

import json
import re

import numpy as np

# Row names of the tables; a method missing here is shown by its registry name.
LABELS = {"flow_matching": "flow matching (Euler)", "imm": "IMM (pushforward)",
          "meanflow": "MeanFlow", "shortcut": "Shortcut",
          "consistency": "consistency training (iCT)", "ctm": "CTM (gamma = 0)",
          "starflow": "STARFlow (one exact pass)", "sct": "sCT (TrigFlow)",
          "scd": "sCD (TrigFlow, from flow matching)",
          "imm_by_label": "IMM, groups by label", "imm_a2": "IMM, weighting a = 2",
          "imm_a1": "IMM, weighting a = 1", "imm_guided": "IMM, guidance 5",
          "tvm": "TVM (terminal velocity)",
          "imf": "iMF (improved MeanFlow)", "t_flow": "t-Flow (Student-t noise, nu = 3)",
          "t_flow_nu10": "t-Flow (nu = 10)",
          "meanflow_t": "MeanFlow, Student-t noise (nu = 3)",
          "flow_matching_repa": "flow matching + REPA", "meanflow_repa": "MeanFlow + REPA",
          "dmd2": "DMD2 (from flow matching)", "fdistill": "f-distill (JS, from flow matching)"}
# Captions of the tables of a suite's further metrics (SUITES[...]["extra_metrics"]).
EXTRA_METRICS = {"tail_error": "Tail-quantile error (mean relative error of the 0.99 and 0.999 "
                               "quantiles of |x| per axis)"}
# Two entries whose means differ by more than this many times the larger of their standard
# deviations over seeds are told apart by the table; closer ones are not.
RESOLVED_STDS = 2.0
BLOCK = re.compile(r"<!-- arena report: (\S+) -->\n(.*?)<!-- end arena report -->", re.S)


def load(path: str) -> dict:
  """The record of an arena result file (see the module docstring for its fields)."""
  from flowjax import storage
  if not storage.exists(path):
    raise FileNotFoundError(f"{path} does not exist; an arena writes its result file as "
                            "DIR/arena.json (python -m flowjax.arena --suite=SUITE --workdir=DIR), "
                            "committed as experiments/results/arena_<suite>.json.")
  record = json.loads(storage.read_text(path))
  if isinstance(record, list):
    raise ValueError(f"{path} is an arena.json written before result files had a header (a list "
                     "of single-seed records); rerun the arena command on its workdir (trained "
                     "methods are only evaluated again) to rewrite it.")
  return record


def statistics(values) -> dict:
  """mean, sample standard deviation (None for one value), min, max and count of `values`."""
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1
          else None, "min": float(values.min()), "max": float(values.max()), "n": len(values)}


def entries(record: dict, key: str) -> dict:
  """{method: {num_steps: statistics of metrics[key] over seeds}} in the suite's method order."""
  values: dict = {}
  for r in record["results"]:
    if key in r["metrics"]:
      values.setdefault(r["method"], {}).setdefault(r["num_steps"], []).append(r["metrics"][key])
  order = [m for m in record["methods"] if m in values] + sorted(set(values) - set(
      record["methods"]))
  return {m: {n: statistics(v) for n, v in sorted(values[m].items())} for m in order}


def resolved_best(column: dict, lower_is_better: bool = True) -> set:
  """Methods of one column ({method: statistics}) that the seeds do not tell apart from the best
  mean: the best itself, and every entry whose mean is within RESOLVED_STDS x the larger of the
  two standard deviations of it (the one that is known, when one of the two has a single seed).
  Where neither has a spread (single seeds), only the best."""
  best = (min if lower_is_better else max)(column, key=lambda m: column[m]["mean"])
  chosen = {best}
  for method, s in column.items():
    spreads = [std for std in (column[best]["std"], s["std"]) if std is not None]
    if spreads and abs(s["mean"] - column[best]["mean"]) <= RESOLVED_STDS * max(spreads):
      chosen.add(method)
  return chosen


def _mean_std(s: dict, digits: str) -> str:
  if s["std"] is None:
    return format(s["mean"], digits)
  return f"{s['mean']:{digits}} ± {s['std']:#.2g}"


def _table(record: dict, key: str, columns: list, cell, better: str | None = None) -> list[str]:
  """Rows of `cell(statistics)` per method and column; better="lower"|"higher" bolds each
  column's resolved_best."""
  by_method = entries(record, key)
  bold = {}
  if better is not None:
    for n in columns:
      column = {m: e[n] for m, e in by_method.items() if n in e}
      bold[n] = resolved_best(column, better == "lower") if column else set()
  lines = ["| method | " + " | ".join(_column_name(record, n) for n in columns) + " |",
           "|---|" + "---|" * len(columns)]
  for method, row in by_method.items():
    cells = []
    for n in columns:
      text = cell(row[n]) if n in row else ""
      cells.append(f"**{text}**" if text and method in bold.get(n, ()) else text)
    lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
  return lines


def _column_name(record: dict, n: int) -> str:
  """'N steps', or 'N calls' where every entry comes from one exact decoding pass (its step count
  is the number of sequential network calls it made, not one of the counts asked for)."""
  methods = {r["method"] for r in record["results"] if r["num_steps"] == n}
  if all(n not in record["methods"].get(m, {}).get("step_counts", [n]) for m in methods):
    return f"{n} calls"
  return "1 step" if n == 1 else f"{n} steps"


def _seeds(seeds) -> str:
  seeds = sorted(seeds)
  if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
    return f"{seeds[0]} to {seeds[-1]}"
  return ", ".join(map(str, seeds))


def _run_line(run: dict) -> str:
  machine = run["machine"]
  changes = " with uncommitted changes" if run["uncommitted_changes"] else ""
  methods = ", ".join(run["methods"])
  return (f"`{run['command']}` at commit {run['commit'][:10]}{changes}, {run['date']}, on "
          f"{machine['cpu']} ({machine['cpu_count']} cores, {machine['devices']}, jax "
          f"{machine['jax']}): seeds {_seeds(run['seeds'])} of {methods}.")


def markdown(record: dict) -> str:
  """The tables of an arena result file: metric mean ± std over seeds (bold: not told apart from
  the column's best), the real-data floor, the range over seeds, classifier accuracy where the
  samples are class-conditional, and the commands that produced the numbers."""
  metric, budget = record["metric"], record["budget"]
  columns = sorted({r["num_steps"] for r in record["results"]})
  seeds = sorted({r["seed"] for r in record["results"]})
  counts = {s["n"] for row in entries(record, metric).values() for s in row.values()}
  backbone = (f"the same backbone ({budget['hidden_size']} wide, depth {budget['depth']})"
              if budget.get("hidden_size") else "each method's own experiment's backbone")
  lines = [f"Budget: {budget['train_steps']} steps x batch {budget['batch_size']} for every "
           f"method, {backbone}; "
           f"{budget['num_samples']} samples per entry. Metric: {metric} (lower is better), mean "
           f"± sample standard deviation over {len(seeds)} seed{'s' * (len(seeds) > 1)} "
           f"({_seeds(seeds)}; seed k sets config.seed = k, the sampling key and the "
           "evaluation seed)."]
  if counts != {len(seeds)}:
    fewer = sorted(count for count in counts if count < len(seeds))
    lines[-1] += (f" Some entries have fewer seeds ({' or '.join(map(str, fewer))}); "
                  "the range table shows which.")
  lines[-1] += (f" Bold: the best mean of a column and every entry within {RESOLVED_STDS:g} x "
                "the larger of the two standard deviations of it (the known one beside a single "
                "seed), which these seeds do not tell apart from the best." if len(seeds) > 1
                else " Bold: the best of a column.")
  lines += [""] + _table(record, metric, columns, lambda s: _mean_std(s, ".4g"), "lower")
  if "starflow" in record["methods"] and any(r["method"] == "starflow"
                                             for r in record["results"]):
    lines += ["", "STARFlow samples by one exact decoding pass, token by token with a KV cache: "
              "its entry stands in the column of its sequential network calls (tokens x flow "
              "blocks)."]
  floor = record.get("floor")
  if floor and floor["values"]:
    s = statistics(floor["values"])
    lines += ["", f"Real-data floor (the metric between two independent sets of real data of "
              f"the same size): {_mean_std(s, '.4g')}, range [{s['min']:.4g}, {s['max']:.4g}] "
              f"over evaluation seeds {_seeds(floor['evaluation_seeds'])}."]
  if len(seeds) > 1:
    lines += ["", f"Range of {metric} over seeds [min, max]:", ""] + _table(
        record, metric, columns, lambda s: f"[{s['min']:.4g}, {s['max']:.4g}]"
        + ("" if s["n"] == len(seeds) else f" ({s['n']} seed{'s' * (s['n'] > 1)})"))
  for key, floor_values in record.get("extra_metrics", {}).items():
    lines += ["", f"{EXTRA_METRICS.get(key, key)} (lower is better):", ""]
    lines += _table(record, key, columns, lambda s: _mean_std(s, ".3g"), "lower")
    if floor_values:
      s = statistics(floor_values)
      lines += ["", f"Real-data floor of {key}: {_mean_std(s, '.3g')}, range [{s['min']:.3g}, "
                f"{s['max']:.3g}]."]
  if any("accuracy" in r["metrics"] for r in record["results"]):
    lines += ["", "Classifier accuracy of class-conditional samples (higher is better):"
              if record.get("conditioning") != "text" else "Classifier accuracy of the samples "
              "against the digit their caption names (higher is better):", ""]
    lines += _table(record, "accuracy", columns, lambda s: _mean_std(s, ".3f"), "higher")
  lines += ["", "Produced by " + " ".join(_run_line(run) for run in record["runs"])]
  if any(r.get("run") is None for r in record["results"]):
    lines[-1] += " Some records come from an arena run that did not record its command."
  return "\n".join(lines) + "\n"


def readme_block(path: str, text: str) -> str:
  return f"<!-- arena report: {path} -->\n{text}<!-- end arena report -->"


def readme_mismatches(readme: str, root: str = ".") -> list[str]:
  """One message per README block whose text is not `markdown` of its result file (a file under
  `root`), or whose file is missing; [] when every block matches."""
  import os
  problems = []
  for match in BLOCK.finditer(readme):
    path, text = match.group(1), match.group(2)
    if not os.path.exists(os.path.join(root, path)):
      problems.append(f"README block names {path}, which does not exist.")
      continue
    expected = markdown(load(os.path.join(root, path)))
    if text != expected:
      shown, wanted = text.splitlines(), expected.splitlines()
      first = next((i for i, (a, b) in enumerate(zip(shown, wanted)) if a != b),
                   min(len(shown), len(wanted)))
      problems.append(
          f"README block of {path} differs from its file at line {first + 1}:\n"
          f"  README: {shown[first] if first < len(shown) else '(ends)'}\n"
          f"  file:   {wanted[first] if first < len(wanted) else '(ends)'}\n"
          f"Refresh it: python -m flowjax.arena --report={path} --readme=README.md")
  return problems


def update_readme(readme: str, path: str, text: str) -> str:
  """`readme` with the block of `path` replaced by `text`."""
  matches = [m for m in BLOCK.finditer(readme) if m.group(1) == path]
  if not matches:
    raise ValueError(f"The README has no block for {path}; put the two lines "
                     f"'<!-- arena report: {path} -->' and '<!-- end arena report -->' where its "
                     "tables go, then run this again.")
  for match in reversed(matches):
    readme = readme[:match.start()] + readme_block(path, text) + readme[match.end():]
  return readme


def differences(committed: dict, rerun: dict, rtol: float, atol: float) -> list[str]:
  """One message per number of `rerun` (every metric of every method, step count and seed, and
  the floor) that is further than atol + rtol * |committed| from `committed`, and per record
  that only one of them has; [] when they agree."""
  def keyed(record):
    return {(r["method"], r["num_steps"], r["seed"]): r["metrics"] for r in record["results"]}
  old, new = keyed(committed), keyed(rerun)
  problems = [f"{key} only in the committed file" for key in sorted(set(old) - set(new))]
  problems += [f"{key} only in the rerun" for key in sorted(set(new) - set(old))]
  pairs = [(f"{key} {name}", old[key][name], new[key].get(name))
           for key in sorted(set(old) & set(new)) for name in sorted(old[key])]
  pairs += [(f"floor at evaluation seed {seed}", a, b) for seed, a, b in zip(
      committed["floor"]["evaluation_seeds"], committed["floor"]["values"],
      rerun["floor"]["values"])]
  for name, a, b in pairs:
    if b is None or not abs(b - a) <= atol + rtol * abs(a):
      problems.append(f"{name}: committed {a!r}, rerun {b!r}")
  return problems
