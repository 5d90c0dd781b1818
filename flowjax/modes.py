"""The drivers of `--mode=eval` and `--mode=sample`: a trained workdir restored onto the mesh,
then evaluated or sampled."""

import io
import json
import logging

import jax
import jax.numpy as jnp
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


class PromptError(ValueError):
  """--prompts that cannot be sampled: no file, no prompt, or a model without text."""


def run_sample(config, workdir: str, prompts: str | None = None) -> np.ndarray:
  """Samples from the latest checkpoint; writes samples/final.png and samples/final.npz, or with
  `prompts` (a file of prompts, one per line, for a text model) samples/prompt_NN.png and .npz
  per prompt (sample.num samples each) and samples/prompts.json."""
  if prompts:
    return run_prompts(config, workdir, prompts)
  setup, state = load(config, workdir)
  writer = metrics.Writer(workdir, enabled=jax.process_index() == 0)
  samples = train.write_samples(setup, state, int(state.step), workdir, writer, name="final.png")
  if jax.process_index() == 0:
    _write_npz(storage.join(workdir, "samples", "final.npz"), samples=samples)
  writer.close()
  return samples


def _write_npz(path: str, **arrays) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  storage.write_bytes(path, buffer.getvalue())


def run_prompts(config, workdir: str, path: str) -> np.ndarray:
  """One grid of sample.num samples per prompt of the file `path`; returns [P, num, ...]."""
  from flowjax import text
  try:
    prompts = text.read_prompts(path)
  except ValueError as error:
    raise PromptError(str(error)) from error
  if not config.data.text.encoder or not config.model.get("text_dim", 0):
    raise PromptError(f"--prompts={path}: this model reads no text (data.text.encoder="
                      f"{config.data.text.encoder!r}, model.text_dim="
                      f"{config.model.get('text_dim', 0)}); prompts need a text-to-image model.")
  setup, state = load(config, workdir)
  try:
    features = setup.info.text.encode(prompts)
  except (ValueError, FileNotFoundError) as error:  # e.g. the encoder's folder is not here
    raise PromptError(f"--prompts={path}: the prompts cannot be encoded with data.text "
                      f"({type(error).__name__}: {error}).") from error
  num = config.sample.num
  sample = train.sampler(setup)
  params = train.sampling_params(state, config)
  step = int(state.step)
  out = []
  for index, prompt_features in enumerate(features):
    cond = jnp.broadcast_to(jnp.asarray(prompt_features), (num,) + prompt_features.shape)
    rng = jax.random.fold_in(jax.random.fold_in(setup.eval_rng, step), index)
    with train.context(setup):
      samples = np.asarray(jax.device_get(sample(params, rng, cond)))
    out.append(samples)
    if jax.process_index() == 0:
      picture = metrics.samples_picture(train.as_images(config, samples))
      metrics.save_png(storage.join(workdir, "samples", f"prompt_{index:02d}.png"), picture)
      _write_npz(storage.join(workdir, "samples", f"prompt_{index:02d}.npz"), samples=samples)
  if jax.process_index() == 0:
    storage.write_text(storage.join(workdir, "samples", "prompts.json"), json.dumps(
        {"step": step, "guidance": config.sample.guidance,
         "prompts": {f"prompt_{i:02d}": p for i, p in enumerate(prompts)}}, indent=2))
  logging.info("Sampled %d prompts x %d at step %d into %s.", len(prompts), num, step,
               storage.join(workdir, "samples"))
  return np.stack(out)
