"""Every failure stops the process: `python -m flowjax.main` exits within seconds with a non-zero
code and one error line, never waiting on a background thread (orbax's writers and signal
waiters, data prefetch).

Each case runs the real entry point in a subprocess with one fault: a checkpoints directory that
cannot be written (after a failed asynchronous save orbax leaves threads that wait forever), saves
that keep failing, a data loader that raises, an evaluation that raises, and a non-finite loss
with train.nonfinite=stop.
"""

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Injected before flowjax.main runs; FAULT selects the failure.
PRELUDE = textwrap.dedent("""
    import os, sys
    fault = os.environ["FAULT"]
    if fault == "save":
      import orbax.checkpoint as ocp
      real_save = ocp.CheckpointManager.save
      def save(self, step, *args, **kwargs):
        if step >= 4:
          raise OSError(28, "No space left on device")
        return real_save(self, step, *args, **kwargs)
      ocp.CheckpointManager.save = save
    elif fault == "none":
      pass
    elif fault == "data":
      from flowjax.data import pipeline
      real_next = pipeline.Batches.__next__
      def next_batch(self):
        if self.get_state().get("next_batch", 0) >= 3:
          raise OSError(5, "Input/output error reading a data shard")
        return real_next(self)
      pipeline.Batches.__next__ = next_batch
    elif fault == "eval":
      from flowjax import train
      def evaluate(*args, **kwargs):
        raise RuntimeError("the evaluator crashed")
      train.evaluate = evaluate
    elif fault == "nonfinite":
      from flowjax.data import pipeline
      real_next = pipeline.Batches.__next__
      def next_batch(self):
        batch = real_next(self)
        return dict(batch, image=batch["image"] * float("nan"))
      pipeline.Batches.__next__ = next_batch
    from absl import app
    from flowjax import main
    app.run(main.main, flags_parser=main.parse_flags)
""")


@pytest.mark.parametrize("fault, message", [
    ("save", "Saving checkpoints in"),
    ("data", "Input/output error reading a data shard"),
    ("eval", "the evaluator crashed"),
    ("nonfinite", "NonFiniteError: Non-finite values at step 1"),
])
def test_a_failure_ends_the_process_promptly(tmp_path, fault, message):
  done = run_main(tmp_path / "w", fault)
  assert done.returncode != 0, done.stderr[-3000:]
  assert message in done.stderr, done.stderr[-3000:]


def run_main(workdir, fault, timeout=120):
  args = ["--config=experiments/fm_toy2d.py:tiny", f"--workdir={workdir}",
          "--num_cpu_devices=2", "--config.train.steps=12", "--config.ckpt.every_steps=2",
          "--config.ckpt.async_save=True", "--config.eval.every_steps=2",
          "--config.sample.num=16", "--config.train.log_every=1"]
  env = dict(os.environ, FAULT=fault, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", PRELUDE] + args, cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def unwritable(directory):
  """`directory` made unwritable: immutable (chattr +i) for root, whom permissions do not stop;
  mode 0555 for anyone else."""
  directory.mkdir(parents=True)
  if os.geteuid() == 0:
    if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
      pytest.skip("chattr +i is not available here, and root ignores permissions")
    try:
      yield
    finally:
      subprocess.run(["chattr", "-i", str(directory)], check=True)
  else:
    directory.chmod(0o555)
    try:
      yield
    finally:
      directory.chmod(0o755)


def test_an_unwritable_checkpoints_directory_ends_the_process_promptly(tmp_path):
  workdir = tmp_path / "w"
  with unwritable(workdir / "checkpoints"):
    done = run_main(workdir, "none")  # it used to wait forever on orbax's threads: timeout
  assert done.returncode == 1, done.stderr[-3000:]
  assert "CheckpointError: A checkpoint write to" in done.stderr, done.stderr[-3000:]
  assert "Operation not permitted" in done.stderr or "Permission denied" in done.stderr
