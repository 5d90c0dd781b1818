"""Multi-process and multi-layout runs on one machine.

- Two processes with two CPU devices each, joined by jax.distributed through
  launch/local_multiprocess.sh, train, save, resume and end with the same state and data
  position as one process with four devices on the same global batches. Each process reads only
  its rows of every global batch (a process reading other rows, or all of them, would change the
  result or fail to assemble the global array); that the per-process slices of the digits and
  toy2d sources are disjoint and cover the global batch is tested directly in
  tests/test_data.py::test_process_slices_partition_the_global_batch.
- A checkpoint written on 8 devices with an FSDP layout restores, and training continues, on 4
  devices and on 1.
- When one process dies, the launcher stops the others and exits with its status.
- PRINT_ONLY=1 prints the commands and starts nothing.
"""

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flowjax import checkpoint, config as config_lib, metrics, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launch", "local_multiprocess.sh")
CONFIG = "experiments/fm_toy2d.py:tiny"
ARGS = [f"--config={CONFIG}", "--config.optim.schedule=constant", "--config.ckpt.every_steps=2",
        "--config.train.log_every=1", "--config.sample.num=16"]
FIRST, TOTAL = 4, 8  # the two-process run stops at FIRST, then resumes up to TOTAL


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launcher_env(**extra):
  # XLA_FLAGS from conftest (8 fake devices) is inherited on purpose: --num_cpu_devices must win.
  return dict(os.environ, PYTHON=sys.executable, DEVICES_PER_PROCESS="2", PORT=str(free_port()),
              **extra)


def launch(num_processes, args, timeout=240):
  return subprocess.run(["bash", LAUNCHER, str(num_processes)] + args, cwd=ROOT,
                        env=launcher_env(), capture_output=True, text=True, timeout=timeout)


def committed_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def final_state(workdir):
  """(state, data_state, step) of the latest checkpoint, restored onto this process's 8 devices."""
  config = config_lib.load_experiment(*CONFIG.split(":"))
  setup = train.build(config)
  mngr = checkpoint.manager(workdir, config.ckpt)
  state, data_state, _, step = checkpoint.restore_latest(mngr, setup.abstract_state)
  mngr.close()
  return jax.device_get(state), data_state, step


def device_lines(log):
  return sorted(re.findall(r"process \d+ of \d+, \d+ local / \d+ global devices", log))


# ----------------------------------------------------------------------------------------------
# two processes x two devices == one process x four devices


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("two_processes"))
  args = [f"--workdir={workdir}"] + ARGS
  first = launch(2, args + [f"--config.train.steps={FIRST}"])
  assert first.returncode == 0, first.stderr[-4000:]
  assert committed_steps(workdir) == [2, 4]
  second = launch(2, args + [f"--config.train.steps={TOTAL}"])
  assert second.returncode == 0, second.stderr[-4000:]
  return workdir, first.stderr, second.stderr


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("one_process"))
  done = subprocess.run(
      [sys.executable, "-m", "flowjax.main", "--num_cpu_devices=4", f"--workdir={workdir}"] +
      ARGS + [f"--config.train.steps={TOTAL}"], cwd=ROOT, capture_output=True, text=True,
      timeout=240)
  assert done.returncode == 0, done.stderr[-4000:]
  return workdir, done.stderr


def test_each_process_gets_its_own_devices_and_both_resume(two_processes, one_process):
  _, first_log, second_log = two_processes
  expected = ["process 0 of 2, 2 local / 4 global devices",
              "process 1 of 2, 2 local / 4 global devices"]
  assert device_lines(first_log) == device_lines(second_log) == expected
  assert device_lines(one_process[1]) == ["process 0 of 1, 4 local / 4 global devices"]
  assert "Resumed" not in first_log
  assert len(re.findall(rf"Resumed from \S+ at step {FIRST}\.", second_log)) == 2


def test_two_processes_end_like_one_process_with_four_devices(two_processes, one_process):
  workdir, _, _ = two_processes
  ref_workdir, _ = one_process
  state, data_state, step = final_state(workdir)
  ref_state, ref_data_state, ref_step = final_state(ref_workdir)
  assert step == ref_step == TOTAL
  assert data_state == ref_data_state
  assert data_state["next_batch"] == TOTAL
  # Not bitwise: gloo's cross-process all-reduce sums the four gradient shards in another order
  # than the in-process one, which moves the last bit of the loss from step 4 on. A wrong or
  # shifted data shard moves parameters by about lr = 1e-3 per step.
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  records = metrics.read_metrics(workdir)
  ref_records = metrics.read_metrics(ref_workdir)
  assert [r["step"] for r in records] == [r["step"] for r in ref_records] == list(
      range(1, TOTAL + 1))
  np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in ref_records],
                             rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# two processes x four devices on mesh (2, 2, 2) == one process x eight devices == one device


MESH_222 = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
            "--config.model.hidden_size=64", "--config.train.batch_size=32",
            "--config.train.steps=6", "--config.ckpt.every_steps=0", "--config.sample.num=16",
            "--config.train.log_every=1", "--config.optim.schedule=constant",
            "--config.optim.warmup_steps=0"]


def run_main(workdir, num_cpu_devices, extra=()):
  done = subprocess.run(
      [sys.executable, "-m", "flowjax.main", f"--num_cpu_devices={num_cpu_devices}",
       f"--workdir={workdir}", f"--config={CONFIG}"] + list(extra), cwd=ROOT,
      capture_output=True, text=True, timeout=240)
  assert done.returncode == 0, done.stderr[-4000:]


def test_two_processes_on_a_2x2x2_mesh_train_like_one_device(tmp_path):
  """Every mesh axis above 1 with the data axis across processes: parameters, gradient norms
  and losses equal those of one device (one process with the same 2x2x2 mesh is
  test_mesh_equivalence's case mlp-2x2x2)."""
  two, one = (str(tmp_path / name) for name in ("two", "one"))
  done = subprocess.run(
      ["bash", LAUNCHER, "2", f"--workdir={two}", f"--config={CONFIG}"] + MESH_222, cwd=ROOT,
      env=dict(launcher_env(), DEVICES_PER_PROCESS="4"), capture_output=True, text=True,
      timeout=240)
  assert done.returncode == 0, done.stderr[-4000:]
  assert device_lines(done.stderr) == ["process 0 of 2, 4 local / 8 global devices",
                                       "process 1 of 2, 4 local / 8 global devices"]
  run_main(one, 1, [a for a in MESH_222 if not a.startswith("--config.mesh.")])
  records = {name: metrics.read_metrics(workdir) for name, workdir in
             (("two", two), ("one", one))}
  for key in ("loss", "grad_norm"):
    want = [r[key] for r in records["one"]]
    assert len(want) == 6
    np.testing.assert_allclose([r[key] for r in records["two"]], want, rtol=1e-5,
                               err_msg=f"{key} of two processes against one device")
  config = config_lib.load_experiment(*CONFIG.split(":"), **{"model.hidden_size": 64})
  states = []
  for workdir in (two, one):
    setup = train.build(config, devices=jax.devices()[:1])
    mngr = checkpoint.manager(workdir, config.ckpt)
    states.append(jax.device_get(checkpoint.restore_latest(mngr, setup.abstract_state)[0]))
    mngr.close()
  # Adam divides by the gradient's running RMS, so where a gradient entry is near zero its
  # last-bit differences move a parameter by up to ~1e-6; a wrong layout moves parameters by
  # about the learning rate (1e-3) per step.
  for a, b in zip(jax.tree.leaves(states[0].params), jax.tree.leaves(states[1].params),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# an FSDP checkpoint from 8 devices restores and continues on 4 and on 1


def fm_imagenet(data, fsdp, steps=4):
  return config_lib.load_experiment("experiments/fm_imagenet.py", "tiny", **{
      "mesh.data": data, "mesh.fsdp": fsdp, "train.steps": steps})


def restore_on(config, devices, workdir):
  setup = train.build(config, devices=devices)
  mngr = checkpoint.manager(workdir, config.ckpt)
  state, data_state, _, step = checkpoint.restore_latest(mngr, setup.abstract_state)
  mngr.close()
  return state, data_state, step


def fsdp_sharded(state):
  return [leaf for leaf in jax.tree.leaves(state.params)
          if any("fsdp" in (axes if isinstance(axes, tuple) else (axes,))
                 for axes in leaf.sharding.spec if axes)]


def test_fsdp_checkpoint_from_8_devices_restores_and_continues_on_4_and_on_1(tmp_path):
  workdir = str(tmp_path)
  devices = jax.devices()
  assert len(devices) == 8
  saved = train.run(fm_imagenet(data=2, fsdp=4), workdir)
  assert int(saved.step) == 4
  assert fsdp_sharded(saved), "the 8-device run must shard parameters over fsdp"
  saved = jax.device_get(saved)
  # The same steps continued on all 8 devices, from a copy of the step-4 workdir.
  reference = str(tmp_path.parent / (tmp_path.name + "_on_8"))
  shutil.copytree(workdir, reference)
  on_8 = {steps: jax.device_get(train.run(fm_imagenet(data=2, fsdp=4, steps=steps), reference))
          for steps in (6, 8)}

  for subset in (devices[:4], devices[:1]):
    state, data_state, step = restore_on(fm_imagenet(data=1, fsdp=len(subset)), subset, workdir)
    assert step == 4 and data_state["next_batch"] == 4
    for leaf in jax.tree.leaves(state):
      assert leaf.sharding.device_set == set(subset)
    assert bool(fsdp_sharded(state)) == (len(subset) > 1)
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(saved), strict=True):
      np.testing.assert_array_equal(a, b)

  for subset, steps in ((devices[:4], 6), (devices[:1], 8)):
    continued = train.run(fm_imagenet(data=1, fsdp=len(subset), steps=steps), workdir,
                          devices=subset)
    assert int(continued.step) == steps
    for leaf in jax.tree.leaves(continued.params):
      assert leaf.sharding.device_set == set(subset)
    logged = {r["step"]: r for r in metrics.read_metrics(workdir)}
    assert sorted(logged) == list(range(2, steps + 1, 2))
    assert np.isfinite(logged[steps]["loss"]) and logged[steps]["skipped"] == 0
    assert max(committed_steps(workdir)) == steps
    # Continuing on fewer devices trains what the 8 devices train (to reduction order; a wrong
    # restore or data position moves parameters by about the learning rate per step).
    reference_logged = {r["step"]: r for r in metrics.read_metrics(reference)}
    np.testing.assert_allclose(logged[steps]["loss"], reference_logged[steps]["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(continued)), jax.tree.leaves(on_8[steps]),
                    strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)


# ----------------------------------------------------------------------------------------------
# the local launcher


def stat_field(index):
  """{pid: field `index` of /proc/<pid>/stat after the command name} (1: parent, 3: session)."""
  found = {}
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat") as f:
        found[int(name)] = int(f.read().rsplit(")", 1)[1].split()[index])
    except (FileNotFoundError, ProcessLookupError):
      continue
  return found


def children(pid):
  return [child for child, parent in stat_field(1).items() if parent == pid]


def session_members(sid):
  return [pid for pid, session in stat_field(3).items() if session == sid]


def cmdline(pid):
  with open(f"/proc/{pid}/cmdline", "rb") as f:
    return f.read().decode().split("\0")


def start_training(tmp_path, extra=()):
  """(launcher, log path, workdir, {"--process_id=K": pid}) of a two-process run of ARGS (with
  `extra`) and a million steps, once both processes train (a logged step needs their
  collectives)."""
  workdir = str(tmp_path / "workdir")
  log_path = tmp_path / "launcher.log"
  with open(log_path, "w") as log:
    launcher = subprocess.Popen(
        ["bash", LAUNCHER, "2", f"--workdir={workdir}"] + ARGS + list(extra) +
        ["--config.train.steps=1000000"], cwd=ROOT, env=launcher_env(), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
  deadline = time.time() + 120
  while (not any(r["step"] >= 2 for r in metrics.read_metrics(workdir))
         and launcher.poll() is None and time.time() < deadline):
    time.sleep(0.2)
  assert launcher.poll() is None, log_path.read_text()[-4000:]
  assert any(r["step"] >= 2 for r in metrics.read_metrics(workdir)), "training did not start"
  processes = {arg: pid for pid in children(launcher.pid) for arg in cmdline(pid)
               if arg.startswith("--process_id=")}
  assert sorted(processes) == ["--process_id=0", "--process_id=1"]
  return launcher, log_path, workdir, processes


def stop_launch(launcher):
  try:
    os.killpg(launcher.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  launcher.wait(timeout=30)


def test_when_one_process_dies_the_launcher_stops_the_other_and_fails(tmp_path):
  """SIGKILL to process 1 mid-training: the launcher exits with its status within a bound, and
  process 0 (blocked in a collective with a dead peer) does not outlive it."""
  launcher, log_path, _, processes = start_training(tmp_path)
  try:
    os.kill(processes["--process_id=1"], signal.SIGKILL)
    code = launcher.wait(timeout=90)  # bounded: a survivor stuck in a collective is killed
    log = log_path.read_text()
    assert code == 128 + signal.SIGKILL, log[-4000:]
    assert f"exited with status {128 + signal.SIGKILL}; stopping the others" in log
    assert session_members(launcher.pid) == [], "no process of the launch may outlive it"
  finally:
    stop_launch(launcher)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_to_one_process_stops_every_process_at_one_saved_step(tmp_path, signum):
  """A preemption notice (SIGTERM) or Ctrl-C that reaches only process 0 (a maintenance event
  on one VM): both processes agree on one step through jax's preemption sync point, save it and
  exit 0, instead of one stopping while the other waits for it in the next step's collectives.
  Every step is a checkpoint step here, where the sync point must still be checked."""
  launcher, log_path, workdir, processes = start_training(
      tmp_path, ["--config.ckpt.every_steps=1"])
  try:
    seen = max(r["step"] for r in metrics.read_metrics(workdir))
    os.kill(processes["--process_id=0"], signum)
    code = launcher.wait(timeout=120)
    log = log_path.read_text()
    assert code == 0, log[-4000:]
    stopped = re.findall(r"Stopped by preemption notice at step (\d+);", log)
    assert len(stopped) == 2 and stopped[0] == stopped[1], log[-4000:]
    step = int(stopped[0])
    assert step > seen and committed_steps(workdir)[-1] == step
    assert max(r["step"] for r in metrics.read_metrics(workdir)) == step
  finally:
    stop_launch(launcher)


@pytest.mark.parametrize("num_processes", [2, 3])
def test_print_only_prints_one_command_per_process_and_starts_nothing(tmp_path, num_processes):
  workdir = tmp_path / "a workdir"  # a space, like the tuple below: arguments keep their quoting
  args = [f"--workdir={workdir}", f"--config={CONFIG}", "--config.optim.ema_decays=(0.9, 0.99)"]
  env = dict(os.environ, PRINT_ONLY="1", PORT="23456", PYTHON=sys.executable,
             DEVICES_PER_PROCESS="2")
  done = subprocess.run(["bash", LAUNCHER, str(num_processes)] + args, cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=30)
  assert done.returncode == 0, done.stderr
  lines = done.stdout.splitlines()
  assert len(lines) == num_processes
  for process_id, line in enumerate(lines):
    argv = shlex.split(line)
    assert argv[:3] == [sys.executable, "-m", "flowjax.main"]
    assert sorted(argv[3:-len(args)]) == sorted([
        "--coordinator_address=127.0.0.1:23456", f"--num_processes={num_processes}",
        f"--process_id={process_id}", "--num_cpu_devices=2"])
    assert argv[-len(args):] == args
  assert not workdir.exists()
