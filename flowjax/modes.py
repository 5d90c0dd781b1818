"""The drivers of `--mode=eval` and `--mode=sample`: a trained workdir restored onto the mesh,
then evaluated or sampled."""

import io
import logging

import jax
import numpy as np

from flowjax import checkpoint, config as config_lib, metrics, storage, train


def load(config, workdir: str):
  """(setup, state) with the newest good checkpoint of `workdir` restored onto the mesh.

  A workdir trained with another config (beyond the keys that may change on resume) is refused
  with the differing keys, before any checkpoint is read.
  """
  check_same_config(config, workdir)
  setup = train.build(config)
  mngr = checkpoint.manager(workdir, config.ckpt)
  restored = checkpoint.restore_latest(mngr, setup.abstract_state)
  mngr.close()
  if restored is None:
    raise checkpoint.CheckpointError(
        f"--workdir={workdir} has no checkpoints; train first with "
        f"python -m flowjax.main --config=... --workdir={workdir}")
  return setup, restored[0]


def check_same_config(config, workdir: str) -> None:
  path = storage.join(workdir, "config.json")
  if not storage.exists(path):
    return
  trained = config_lib.from_json(storage.read_text(path))
  diff = config_lib.differences(config_lib.identity(trained), config_lib.identity(config))
  if diff:
    raise train.WorkdirError(
        f"--workdir={workdir} was trained with a different config:\n  " + "\n  ".join(diff) +
        "\nPass the --config (and overrides) it was trained with; its config.json records them, "
        f"and flowjax.api.load({workdir!r}) evaluates or samples it with that config.")


def run_eval(config, workdir: str) -> dict:
  """Evaluates the latest checkpoint; writes eval/step_N.json.

  Beside the objective's loss: bits/dim when the objective has an exact likelihood, and FID,
  precision and recall (and the Inception Score with the Inception network) when the feature
  extractor (eval.feature_extractor: its weights) and eval.fid_reference are set (skipped with a
  warning when they are configured but unusable).
  """
  setup, state = load(config, workdir)
  writer = metrics.Writer(workdir, enabled=jax.process_index() == 0)
  result = train.evaluate(setup, state, int(state.step), workdir, writer)
  writer.close()
  logging.info("Evaluation at step %d: %s", int(state.step), result)
  return result


def run_sample(config, workdir: str) -> np.ndarray:
  """Samples from the latest checkpoint; writes samples/final.png and samples/final.npz."""
  setup, state = load(config, workdir)
  writer = metrics.Writer(workdir, enabled=jax.process_index() == 0)
  samples = train.write_samples(setup, state, int(state.step), workdir, writer, name="final.png")
  if jax.process_index() == 0:
    buffer = io.BytesIO()
    np.savez(buffer, samples=samples)
    storage.write_bytes(storage.join(workdir, "samples", "final.npz"), buffer.getvalue())
  writer.close()
  return samples
