"""THE training loop. Sections: mesh, data, model/objective/optimizer, shapes and shardings,
compile, restore-or-init, loop (step, metrics, checkpoints, evaluation, samples), final save.

Nothing here knows about a particular method or model: objectives and backbones are found by
name from the config.
"""

import collections
import contextlib
import inspect
import json
import logging
import os
import signal
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flowjax import checkpoint, config as config_lib, data, metrics, models, objectives, optim
from flowjax import evals, health, sharding, step as step_lib, storage
from flowjax.state import TrainState


MAX_FAILED_SAVES = 3


class NonFiniteError(FloatingPointError):
  """A non-finite loss or gradient with train.nonfinite='stop'."""


class WorkdirError(RuntimeError):
  """The workdir belongs to another config, or cannot be written."""


class OutOfMemoryError(MemoryError):
  """The accelerator ran out of memory for the train step."""


def out_of_memory(error: BaseException, config, step: int, latest_step) -> OutOfMemoryError | None:
  """The OutOfMemoryError that explains `error` when it is XLA's RESOURCE_EXHAUSTED, else None."""
  if not (isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)):
    return None
  kept = ("no checkpoint was written yet" if latest_step is None
          else f"the checkpoint of step {latest_step} is intact")
  return OutOfMemoryError(
      f"The devices ran out of memory by step {step} (train.batch_size={config.train.batch_size} "
      f"over {jax.device_count()} devices): {str(error).splitlines()[0][:200]}. Lower "
      "train.batch_size or raise train.grad_accum_steps, set model.remat=full (DiT), or shard "
      "the state over more devices (mesh.fsdp); `python -m flowjax.bench --config=... "
      f"--config.train.dry_run=True` prints the memory plan per device. {kept[0].upper()}"
      f"{kept[1:]}.")


class Setup(NamedTuple):
  """Everything built from a config before any parameter exists."""
  config: Any
  mesh: Any
  rules: tuple
  info: Any
  objective: Any
  tx: Any
  lr_schedule: Any
  abstract_state: TrainState
  state_shardings: Any
  batch_spec: dict
  init_fn: Any
  train_step: Any
  eval_step: Any
  step_rng: Any
  eval_rng: Any


def matmul_precision(config) -> str:
  """train.matmul_precision ("default" for configs written before the key existed)."""
  return config.train.get("matmul_precision", "default")


def context(setup_or_mesh, rules=None, precision: str = "default"):
  """The mesh, logical-axis rules and float32 matmul precision (train.matmul_precision) under
  which models trace; given a Setup, all three come from it."""
  if rules is None:
    setup = setup_or_mesh
    return sharding.context(setup.mesh, setup.rules, matmul_precision(setup.config))
  return sharding.context(setup_or_mesh, rules, precision)


def build(config, devices=None) -> Setup:
  """Builds mesh, data info, objective, optimizer, abstract state, shardings and jitted steps."""
  # Mesh.
  devices = list(devices if devices is not None else jax.devices())
  config_lib.validate(config, len(devices))
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules(config.sharding)

  # Data (only shapes here; the iterator is built by `run`), model, objective. What they refuse
  # (an unknown dataset, a backbone that does not fit the data, an objective option out of
  # range) is a config error: one message, no traceback.
  try:
    info = data.data_info(config.data, split="train")
    if config.eval.every_steps:
      # The evaluation split must exist before anything trains (a folder without test/).
      data.data_info(config.data, split=config.eval.split)
    model = models.build(config.model, info)
    objective = objectives.build(config.objective, model, info, config.get("repa"))
  except (ValueError, KeyError) as error:
    raise config_lib.ConfigError(str(error).strip("'\"")) from error
  batch_sharding = sharding.batch_sharding(mesh)
  batch_spec = data.pipeline.batch_spec(info, config.train.batch_size, batch_sharding)

  # Optimizer.
  try:
    tx, lr_schedule = optim.build_for(objective, config.optim, config.train.steps)
  except ValueError as error:
    raise config_lib.ConfigError(str(error)) from error
  root = jax.random.key(config.seed)
  init_rng, step_rng, eval_rng = jax.random.split(root, 3)

  def init_boxed(rng):
    example = {k: jnp.zeros((1,) + v.shape[1:], v.dtype) for k, v in batch_spec.items()}
    params, extra = objective.init(rng, example)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=optim.init_ema(optim.ema_params(objective, params),
                                         config.optim.ema_decays), extra=extra,
                      skipped=jnp.zeros((), jnp.int32))

  # Shapes and shardings: nothing is allocated.
  with context(mesh, rules, matmul_precision(config)):
    abstract_boxed = jax.eval_shape(init_boxed, init_rng)
  sharding.check_rules(config.sharding, abstract_boxed, mesh)
  state_shardings = sharding.tree_shardings(abstract_boxed, mesh, rules)
  abstract_state = checkpoint.abstract_of(nn.meta.unbox(abstract_boxed), state_shardings)
  init_fn = jax.jit(lambda: nn.meta.unbox(init_boxed(init_rng)), out_shardings=state_shardings)

  # The update step: state buffers are donated.
  batch_shardings = {k: v.sharding for k, v in batch_spec.items()}
  replicated = sharding.replicated(mesh)
  train_step = jax.jit(
      step_lib.make_train_step(objective, tx, lr_schedule, config.optim, config.train, step_rng,
                               state_shardings),
      in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, replicated),
      donate_argnums=0)
  eval_step = jax.jit(step_lib.make_eval_step(objective, eval_rng, state_shardings),
                      out_shardings=replicated)
  return Setup(config, mesh, rules, info, objective, tx, lr_schedule, abstract_state,
               state_shardings, batch_spec, init_fn, train_step, eval_step, step_rng, eval_rng)


def compile_step(setup: Setup):
  """Compiles the train step from abstract shapes alone; logs its memory analysis."""
  start = time.perf_counter()
  with context(setup):
    compiled = setup.train_step.lower(setup.abstract_state, setup.batch_spec).compile()
  seconds = time.perf_counter() - start
  memory = memory_summary(compiled)
  logging.info("Compiled the train step in %.1f s; memory per device: %s", seconds,
               ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in memory.items()))
  return compiled, seconds, memory


def memory_summary(compiled) -> dict:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
  out = {f.replace("_size_in_bytes", ""): int(getattr(analysis, f, 0) or 0) for f in fields}
  out["peak_estimate"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def sampler(setup: Setup, num: int | None = None):
  """jitted (params, rng, cond) -> samples with the config's sampler settings."""
  sample_config = setup.config.sample
  num = num or sample_config.num
  args = dict(num_steps=sample_config.num_steps, method=sample_config.method,
              guidance=sample_config.guidance)
  times = tuple(sample_config.get("times", ()))
  if times:
    args["times"] = times
  return sample_fn(setup, num, **args)


def timed_objectives() -> list[str]:
  """The objectives whose samplers take explicit times (config.sample.times)."""
  registry = objectives.OBJECTIVES
  return [name for name in registry.names()
          if "times" in inspect.signature(registry.get(name).sample).parameters]


# The jitted samplers built so far: (id(setup), num, sampler args) -> (setup, function). Periodic
# sample grids and evaluations reuse one function, so the sampler is traced and compiled once
# per run rather than at every grid. The setup is held to keep its id from being reused.
_SAMPLERS: "collections.OrderedDict[tuple, tuple[Setup, Any]]" = collections.OrderedDict()
_MAX_SAMPLERS = 16


def sample_fn(setup: Setup, num: int, **sampler_args):
  """jitted (params, rng, cond) -> [num, ...] samples of the objective, the parameters gathered
  to their compute shardings as in the train step; one function per setup and arguments."""
  key = (id(setup), int(num), repr(sorted(sampler_args.items())))
  cached = _SAMPLERS.get(key)
  if cached is not None and cached[0] is setup:
    _SAMPLERS.move_to_end(key)
    return cached[1]
  function = _new_sample_fn(setup, num, **sampler_args)
  _SAMPLERS[key] = (setup, function)
  while len(_SAMPLERS) > _MAX_SAMPLERS:
    _SAMPLERS.popitem(last=False)
  return function


def _new_sample_fn(setup: Setup, num: int, **sampler_args):
  shardings = setup.state_shardings.params
  if "times" in sampler_args and (
      "times" not in inspect.signature(setup.objective.sample).parameters):
    raise config_lib.ConfigError(
        f"config.sample.times={sampler_args['times']}: the {setup.config.objective.name!r} "
        "objective samples on its own time grid; explicit times are taken by "
        f"{', '.join(timed_objectives())}. Use --config.sample.times='()'.")

  def sample(params, rng, cond):
    # An objective with several parameter sets samples from all of them (the trained
    # parameters) or from its EMA_SETS (an EMA).
    own = ({k: shardings[k] for k in params} if optim.param_sets(setup.objective)
           else shardings)
    params = step_lib.gather_for_compute(params, own)
    return setup.objective.sample(params, rng, num, cond, **sampler_args)

  return jax.jit(sample, out_shardings=sharding.replicated(setup.mesh))


def check_sampler(setup: Setup) -> None:
  """Traces the configured sampler on abstract parameters (nothing runs), so that a sampler
  setting it refuses (an unknown sample.method, a step count it cannot take) stops the run before
  training rather than at the first sample grid."""
  num = 1
  try:
    with context(setup):
      jax.eval_shape(sampler(setup, num), setup.abstract_state.params,
                     jax.random.key(0), sample_labels(setup.info, num))
  except (ValueError, KeyError, NotImplementedError) as error:
    raise config_lib.ConfigError(
        f"config.sample (method={setup.config.sample.method!r}, num_steps="
        f"{setup.config.sample.num_steps}, guidance={setup.config.sample.guidance}): "
        f"{str(error).splitlines()[0]}") from error


def sample_labels(info, num: int):
  """The condition of a sample grid: labels cycling over the classes (one class per column), a
  captioned source's prompt features cycling over its sample prompts, or None."""
  if info.text is not None:
    prompts = info.text.prompt_features()
    return jnp.asarray(prompts[np.arange(num) % len(prompts)])
  return jnp.arange(num, dtype=jnp.int32) % info.num_classes if info.num_classes > 0 else None


def sampled_ema_key(config) -> str | None:
  """The key in TrainState.ema of the EMA that samples and evaluations use: config.sample.ema_decay,
  or the first decay listed in optim.ema_decays when it is -1 (None: no EMA is kept). The EMA
  dict's own order cannot say which is first: pytrees sort dict keys."""
  decays = tuple(config.optim.ema_decays)
  if not decays:
    return None
  decay = config.sample.get("ema_decay", -1.0)
  return optim.ema_key(decays[0] if decay == -1.0 else decay)


def sampling_params(state: TrainState, config, use_ema: bool | None = None):
  """The parameters that samples and evaluations use: the configured EMA (sampled_ema_key) when
  `use_ema` (default config.sample.use_ema) and an EMA is kept, else the trained parameters."""
  use_ema = config.sample.use_ema if use_ema is None else use_ema
  key = sampled_ema_key(config)
  if use_ema and key is not None and state.ema:
    return state.ema[key]
  return state.params


def check_workdir(config, workdir: str, allow_config_change: bool) -> None:
  """Refuses a workdir whose config.json differs from `config` beyond the resumable keys."""
  try:
    storage.makedirs(workdir)
    # One probe per process: the processes of a multi-host run check the same workdir at once.
    probe = storage.join(workdir, f".write_test.{jax.process_index()}.{os.getpid()}")
    storage.write_text(probe, "ok")
    storage.remove(probe)
  except Exception as error:  # OSError locally; the storage client's own errors for a bucket
    raise WorkdirError(f"--workdir={workdir} cannot be written ({type(error).__name__}: "
                       f"{error}); choose a writable directory with free space, or a bucket "
                       "this machine may write to.") from error
  path = storage.join(workdir, "config.json")
  if not storage.exists(path) or allow_config_change:
    return
  old = config_lib.identity(json.loads(storage.read_text(path)))
  diff = config_lib.differences(old, config_lib.identity(config))
  if diff:
    raise WorkdirError(
        f"--workdir={workdir} belongs to a different config:\n  " + "\n  ".join(diff) +
        "\nUse a new --workdir, start from its parameters with --config.ckpt.init_from="
        f"{workdir} in a new workdir, or pass --allow_config_change to resume anyway.")


def evaluation_conditions(setup: Setup, num: int):
  """() -> the condition of the next batch of `num` evaluation samples: for a captioned source,
  the caption features of the next `num` examples of eval.split (shuffled by the run's seed, so
  the samples' captions follow the split's as the real statistics FID compares with do), else
  `sample_labels` (the classes in turn) or None."""
  info = setup.info
  if info.text is None:
    labels = sample_labels(info, num)
    return lambda: labels
  import ml_collections
  captions = []  # the caption stream, opened at the first call (evaluators may sample nothing)

  def next_captions():
    if not captions:
      data_config = ml_collections.ConfigDict(setup.config.data.to_dict())
      data_config.prefetch, data_config.num_workers = 0, 0  # no reader threads left behind
      captions.append(data.build(
          data_config, split=setup.config.eval.split, global_batch_size=num,
          seed=setup.config.seed, sharding=sharding.batch_sharding(setup.mesh), shuffle=True))
    return next(captions[0])[data.captions.KEY]

  return next_captions


def evaluable(setup: Setup, state: TrainState) -> evals.Evaluable:
  """The trained model as the evaluators see it: the sampled parameters and a sampler of
  train.batch_size samples under this run's mesh."""
  config = setup.config
  num = config.train.batch_size
  params = sampling_params(state, config)
  sample_batch = sampler(setup, num)
  conditions = evaluation_conditions(setup, num)

  def sample(rng):
    with context(setup):
      return sample_batch(params, rng, conditions())

  return evals.Evaluable(config=config, objective=setup.objective, mesh=setup.mesh,
                         rules=setup.rules, precision=matmul_precision(config), info=setup.info,
                         params=params, sample=sample, rng=setup.eval_rng)


def evaluate(setup: Setup, state: TrainState, step: int, workdir: str, writer,
             shield=contextlib.nullcontext) -> dict:
  """The objective's loss on `eval.num_batches` batches of `eval.split`, bits/dim of
  exact-likelihood models, FID and Inception Score when their assets are configured; writes
  eval/step_N.json. shield: a context in which a stop signal waits (`_StopSignal.shielded`),
  around the data loader's start and close and the writes of the result."""
  config = setup.config
  with shield():
    batches = data.build(config.data, split=config.eval.split,
                         global_batch_size=config.train.batch_size, seed=config.seed,
                         sharding=sharding.batch_sharding(setup.mesh), shuffle=False)
  totals = {}
  try:
    with context(setup):
      for index in range(config.eval.num_batches):
        with shield():
          batch = next(batches)
        values = setup.eval_step(state.params, step_lib.view_of(state), batch, index)
        totals = jax.tree.map(jnp.add, totals, values) if totals else values
  except BaseException:
    batches.close()  # unshielded: a signal now must not replace the error being raised
    raise
  with shield():
    batches.close()
  result = {f"eval_{k}": float(v) / config.eval.num_batches for k, v in totals.items()}
  # Sample-quality and likelihood evaluators; each skips itself when its assets are missing.
  result.update(evals.quality_metrics(evaluable(setup, state)))
  with shield():  # the scalars, then the file whose presence says the evaluation is done
    writer.scalars(step, result)
    if jax.process_index() == 0:
      storage.write_text(storage.join(workdir, "eval", f"step_{step}.json"),
                         json.dumps({"step": step, **result}, indent=2))
  return result


def write_samples(setup: Setup, state: TrainState, step: int, workdir: str, writer, name=None,
                  shield=contextlib.nullcontext):
  """The sample grid of `step` (samples/step_N.png and TensorBoard); shield: as `evaluate`'s,
  around the writes."""
  config = setup.config
  rng = jax.random.fold_in(setup.eval_rng, step)
  with context(setup):
    samples = sampler(setup)(sampling_params(state, config), rng,
                             sample_labels(setup.info, config.sample.num))
  samples = np.asarray(jax.device_get(samples))
  picture = metrics.samples_picture(as_images(config, samples))
  if jax.process_index() == 0:
    with shield():
      writer.image(step, "samples", picture)
      metrics.save_png(storage.join(workdir, "samples", name or f"step_{step}.png"), picture)
  return samples


def as_images(config, samples: np.ndarray) -> np.ndarray:
  """Samples as pictures: latents go through the data source's decoder (shown raw, with a
  warning, when the decoder cannot be loaded)."""
  try:
    decode = data.image_decoder(config.data)
  except (OSError, ValueError, KeyError) as error:
    logging.warning("Sample grid shows raw latents: their decoder could not be loaded (%s).",
                    error)
    return samples
  return samples if decode is None else np.asarray(decode(samples))


def _preemption_service() -> bool:
  """Whether jax's preemption service runs (a multi-process run through jax.distributed): then
  it, not a handler of this process, decides the step at which every process stops."""
  # jax.distributed.initialize starts the service unless jax_enable_preemption_service is off.
  return (jax.process_count() > 1 and jax.distributed.is_initialized()
          and bool(jax.config.jax_enable_preemption_service))


class Interrupted(BaseException):
  """A stop signal ended an in-loop evaluation or sample grid (`_StopSignal.interruptible`). A
  BaseException, like KeyboardInterrupt, so that no `except Exception` on the way (an evaluator
  that reports a failed asset load and goes on) takes it for an error of its own."""


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps (one process).

  In a multi-process run a flag of one process cannot stop it alone: its peers would wait for it
  in the next step's collectives. There jax's preemption service keeps its own SIGTERM handler,
  which tells every process, and the loop stops at the step they agree on
  (`mngr.reached_preemption`); SIGINT is passed on to that handler as a SIGTERM.
  """

  def __init__(self, collective: bool = False):
    self.received = None
    self.collective = collective
    self._previous = {}
    self._interruptible = False

  @contextlib.contextmanager
  def interruptible(self):
    """A block (an in-loop evaluation or sample grid, which can outlast a preemption's grace
    period) that a signal ends at once with `Interrupted`, so that the loop saves next. One
    process only: processes of a multi-process run agree on a stop at a step, so there the block
    runs to its end first."""
    if self.received is not None and not self.collective:
      raise Interrupted(self.received)
    self._interruptible = True
    try:
      yield
    finally:
      self._interruptible = False

  @contextlib.contextmanager
  def shielded(self):
    """Inside `interruptible`: a block a signal must not cut halfway (a data loader's start and
    close, a result's writes); a signal during it raises `Interrupted` when it ends."""
    outer, self._interruptible = self._interruptible, False
    try:
      yield
    finally:
      self._interruptible = outer
    if outer and self.received is not None and not self.collective:
      self._interruptible = False
      raise Interrupted(self.received)

  def __enter__(self):
    signals = (signal.SIGINT,) if self.collective else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook worker): no handler
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.collective:
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self.received = signal.Signals(signum).name
      if self._interruptible:
        self._interruptible = False
        raise Interrupted(self.received)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def warn_schedule_change(old_steps, config, step: int) -> None:
  """Warns when a resumed run's train.steps (a resumable key, e.g. to extend a run) moves the
  learning rate its schedule gives at the resumed step: warm-up, cosine and linear decay are laid
  out over train.steps, so such a run is not the continuation of the one it resumes."""
  if old_steps is None or int(old_steps) == config.train.steps:
    return
  # The top-level schedule and each parameter set's (optim.sets.<name> may set its own).
  schedules = [("optim", config.optim)] + [
      (f"optim.sets.{name}", optim.set_config(config.optim, name))
      for name in dict(config.optim.get("sets", {}))]
  for where, optim_config in schedules:
    before = float(optim.schedule(optim_config, int(old_steps))(step))
    after = float(optim.schedule(optim_config, config.train.steps)(step))
    if not np.isclose(before, after, rtol=1e-6, atol=0.0):
      logging.warning(
          "train.steps changed from %d to %d on resume: %s.schedule=%r is laid out over "
          "train.steps, so the learning rate at step %d moves from %.6g (the run as it was) to "
          "%.6g, and the run is not a continuation of the one it resumes. Keep train.steps to "
          "continue it, or start a new workdir with --config.ckpt.init_from.", int(old_steps),
          config.train.steps, where, optim_config.schedule, step, before, after)


def restore_or_init(setup: Setup, mngr, workdir: str, allow_config_change: bool = False,
                    with_meta: bool = False):
  """(state, data_state or None, start_step), and with `with_meta` the checkpoint's meta ({} on
  a fresh start) after them: the latest good checkpoint, else a fresh state
  (with the objective's `load_extra` and `initial_params` applied when it has them, and
  parameters from ckpt.init_from when set). A checkpoint written by a different config
  (beyond the resumable keys) is refused unless allow_config_change."""
  config = setup.config

  def check_meta(meta, step):
    if meta.get("fingerprint") == config_lib.fingerprint(config):
      return
    diff = config_lib.differences(meta.get("identity", {}), config_lib.identity(config))
    if not diff:
      return
    if not allow_config_change:
      raise WorkdirError(
          f"The checkpoint at step {step} in {mngr.directory} was written by a different "
          "config:\n  " + "\n  ".join(diff) + "\nUse a new --workdir, start from its "
          f"parameters with --config.ckpt.init_from={workdir} in a new workdir, or pass "
          "--allow_config_change to resume anyway.")
    logging.warning("Resuming step %d written by a different config: %s", step, diff)

  restored = checkpoint.restore_latest(mngr, setup.abstract_state, check_meta)
  if restored is not None:
    state, data_state, meta, step = restored
    logging.info("Resumed from %s at step %d.", mngr.directory, step)
    warn_schedule_change((meta or {}).get("train_steps"), config, step)
    return (state, data_state, step) + ((meta or {},) if with_meta else ())
  with context(setup):
    state = setup.init_fn()
  # Objective state that comes from disk (e.g. a teacher's weights): only on a fresh start, as a
  # resumed checkpoint already holds it.
  load_extra = getattr(setup.objective, "load_extra", None)
  if load_extra is not None:
    state = state.replace(extra={**state.extra, **load_extra(setup.abstract_state.extra)})
  # Parameters an objective sets on a fresh start, from disk or from `extra` (sCM's
  # objective.init_from_teacher starts the student as its teacher): params and every EMA. A
  # resumed run keeps its trained ones. ckpt.init_from, below, still overrides them.
  initial_params = getattr(setup.objective, "initial_params", None)
  if initial_params is not None:
    params = initial_params(state.params, state.extra)
    if params is not state.params:
      state = state.replace(params=params, ema=optim.init_ema(
          optim.ema_params(setup.objective, params), config.optim.ema_decays))
  if config.ckpt.init_from:
    params, from_step = checkpoint.restore_params(config.ckpt.init_from,
                                                  setup.abstract_state.params)
    state = state.replace(params=params, ema=optim.init_ema(
        optim.ema_params(setup.objective, params), config.optim.ema_decays))
    logging.info("Initialised parameters from %s (step %d).", config.ckpt.init_from, from_step)
  return (state, None, 0) + (({},) if with_meta else ())


def run(config, workdir: str, allow_config_change: bool = False, devices=None):
  """Trains `config` in `workdir`, resuming from its latest good checkpoint. Returns the state.

  devices: the devices of the mesh (default: all of them), e.g. to continue on fewer.
  """
  is_host0 = jax.process_index() == 0
  setup = build(config, devices)
  if is_host0:
    logging.info("%s", data.describe(config.data, setup.info))
    if config.data.name == "synthetic":
      logging.warning(
          "data.name='synthetic': TRAINING ON RANDOM GAUSSIAN NOISE, not on a dataset. This is "
          "for dry runs and benchmarks; pass --config.data.name=... to train on data.")
    logging.info("Parameters and optimizer state:\n%s",
                 sharding.describe(setup.state_shardings, setup.abstract_state))
  check_sampler(setup)
  if not config.train.dry_run:
    check_workdir(config, workdir, allow_config_change)
  compiled, _, _ = compile_step(setup)
  if config.train.dry_run:
    logging.info("train.dry_run: compiled from abstract shapes; nothing allocated, stopping.")
    return None

  mngr = checkpoint.manager(workdir, config.ckpt)
  batches = writer = None
  try:
    state, data_state, start, meta = restore_or_init(setup, mngr, workdir, allow_config_change,
                                                     with_meta=True)
    if is_host0:
      logged = metrics.last_logged_step(workdir) if start == 0 else None
      if logged:
        logging.warning(
            "Starting from step 0 in %s, which has no checkpoint but logged steps up to %d "
            "(its checkpoints were deleted or never written): those records of metrics.jsonl "
            "are dropped.", workdir, logged)
      metrics.truncate_metrics(workdir, start)
      storage.write_text(storage.join(workdir, "config.json"), config_lib.to_json(config))
      names = data.class_names(config.data)
      if names:  # label i is class names[i] (e.g. the class folders of folder:DIR)
        storage.write_text(storage.join(workdir, "classes.json"),
                           json.dumps(list(names), indent=1))
    batches = data.build(config.data, split="train", global_batch_size=config.train.batch_size,
                         seed=config.seed, sharding=sharding.batch_sharding(setup.mesh))
    if data_state is not None and start > 0:  # at step 0 (a converted checkpoint) nothing is read
      try:
        batches.set_state(data_state)
      except ValueError as error:  # --allow_config_change with another data order
        raise WorkdirError(f"The checkpoint at step {start} in {workdir} cannot resume this data "
                           f"stream: {error}") from None
    writer = metrics.Writer(workdir, enabled=is_host0)
    return _train_loop(setup, compiled, state, start, mngr, batches, writer, workdir,
                       meta.get("health"))
  except BaseException:
    # Whatever stops the run, checkpoints already being written are completed, and every
    # background thread (orbax's writers, the data loader's prefetch) is stopped, so that the
    # process exits with the error instead of waiting on them at shutdown.
    with contextlib.suppress(Exception):
      mngr.wait_until_finished()
    for resource in (mngr, batches, writer):
      if resource is not None:
        with contextlib.suppress(Exception):
          resource.close()
    raise


def missing_reports(config, workdir: str, step: int) -> tuple[bool, bool]:
  """(evaluation, sample grid): whether the one due at `step`, where a run resumes, is missing
  from the workdir (a stop during it left it unwritten), so that the resumed run makes it first.
  Process 0, which writes them, decides for every process."""
  due = lambda every: bool(step and every and step % every == 0)
  missing = np.array([
      due(config.eval.every_steps)
      and not storage.exists(storage.join(workdir, "eval", f"step_{step}.json")),
      due(config.sample.every_steps)
      and not storage.exists(storage.join(workdir, "samples", f"step_{step}.png"))], np.int32)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
  return bool(missing[0]), bool(missing[1])


def _train_loop(setup: Setup, compiled, state, start: int, mngr, batches, writer, workdir: str,
                health_state: dict | None = None):
  """The loop of `run` from step `start` with the compiled step; returns the final state.
  health_state: the divergence monitor's state saved with the checkpoint resumed from."""
  config = setup.config
  is_host0 = jax.process_index() == 0
  progress = metrics.Progress(config.train.steps, config.train.batch_size, start,
                              config.train.progress, enabled=is_host0)
  meta = {"fingerprint": config_lib.fingerprint(config), "identity": config_lib.identity(config),
          "train_steps": config.train.steps}
  total = config.train.steps
  monitor = health.Monitor(config.train.get("divergence_factor", 5.0),
                           config.train.get("divergence_warmup", 200),
                           config.train.get("on_divergence", "warn"))
  monitor.load_state_dict(health_state)
  # Objectives that reweight their loss name an unweighted error; the progress line shows it.
  reweighted = hasattr(setup.objective, "ERROR_METRIC")

  def handle(step_metrics, step):
    """Host-side work for finished step `step` (its metrics are already computed)."""
    values = jax.device_get(step_metrics)
    if values["nonfinite"] and config.train.nonfinite == "stop":
      checkpoint.finish(mngr)
      raise NonFiniteError(
          f"Non-finite values at step {step} (global batch index {step - 1} of the data order, "
          f"seed {config.seed}): loss={values['loss']}, grad_norm={values['grad_norm']}. The "
          "update was not applied and nothing non-finite was saved. Lower optim.lr, enable "
          "optim.grad_clip, or set train.nonfinite=skip to skip such updates.")
    if values["nonfinite"]:
      logging.warning("Step %d: non-finite loss or gradient; update skipped (%d so far).", step,
                      values["skipped"])
      limit = config.train.get("max_skipped", 20)
      if values["skipped"] > limit:
        checkpoint.finish(mngr)
        raise NonFiniteError(
            f"{values['skipped']} updates skipped for non-finite values by step {step}, more "
            f"than train.max_skipped={limit}: the run is not training. The last checkpoint "
            f"(step {mngr.latest_step()}) holds no skipped update's values. Lower optim.lr or "
            "enable optim.grad_clip, or raise train.max_skipped.")
    try:
      report = monitor.update(step, values)
    except health.DivergenceError as error:
      writer.scalars(step, values)
      checkpoint.finish(mngr)
      latest, onset, kept = mngr.latest_step(), monitor.onset(), checkpoint.pinned_step(mngr)
      after = ""
      if latest is not None and onset is not None and latest >= onset:
        earlier = (f"step {kept}, the last from before it, is kept" if kept is not None
                   else "an earlier one")
        after = (f"; it was written after the rise began (step {onset}): resume from {earlier} "
                 "by removing the later ones from WORKDIR/checkpoints")
      raise health.DivergenceError(
          f"{error} Stopped (train.on_divergence=stop); the last checkpoint is step {latest}"
          f"{after}. Lower optim.lr or enable optim.grad_clip, then resume or restart; "
          "train.on_divergence=warn only warns.") from None
    if report:
      logging.warning("%s The loss alone may not show it; lower optim.lr or enable "
                      "optim.grad_clip (train.on_divergence=stop stops such a run).", report)
    if step % config.train.log_every == 0 or step == total:
      rate = progress.rate(step)
      writer.scalars(step, dict(values, steps_per_sec=rate,
                                examples_per_sec=rate * config.train.batch_size))
      progress.report(step, float(values["loss"]), rate,
                      float(values["error"]) if reweighted else None)

  failed_saves = []

  def save(force=False):
    """Saves; tolerates MAX_FAILED_SAVES failures in a row (each is logged as an error). With
    train.on_divergence=stop, while a rise is under way the last checkpoint from before it is
    pinned, so that the rotation of old checkpoints keeps it for the stop to name."""
    onset = monitor.onset() if monitor.action == "stop" else None
    checkpoint.pin(mngr, None if onset is None else max(
        (s for s in mngr.all_steps() if s < onset), default=None))
    try:
      checkpoint.save(mngr, state, batches.get_state(),
                      dict(meta, health=monitor.state_dict()), force=force)
      failed_saves.clear()
    except checkpoint.SaveError as error:
      failed_saves.append(step)
      if force or len(failed_saves) >= MAX_FAILED_SAVES:
        raise checkpoint.CheckpointError(
            f"Saving checkpoints in {mngr.directory} failed at steps {failed_saves} ({error}); "
            f"the latest complete checkpoint is step {mngr.latest_step()}. Free disk space or "
            "fix the workdir's permissions, then rerun the same command to resume.") from error

  pending = None
  step = start
  redo_eval, redo_sample = missing_reports(config, workdir, start)
  # The handler stays until the final checkpoint is written: a second signal does not cut it.
  with _StopSignal(collective=_preemption_service()) as stop:
    try:
      with context(setup):
        def reports(step, evaluation, samples):
          """The in-loop evaluation and sample grid of `step`, which a signal ends at once (a
          preemption's grace period is short; the step is saved next)."""
          if not (evaluation or samples):
            return
          try:
            with stop.interruptible():
              if evaluation:
                evaluate(setup, state, step, workdir, writer, shield=stop.shielded)
              if samples:
                write_samples(setup, state, step, workdir, writer, shield=stop.shielded)
          except Interrupted as interrupted:
            logging.warning("%s arrived during the evaluation or sample grid of step %d: left "
                            "unfinished (a resumed run makes it first), so that the checkpoint "
                            "is saved at once.", interrupted, step)

        if redo_eval or redo_sample:
          names = [name for name, missing in (("evaluation", redo_eval),
                                               ("sample grid", redo_sample)) if missing]
          logging.info("The %s of step %d, where this run resumes, %s not written (a stop ended "
                       "it); making it first.", " and ".join(names), step,
                       "was" if len(names) == 1 else "were")
          reports(step, redo_eval, redo_sample)
        while step < total and stop.received is None:
          batch = next(batches)
          state, step_metrics = compiled(state, batch)
          step += 1
          if pending is not None:
            handle(*pending)
          pending = (step_metrics, step)
          if config.ckpt.every_steps and step % config.ckpt.every_steps == 0:
            # The records up to this step are written (on object storage: uploaded) before the
            # checkpoint, so that a resumed run finds every record up to its checkpoint.
            handle(*pending)
            pending = None
            writer.flush()
            save()
          # Every step, checkpoint steps included: the processes of a multi-process run agree
          # through it on the step at which all of them stop.
          if mngr.reached_preemption(step):
            stop.received = "preemption notice"
          # A stop (a preemption's grace period is short) saves before anything else.
          due = lambda every: every and step % every == 0 and stop.received is None
          reports(step, due(config.eval.every_steps), due(config.sample.every_steps))
        if pending is not None:
          handle(*pending)
    except BaseException as error:
      with contextlib.suppress(Exception):
        mngr.wait_until_finished()
      explained = out_of_memory(error, config, step + 1, mngr.latest_step())
      if explained is not None:
        raise explained from error
      raise

    save(force=True)
    checkpoint.finish(mngr)
  batches.close()
  if stop.received is not None:
    logging.warning("Stopped by %s at step %d; checkpoint saved, rerun the same command to "
                    "resume.", stop.received, step)
  else:
    if not (config.sample.every_steps and step % config.sample.every_steps == 0):
      write_samples(setup, state, step, workdir, writer)
    logging.info("Finished %d steps in %s.", total, workdir)
  skipped = int(jax.device_get(state.skipped))
  if skipped:
    logging.warning("%d of %d updates were skipped for non-finite values "
                    "(train.nonfinite=skip).", skipped, step)
  progress.done()
  writer.close()
  mngr.close()
  return state
