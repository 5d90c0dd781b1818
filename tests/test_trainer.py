"""The trainer's guarantees: validation errors, non-finite handling, workdir ownership, damaged
checkpoints, init_from, and metrics truncation on resume."""

import json
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowjax import checkpoint, config as config_lib, data, metrics, sharding, train
import helpers


def toy_config(**overrides):
  base = {"train.steps": 6, "ckpt.every_steps": 2, "train.log_every": 1, "data.prefetch": 0,
          "optim.schedule": "constant", "sample.num": 16}
  base.update(overrides)
  return config_lib.load_experiment("experiments/fm_toy2d.py", "tiny", **base)


def params_of(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


# Validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"train.batch_size": 12}, "not divisible by the 8 batch shards"),
    ({"mesh.data": 3}, "does not fit 8 devices"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "only one axis may be -1"),
    ({"train.nonfinite": "skp"}, "Did you mean 'skip'"),
    ({"model.name": "dti"}, "Did you mean 'dit'"),
    ({"objective.name": "flow_matchin"}, "Did you mean 'flow_matching'"),
    ({"train.steps": 0}, "config.train.steps=0 must be positive"),
    ({"optim.lr": -1.0}, "config.optim.lr=-1.0 must be >= 0"),
    ({"train.grad_accum_steps": 3}, "not divisible by config.train.grad_accum_steps=3"),
    ({"optim.ema_decays": (1.5,)}, "outside [0, 1)"),
    ({"train.matmul_precision": "fp32"}, "Unknown value 'fp32'. Known: default, float32"),
])
def test_bad_config_values_give_one_clear_error(overrides, message):
  config = toy_config(**overrides)
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(
      "[", r"\[").replace(")", r"\)")):
    config_lib.validate(config, 8)


def test_matmul_precision_is_the_tracing_context():
  config = toy_config(**{"train.matmul_precision": "tensorfloat32"})
  mesh = sharding.make_mesh(config.mesh, jax.devices())
  before = jax.config.jax_default_matmul_precision
  with train.context(mesh, (), config.train.matmul_precision):
    assert jax.config.jax_default_matmul_precision == "tensorfloat32"
  with train.context(mesh, (), "default"):
    assert jax.config.jax_default_matmul_precision == before
  assert jax.config.jax_default_matmul_precision == before


def test_out_of_memory_is_explained_and_other_errors_are_not():
  config = toy_config()
  error = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                     "allocate 90.08GiB with allocator GPU_0_bfc")
  explained = train.out_of_memory(error, config, 7, 5)
  assert isinstance(explained, train.OutOfMemoryError)
  for part in ("by step 7", "90.08GiB", "train.batch_size", "model.remat=full", "mesh.fsdp",
               "dry_run=True", "The checkpoint of step 5 is intact"):
    assert part in str(explained)
  assert "No checkpoint was written yet" in str(train.out_of_memory(error, config, 1, None))
  assert train.out_of_memory(jax.errors.JaxRuntimeError("INTERNAL: other"), config, 1, 0) is None
  assert train.out_of_memory(ValueError("RESOURCE_EXHAUSTED"), config, 1, 0) is None


def test_unknown_key_and_wrong_type_are_refused_by_the_locked_config():
  config = toy_config()
  with pytest.raises(AttributeError, match='Did you mean "steps"'):
    config.train.stesp = 3
  with pytest.raises(TypeError, match="cannot be casted"):
    config.train.steps = "many"


def test_unprepared_dataset_names_the_fix(tmp_path):
  config = toy_config(**{"data.name": "tfds:cifar10", "data.tfds_data_dir": str(tmp_path)})
  with pytest.raises(FileNotFoundError, match="not prepared.*tfds build cifar10"):
    train.build(config)


def test_unwritable_workdir_is_reported_before_training(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(train.WorkdirError, match="cannot be written"):
    train.check_workdir(toy_config(), str(blocker / "run"), allow_config_change=False)


# Non-finite values ------------------------------------------------------------------------------


class PoisonedBatches:
  """Wraps a Batches iterator and puts NaN into the images of one global batch index."""

  def __init__(self, inner, poisoned_index):
    self.inner, self.poisoned_index, self.count = inner, poisoned_index, 0

  def __next__(self):
    batch = next(self.inner)
    self.count += 1
    if self.count - 1 == self.poisoned_index:
      batch = dict(batch, image=batch["image"] * jnp.nan)
    return batch

  def __getattr__(self, name):
    return getattr(self.inner, name)


@pytest.fixture
def poison(monkeypatch):
  def install(index):
    build = data.build

    def poisoned(*args, **kwargs):
      inner = build(*args, **kwargs)
      return PoisonedBatches(inner, index) if kwargs.get("split") == "train" else inner

    monkeypatch.setattr(data, "build", poisoned)
  return install


def test_nonfinite_skip_does_not_apply_the_update_and_counts_it(tmp_path, poison):
  poison(2)
  state = train.run(toy_config(**{"train.nonfinite": "skip"}), str(tmp_path))
  assert int(state.step) == 6 and int(state.skipped) == 1
  assert all(np.isfinite(p).all() for p in params_of(state))
  records = metrics.read_metrics(str(tmp_path))
  assert [r["nonfinite"] for r in records] == [0, 0, 1, 0, 0, 0]
  assert records[-1]["skipped"] == 1


def test_nonfinite_stop_names_the_step_and_saves_nothing_nonfinite(tmp_path, poison):
  poison(2)
  with pytest.raises(train.NonFiniteError, match="at step 3 .*global batch index 2"):
    train.run(toy_config(), str(tmp_path))
  setup = train.build(toy_config())
  mngr = checkpoint.manager(str(tmp_path), toy_config().ckpt)
  assert mngr.all_steps()
  for step in mngr.all_steps():
    restored = mngr.restore(step, args=checkpoint.ocp.args.Composite(
        state=checkpoint.ocp.args.StandardRestore(setup.abstract_state)))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state))
  # The stop at step 3 happens before the step-4 save: only step 2 exists, at data position 2.
  assert mngr.all_steps() == [2]
  saved = mngr.restore(2, args=checkpoint.ocp.args.Composite(
      data=checkpoint.ocp.args.JsonRestore()))
  assert saved.data["next_batch"] == 2
  mngr.close()


def test_step_keeps_the_state_on_nan(tmp_path):
  """After a real update (so the optimizer moments and the EMA are not at their initial values),
  a non-finite step leaves params, optimizer state, EMA and extra bitwise unchanged."""
  setup = train.build(toy_config())
  with train.context(setup):
    state = setup.init_fn()
    batches = data.build(setup.config.data, split="train", global_batch_size=16, seed=0,
                         sharding=setup.batch_spec["image"].sharding)
    state, _ = setup.train_step(state, next(batches))
    before = jax.device_get(state)
    batch = next(batches)
    new_state, step_metrics = setup.train_step(state, dict(batch, image=batch["image"] * jnp.inf))
  after = jax.device_get(new_state)
  assert int(step_metrics["nonfinite"]) == 1 and int(after.skipped) == 1
  assert int(after.step) == 2
  for part in ("params", "opt_state", "ema", "extra"):
    want, got = jax.tree.leaves(getattr(before, part)), jax.tree.leaves(getattr(after, part))
    assert len(want) == len(got)
    for a, b in zip(want, got):
      np.testing.assert_array_equal(a, b, err_msg=part)
  # The optimizer state is not trivially constant: one real update moved it.
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(before.opt_state)
             if np.asarray(x).dtype.kind == "f")


# Workdir ownership, damaged checkpoints, init_from -----------------------------------------------


def test_workdir_of_another_config_is_refused_unless_allowed(tmp_path):
  train.run(toy_config(), str(tmp_path))
  changed = toy_config(**{"optim.lr": 0.5, "train.steps": 8})
  with pytest.raises(train.WorkdirError, match=r"optim.lr: 0.001 -> 0.5"):
    train.run(changed, str(tmp_path))
  # train.steps may change on resume: the run continues from step 6 to 8.
  state = train.run(toy_config(**{"train.steps": 8}), str(tmp_path))
  assert int(state.step) == 8
  state = train.run(changed, str(tmp_path), allow_config_change=True)
  assert int(state.step) == 8
  # Allowed, but another batch size cannot continue the data stream: one error naming both.
  with pytest.raises(train.WorkdirError, match=r"(?s)cannot resume this data stream.*batch"):
    train.run(toy_config(**{"train.steps": 10, "train.batch_size": 64}), str(tmp_path),
              allow_config_change=True)
  # Without config.json the checkpoint's own fingerprint still refuses another config.
  (tmp_path / "config.json").unlink()
  with pytest.raises(train.WorkdirError,
                     match=r"(?s)checkpoint at step 8 .*model.hidden_size: 32 -> 64"):
    train.run(toy_config(**{"train.steps": 10, "model.hidden_size": 64}), str(tmp_path))


def test_workdir_from_before_a_key_existed_resumes_at_its_default(tmp_path):
  """A workdir written before flowjax had a config key (absent from its config.json and its
  checkpoints' identity) resumes when the new config leaves the key at its default, and is
  refused when the key is set to anything else."""
  train.run(toy_config(), str(tmp_path))
  path = tmp_path / "config.json"
  saved = json.loads(path.read_text())
  del saved["model"]["dropout"], saved["optim"]["b2"], saved["data"]["text"]
  path.write_text(json.dumps(saved))
  for meta_file in tmp_path.glob("checkpoints/*/meta/metadata"):
    meta = json.loads(meta_file.read_text())
    del meta["identity"]["model.dropout"], meta["identity"]["optim.b2"]
    for key in [k for k in meta["identity"] if k.startswith("data.text.")]:
      del meta["identity"][key]
    meta["fingerprint"] = "written-before-model.dropout-and-optim.b2"
    meta_file.write_text(json.dumps(meta))
  assert config_lib.default_value("model.dropout", {"model.name": "mlp"}) == 0.0
  assert config_lib.default_value("optim.b2", {}) == config_lib.base_config().optim.b2
  with pytest.raises(train.WorkdirError, match=r"model.dropout: '<absent>' -> 0.1"):
    train.run(toy_config(**{"train.steps": 8, "model.dropout": 0.1}), str(tmp_path))
  path.unlink()
  with pytest.raises(train.WorkdirError,
                     match=r"(?s)checkpoint at step 6 .*optim.b2: '<absent>' -> 0.9"):
    train.run(toy_config(**{"train.steps": 8, "optim.b2": 0.9}), str(tmp_path))
  path.write_text(json.dumps(saved))
  state = train.run(toy_config(**{"train.steps": 8}), str(tmp_path))
  assert int(state.step) == 8
  # Loading it for sampling or evaluation reads its config.json with the added keys at their
  # defaults (a model whose builder reads every key of its section would otherwise refuse it).
  path.write_text(json.dumps(saved))
  from flowjax import api
  config = api.read_config(str(tmp_path))
  assert config.model.dropout == 0.0 and config.optim.b2 == config_lib.base_config().optim.b2
  assert config.data.text.to_dict() == config_lib.base_config().data.text.to_dict()
  assert api.load(str(tmp_path)).sample(2).shape == (2, 2)


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
  config = toy_config(**{"ckpt.max_to_keep": 5})
  train.run(config, str(tmp_path))
  ckpts = tmp_path / "checkpoints"
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [2, 4, 6]
  shutil.rmtree(ckpts / "6" / "state")
  setup = train.build(config)
  mngr = checkpoint.manager(str(tmp_path), config.ckpt)
  state, data_state, _, step = checkpoint.restore_latest(mngr, setup.abstract_state)
  mngr.close()
  assert step == 4 and int(state.step) == 4 and data_state["next_batch"] == 4
  assert "cannot be restored" in caplog.text
  # The damaged step is kept aside, not deleted, and the resumed run writes step 6 again.
  assert (ckpts / "damaged" / "6").is_dir()
  state = train.run(config, str(tmp_path))
  assert int(state.step) == 6 and (ckpts / "6" / "state").is_dir()


def test_sigint_and_preemption_notice_save_and_stop_cleanly(tmp_path, monkeypatch):
  # SIGINT arrives while the third batch is read: the run finishes that step, saves, returns.
  build = data.build
  helpers.interrupt_while_reading(monkeypatch, 3, signal.SIGINT)
  config = toy_config(**{"train.steps": 50, "ckpt.every_steps": 100})
  state = train.run(config, str(tmp_path / "sigint"))
  assert int(state.step) == 3
  assert (tmp_path / "sigint" / "checkpoints" / "3").is_dir()
  monkeypatch.setattr(data, "build", build)
  # The platform's preemption notice (orbax's reached_preemption) does the same.
  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "reached_preemption",
                      lambda self, step: step == 5)
  state = train.run(config, str(tmp_path / "preempted"))
  assert int(state.step) == 5
  assert (tmp_path / "preempted" / "checkpoints" / "5").is_dir()
  # Also when the notice's step is a checkpoint step (the sync point is checked at every step).
  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "reached_preemption",
                      lambda self, step: step == 4)
  config = toy_config(**{"train.steps": 50, "ckpt.every_steps": 2})
  state = train.run(config, str(tmp_path / "preempted_at_a_checkpoint"))
  assert int(state.step) == 4


@pytest.mark.parametrize("where", ["eval", "sample"])
def test_a_signal_during_an_in_loop_evaluation_ends_it_and_saves_at_once(tmp_path, monkeypatch,
                                                                         where):
  """An evaluation (FID over many batches) or a sample grid can outlast a preemption's grace
  period: a signal during one leaves it unfinished, and the run saves the step it scored and
  stops; the resumed run makes that step's report first, and only a missing one. Here the
  evaluator (or the sampler) works in 40 slices and SIGTERM arrives in the 3rd."""
  from flowjax import evals
  done, signal_at = [], [2]

  def slow(*args, **kwargs):
    for index in range(40):
      if index in signal_at:
        os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.01)
      done.append(index)
    return {"eval_fid": 1.0} if where == "eval" else original_sampler(*args, **kwargs)

  original_sampler = None
  if where == "eval":
    monkeypatch.setattr(evals, "quality_metrics", slow)
    overrides = {"eval.every_steps": 4, "sample.every_steps": 0}
    report = lambda step: tmp_path / "eval" / f"step_{step}.json"
  else:
    sampler = train.sampler

    def slow_sampler(setup, num=None):
      nonlocal original_sampler
      original_sampler = sampler(setup, num)
      return original_sampler if num is not None else slow  # the start's check traces num=1
    monkeypatch.setattr(train, "sampler", slow_sampler)
    overrides = {"eval.every_steps": 0, "sample.every_steps": 4}
    report = lambda step: tmp_path / "samples" / f"step_{step}.png"
  config = toy_config(**{"train.steps": 8, "ckpt.every_steps": 100, **overrides})
  state = train.run(config, str(tmp_path))
  assert int(state.step) == 4 and (tmp_path / "checkpoints" / "4").is_dir()
  assert len(done) <= 3, done
  assert not report(4).exists()
  # Resumed at step 4: its report first, then step 8's.
  signal_at.clear()
  done.clear()
  state = train.run(config, str(tmp_path))
  assert int(state.step) == 8 and report(4).exists() and report(8).exists()
  assert len(done) == 80, len(done)
  # Resumed at step 8, whose report exists: nothing is made again before training on.
  done.clear()
  state = train.run(toy_config(**{"train.steps": 12, "ckpt.every_steps": 100, **overrides}),
                    str(tmp_path))
  assert int(state.step) == 12 and len(done) == 40, len(done)
  # A stop during the last step's report: the rerun of the finished run makes it.
  final = tmp_path / "final"
  report = lambda step: final / ("eval" if where == "eval" else "samples") / (
      f"step_{step}.json" if where == "eval" else f"step_{step}.png")
  config = toy_config(**{"train.steps": 4, "ckpt.every_steps": 100, **overrides})
  signal_at.append(2)
  done.clear()
  assert int(train.run(config, str(final)).step) == 4 and not report(4).exists()
  signal_at.clear()
  done.clear()
  assert int(train.run(config, str(final)).step) == 4 and report(4).exists()
  assert len(done) == 40, len(done)


def test_a_shielded_block_finishes_before_the_signal_interrupts(monkeypatch):
  """Inside an interruptible report a signal raises at once, past any `except Exception`; in a
  shielded part (a loader's close, a result's writes) it waits for the part's end; outside both
  it only sets the flag."""
  def signalled():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)  # the handler runs at the next bytecode of the main thread

  with train._StopSignal() as stop:
    steps = []
    with pytest.raises(train.Interrupted):
      with stop.interruptible():
        try:
          signalled()
          steps.append("not reached")
        except Exception:  # an evaluator's own error handling does not swallow it
          steps.append("swallowed")
    assert steps == [] and stop.received == "SIGTERM"
  with train._StopSignal() as stop:
    with pytest.raises(train.Interrupted):
      with stop.interruptible():
        with stop.shielded():
          signalled()
          steps.append("closed")
        steps.append("not reached")
    assert steps == ["closed"]
  with train._StopSignal() as stop:
    signalled()
    assert stop.received == "SIGTERM"


def test_a_signal_during_a_training_step_is_an_ordinary_stop(tmp_path, monkeypatch, caplog):
  """A signal between reports stops at the step as always, without claiming that a report was
  cut short, and a later signal-free run is not disturbed by what the stop left behind."""
  helpers.interrupt_while_reading(monkeypatch, 3, signal.SIGINT)
  config = toy_config(**{"train.steps": 50, "ckpt.every_steps": 100, "eval.every_steps": 2,
                         "eval.num_batches": 1})  # the eval loader reads 1 batch: no signal
  with caplog.at_level("WARNING"):
    state = train.run(config, str(tmp_path))
  assert int(state.step) == 3 and (tmp_path / "checkpoints" / "3").is_dir()
  assert (tmp_path / "eval" / "step_2.json").exists()
  assert not any("during the evaluation" in r.getMessage() for r in caplog.records)


def test_resuming_with_other_train_steps_warns_when_the_schedule_moves(tmp_path, caplog):
  """train.steps may change on resume (to extend a run), but warm-up + cosine is laid out over
  it: the resumed run warns with the learning rate it had and the one it gets; a constant
  schedule without warm-up does not move and does not warn."""
  cosine = {"optim.schedule": "cosine", "optim.warmup_steps": 2, "optim.final_lr": 0.0}
  train.run(toy_config(**{"train.steps": 4, **cosine}), str(tmp_path / "cosine"))
  with caplog.at_level("WARNING"):
    train.run(toy_config(**{"train.steps": 8, **cosine}), str(tmp_path / "cosine"))
  moved = [r.getMessage() for r in caplog.records if "train.steps changed from 4 to 8" in
           r.getMessage()]
  assert len(moved) == 1 and "at step 4 moves from 0 (the run as it was) to 0.00075" in moved[0]
  caplog.clear()
  constant = {"optim.schedule": "constant", "optim.warmup_steps": 0}
  train.run(toy_config(**{"train.steps": 4, **constant}), str(tmp_path / "constant"))
  with caplog.at_level("WARNING"):
    state = train.run(toy_config(**{"train.steps": 8, **constant}), str(tmp_path / "constant"))
  assert int(state.step) == 8
  assert not any("train.steps changed" in r.getMessage() for r in caplog.records)
  # A parameter set's own schedule (DMD2's generator here) is checked too.
  caplog.clear()
  sets = config_lib.load_experiment("experiments/dmd2_toy2d.py", "tiny")
  with sets.unlocked():
    sets.train.steps = 8
    sets.optim.sets.generator.update(dict(schedule="cosine", warmup_steps=0))
  with caplog.at_level("WARNING"):
    train.warn_schedule_change(4, sets, 4)
  moved = [r.getMessage() for r in caplog.records if "train.steps changed" in r.getMessage()]
  assert len(moved) == 1 and "optim.sets.generator.schedule='cosine'" in moved[0], moved


def test_all_checkpoints_damaged_is_one_clear_error(tmp_path):
  config = toy_config()
  train.run(config, str(tmp_path))
  for step_dir in (tmp_path / "checkpoints").iterdir():
    if step_dir.name.isdigit():
      (step_dir / "state" / "_METADATA").write_text("garbage")
      shutil.rmtree(step_dir / "state" / "d", ignore_errors=True)
  with pytest.raises(checkpoint.CheckpointError, match="None of the checkpoints"):
    train.run(config, str(tmp_path))


def test_init_from_copies_parameters_only(tmp_path):
  source = tmp_path / "source"
  trained = train.run(toy_config(), str(source))
  target = tmp_path / "target"
  config = toy_config(**{"ckpt.init_from": str(source), "train.steps": 1})
  setup = train.build(config)
  mngr = checkpoint.manager(str(target), config.ckpt)
  state, data_state, start = train.restore_or_init(setup, mngr, str(target))
  mngr.close()
  assert start == 0 and data_state is None and int(state.step) == 0
  for a, b in zip(params_of(trained), params_of(state)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(checkpoint.CheckpointError, match="has no checkpoints directory"):
    checkpoint.restore_params(str(tmp_path / "nowhere"), setup.abstract_state.params)


def test_truncate_metrics_keeps_complete_records_up_to_step(tmp_path):
  path = tmp_path / metrics.METRICS_FILE
  path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6))
                  + '{"step": 8, "lo')
  metrics.truncate_metrics(str(tmp_path), 4)
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [2, 4]


def test_config_json_and_fingerprint_ignore_resumable_keys():
  a = toy_config()
  b = toy_config(**{"train.steps": 100, "mesh.data": 4, "mesh.fsdp": 2, "ckpt.every_steps": 7})
  c = toy_config(**{"model.hidden_size": 64})
  assert config_lib.fingerprint(a) == config_lib.fingerprint(b)
  assert config_lib.fingerprint(a) != config_lib.fingerprint(c)
  assert json.loads(config_lib.to_json(a))["train"]["steps"] == 6
  assert os.path.basename(metrics.METRICS_FILE) == "metrics.jsonl"


# Storage faults ----------------------------------------------------------------------------------


def failing_saves(monkeypatch, fail_steps):
  real_save = checkpoint.ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step in fail_steps:
      raise OSError(28, "No space left on device")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", save)


def test_a_failed_save_is_reported_and_the_previous_checkpoint_stays(tmp_path, monkeypatch,
                                                                     caplog):
  failing_saves(monkeypatch, {4})
  state = train.run(toy_config(**{"ckpt.max_to_keep": 5}), str(tmp_path))
  assert int(state.step) == 6
  assert "CHECKPOINT SAVE FAILED at step 4" in caplog.text
  assert "No space left on device" in caplog.text
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 6]


def test_saves_that_keep_failing_stop_the_run_with_one_clear_error(tmp_path, monkeypatch):
  failing_saves(monkeypatch, {4, 6, 8, 10})
  config = toy_config(**{"train.steps": 12})
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"failed at steps \[4, 6, 8\].*latest complete checkpoint is step 2"):
    train.run(config, str(tmp_path))
  # The last good checkpoint is intact and resumable.
  setup = train.build(config)
  mngr = checkpoint.manager(str(tmp_path), config.ckpt)
  state, _, _, step = checkpoint.restore_latest(mngr, setup.abstract_state)
  mngr.close()
  assert step == 2 and int(state.step) == 2


class AlwaysPoisoned(PoisonedBatches):
  """NaN images from global batch index `poisoned_index` on."""

  def __next__(self):
    batch = next(self.inner)
    self.count += 1
    if self.count - 1 >= self.poisoned_index:
      batch = dict(batch, image=batch["image"] * jnp.nan)
    return batch


def test_skipping_stops_past_max_skipped_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                            monkeypatch):
  build = data.build
  monkeypatch.setattr(data, "build", lambda *a, **k: AlwaysPoisoned(build(*a, **k), 2)
                      if k.get("split") == "train" else build(*a, **k))
  config = toy_config(**{"train.nonfinite": "skip", "train.max_skipped": 3,
                         "train.steps": 20})
  # Step 6's record (the fourth skip) is handled before step 6 would be saved: the run stops
  # with step 4 as its last checkpoint.
  with pytest.raises(train.NonFiniteError,
                     match=r"4 updates skipped for non-finite values by step 6, more than "
                           r"train.max_skipped=3.*last checkpoint \(step 4\)"):
    train.run(config, str(tmp_path))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4]
  # The checkpoint after the poison holds the parameters of step 2: no update was applied.
  setup = train.build(config)
  mngr = checkpoint.manager(str(tmp_path), config.ckpt)
  last = jax.device_get(mngr.restore(4, args=checkpoint.ocp.args.Composite(
      state=checkpoint.ocp.args.StandardRestore(setup.abstract_state))).state)
  good = jax.device_get(mngr.restore(2, args=checkpoint.ocp.args.Composite(
      state=checkpoint.ocp.args.StandardRestore(setup.abstract_state))).state)
  mngr.close()
  assert int(last.skipped) == 2 and params_of(last) and all(
      np.array_equal(a, b) for a, b in zip(params_of(last), params_of(good)))


def test_metrics_stay_strict_json_and_the_run_reports_its_skips(tmp_path, poison, caplog):
  poison(2)
  caplog.set_level("WARNING")
  train.run(toy_config(**{"train.nonfinite": "skip"}), str(tmp_path))
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()

  def refuse(constant):
    raise ValueError(f"non-JSON constant {constant}")

  records = [json.loads(line, parse_constant=refuse) for line in lines]
  assert records[2]["step"] == 3 and records[2]["loss"] is None
  assert records[2]["nonfinite"] == 1 and all(r["loss"] is not None for r in records[3:])
  assert "1 of 6 updates were skipped for non-finite values" in caplog.text


def test_a_fresh_start_over_logged_steps_says_so(tmp_path, caplog):
  train.run(toy_config(**{"train.steps": 4}), str(tmp_path))
  shutil.rmtree(tmp_path / "checkpoints")
  caplog.set_level("WARNING")
  train.run(toy_config(**{"train.steps": 4}), str(tmp_path))
  assert ("has no checkpoint but logged steps up to 4 (its checkpoints were deleted or never "
          "written)") in caplog.text
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 2, 3, 4]


def test_periodic_samples_and_evaluations_trace_the_sampler_once_per_size(tmp_path, monkeypatch):
  """Sample grids every 2 steps and evaluations every 3 reuse one jitted sampler per sample
  count: the objective's sampler is traced once per count, not once per grid."""
  config = toy_config(**{"sample.every_steps": 2, "eval.every_steps": 3, "eval.num_batches": 1})
  objective_class = type(train.build(config).objective)
  traced = []
  original = objective_class.sample

  def counting(self, params, rng, num, *args, **kwargs):
    traced.append(num)
    return original(self, params, rng, num, *args, **kwargs)

  monkeypatch.setattr(objective_class, "sample", counting)
  train.run(config, str(tmp_path))
  grids = sorted(os.listdir(tmp_path / "samples"))
  assert len([name for name in grids if name.startswith("step_")]) >= 3, grids
  assert {num: traced.count(num) for num in set(traced)} == {num: 1 for num in set(traced)}, traced
