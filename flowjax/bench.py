"""python -m flowjax.bench --config=experiments/X.py [--steps=N] [--out=FILE.json]

Compile time, median train-step time, examples/s, memory, input-pipeline throughput and sampling
throughput of one config on the devices at hand, printed and written as JSON. With
--config.train.dry_run=True only the compile and its memory analysis are measured.
"""

import json
import resource
import statistics
import time

from absl import app, flags, logging
from ml_collections import config_flags

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
flags.mark_flags_as_required(["config"])


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
  result = {
      "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(), "mesh": dict(setup.mesh.shape),
      "batch_size": config.train.batch_size, "compile_seconds": round(compile_seconds, 3),
      "compiled_memory_mib": {k: round(v / 2**20, 2) for k, v in memory.items()},
      "num_params": sum(x.size for x in jax.tree.leaves(setup.abstract_state.params)),
      "analytic_memory": memory_lib.plan(setup),
  }
  if config.train.dry_run:
    return result

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
  })

  if sample_repeats:
    sample = train.sampler(setup)
    params = train.sampling_params(state, config)
    labels = train.sample_labels(setup.info, config.sample.num)
    with train.context(setup):
      start = time.perf_counter()
      jax.block_until_ready(sample(params, jax.random.key(0), labels))
      result["sample_compile_seconds"] = round(time.perf_counter() - start, 3)
      seconds = _median_seconds(
          lambda: jax.block_until_ready(sample(params, jax.random.key(1), labels)),
          sample_repeats)
    result.update({"sample_num": config.sample.num, "sample_num_steps": config.sample.num_steps,
                   "samples_per_sec": round(config.sample.num / seconds, 1)})

  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    result["device_peak_memory_mib"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
  result["host_max_rss_mib"] = round(
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  batches.close()
  return result


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
  for method in methods:
    sample = jax.jit(lambda p, rng, c, method=method: setup.objective.sample_with_steps(
        p, rng, config.sample.num, c, method=method, guidance=config.sample.guidance))
    with train.context(setup):
      start = time.perf_counter()
      _, steps = jax.block_until_ready(sample(params, jax.random.key(0), labels))
      compile_seconds = time.perf_counter() - start
      seconds = _median_seconds(
          lambda: jax.block_until_ready(sample(params, jax.random.key(1), labels)), repeats)
    result["methods"][method] = {
        "compile_seconds": round(compile_seconds, 3), "seconds": round(seconds, 4),
        "samples_per_sec": round(config.sample.num / seconds, 1),
        "sequential_steps": int(steps)}
  return result


def main(argv):
  del argv
  from flowjax import metrics, sharding
  metrics.quiet_libraries()
  sharding.start_runtime(_NUM_CPU_DEVICES.value)
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
  text = json.dumps(result, indent=2)
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text + "\n")
  logging.info("bench done")


if __name__ == "__main__":
  app.run(main)
