"""python -m flowjax.arena --suite=toy2d|digits|... --workdir=DIR [--seeds=N] [--budget=STEPS]
                          [--methods=...] [--first_seed=K]
python -m flowjax.arena --report=experiments/results/arena_toy2d.json [--readme=README.md]

Trains every method of a suite with the same backbone and the same budget (steps x batch) with
N seeds, evaluates each at its natural step counts, and writes DIR/arena.json (the result file:
the commands, commit and machine that produced it, the real-data floor at several evaluation
seeds and one record per method, step count and seed), DIR/arena.md (its tables: mean ± std over
seeds, flowjax.arena_report), DIR/arena.png (metric against network evaluations per sample, one
line per method, the range over seeds shaded), DIR/arena_samples.png (seed 0's samples) and
DIR/arena_error.png (seed 0's unweighted training error of every method against steps).

Seed k trains with config.seed = k, samples with key 1234 + k and evaluates with the suite's
evaluation seed + k. Seed 0 trains in DIR/<method>/ and seed k > 0 in DIR/seed_<k>/<method>/
(CTM's teacher is the flow-matching run of its own seed), each with the ordinary trainer, so an
interrupted arena resumes where it stopped and an earlier single-seed arena is seed 0 of a
multi-seed one; --first_seed=K trains only seeds K..N-1 and keeps the results of the lower
seeds that DIR/arena.json holds. --report prints the tables of a result file; with --readme it
rewrites that file's block in the README instead.
"""

import dataclasses
import io
import json
import logging
import sys

import jax
import numpy as np

from flowjax import arena_report, storage

# Each method: (experiment, sampling step counts, sampler, [config overrides]). An override value
# may name another method's workdir as "{workdir}/<method>" (CTM distils the flow-matching run,
# which therefore trains first).
REPA_DIGITS = {"repa.weight": 0.5, "repa.encoder": "digits", "repa.depth": 2,
               "repa.projector_dim": 256}
SUITES = {
    "toy2d": dict(
        methods={"flow_matching": ("fm_toy2d.py", [1, 2, 4, 8, 100], "euler"),
                 "imm": ("imm_toy2d.py", [1, 2, 4, 8], "uniform"),
                 "meanflow": ("meanflow_toy2d.py", [1, 2, 4, 8], "euler"),
                 "shortcut": ("shortcut_toy2d.py", [1, 2, 4, 8, 128], "euler"),
                 "consistency": ("consistency_toy2d.py", [1, 2, 4, 8], "multistep"),
                 "ctm": ("ctm_toy2d.py", [1, 2, 4, 8], "karras",
                         {"objective.teacher_workdir": "{workdir}/flow_matching"}),
                 "starflow": ("starflow_toy2d.py", [1], "kv_cache", {"model.hidden_size": 64}),
                 "sct": ("scm_toy2d.py", [1, 2, 4], "trigflow",
                         {"objective.tangent_warmup_steps": 200}),
                 "scd": ("scm_toy2d.py", [1, 2, 4], "trigflow",
                         {"objective.mode": "scd", "objective.tangent_warmup_steps": 200,
                          "objective.teacher_workdir": "{workdir}/flow_matching"}),
                 "tvm": ("tvm_toy2d.py", [1, 2, 4, 8], "uniform",
                         {"optim.ema_decays": (0.995, 0.99), "sample.ema_decay": 0.995}),
                 "imf": ("imf_toy2d.py", [1, 2, 4, 8], "euler"),
                 "dmd2": ("dmd2_toy2d.py", [1], "generator",
                          {"objective.teacher_workdir": "{workdir}/flow_matching"}),
                 "fdistill": ("fdistill_toy2d.py", [1], "generator",
                              {"objective.teacher_workdir": "{workdir}/flow_matching"})},
        overrides={"model.hidden_size": 256, "model.depth": 4, "train.batch_size": 512,
                   "data.toy_distribution": "checkerboard", "sample.every_steps": 0,
                   "train.log_every": 500, "optim.ema_decays": (0.995,)},
        steps=2000, num_samples=4096, metric="energy_distance", evaluation_seed=1),
    "digits": dict(
        methods={"flow_matching": ("quickstart.py", [1, 2, 4, 8, 100], "euler"),
                 "imm": ("imm_digits.py", [1, 2, 4, 8], "uniform"),
                 "imm_by_label": ("imm_digits.py", [1, 2, 4, 8], "uniform",
                                  {"objective.label_groups": "by_label"}),
                 # IMM with a = 2 in the alpha_t^a factor of its loss weighting (arXiv:2503.07565;
                 # the official ImageNet-256 default) instead of the digits preset's 1.
                 "imm_a2": ("imm_digits.py", [1, 2, 4, 8], "uniform", {"objective.weight_a": 2.0}),
                 "meanflow": ("meanflow_digits.py", [1, 2, 4, 8], "euler"),
                 "shortcut": ("shortcut_digits.py", [1, 2, 4, 8, 128], "euler"),
                 "consistency": ("consistency_digits.py", [1, 2, 4, 8], "multistep"),
                 "ctm": ("ctm_digits.py", [1, 2, 4, 8], "karras",
                         {"objective.teacher_workdir": "{workdir}/flow_matching"}),
                 "sct": ("scm_digits.py", [1, 2, 4], "trigflow"),
                 "scd": ("scm_digits.py", [1, 2, 4], "trigflow",
                         {"objective.mode": "scd", "objective.teacher_guidance": 2.0,
                          "objective.teacher_workdir": "{workdir}/flow_matching"}),
                 "tvm": ("tvm_digits.py", [1, 2, 4, 8], "uniform"),
                 "imf": ("imf_digits.py", [1, 2, 4, 8], "euler"),
                 # REPA (arXiv:2410.06940) against the committed digits classifier's feature
                 # map, at the weight of the paper, after block 2 of the 4, with a projector
                 # 256 wide (REPA's 2048 serves a 1152-wide SiT-XL; beside this 96-wide DiT it
                 # would cost several times the network).
                 "flow_matching_repa": ("quickstart.py", [1, 2, 4, 8, 100], "euler", REPA_DIGITS),
                 "meanflow_repa": ("meanflow_digits.py", [1, 2, 4, 8], "euler", REPA_DIGITS),
                 "dmd2": ("dmd2_digits.py", [1], "generator",
                          {"objective.teacher_workdir": "{workdir}/flow_matching"}),
                 "fdistill": ("fdistill_digits.py", [1], "generator",
                              {"objective.teacher_workdir": "{workdir}/flow_matching"})},
        overrides={"model.hidden_size": 96, "model.depth": 4, "model.num_heads": 4,
                   "model.patch_size": 2, "train.batch_size": 128, "sample.every_steps": 0,
                   "train.log_every": 250},
        steps=1500, num_samples=500, metric="fd", evaluation_seed=0),
}
# The digits at 28x28 (upscaled bilinearly, MNIST's size): the same methods and budget with
# patch 4 (49 tokens) at batch 64; samples are scored by the 8x8 digits classifier after a
# resize back to 8x8, against a floor of real images taken through the same round trip.
# IMM's label input is weak after this budget at 28x28: "imm_guided" is IMM's preset sampled
# with guidance 5 instead of 1.5 (1.5 is the better on the 8x8 digits); the arena trains it in
# its own folder, to the same parameters as "imm" (a run is deterministic).
_IMM_ROWS = ["imm", "imm_by_label", "imm_a2"]
SUITES["digits28"] = dict(
    SUITES["digits"],
    methods={**{m: SUITES["digits"]["methods"][m] for m in ["flow_matching"] + _IMM_ROWS},
             "imm_guided": ("imm_digits.py", [1, 2, 4, 8], "uniform", {"sample.guidance": 5.0}),
             **SUITES["digits"]["methods"]},
    overrides=dict(SUITES["digits"]["overrides"], **{
        "data.image_size": 28, "model.patch_size": 4, "train.batch_size": 64}))
# Heavy tails (t-Flow, Pandey et al., arXiv:2410.14171): flow matching and MeanFlow with Gaussian
# and with Student-t noise on the heavy-tailed toy (0.5 t(3) along x), scored by energy distance
# and by the tail-quantile error (tail_error: the mean relative error of the 0.99 and 0.999
# quantiles of |x| per axis), with twice the samples so that the 0.999 quantiles rest on 8 points.
SUITES["toy2d_heavy"] = dict(
    SUITES["toy2d"], methods={
        "flow_matching": ("fm_toy2d_heavy.py", [1, 2, 4, 8, 100], "euler",
                          {"objective.noise": "gaussian"}),
        "t_flow": ("fm_toy2d_heavy.py", [1, 2, 4, 8, 100], "euler"),
        "t_flow_nu10": ("fm_toy2d_heavy.py", [1, 2, 4, 8, 100], "euler",
                        {"objective.noise_nu": 10.0}),
        "meanflow": ("meanflow_toy2d.py", [1, 2, 4, 8], "euler"),
        "meanflow_t": ("meanflow_toy2d.py", [1, 2, 4, 8], "euler",
                       {"objective.noise": "student_t", "objective.noise_nu": 3.0})},
    overrides=dict(SUITES["toy2d"]["overrides"], **{"data.toy_distribution": "student_t"}),
    num_samples=8192, extra_metrics=["tail_error"])
# A smoke-size arena (two methods on a small MLP; committed with --seeds=2, about a minute on 2
# CPU cores) whose result file tests/test_arena.py reruns, so that a change which moves training
# or evaluation numbers fails a test before a README table is left behind.
SUITES["toy2d_smoke"] = dict(
    SUITES["toy2d"], methods={"flow_matching": ("fm_toy2d.py", [1, 4, 16], "euler"),
                              "meanflow": ("meanflow_toy2d.py", [1, 4], "euler")},
    overrides=dict(SUITES["toy2d"]["overrides"], **{
        "model.hidden_size": 64, "model.depth": 2, "train.batch_size": 256,
        "sample.num": 256}),  # each run's final sample picture (the evaluation draws its own)
    steps=200, num_samples=1024)
# Text to image on the captioned digits: flow matching and MeanFlow DiTs and STARFlow, each with
# its own experiment's backbone and caption path ('words' features), at one budget (steps x
# batch) and without guidance. Samples are drawn from the 30 captions ("a [thin |thick ]
# handwritten <digit>", cycling) and scored by FD and by the classifier's accuracy against the
# digit their caption names.
SUITES["digits_text"] = dict(
    methods={"flow_matching": ("fm_digits_text.py", [1, 2, 4, 8, 100], "euler"),
             "meanflow": ("meanflow_digits_text.py", [1, 2, 4, 8], "euler"),
             "starflow": ("starflow_digits_text.py", [1], "kv_cache")},
    overrides={"train.batch_size": 128, "sample.every_steps": 0, "sample.guidance": 1.0,
               "eval.every_steps": 0, "train.log_every": 250},
    steps=1500, num_samples=600, metric="fd", evaluation_seed=0, conditioning="text")
# The floor is evaluated at this many evaluation seeds (or at one per training seed, if more).
FLOOR_SEEDS = 10


@dataclasses.dataclass
class Result:
  method: str
  num_steps: int
  nfe: int
  metrics: dict
  train_steps: int = 0
  seed: int = 0
  evaluation_seed: int | None = None
  run: int | None = None  # index of the arena command in the result file's "runs"


def seed_workdir(workdir: str, seed: int) -> str:
  """Where the methods of `seed` train: DIR itself for seed 0, DIR/seed_<k> otherwise."""
  return workdir if seed == 0 else storage.join(workdir, f"seed_{seed}")


def earlier_results(workdir: str, steps: int, rerun) -> tuple[list[Result], list[dict]]:
  """Results in DIR/arena.json from earlier arena runs at the same training budget whose
  (method, seed) is not in `rerun`, and the runs (headers) they came from: running a subset of
  methods (--methods) or more seeds adds to the table. An arena.json from before result files had
  headers (a list of records) holds seed 0 of unrecorded runs."""
  path = storage.join(workdir, "arena.json")
  if not storage.exists(path):
    return [], []
  record = json.loads(storage.read_text(path))
  if isinstance(record, list):
    record = {"runs": [], "results": [dict(r, run=None) for r in record]}
  kept = [Result(**r) for r in record["results"]
          if r["train_steps"] == steps and (r["method"], r.get("seed", 0)) not in rerun]
  used = sorted({r.run for r in kept if r.run is not None})
  renumber = {old: new for new, old in enumerate(used)}
  for r in kept:
    r.run = renumber.get(r.run)
  return kept, [record["runs"][i] for i in used]


def floor_values(spec: dict, evaluation_seeds, metric: str | None = None) -> list[float]:
  """The suite's real-data floor at each evaluation seed: its metric (or `metric`, a toy2d
  metric) between two independent sets of num_samples real points (toy2d) or of real train-split
  images and the test split (digits, through the same resize round trip as the samples)."""
  n = spec["num_samples"]
  if spec["metric"] == "energy_distance":
    from flowjax.data import toy2d
    from flowjax.evals import toy2d as toy_metric
    distribution = spec["overrides"]["data.toy_distribution"]
    # The floor does not depend on the samples evaluated beside it; real points stand in.
    key = f"{metric or spec['metric']}_floor"
    return [toy_metric.evaluate(toy2d.sample(distribution, n, (seed, 12)), distribution,
                                seed)[key] for seed in evaluation_seeds]
  from flowjax.data import digits
  from flowjax.evals import digits as digits_metric
  classifier = digits_metric.load_classifier()
  images = digits.load()[0][:n]
  size = spec["overrides"].get("data.image_size", digits.NATIVE_SIZE)
  return [digits_metric.evaluate(images, classifier=classifier, seed=seed,
                                 image_size=size)["fd_floor"] for seed in evaluation_seeds]


def caption_prompts(num: int) -> tuple[np.ndarray, list[str]]:
  """(labels [num], captions) cycling over the captioned digits' 30 prompts: sample i asks for
  digit i % 10 in style (i // 10) % 3 ('thin', plain, 'thick')."""
  from flowjax.data import digits
  labels = np.arange(num) % digits.NUM_CLASSES
  styles = [digits.STYLES[(i // digits.NUM_CLASSES) % len(digits.STYLES)] for i in range(num)]
  return labels, [digits.caption(int(label), style) for label, style in zip(labels, styles)]


def sample_conditions(info, num: int):
  """(conditions the samples are drawn with, the digit each should show or None): a captioned
  source's features of `caption_prompts`, else labels cycling over the classes (or None)."""
  from flowjax import train
  if info.text is not None:
    labels, captions = caption_prompts(num)
    return jax.numpy.asarray(info.text.encode(captions)), labels
  labels = train.sample_labels(info, num)
  return labels, labels


def evaluate_method(config, workdir: str, method: str, step_counts, sample_method: str,
                    spec: dict, seed: int = 0) -> list[Result]:
  """The metrics of `method`'s checkpoint in `workdir` at each step count: spec["num_samples"]
  samples drawn with key 1234 + seed, scored at evaluation seed spec["evaluation_seed"] + seed."""
  from flowjax import metrics, modes, train
  from flowjax.evals import digits as digits_metric, toy2d as toy_metric
  num_samples, toy = spec["num_samples"], spec["metric"] == "energy_distance"
  evaluation_seed = spec["evaluation_seed"] + seed
  setup, state = modes.load(config, workdir)
  params = train.sampling_params(state, config)
  conditions, labels = sample_conditions(setup.info, num_samples)
  guided = conditions is not None and config.sample.guidance != 1.0
  classifier = None if toy else digits_metric.load_classifier()
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
      samples, calls = sample(params, jax.random.key(1234 + seed), conditions)
    samples, calls = np.asarray(jax.device_get(samples)), int(calls)
    if toy:
      values = toy_metric.evaluate(samples, config.data.toy_distribution, evaluation_seed)
    else:
      values = digits_metric.evaluate(samples, None if labels is None else np.asarray(labels),
                                      classifier=classifier, seed=evaluation_seed,
                                      image_size=samples.shape[1])
    metrics.save_png(storage.join(workdir, "samples", f"arena_{calls}_steps.png"),
                     metrics.samples_picture(samples if toy else samples[:100]))
    results.append(Result(method, calls, calls * (2 if guided else 1), values,
                          int(config.train.steps), seed, evaluation_seed))
    logging.info("%s seed %d, %d steps: %s", method, seed, num_steps, values)
  return results


def method_config(suite: str, method: str, seed: int, steps: int, workdir: str):
  """The config `method` of `suite` trains with at `seed` for `steps` steps in the arena DIR
  `workdir`: its experiment with the suite's overrides, then its own."""
  from flowjax import config as config_lib
  spec = SUITES[suite]
  experiment, _, _, *extra = spec["methods"][method]
  own = {key: value.format(workdir=seed_workdir(workdir, seed)) if isinstance(value, str)
         else value for key, value in (extra[0] if extra else {}).items()}
  overrides = dict(spec["overrides"], **own, **{"train.steps": steps,
                                                "ckpt.every_steps": steps, "seed": seed})
  # A shared override that the method's backbone does not have (an MLP's depth for a flow) is
  # left out; the method's own experiment sizes that part.
  keys = config_lib.flatten(config_lib.load_experiment(experiment))
  overrides = {k: v for k, v in overrides.items() if k in keys or k in own}
  return config_lib.load_experiment(experiment, None, **overrides)


def run(suite: str, workdir: str, budget: int | None = None, methods=None, seeds: int = 1,
        command: str | None = None, first_seed: int = 0) -> list[Result]:
  """Trains and evaluates the chosen methods of `suite` with seeds first_seed..seeds-1 (every
  method of the first seed first, so that an interrupted run already holds a complete
  single-seed arena), then writes DIR/arena.json, .md, .png and _samples.png; returns every
  result of DIR/arena.json (the results of other seeds and methods at this budget are kept)."""
  from flowjax import provenance, train
  spec = SUITES[suite]
  steps = budget or spec["steps"]
  unknown = [m for m in (methods or []) if m not in spec["methods"]]
  if unknown:
    from flowjax import registry
    raise ValueError(registry.unknown_name_message(f"--methods entry of suite {suite!r}",
                                                   unknown[0], list(spec["methods"])))
  if seeds < 1:
    raise ValueError(f"--seeds must be at least 1; got {seeds}.")
  if not 0 <= first_seed < seeds:
    raise ValueError(f"--first_seed={first_seed} must be in [0, --seeds={seeds}).")
  chosen = [m for m in spec["methods"] if not methods or m in methods]
  # The code that trains and evaluates is the code at the start (commit, uncommitted changes).
  header = provenance.header(command or f"flowjax.arena.run({suite!r}, ...)")
  results = []
  for seed in range(first_seed, seeds):
    for method in chosen:
      _, step_counts, sample_method, *_ = spec["methods"][method]
      config = method_config(suite, method, seed, steps, workdir)
      method_dir = storage.join(seed_workdir(workdir, seed), method)
      state = train.run(config, method_dir)
      if int(state.step) < steps:
        # Stopped by a signal (checkpoint saved): report nothing half-trained.
        logging.warning("The arena stopped while training %s (seed %d) at step %d of %d; rerun "
                        "the same command to resume.", method, seed, int(state.step), steps)
        raise SystemExit(1)
      results += evaluate_method(config, method_dir, method, step_counts, sample_method, spec,
                                 seed)
  kept, runs = earlier_results(workdir, steps, {(r.method, r.seed) for r in results})
  for r in results:
    r.run = len(runs)
  runs.append(dict(header, seeds=list(range(first_seed, seeds)), methods=chosen))
  order = list(spec["methods"])
  results = sorted(kept + results, key=lambda r: (order.index(r.method) if r.method in order
                                                  else len(order), r.method, r.seed, r.num_steps))
  evaluation_seeds = [spec["evaluation_seed"] + k for k in range(max(FLOOR_SEEDS, seeds))]
  record = {"suite": suite, "metric": spec["metric"],
            **({"conditioning": spec["conditioning"]} if spec.get("conditioning") else {}),
            "budget": {"train_steps": steps,
                       "batch_size": spec["overrides"]["train.batch_size"],
                       "hidden_size": spec["overrides"].get("model.hidden_size"),
                       "depth": spec["overrides"].get("model.depth"),
                       "num_samples": spec["num_samples"]},
            "methods": {name: {"experiment": experiment, "step_counts": list(step_counts),
                               "sampler": sampler}
                        for name, (experiment, step_counts, sampler, *_) in
                        spec["methods"].items()},
            "runs": runs,
            "floor": {"key": f"{spec['metric']}_floor", "evaluation_seeds": evaluation_seeds,
                      "values": floor_values(spec, evaluation_seeds)},
            **({"extra_metrics": {key: floor_values(spec, evaluation_seeds, key)
                                  for key in spec["extra_metrics"]}}
               if spec.get("extra_metrics") else {}),
            "results": [dataclasses.asdict(r) for r in results]}
  write_report(workdir, record)
  return results


def write_report(workdir: str, record: dict) -> None:
  """DIR/arena.json (the record), DIR/arena.md (its tables), DIR/arena.png and
  DIR/arena_samples.png."""
  storage.write_text(storage.join(workdir, "arena.json"), json.dumps(record, indent=1) + "\n")
  storage.write_text(storage.join(workdir, "arena.md"), f"# flowjax arena: {record['suite']}\n\n"
                     + arena_report.markdown(record))
  plot(storage.join(workdir, "arena.png"), record)
  seed_zero = {}
  for r in record["results"]:
    if r["seed"] == 0:
      seed_zero.setdefault(r["method"], {})[r["num_steps"]] = r
  samples_figure(storage.join(workdir, "arena_samples.png"), workdir, seed_zero, record["metric"])
  error_figure(storage.join(workdir, "arena_error.png"), workdir, list(seed_zero))


def error_curves(workdir: str, methods) -> dict[str, list[tuple[float, float]]]:
  """{method label: [(step, error), ...]}: the unweighted error each method logs as `error`
  (flow matching's MSE, IMM's MMD, MeanFlow's and consistency's MSE, CTM's distance, STARFlow's
  NLL), from seed 0's DIR/<method>/metrics.jsonl."""
  from flowjax import metrics, plot as plot_lib
  curves = {}
  for method in methods:
    records = metrics.read_metrics(storage.join(workdir, method))
    series = plot_lib.metric_series(records, keys=None).get("error", [])
    if series:
      curves[arena_report.LABELS.get(method, method)] = series
  return curves


def error_figure(path: str, workdir: str, methods) -> None:
  """DIR/arena_error.png: every method's unweighted error against training steps (seed 0), on
  a log scale: a run that diverges under a falling weighted loss shows here."""
  from flowjax import plot as plot_lib
  curves = error_curves(workdir, methods)
  if not curves:
    return
  plt = plot_lib.pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
  plot_lib.line_chart(ax, curves, xlabel="training step", ylabel="unweighted error (each "
                      "method's own)", title="flowjax arena: error while training, seed 0",
                      log_y=True, markers=True)
  fig.tight_layout()
  _save_figure(fig, path)
  plt.close(fig)


def samples_figure(path: str, workdir: str, by_method: dict, metric: str) -> list[str]:
  """One row of sample pictures per method, one column per step count (DIR/<method>/samples/
  arena_<N>_steps.png, seed 0's, written by the evaluation), each titled with its metric; saved
  with 16 colours, the committed gallery's size. Methods of the record whose runs are not in
  DIR (results kept from an earlier workdir) get no row. Returns the methods drawn."""
  from PIL import Image

  from flowjax import plot as plot_lib

  def picture_path(method, n):
    return storage.join(workdir, method, "samples", f"arena_{n}_steps.png")

  by_method = {method: entries for method, entries in by_method.items()
               if any(storage.exists(picture_path(method, n)) for n in entries)}
  if not by_method:
    return []
  columns = sorted({n for entries in by_method.values() for n in entries})
  plt = plot_lib.pyplot()
  fig, axes = plt.subplots(len(by_method), len(columns), squeeze=False,
                           figsize=(1.9 * len(columns), 2.0 * len(by_method)), dpi=100)
  for row, (method, entries) in enumerate(by_method.items()):
    for col, n in enumerate(columns):
      ax = axes[row][col]
      ax.axis("off")
      picture = picture_path(method, n)
      if n not in entries or not storage.exists(picture):
        continue
      ax.imshow(Image.open(io.BytesIO(storage.read_bytes(picture))))
      ax.set_title(f"{method}, {n} steps, seed 0\n{metric} "
                   f"{entries[n]['metrics'][metric]:.3g}", fontsize=7)
  fig.tight_layout()
  _save_figure(fig, path, colors=16)
  plt.close(fig)
  return list(by_method)


def _save_figure(fig, path: str, colors: int | None = None) -> None:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  if colors:
    from PIL import Image
    picture = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").quantize(colors)
    buffer = io.BytesIO()
    picture.save(buffer, format="png")
  storage.write_bytes(path, buffer.getvalue())


def plot(path: str, record: dict) -> None:
  """The metric's mean over seeds against network evaluations per sample, one line per method,
  shaded between the lowest and highest seed, with the real-data floor's mean."""
  from flowjax import plot as plot_lib
  metric = record["metric"]
  nfe = {(r["method"], r["num_steps"]): r["nfe"] for r in record["results"]}
  series, bands = {}, {}
  for method, row in arena_report.entries(record, metric).items():
    label = arena_report.LABELS.get(method, method)
    series[label] = [(nfe[method, n], s["mean"]) for n, s in row.items()]
    bands[label] = [(nfe[method, n], s["min"], s["max"]) for n, s in row.items() if s["n"] > 1]
  floor = record["floor"]["values"]
  plt = plot_lib.pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
  plot_lib.line_chart(ax, series, xlabel="network evaluations per sample", ylabel=metric,
                      title=f"flowjax arena: {record['suite']}", log_x=2, log_y=True,
                      markers=True, bands=bands,
                      hline=(float(np.mean(floor)), "real-data floor") if floor else None)
  fig.tight_layout()
  _save_figure(fig, path)
  plt.close(fig)


def main(argv=None):
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--suite", choices=sorted(SUITES))
  parser.add_argument("--workdir")
  parser.add_argument("--seeds", type=int, default=1,
                      help="train every method with config.seed = 0..N-1")
  parser.add_argument("--first_seed", type=int, default=0,
                      help="train only seeds K..N-1; the results of lower seeds stay in "
                      "DIR/arena.json from the runs that made them")
  parser.add_argument("--budget", type=int, default=None, help="train steps for every method")
  parser.add_argument("--methods", default="", help="comma-separated subset of the methods")
  parser.add_argument("--report", help="print the tables of this arena result file (no "
                      "training), e.g. experiments/results/arena_toy2d.json")
  parser.add_argument("--readme", help="with --report: rewrite that file's block in this README")
  args = parser.parse_args(argv)
  if args.report:
    try:
      text = arena_report.markdown(arena_report.load(args.report))
      if args.readme:
        storage.write_text(args.readme, arena_report.update_readme(
            storage.read_text(args.readme), args.report, text))
        print(f"Rewrote the block of {args.report} in {args.readme}.")
      else:
        print(text, end="")
    except (FileNotFoundError, ValueError) as error:
      parser.exit(1, f"flowjax.arena: {error}\n")
    return
  if not args.suite or not args.workdir:
    parser.error("give --suite and --workdir to run an arena, or --report=FILE to print one.")
  if args.seeds < 1:
    parser.error(f"--seeds must be at least 1; got {args.seeds}.")
  if not 0 <= args.first_seed < args.seeds:
    parser.error(f"--first_seed={args.first_seed} must be in [0, --seeds={args.seeds}).")
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
  command = " ".join(["python -m flowjax.arena"] + list(sys.argv[1:] if argv is None else argv))
  run(args.suite, args.workdir, args.budget, methods, args.seeds, command, args.first_seed)
  print(storage.read_text(storage.join(args.workdir, "arena.md")))


if __name__ == "__main__":
  main()
