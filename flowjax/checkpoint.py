"""Saving and restoring the train state with the data-iterator position; the only orbax user.

A checkpoint `checkpoints/<step>/` holds three items: `state` (TrainState arrays, sharded),
`data` (the iterator position, JSON) and `meta` (the config fingerprint, JSON). Restores try the
newest step first and fall back to older ones when a step is damaged.
"""

import dataclasses
import logging

import jax
import orbax.checkpoint as ocp

from flowjax import storage
from flowjax.state import TrainState

ITEMS = ("state", "data", "meta")


class CheckpointError(RuntimeError):
  """No usable checkpoint, or one that does not belong to this run, or saves keep failing."""


class SaveError(CheckpointError):
  """One save failed; the previous checkpoint is intact."""


def _serial_array_saves_on_cpu() -> None:
  """On CPU devices, which share one host's memory, arrays are written whole rather than split
  across their replicas: the split compiles one slicing program per array and device (seconds
  for a first save on 8 devices) and gains nothing. GPU and TPU keep orbax's own default."""
  if jax.default_backend() == "cpu":
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


@dataclasses.dataclass
class _Pinned:
  """Preserves checkpoint `step` (None: none) whatever its age (`pin`)."""
  step: int | None = None

  def should_preserve(self, checkpoints, *, context):
    del context
    return [info.step == self.step for info in checkpoints]


def pin(mngr: ocp.CheckpointManager, step: int | None) -> None:
  """Keeps checkpoint `step` (None: none) beside the ckpt.max_to_keep latest ones, until pinned
  otherwise; in memory, for this manager's life."""
  mngr.flowjax_pinned.step = None if step is None else int(step)


def pinned_step(mngr: ocp.CheckpointManager) -> int | None:
  return mngr.flowjax_pinned.step


def manager(workdir: str, ckpt_config) -> ocp.CheckpointManager:
  _serial_array_saves_on_cpu()
  pinned = _Pinned()
  options = ocp.CheckpointManagerOptions(
      # The ckpt.max_to_keep latest steps (all with 0), and a pinned one (`pin`).
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy([
          ocp.checkpoint_managers.LatestN(n=ckpt_config.max_to_keep or None), pinned]),
      enable_async_checkpointing=ckpt_config.async_save,
      # A step a killed process left half-written (a temporary directory locally; on object
      # storage, a step directory without its commit marker) is removed, so that step saves anew.
      cleanup_tmp_directories=True,
      create=True)
  mngr = ocp.CheckpointManager(storage.join(storage.absolute(workdir), "checkpoints"),
                               item_names=ITEMS, options=options)
  mngr.flowjax_pinned = pinned
  return mngr


def save(mngr: ocp.CheckpointManager, state: TrainState, data_state: dict, meta: dict,
         force: bool = False) -> bool:
  """Starts a (possibly asynchronous) save at state.step; returns whether one was started.

  The device-to-host copy happens before this returns, so the caller may donate `state` next.
  """
  step = int(state.step)
  if step in mngr.all_steps():
    return False
  _remove_unfinished(mngr, step)
  try:
    return mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=force)
  except Exception as error:  # disk full, permissions, a failed earlier asynchronous write, ...
    logging.error("CHECKPOINT SAVE FAILED at step %d in %s (%s: %s). The previous checkpoint "
                  "(step %s) is kept; training continues and the next save retries.", step,
                  mngr.directory, type(error).__name__, error, mngr.latest_step())
    raise SaveError(str(error)) from error


def _remove_unfinished(mngr: ocp.CheckpointManager, step: int) -> None:
  """On object storage, deletes what a killed process left of an unfinished save of `step` (a
  step directory without its commit marker, which all_steps() does not list): orbax would
  otherwise write into its half-written array database."""
  directory = storage.join(str(mngr.directory), str(step))
  if not storage.is_remote(directory):
    return  # locally an unfinished save is a temporary directory that orbax removes itself
  if jax.process_index() == 0 and storage.exists(directory):
    logging.warning("Deleting %s, an unfinished save of a stopped run.", directory)
    storage.rmtree(directory)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"flowjax_unfinished_{step}")


def finish(mngr: ocp.CheckpointManager) -> None:
  """Waits for pending asynchronous saves; a failure is raised as CheckpointError."""
  try:
    mngr.wait_until_finished()
  except Exception as error:  # see save
    raise CheckpointError(f"A checkpoint write to {mngr.directory} failed ({type(error).__name__}: "
                          f"{error}); the latest complete checkpoint is step "
                          f"{mngr.latest_step()}. Check the disk space and permissions of the "
                          "workdir, then rerun the same command to resume.") from error


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: TrainState, check_meta=None):
  """(state, data_state, meta, step) from the newest readable checkpoint, or None if none exist.

  abstract_state: TrainState of jax.ShapeDtypeStruct with shardings; restored arrays are placed
  directly on those shardings. check_meta(meta, step), if given, runs on the newest step's meta
  item before any array is read and may raise (a checkpoint of another config). A step that
  cannot be read is reported and the previous one tried; once an older step restores, the
  damaged newer ones are moved to checkpoints/damaged/. If none restores, nothing is moved.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  if check_meta is not None:
    try:
      meta = mngr.restore(steps[0], args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception:  # a damaged meta item: the array restore below reports the step
      meta = None
    if meta is not None:
      check_meta(meta, steps[0])
  failures, damaged = [], []
  for step in steps:
    mismatch = _shape_mismatches(storage.join(str(mngr.directory), str(step), "state"),
                                 ("params",), abstract_state.params)
    if mismatch:
      # A checkpoint of another model (e.g. resumed with --allow_config_change and another
      # width) is not damaged: nothing is moved aside, and orbax is not asked to read it.
      raise CheckpointError(
          f"The checkpoint at step {step} in {mngr.directory} holds parameters of other shapes "
          "than this config's model " + _listed(mismatch)
          + "\nA run resumes only with the same model; use a new --workdir.")
    mismatch = _shape_mismatches(storage.join(str(mngr.directory), str(step), "state"),
                                 ("extra",), abstract_state.extra)
    if mismatch:
      raise CheckpointError(
          f"The checkpoint at step {step} in {mngr.directory} holds other objective state "
          "(state.extra: a teacher, an encoder, statistics an objective keeps across steps) "
          "than this config's objective " + _listed(mismatch)
          + "\nAn option that adds or removes such state was changed (e.g. "
          "objective.ratio_ema_rate, config.repa); resume with the checkpoint's objective "
          "settings or use a new --workdir.")
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore()))
    except Exception as error:  # orbax raises ValueError, FileNotFoundError, KeyError, ...
      logging.warning("Checkpoint at step %d in %s cannot be restored (%s: %s); trying the "
                      "previous one.", step, mngr.directory, type(error).__name__, error)
      failures.append(f"step {step}: {type(error).__name__}: {str(error)[:300]}")
      damaged.append(step)
      continue
    if failures:
      logging.warning("Resumed from step %d after skipping damaged checkpoints: %s", step,
                      "; ".join(failures))
      for bad in damaged:
        set_aside(mngr, bad)
    return restored.state, restored.data, restored.meta, step
  raise CheckpointError(
      f"None of the checkpoints in {mngr.directory} can be restored:\n  " + "\n  ".join(failures)
      + "\nIf they belong to another model or config, use a new --workdir; otherwise move the "
      "checkpoints directory away to start afresh.")


def set_aside(mngr: ocp.CheckpointManager, step: int) -> None:
  """Moves a damaged step to checkpoints/damaged/ (kept for inspection, never deleted), so that
  the resumed run can save that step again. Process 0 moves it; every process then re-reads the
  list of steps."""
  if jax.process_index() == 0:
    source = storage.join(str(mngr.directory), str(step))
    target = storage.join(str(mngr.directory), "damaged", str(step))
    suffix = 0
    while storage.exists(target):
      suffix += 1
      target = storage.join(str(mngr.directory), "damaged", f"{step}.{suffix}")
    try:
      storage.makedirs(storage.join(str(mngr.directory), "damaged"))
      storage.rename(source, target)
      logging.warning("Moved the damaged checkpoint of step %d to %s.", step, target)
    except OSError as error:
      logging.warning("Could not move the damaged checkpoint %s aside: %s", source, error)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"flowjax_set_aside_{step}")
  mngr.reload()


def restore_params(workdir: str, abstract_params, key: str | tuple[str, ...] = "params",
                   source: str = "ckpt.init_from", skip: tuple[str, ...] = ()):
  """A parameter subtree of the newest readable checkpoint in another run's `workdir`.

  abstract_params: tree of jax.ShapeDtypeStruct with shardings (the current run's parameters).
  key: the subtree of the saved TrainState to read: "params", or a path such as
  ("ema", "0.999") for one EMA tree. source: the config key that named `workdir`, for errors.
  skip: top-level names the saved subtree may hold beyond `abstract_params`, left unread (the
  projector `repa_projector` of a teacher trained with config.repa).
  Returns (subtree, step).
  """
  path_keys = (key,) if isinstance(key, str) else tuple(key)
  directory = storage.join(storage.absolute(workdir), "checkpoints")
  if not storage.isdir(directory):
    raise CheckpointError(f"{source}={workdir!r} has no checkpoints directory "
                          f"({directory}); name a workdir written by flowjax.main.")
  mngr = ocp.CheckpointManager(directory, item_names=ITEMS,
                               options=ocp.CheckpointManagerOptions(read_only=True))
  errors = []
  for step in sorted(mngr.all_steps(), reverse=True):
    path = storage.join(directory, str(step), "state")
    item = abstract_params
    for name in reversed(path_keys):
      item = {name: item}
    mismatch = _shape_mismatches(path, path_keys, abstract_params, skip)
    if mismatch:
      # Checked from the metadata, before orbax reads anything: a restore into other shapes
      # fails deep in its asynchronous reads and floods the log with event-loop tracebacks.
      raise CheckpointError(
          f"{source}={workdir!r}: the parameters of its step {step} do not fit this model "
          + _listed(mismatch) + "\nUse a workdir of the same model (the same model.* keys), or "
          "leave ckpt.init_from empty.")
    try:
      restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))
      for name in path_keys:
        restored = restored[name]
      return restored, step
    except Exception as error:  # see restore_latest
      errors.append(f"step {step}: {type(error).__name__}: {str(error)[:300]}")
  raise CheckpointError(f"{source}={workdir!r}: no checkpoint with parameters matching this "
                        "model could be read:\n  " + "\n  ".join(errors or ["no checkpoints"]))


def _listed(mismatches: list[str], most: int = 12) -> str:
  """'(N differences):' and the first `most` of them, one per line."""
  more = "\n  ..." if len(mismatches) > most else ""
  return (f"({len(mismatches)} differences):\n  " + "\n  ".join(mismatches[:most]) + more)


def _shape_mismatches(path: str, keys: tuple[str, ...], abstract, skip=()) -> list[str]:
  """'name: checkpoint SHAPE, model SHAPE' (or a missing / extra name) for each leaf of the saved
  subtree `keys` of the state item at `path` that does not match `abstract`, its top-level names
  in `skip` aside; [] when they match or when the metadata cannot be read (the restore then
  reports the problem)."""
  try:
    metadata = ocp.PyTreeCheckpointer().metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    for name in keys:
      # A state saved with an empty state.extra may lack the entry; any other missing name is
      # a layout this check does not know (the restore then reports it).
      tree = {} if name == "extra" and name not in tree and "params" in tree else tree[name]
    if skip:
      tree = {name: value for name, value in tree.items() if name not in skip}
    saved = {jax.tree_util.keystr(p): tuple(leaf.shape)
             for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  except Exception:  # an older or damaged metadata layout: let the restore speak
    return []
  wanted = {jax.tree_util.keystr(p): tuple(leaf.shape)
            for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  out = []
  for name in sorted(set(saved) | set(wanted)):
    if name not in saved:
      out.append(f"{name}: not in the checkpoint (model {wanted[name]})")
    elif name not in wanted:
      out.append(f"{name}: not in this model (checkpoint {saved[name]})")
    elif saved[name] != wanted[name]:
      out.append(f"{name}: checkpoint {saved[name]}, model {wanted[name]}")
  return out


def abstract_of(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
