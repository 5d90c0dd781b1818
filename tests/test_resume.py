"""A run interrupted by SIGTERM, or killed with SIGKILL at random moments (also during asynchronous
saves), and restarted with the same command ends bitwise identical to an uninterrupted run, with
the same data order. (SIGKILL is covered by the chaos test.)"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flowjax import checkpoint, config as config_lib, metrics, train

TOTAL = 150
ARGS = ["--config=experiments/fm_toy2d.py:tiny", "--config.optim.schedule=constant",
        "--config.ckpt.every_steps=5", "--config.ckpt.max_to_keep=2", "--config.train.log_every=1",
        "--config.data.prefetch=2", "--config.sample.num=16"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(workdir, steps):
  return ([sys.executable, "-m", "flowjax.main", f"--workdir={workdir}"] + ARGS +
          [f"--config.train.steps={steps}"])


def run_to_end(workdir, steps=TOTAL):
  subprocess.run(command(workdir, steps), cwd=ROOT, check=True, capture_output=True, timeout=300)


def committed_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def start_and_interrupt(workdir, sig):
  """Starts a very long run, sends `sig` once a checkpoint is committed; returns the exit code."""
  process = subprocess.Popen(command(workdir, 10**6), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not committed_steps(workdir) and time.time() < deadline and process.poll() is None:
    time.sleep(0.02)
  process.send_signal(sig)
  return process.wait(timeout=120)


def final_state(workdir, with_meta=False):
  config = config_lib.load_experiment("experiments/fm_toy2d.py", "tiny")
  setup = train.build(config)
  mngr = checkpoint.manager(workdir, config.ckpt)
  state, data_state, meta, step = checkpoint.restore_latest(mngr, setup.abstract_state)
  mngr.close()
  return (jax.device_get(state), data_state, step) + ((meta,) if with_meta else ())


@pytest.fixture(scope="module")
def reference_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  run_to_end(workdir)
  return workdir


@pytest.fixture(scope="module")
def reference(reference_workdir):
  return final_state(reference_workdir)


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_interrupted_run_resumes_bitwise(tmp_path, reference, reference_workdir, sig):
  workdir = str(tmp_path)
  code = start_and_interrupt(workdir, sig)
  if sig == signal.SIGTERM:
    assert code == 0, "SIGTERM must save and exit cleanly"
  else:
    assert code == -signal.SIGKILL
  interrupted_at = max(committed_steps(workdir))
  assert 0 < interrupted_at < TOTAL, "the interruption must come before the end of the run"
  run_to_end(workdir)
  state, data_state, step = final_state(workdir)
  ref_state, ref_data_state, ref_step = reference
  assert step == ref_step == TOTAL
  assert data_state == ref_data_state
  leaves, ref_leaves = jax.tree.leaves(state), jax.tree.leaves(ref_state)
  assert len(leaves) == len(ref_leaves)
  for a, b in zip(leaves, ref_leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  records = [r["step"] for r in metrics.read_metrics(workdir)]
  assert records == sorted(set(records)), "metrics.jsonl must not repeat steps after a resume"
  # The divergence monitor resumed too: its state (steps seen, smoothed and best levels) equals
  # the uninterrupted run's.
  health, ref_health = (final_state(w, with_meta=True)[3]["health"]
                        for w in (workdir, reference_workdir))
  assert health == ref_health and health["seen"] == TOTAL


def test_chaos_repeated_kills_including_mid_save_end_bitwise(tmp_path, reference):
  """SIGKILL at random moments (some during asynchronous saves), restart, five times or more."""
  workdir = str(tmp_path)
  rng = np.random.default_rng(0)
  kills, lost = 0, []
  while kills < 5:
    before = max(committed_steps(workdir), default=0)
    process = subprocess.Popen(command(workdir, TOTAL), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    # Wait for the run to pass its restore point, then kill after a random delay.
    deadline = time.time() + 120
    while max(committed_steps(workdir), default=0) <= before and time.time() < deadline:
      if process.poll() is not None:
        break
      time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.3))
    if process.poll() is not None:
      break
    process.kill()
    process.wait(timeout=60)
    kills += 1
    logged = max((r["step"] for r in metrics.read_metrics(workdir)), default=0)
    lost.append(max(logged - max(committed_steps(workdir), default=0), 0))
  assert kills >= 5, "the run finished before five kills; make it longer"
  print(f"chaos: {kills} kills survived; steps lost per kill (logged - restored): {lost}")
  run_to_end(workdir)
  state, data_state, step = final_state(workdir)
  ref_state, ref_data_state, _ = reference
  assert step == TOTAL and data_state == ref_data_state
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
