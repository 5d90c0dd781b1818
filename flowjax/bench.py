"""python -m flowjax.bench --config=experiments/X.py [--steps=N] [--out=FILE.json]

Compile time, median train-step time, examples/s, memory, input-pipeline throughput and sampling
throughput of one config on the devices at hand, printed and written as JSON with the command,
commit, seed, machine and load average. With --config.train.dry_run=True only the compile and
its memory analysis are measured.

FLOP/s and MFU, for the train step and for sampling: the FLOPs are XLA's cost analysis of the
compiled program (`compiled.cost_analysis()['flops']`: 2 per multiply-add of every dot and
convolution, 1 per elementwise operation); a loop body counts once, so a program whose while
loops contain dots or convolutions reports `flops_exact: false` (a lower bound) and no MFU.
MFU = FLOPs / seconds / peak, the peak per device from PEAK_FLOPS (dense bf16, TF32 and FP32
figures of A100 / H100 / H200, bf16 of TPU v4 / v5e / v5p / v6e; `peak_flops` picks the one of
the model's compute dtype and train.matmul_precision) or, on CPU, measured: the best of
CPU_PROBE_REPEATS runs of a jitted CPU_PROBE_SIZE x CPU_PROBE_SIZE matmul in the compute dtype on
the cores the process has, an attainable rather than a datasheet peak (`cpu_matmul_peak`).

On CPU the bench starts XLA with sharding.CPU_XLA_FLAGS added to XLA_FLAGS, as flowjax.main does
(unless XLA_FLAGS already sets them, or this jaxlib rejects them): see
`sharding.use_cpu_xla_flags`.

python -m flowjax.bench --objectives=fm_toy2d,imm_toy2d,... [--set=KEY=VALUE,...] [--rounds=R]
                        [--steps=N] [--out=FILE.json]

The train-step cost of several experiments against the first: every step is compiled first,
then each round times --steps steps of every experiment in turn (after 2 warm-up steps), so that
a load that drifts during the run moves all of them alike; the figure is the median over rounds
of each round's median step time, and the ratio to the first experiment is taken within each
round before its median. --set applies the same dotted overrides to every experiment (those an
experiment lacks are left out, as in the arena). An experiment that distils a flow-matching
teacher (objective.teacher_workdir) gets one made by a one-step flow-matching run of the same
data and backbone: a teacher's weights do not change the step's cost.
python -m flowjax.bench --report=FILE.json prints the table of such a result file (the README's
table is generated from it and checked by tests/test_bench.py).

python -m flowjax.bench --data_loading [--data_workers=0,2] [--out=FILE.json]

Examples/s of the sources that read your own images (folder:, arrays: .npy memory-mapped and
.npz, packed:) on generated data, for each data.num_workers setting, with the time
`flowjax.data.prepare` takes to pack them; no --config.
"""

import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

from flowjax import provenance

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps (after 2 warm-up steps).")
_SAMPLE_REPEATS = flags.DEFINE_integer("sample_repeats", 3, "Timed sampling calls (0 = skip).")
_OUT = flags.DEFINE_string("out", None, "Write the results here as JSON.")
_NUM_CPU_DEVICES = flags.DEFINE_integer("num_cpu_devices", None, "Fake CPU devices.")
_AR_METHODS = flags.DEFINE_list(
    "ar_methods", None, "Instead of the train-step benchmark, time these decoders of an "
    "autoregressive flow (objective 'starflow'), e.g. kv_cache,jacobi,naive.")
_WORKDIR = flags.DEFINE_string("workdir", None, "With --ar_methods: sample from the latest "
                               "checkpoint of this workdir (default: freshly initialised).")
_CPU_XLA_FLAGS = flags.DEFINE_bool(
    "cpu_xla_flags", True, "Add CPU_XLA_FLAGS to XLA_FLAGS (XLA:CPU options that speed up "
    "convolutions); --nocpu_xla_flags measures XLA's defaults.")
_DATA_LOADING = flags.DEFINE_bool(
    "data_loading", False, "Instead of a config's train step, time the data sources of your own "
    "images (folder:, arrays:, packed:) on generated data.")
_DATA_WORKERS = flags.DEFINE_list("data_workers", ["0", "2"], "With --data_loading: the "
                                  "data.num_workers settings to time.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "With --data_loading: where the generated data "
                                "is written (default: a temporary directory, removed after).")
_DATA_SECONDS = flags.DEFINE_float("data_seconds", 4.0, "With --data_loading: timed seconds per "
                                   "source and setting, after the first batch.")
_FOLDER_IMAGES = flags.DEFINE_integer("folder_images", 3000, "With --data_loading: PNG files of "
                                      "64x64x3 in the generated folder (10 classes).")
_OBJECTIVES = flags.DEFINE_list(
    "objectives", None, "Instead of one config, time the train step of each of these "
    "experiments (experiments/<name>.py) against the first, in interleaved rounds.")
_SET = flags.DEFINE_list("set", [], "With --objectives: KEY=VALUE config overrides applied to "
                         "every experiment (values parsed as Python literals where they parse).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "With --objectives: timing rounds.")
_REPORT = flags.DEFINE_string("report", None, "Print the table of an --objectives result file.")
_ARRAY_IMAGES = flags.DEFINE_integer("array_images", 50_000, "With --data_loading: 32x32x3 uint8 "
                                     "images in the generated .npy and .npz.")


# Dense (no sparsity) peak FLOP/s per device: (device_kind prefix, {precision: FLOP/s}). The
# first matching prefix wins, so the longer names come first. NVIDIA datasheets (SXM unless
# named); TPUs: bf16 MXU peak (float32 matmuls at default precision run as bf16 passes).
PEAK_FLOPS = (
    ("NVIDIA H100 PCIe", {"bfloat16": 756e12, "tensorfloat32": 378e12, "float32": 51.2e12}),
    ("NVIDIA H100 NVL", {"bfloat16": 835e12, "tensorfloat32": 418e12, "float32": 60e12}),
    ("NVIDIA H200 NVL", {"bfloat16": 835e12, "tensorfloat32": 418e12, "float32": 60e12}),
    ("NVIDIA H100", {"bfloat16": 989e12, "tensorfloat32": 494.7e12, "float32": 66.9e12}),
    ("NVIDIA H200", {"bfloat16": 989e12, "tensorfloat32": 494.7e12, "float32": 66.9e12}),
    ("NVIDIA A100", {"bfloat16": 312e12, "tensorfloat32": 156e12, "float32": 19.5e12}),
    ("TPU v4", {"bfloat16": 275e12}),
    ("TPU v5 lite", {"bfloat16": 197e12}),
    ("TPU v5e", {"bfloat16": 197e12}),
    ("TPU v5", {"bfloat16": 459e12}),
    ("TPU v6 lite", {"bfloat16": 918e12}),
    ("TPU v6e", {"bfloat16": 918e12}),
)
CPU_PROBE_SIZE = 2048
CPU_PROBE_REPEATS = 10


def compiled_flops(compiled) -> tuple[float, bool]:
  """(FLOPs of one call on one device, exact) from XLA's cost analysis of a compiled program
  (with a mesh, the partitioned per-device program).

  exact is False when a while loop's body holds a dot or convolution: the analysis counts a
  loop body once whatever its trip count, so the FLOPs are then a lower bound.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = float((analysis or {}).get("flops", 0.0))
  return flops, not _loop_holds_matmul(compiled.as_text())


def _loop_holds_matmul(hlo: str) -> bool:
  """Whether a while loop of this HLO text reaches a dot or convolution (through the
  computations its body calls)."""
  bodies, current = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      current = header.group(1)
      bodies[current] = []
    elif current is not None:
      bodies[current].append(line)
  calls = re.compile(r"(?:calls|body|condition|to_apply|branch_computations|"
                     r"called_computations)=\{?%?([\w.\-]+(?:, %[\w.\-]+)*)")
  matmul = re.compile(r" (?:dot|convolution)\(")

  def reaches_matmul(name, seen):
    if name in seen or name not in bodies:
      return False
    seen.add(name)
    text = "\n".join(bodies[name])
    if matmul.search(text):
      return True
    return any(reaches_matmul(callee.lstrip("%"), seen) for group in calls.findall(text)
               for callee in group.split(", "))

  loop_bodies = re.findall(r" while\(.*?body=%?([\w.\-]+)", hlo)
  return any(reaches_matmul(body, set()) for body in loop_bodies)


def peak_flops(device_kind: str, dtype: str, matmul_precision: str = "default") -> float | None:
  """Datasheet peak FLOP/s of one device (PEAK_FLOPS) for a compute dtype ('float32' |
  'bfloat16') and train.matmul_precision; None for a device not in the table.

  float32 compute on an NVIDIA GPU runs its matmuls as TF32 unless the precision is 'float32'.
  """
  for prefix, peaks in PEAK_FLOPS:
    if device_kind.startswith(prefix):
      if "float32" not in peaks:  # TPU: one MXU peak
        return peaks["bfloat16"]
      if dtype == "bfloat16" or matmul_precision == "bfloat16":
        return peaks["bfloat16"]
      return peaks["float32" if matmul_precision == "float32" else "tensorfloat32"]
  return None


def cpu_matmul_peak(dtype: str = "float32", size: int = CPU_PROBE_SIZE,
                    repeats: int = CPU_PROBE_REPEATS) -> float:
  """Attainable FLOP/s of this CPU: 2 size^3 / the fastest of `repeats` calls of a jitted
  size x size matmul in `dtype` (after one warm-up call), on the default CPU device."""
  import jax
  import jax.numpy as jnp
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.random.normal(k, (size, size), jnp.dtype(dtype)) for k in keys)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - start)
  return 2.0 * size**3 / best


def utilisation(flops: float, exact: bool, seconds: float, peak: float | None) -> dict:
  """FLOPs, achieved FLOP/s and MFU (None without a peak or exact FLOPs) of one timed call."""
  achieved = flops / seconds
  return {"flops": flops, "flops_exact": exact, "achieved_flops_per_sec": round(achieved, 1),
          "mfu": round(achieved / peak, 4) if peak and exact else None}


def device_peak(config) -> dict:
  """{'peak_flops_per_sec', 'peak_source'} for the first device and config.model.dtype. Fake
  CPU devices (--num_cpu_devices=N) share the probed cores: their MFU reads 1/N of the CPU's."""
  import jax
  from flowjax import train
  device = jax.devices()[0]
  dtype = str(config.model.get("dtype", "float32"))
  precision = train.matmul_precision(config)
  if device.platform == "cpu":
    return {"peak_flops_per_sec": round(cpu_matmul_peak(dtype), 1),
            "peak_source": f"measured: best of {CPU_PROBE_REPEATS} {dtype} "
                           f"{CPU_PROBE_SIZE}x{CPU_PROBE_SIZE} matmuls on this CPU"}
  peak = peak_flops(device.device_kind, dtype, precision)
  return {"peak_flops_per_sec": peak,
          "peak_source": (f"table: {device.device_kind}, {dtype} compute, matmul precision "
                          f"{precision}") if peak else f"unknown device {device.device_kind!r}"}


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def benchmark(config, steps: int, sample_repeats: int) -> dict:
  import jax
  from flowjax import data, sharding, train
  from flowjax import memory as memory_lib

  setup = train.build(config)
  compiled, compile_seconds, memory = train.compile_step(setup)
  step_flops, step_flops_exact = compiled_flops(compiled)
  result = {
      "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(), "mesh": dict(setup.mesh.shape),
      "batch_size": config.train.batch_size, "compile_seconds": round(compile_seconds, 3),
      "compiled_memory_mib": {k: round(v / 2**20, 2) for k, v in memory.items()},
      "num_params": sum(x.size for x in jax.tree.leaves(setup.abstract_state.params)),
      "analytic_memory": memory_lib.plan(setup),
      "step_flops": step_flops,
  }
  if config.train.dry_run:
    return result
  result.update(device_peak(config))
  peak = result["peak_flops_per_sec"]  # per device, as the FLOPs of the partitioned program

  with train.context(setup):
    state = setup.init_fn()
  batches = data.build(config.data, split="train", global_batch_size=config.train.batch_size,
                       seed=config.seed, sharding=sharding.batch_sharding(setup.mesh))
  pipeline_batches = max(steps, 10)
  start = time.perf_counter()
  held = [next(batches) for _ in range(pipeline_batches)]
  jax.block_until_ready(held)
  pipeline_seconds = time.perf_counter() - start
  result["input_examples_per_sec_per_process"] = round(
      pipeline_batches * config.train.batch_size / jax.process_count() / pipeline_seconds, 1)

  times = []
  with train.context(setup):
    for i in range(steps + 2):
      start = time.perf_counter()
      state, step_metrics = compiled(state, held[i % len(held)])
      jax.block_until_ready((state, step_metrics))
      times.append(time.perf_counter() - start)
  step_seconds = statistics.median(times[2:])
  result.update({
      "step_seconds_median": round(step_seconds, 5),
      "steps_per_sec": round(1.0 / step_seconds, 3),
      "examples_per_sec": round(config.train.batch_size / step_seconds, 1),
      "final_loss": float(step_metrics["loss"]),
      "step_utilisation": utilisation(step_flops, step_flops_exact, step_seconds, peak),
  })

  if sample_repeats:
    sample = train.sampler(setup)
    params = train.sampling_params(state, config)
    labels = train.sample_labels(setup.info, config.sample.num)
    with train.context(setup):
      start = time.perf_counter()
      sample = sample.lower(params, jax.random.key(0), labels).compile()
      jax.block_until_ready(sample(params, jax.random.key(0), labels))
      result["sample_compile_seconds"] = round(time.perf_counter() - start, 3)
      seconds = _median_seconds(
          lambda: jax.block_until_ready(sample(params, jax.random.key(1), labels)),
          sample_repeats)
    result.update({"sample_num": config.sample.num, "sample_num_steps": config.sample.num_steps,
                   "samples_per_sec": round(config.sample.num / seconds, 1),
                   "sample_utilisation": utilisation(*compiled_flops(sample), seconds, peak)})

  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    result["device_peak_memory_mib"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
  result["host_max_rss_mib"] = round(
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  batches.close()
  return result


def parse_overrides(items) -> dict:
  """["model.depth=4", "sample.method=euler", ...] -> {"model.depth": 4, "sample.method":
  "euler"}: values are Python literals where they parse, strings otherwise."""
  import ast
  overrides = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise app.UsageError(f"--set entry {item!r} is not KEY=VALUE (e.g. model.depth=4).")
    try:
      overrides[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key.strip()] = value
  return overrides


def _objective_config(experiment: str, overrides: dict, teacher_dir: str):
  """The locked config of `experiment` with the overrides it has keys for; a distilling
  experiment with no teacher gets a one-step flow-matching teacher written to `teacher_dir`."""
  from flowjax import config as config_lib, train
  keys = config_lib.flatten(config_lib.load_experiment(experiment))
  own = {k: v for k, v in overrides.items() if k in keys}
  if "objective.teacher_workdir" in keys and not own.get("objective.teacher_workdir"):
    if not os.path.isdir(os.path.join(teacher_dir, "checkpoints")):
      teacher_keys = config_lib.flatten(config_lib.load_experiment("fm_toy2d.py"))
      source = config_lib.load_experiment(experiment, **own)
      teacher = {k: v for k, v in config_lib.flatten(source).items()
                 if k.split(".")[0] in ("model", "data") and k in teacher_keys}
      train.run(config_lib.load_experiment(
          "fm_toy2d.py", **teacher, **{"train.steps": 1, "ckpt.every_steps": 1,
                                      "sample.every_steps": 0}), teacher_dir)
    own["objective.teacher_workdir"] = teacher_dir
  return config_lib.load_experiment(experiment, **own)


def objective_costs(experiments, overrides: dict, steps: int, rounds: int) -> dict:
  """Median train-step seconds of each experiment and its ratio to the first (see the module
  docstring), from interleaved timing rounds."""
  import jax
  from flowjax import data, sharding, train
  if len(experiments) < 2:
    raise app.UsageError("--objectives needs at least two experiments (the first is the "
                         "baseline).")
  runs = []
  with tempfile.TemporaryDirectory() as teacher_dir:
    for name in experiments:
      config = _objective_config(name, overrides, teacher_dir)
      setup = train.build(config)
      compiled, _, _ = train.compile_step(setup)
      with train.context(setup):
        state = setup.init_fn()
      batches = data.build(config.data, split="train",
                           global_batch_size=config.train.batch_size, seed=config.seed,
                           sharding=sharding.batch_sharding(setup.mesh))
      held = [next(batches) for _ in range(min(steps, 10))]
      batches.close()
      runs.append(dict(name=name, config=config, setup=setup, compiled=compiled, state=state,
                       held=held, medians=[]))
  for _ in range(rounds):
    for run in runs:
      times = []
      with train.context(run["setup"]):
        for i in range(steps + 2):
          start = time.perf_counter()
          run["state"], step_metrics = run["compiled"](run["state"],
                                                       run["held"][i % len(run["held"])])
          jax.block_until_ready((run["state"], step_metrics))
          times.append(time.perf_counter() - start)
      run["medians"].append(statistics.median(times[2:]))
  base = runs[0]["medians"]
  return {"set": [f"{k}={v}" for k, v in overrides.items()], "steps_per_round": steps,
          "rounds": rounds, "objectives": [
              {"experiment": run["name"], "objective": run["config"].objective.name,
               "variant": run["config"].objective.get(
                   "variant", run["config"].objective.get("mode", "")),
               "batch_size": run["config"].train.batch_size,
               "num_params": sum(x.size for x in jax.tree.leaves(run["state"].params)),
               "step_seconds_median": round(statistics.median(run["medians"]), 5),
               "step_seconds_rounds": [round(m, 5) for m in run["medians"]],
               "ratio_to_first": round(statistics.median(
                   [m / b for m, b in zip(run["medians"], base)]), 3),
               "ratio_rounds": [round(m / b, 3) for m, b in zip(run["medians"], base)]}
              for run in runs]}


def objective_table(record: dict) -> str:
  """The markdown table of an --objectives result file, and the line that says where it comes
  from."""
  lines = ["| experiment | objective | step | / " + record["objectives"][0]["experiment"]
           + " | range of the ratio over rounds |", "|---|---|---|---|---|"]
  for row in record["objectives"]:
    variant = row["variant"] if row["variant"] != row["objective"] else ""
    name = row["objective"] + (f" ({variant})" if variant else "")
    ratios = row["ratio_rounds"]
    lines.append(f"| `{row['experiment']}` | {name} | {row['step_seconds_median']:.4g} s | "
                 f"{row['ratio_to_first']:.2f} | [{min(ratios):.2f}, {max(ratios):.2f}] |")
  machine = record["machine"]
  lines += ["", f"Produced by `{record['command']}` at commit {record['commit'][:10]}"
            f"{' with uncommitted changes' if record.get('uncommitted_changes') else ''}, "
            f"{record['date']}, on {machine.get('cpu', '?')} ({machine.get('cpu_count', '?')} "
            f"cores, jax {machine.get('jax', '?')}), load average "
            f"{record['load_average_1min_before']} before and "
            f"{record['load_average_1min_after']} after; {record['rounds']} rounds of "
            f"{record['steps_per_round']} steps."]
  return "\n".join(lines) + "\n"


def autoregressive_sampling(config, methods, workdir: str | None = None,
                            repeats: int = 3) -> dict:
  """Samples/s of each decoder ("kv_cache", "jacobi", "naive") of an autoregressive flow, with
  its sequential network evaluations (Jacobi iterations for "jacobi") per sample call, for
  config.sample.num samples (labels 0, 1, ... when conditional) at config.sample.guidance.

  python -m flowjax.bench --config=experiments/starflow_digits.py --workdir=/tmp/sf_digits \
    --ar_methods=naive,kv_cache,jacobi
  """
  import jax
  from flowjax import checkpoint, train

  setup = train.build(config)
  if workdir:
    mngr = checkpoint.manager(workdir, config.ckpt)
    state, _, step = train.restore_or_init(setup, mngr, workdir)
    mngr.close()
  else:
    with train.context(setup):
      state, step = setup.init_fn(), 0
  params = train.sampling_params(state, config)
  labels = train.sample_labels(setup.info, config.sample.num)
  result = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "step": int(step), "sample_num": config.sample.num,
            "guidance": config.sample.guidance, "methods": {}}
  result.update(device_peak(config))
  for method in methods:
    sample = jax.jit(lambda p, rng, c, method=method: setup.objective.sample_with_steps(
        p, rng, config.sample.num, c, method=method, guidance=config.sample.guidance))
    with train.context(setup):
      start = time.perf_counter()
      sample = sample.lower(params, jax.random.key(0), labels).compile()
      _, steps = jax.block_until_ready(sample(params, jax.random.key(0), labels))
      compile_seconds = time.perf_counter() - start
      seconds = _median_seconds(
          lambda: jax.block_until_ready(sample(params, jax.random.key(1), labels)), repeats)
    result["methods"][method] = {
        "compile_seconds": round(compile_seconds, 3), "seconds": round(seconds, 4),
        "samples_per_sec": round(config.sample.num / seconds, 1),
        "sequential_steps": int(steps),
        "utilisation": utilisation(*compiled_flops(sample), seconds,
                                   result["peak_flops_per_sec"])}
  return result


# ----------------------------------------------------------------------------------------------
# --data_loading

DATA_SEED = 0
DATA_BATCH_SIZE = 256


def _generate_data(root: str, folder_images: int, array_images: int, seed: int) -> dict:
  """Writes the benchmark's data under root; returns {'folder', 'npy', 'npz': data.name}.

  folder/: folder_images PNGs of 64x64x3 in 10 class folders, smooth random pictures with noise
  (about 8 KB each, like small photos); images.npy and images.npz: array_images 32x32x3 uint8
  images, the .npz with labels 0..9.
  """
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(seed)
  for index in range(folder_images):
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((64, 64), Image.Resampling.BICUBIC), np.int16)
    noisy = np.clip(smooth + rng.integers(-6, 7, smooth.shape), 0, 255).astype(np.uint8)
    folder = os.path.join(root, "folder", f"class{index % 10}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(noisy).save(os.path.join(folder, f"{index:06d}.png"))
  images = rng.integers(0, 256, (array_images, 32, 32, 3), dtype=np.uint8)
  np.save(os.path.join(root, "images.npy"), images)
  np.savez(os.path.join(root, "images.npz"), images=images, labels=np.arange(array_images) % 10)
  return {"folder": f"folder:{root}/folder", "npy": f"arrays:{root}/images.npy",
          "npz": f"arrays:{root}/images.npz"}


def _examples_per_sec(data_config, seconds: float) -> dict:
  """Reads global batches of DATA_BATCH_SIZE (shuffled, flipped) on one CPU device for about
  `seconds` after the first batch; returns examples/s and the first batch's latency."""
  import jax
  import numpy as np
  from flowjax import data
  mesh = jax.sharding.Mesh(np.asarray(jax.devices("cpu")[:1]), ("data",))
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  start = time.perf_counter()
  batches = data.build(data_config, split="train", global_batch_size=DATA_BATCH_SIZE,
                       seed=DATA_SEED, sharding=batch_sharding)
  jax.block_until_ready(next(batches))
  first_seconds = time.perf_counter() - start
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    jax.block_until_ready(next(batches))
    count += 1
  elapsed = time.perf_counter() - start
  batches.close()
  return {"examples_per_sec": round(count * DATA_BATCH_SIZE / elapsed, 1),
          "timed_batches": count, "first_batch_seconds": round(first_seconds, 3)}


def _machine() -> dict:
  """provenance.machine() with grain's version (the data-loading results depend on it)."""
  import grain
  return dict(provenance.machine(), grain=getattr(grain, "__version__", ""))


def data_loading(workers: list[int], seconds: float, folder_images: int, array_images: int,
                 data_dir: str | None = None) -> dict:
  """Examples/s of folder:, arrays: (.npy, .npz) and packed: for each data.num_workers setting.

  Every source serves batches of DATA_BATCH_SIZE shuffled examples in [-1, 1] with random flips
  (labels where the source has them) through flowjax.data.build, as the trainer reads them.
  """
  from flowjax import config as config_lib
  from flowjax.data import prepare
  with tempfile.TemporaryDirectory() as scratch:
    root = data_dir or scratch
    start = time.perf_counter()
    names = _generate_data(root, folder_images, array_images, DATA_SEED)
    result = {"generate_seconds": round(time.perf_counter() - start, 1), "prepare": {}}
    for name, source, size in (("packed_folder", names["folder"], 64),
                               ("packed_npz", names["npz"], 32)):
      start = time.perf_counter()
      prepare.prepare(source, os.path.join(root, name), image_size=size)
      seconds_taken = time.perf_counter() - start
      count = folder_images if name == "packed_folder" else array_images
      result["prepare"][name] = {"source": source.replace(root, "DIR"), "image_size": size,
                                 "seconds": round(seconds_taken, 1),
                                 "images_per_sec": round(count / seconds_taken, 1)}
      names[name] = f"packed:{os.path.join(root, name)}"
    cases = []
    sizes = {"folder": 64, "packed_folder": 64, "npy": 32, "npz": 32, "packed_npz": 32}
    for name in ("folder", "packed_folder", "npy", "npz", "packed_npz"):
      for num_workers in workers:
        data_config = config_lib.base_config().data
        data_config.update(dict(name=names[name], image_size=sizes[name], random_flip=True,
                                conditional=name != "npy", num_workers=num_workers))
        case = {"source": name, "data_name": names[name].replace(root, "DIR"),
                "image_shape": [sizes[name], sizes[name], 3], "num_workers": num_workers,
                "prefetch": data_config.prefetch}
        case.update(_examples_per_sec(data_config, seconds))
        logging.info("%s", case)
        cases.append(case)
  result["cases"] = cases
  return result


def _data_loading_result() -> dict:
  workers = [int(value) for value in _DATA_WORKERS.value]
  result = {"benchmark": "data_loading",
            "command": " ".join(["python -m flowjax.bench"] + sys.argv[1:]),
            **provenance.commit(), "date": time.strftime("%Y-%m-%d"),
            "seeds": {"generated_data": DATA_SEED, "order_and_flips": DATA_SEED},
            "machine": _machine(), "batch_size": DATA_BATCH_SIZE,
            "folder_images": _FOLDER_IMAGES.value, "array_images": _ARRAY_IMAGES.value}
  result.update(data_loading(workers, _DATA_SECONDS.value, _FOLDER_IMAGES.value,
                             _ARRAY_IMAGES.value, _DATA_DIR.value))
  return result


def main(argv):
  del argv
  from flowjax import metrics, sharding
  metrics.quiet_libraries()
  if _REPORT.value:
    with open(_REPORT.value) as f:
      print(objective_table(json.load(f)), end="")
    return
  if _DATA_LOADING.value:
    _write_result(_data_loading_result())
    return
  if _OBJECTIVES.value:
    overrides = parse_overrides(_SET.value)
    added = sharding.use_cpu_xla_flags() if _CPU_XLA_FLAGS.value else []
    sharding.start_runtime(_NUM_CPU_DEVICES.value)
    record = {"command": " ".join(["python -m flowjax.bench"] + sys.argv[1:]),
              **provenance.commit(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": _machine(), "xla_flags_added_by_bench": added,
              "load_average_1min_before": round(os.getloadavg()[0], 2)}
    result = objective_costs(_OBJECTIVES.value, overrides, _STEPS.value, _ROUNDS.value)
    _write_result({**record, "load_average_1min_after": round(os.getloadavg()[0], 2),
                   **result})
    return
  if _CONFIG.value is None:
    raise app.UsageError("Give --config=experiments/X.py (or --objectives=..., "
                         "--data_loading).")
  added = sharding.use_cpu_xla_flags() if _CPU_XLA_FLAGS.value else []
  sharding.start_runtime(_NUM_CPU_DEVICES.value)
  record = {"command": " ".join(["python -m flowjax.bench"] + sys.argv[1:]),
            **provenance.commit(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "seed": _CONFIG.value.seed, "machine": _machine(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "xla_flags_added_by_bench": added,
            "load_average_1min_before": round(os.getloadavg()[0], 2)}
  if _AR_METHODS.value:
    result = autoregressive_sampling(_CONFIG.value, _AR_METHODS.value, _WORKDIR.value,
                                     max(_SAMPLE_REPEATS.value, 1))
  else:
    try:
      result = benchmark(_CONFIG.value, _STEPS.value, _SAMPLE_REPEATS.value)
    except Exception as error:
      from flowjax import train
      explained = train.out_of_memory(error, _CONFIG.value, 1, None)
      if explained is None:
        raise
      raise explained from error
  _write_result({**record, "load_average_1min_after": round(os.getloadavg()[0], 2),
                 **result})


def _write_result(result: dict) -> None:
  text = json.dumps(result, indent=2)
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text + "\n")
  logging.info("bench done")


if __name__ == "__main__":
  app.run(main)
