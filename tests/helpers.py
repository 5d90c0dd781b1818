"""Shared test utilities (importable from the test modules: tests/ is on sys.path)."""

import jax
import numpy as np

from flowjax.models import autoencoder


def random_autoencoder_params(model, image_shape, seed=0):
  """Autoencoder parameters drawn with NumPy in the model's shapes (no compiled init): kernels
  N(0, 1 / fan_in), norm scales near 1 and biases near 0, all distinct from their init values."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(path[-1].key)
    if name == "kernel":
      return rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    return (name == "scale") + 0.1 * rng.normal(size=leaf.shape)

  shapes = autoencoder.abstract_params(model, image_shape)
  return jax.tree_util.tree_map_with_path(lambda p, s: draw(p, s).astype(np.float32), shapes)


def run_batch_errors(config, states):
  """(losses, errors) of the objective on each global batch of a `config` run, with the key and
  step index its train step used, at each state of `states` (None = the run's initial state,
  with what the objective loads from disk, e.g. CTM's teacher); each [len(states),
  config.train.steps]. errors are what the run logs as `error` (the loss before any
  reweighting). Computed on one device."""
  from flowjax import data, sharding, step as step_lib, train
  assert config.train.grad_accum_steps == 1
  setup = train.build(config, jax.devices()[:1])
  batches = data.build(config.data, split="train", global_batch_size=config.train.batch_size,
                       seed=config.seed, sharding=sharding.batch_sharding(setup.mesh))
  batches = [next(batches) for _ in range(config.train.steps)]

  @jax.jit
  def loss_and_error(state, batch, index):
    loss, metrics = setup.objective.loss(state.params, batch,
                                         jax.random.fold_in(setup.step_rng, index), index,
                                         step_lib.view_of(state))
    return loss, step_lib.error_of(setup.objective, loss, metrics)

  with train.context(setup):
    initial = setup.init_fn()
    load_extra = getattr(setup.objective, "load_extra", None)  # as train.restore_or_init does
    if load_extra is not None:
      initial = initial.replace(extra=load_extra(setup.abstract_state.extra))
    # Every state on the host, so that one executable serves them all (the initial state's
    # shardings would compile it again).
    states = [jax.device_get(initial if state is None else state) for state in states]
    results = [[loss_and_error(state, batch, k) for k, batch in enumerate(batches)]
               for state in states]
  return tuple(np.asarray([[float(pair[i]) for pair in row] for row in results])
               for i in (0, 1))


def tiny_run_errors(config, workdir, **train_overrides):
  """Trains `config` in `workdir` (pathlib.Path) logging every step, checks that it ran every step
  without skipping, that the step-1 loss and error it logged are those of the first global batch
  at the initial state (`run_batch_errors`, rtol 1e-5) and that it wrote its sample grid, and
  returns the errors [2, steps] of every batch at the initial and the trained state."""
  import json
  from flowjax import config as config_lib, train
  config_lib.validate(config, 8)
  with config.unlocked():
    config.train.update(dict(log_every=1, **train_overrides))
    config.ckpt.every_steps = 0
  state = train.run(config, str(workdir))
  assert int(state.step) == config.train.steps and int(state.skipped) == 0
  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == list(range(1, config.train.steps + 1))
  losses, errors = run_batch_errors(config, [None, state])
  np.testing.assert_allclose(records[0]["loss"], losses[0, 0], rtol=1e-5)
  np.testing.assert_allclose(records[0]["error"], errors[0, 0], rtol=1e-5)
  assert (workdir / "samples" / f"step_{config.train.steps}.png").exists()
  return errors


def interrupt_while_reading(patch, batch: int, sig):
  """Makes every data.build of the run send `sig` to this process while global batch `batch`
  (1-based) is read, so the run finishes that step, saves it and returns. `patch` is a pytest
  monkeypatch (or its context)."""
  import os

  from flowjax import data
  build = data.build

  class Interrupting:
    def __init__(self, inner):
      self.inner, self.count = inner, 0

    def __next__(self):
      self.count += 1
      if self.count == batch:
        os.kill(os.getpid(), sig)
      return next(self.inner)

    def __getattr__(self, attribute):
      return getattr(self.inner, attribute)

  patch.setattr(data, "build", lambda *a, **k: Interrupting(build(*a, **k)))
