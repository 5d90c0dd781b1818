"""Cluster launchers and multi-process start-up, without a cluster.

- launch/tpu_pod.sh and launch/gpu_multinode.sh in PRINT_ONLY=1 mode: the gcloud / srun /
  python commands they would run, with flowjax.main arguments (spaces, brackets) intact; missing
  required arguments are a usage error (exit 2). The run modes are exercised once each with fake
  gcloud / srun / scontrol / python executables.
- sharding.start_runtime calls jax.distributed.initialize only for an explicit coordinator or an
  environment that clearly is a multi-process cluster (jax.distributed.initialize is replaced;
  nothing is initialized).
"""

import os
import shlex
import subprocess

import jax
import pytest

from flowjax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(ROOT, "launch", "tpu_pod.sh")
GPU_MULTINODE = os.path.join(ROOT, "launch", "gpu_multinode.sh")
ARGS = ["--config=experiments/fm_toy2d.py:tiny", "--config.optim.ema_decays=(0.9, 0.99)",
        "--workdir=gs://bucket/run 1"]
CLUSTER_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "CLOUD_TPU_TASK_ID",
                "COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID", "PRINT_ONLY", "CREATE",
                "SETUP", "SYNC", "REPO_URL", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION",
                "FLOWJAX_SRUN_TASK", "PORT", "SRUN_ARGS", "PYTHON")


def clean_env(**extra):
  env = {k: v for k, v in os.environ.items()
         if k not in CLUSTER_VARS and not k.startswith("SLURM_")}
  env.update(extra)
  return env


def launch(script, args, **env):
  return subprocess.run(["bash", script, *args], env=clean_env(**env), capture_output=True,
                        text=True, timeout=30, cwd=ROOT)


def lines(result):
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def remote_command(argv):
  """The shell command that `gcloud ... ssh --command=...` runs on the workers, split."""
  (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return shlex.split(command)


def flowjax_args(argv):
  """Everything after `-m flowjax.main`."""
  i = argv.index("-m")
  assert argv[i + 1] == "flowjax.main"
  return argv[i + 2:]


# --- launch/tpu_pod.sh -------------------------------------------------------------------------

def test_tpu_pod_create_setup_run():
  out = lines(launch(TPU_POD, ["my-tpu", "us-central2-b", *ARGS], PRINT_ONLY="1", CREATE="1",
                     SETUP="1", ACCELERATOR_TYPE="v4-32", PROJECT="proj",
                     REPO_URL="https://example.com/flowjax.git"))
  assert all(argv[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] for argv in out)
  assert all("--zone=us-central2-b" in argv and "--project=proj" in argv for argv in out)
  create, clone, setup, run = out
  assert create[4:6] == ["create", "my-tpu"]
  assert "--accelerator-type=v4-32" in create
  assert any(a.startswith("--version=") for a in create)
  for argv in (clone, setup, run):
    assert argv[4:6] == ["ssh", "my-tpu"] and "--worker=all" in argv
  assert "https://example.com/flowjax.git" in remote_command(clone)
  setup_cmd = remote_command(setup)
  assert "venv" in setup_cmd and ".[tpu]" in setup_cmd
  run_cmd = remote_command(run)
  assert flowjax_args(run_cmd) == ARGS  # intact, and no coordinator flags on a pod


def test_tpu_pod_reuses_and_copies_local_checkout():
  out = lines(launch(TPU_POD, ["my-tpu", "europe-west4-a", *ARGS], PRINT_ONLY="1"))
  commands = [argv[:6] for argv in out]
  assert not any("create" in c for c in commands)  # reused, not created
  assert not any("pip install" in " ".join(argv) for argv in out)  # no SETUP=1, no set-up
  tar, scp, unpack, run = out
  assert tar[0] == "tar" and ROOT in tar
  assert scp[4] == "scp" and "--worker=all" in scp and scp[5] == tar[tar.index("-czf") + 1]
  assert "--worker=all" in unpack and "tar" in remote_command(unpack)
  assert "--worker=all" in run and flowjax_args(remote_command(run)) == ARGS
  # SYNC=0: only the run command.
  (run_only,) = lines(launch(TPU_POD, ["my-tpu", "europe-west4-a", *ARGS], PRINT_ONLY="1",
                             SYNC="0"))
  assert flowjax_args(remote_command(run_only)) == ARGS


def test_tpu_pod_runs_the_printed_commands(tmp_path):
  log = tmp_path / "gcloud.log"
  fake = tmp_path / "gcloud"
  fake.write_text(f'#!/bin/bash\nprintf "%q " "$@" >> {log}\necho >> {log}\n')
  fake.chmod(0o755)
  args = ["t", "z", *ARGS]
  env = dict(SETUP="1", REPO_URL="https://example.com/f.git",
             PATH=f"{tmp_path}:{os.environ['PATH']}")
  result = launch(TPU_POD, args, **env)
  assert result.returncode == 0, result.stderr
  ran = [["gcloud", *shlex.split(line)] for line in log.read_text().splitlines()]
  assert ran == lines(launch(TPU_POD, args, PRINT_ONLY="1", **env))


@pytest.mark.parametrize("args,env", [([], {}), (["my-tpu"], {}),
                                      (["my-tpu", "zone"], {"CREATE": "1"})])
def test_tpu_pod_usage_errors(args, env):
  result = launch(TPU_POD, args, PRINT_ONLY="1", **env)
  assert result.returncode == 2
  assert "usage:" in result.stderr and result.stdout == ""


# --- launch/gpu_multinode.sh -------------------------------------------------------------------

SLURM = dict(SLURM_JOB_ID="4242", SLURM_NTASKS="4", SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2",
             SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_PROCID="0")


def test_gpu_multinode_slurm_prints_srun():
  (srun,) = lines(launch(GPU_MULTINODE, ARGS, PRINT_ONLY="1", SRUN_ARGS="--gpus-per-node=8",
                         **SLURM))
  assert srun[0] == "srun"
  assert "--nodes=2" in srun and "--ntasks=2" in srun and "--ntasks-per-node=1" in srun
  assert "--gpus-per-node=8" in srun
  assert srun[-len(ARGS):] == ARGS


def fake_bin(tmp_path):
  """scontrol (two hosts), srun (two tasks with step variables) and a python that echoes."""
  (tmp_path / "scontrol").write_text("#!/bin/bash\necho gpu-a01\necho gpu-a02\n")
  (tmp_path / "srun").write_text(
      "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
      "for i in 0 1; do SLURM_NTASKS=2 SLURM_PROCID=$i SLURM_STEP_NODELIST='gpu-a[01-02]' "
      '"$@" || exit; done\n')
  (tmp_path / "python").write_text('#!/bin/bash\nprintf "%q " python "$@"; echo\n')
  for name in ("scontrol", "srun", "python"):
    (tmp_path / name).chmod(0o755)
  return dict(PATH=f"{tmp_path}:{os.environ['PATH']}", PYTHON=str(tmp_path / "python"))


def test_gpu_multinode_slurm_tasks_derive_flags(tmp_path):
  env = fake_bin(tmp_path)
  out = lines(launch(GPU_MULTINODE, ARGS, PORT="13000", **env, **SLURM))
  assert len(out) == 2
  for process_id, argv in enumerate(out):
    assert flowjax_args(argv) == ["--coordinator_address=gpu-a01:13000", "--num_processes=2",
                                  f"--process_id={process_id}", *ARGS]


def test_gpu_multinode_without_slurm_uses_env(tmp_path):
  (cmd,) = lines(launch(GPU_MULTINODE, ARGS, PRINT_ONLY="1", COORDINATOR_ADDRESS="node0:1234",
                        NUM_PROCESSES="3", PROCESS_ID="2"))
  assert cmd[0] == "python3"
  assert flowjax_args(cmd) == ["--coordinator_address=node0:1234", "--num_processes=3",
                               "--process_id=2", *ARGS]
  env = fake_bin(tmp_path)
  (ran,) = lines(launch(GPU_MULTINODE, ARGS, COORDINATOR_ADDRESS="node0:1234",
                        NUM_PROCESSES="3", PROCESS_ID="2", **env))
  assert flowjax_args(ran) == flowjax_args(cmd)


@pytest.mark.parametrize("env", [{}, {"COORDINATOR_ADDRESS": "n:1", "NUM_PROCESSES": "2"},
                                 {"COORDINATOR_ADDRESS": "n:1", "NUM_PROCESSES": "2",
                                  "PROCESS_ID": "2"}])
def test_gpu_multinode_usage_errors(env):
  result = launch(GPU_MULTINODE, ARGS, PRINT_ONLY="1", **env)
  assert result.returncode == 2
  assert "usage:" in result.stderr and result.stdout == ""


# --- sharding.start_runtime --------------------------------------------------------------------

@pytest.fixture
def initialize_calls(monkeypatch):
  """Replaces jax.distributed.initialize and clears every cluster variable from os.environ."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  for name in list(os.environ):
    if name in CLUSTER_VARS or name.startswith("SLURM_"):
      monkeypatch.delenv(name)
  return calls


@pytest.mark.parametrize("env", [
    {},
    {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"},
    {"SLURM_NTASKS": "2"},  # no job: not SLURM
    {"TPU_WORKER_HOSTNAMES": "localhost"},  # single-host TPU VM
    {"TPU_WORKER_HOSTNAMES": "localhost", "CLOUD_TPU_TASK_ID": "0"},
])
def test_start_runtime_single_process_never_initializes(initialize_calls, monkeypatch, env):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  sharding.start_runtime()
  sharding.start_runtime(None, "127.0.0.1:1234", 1, 0)  # explicit single process
  assert initialize_calls == []


@pytest.mark.parametrize("env", [
    {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"},
    {"TPU_WORKER_HOSTNAMES": "a,b"},
    {"CLOUD_TPU_TASK_ID": "3"},
])
def test_start_runtime_detects_clusters(initialize_calls, monkeypatch, env):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  sharding.start_runtime()
  assert initialize_calls == [((), {})]  # no arguments: JAX detects the cluster itself


def test_start_runtime_explicit_coordinator_wins(initialize_calls, monkeypatch):
  monkeypatch.setenv("SLURM_JOB_ID", "1")
  monkeypatch.setenv("SLURM_NTASKS", "8")
  sharding.start_runtime(None, "node0:1234", 2, 1)
  assert initialize_calls == [((), dict(coordinator_address="node0:1234", num_processes=2,
                                        process_id=1))]


# --- every launcher: the missing piece is named --------------------------------------------------

LOCAL = os.path.join(ROOT, "launch", "local_multiprocess.sh")


@pytest.mark.parametrize("script, lead", [(TPU_POD, ["t", "z"]), (GPU_MULTINODE, []),
                                          (LOCAL, ["2"])])
@pytest.mark.parametrize("drop, named", [("--config=", "--config=experiments/<name>.py"),
                                         ("--workdir=", "--workdir=DIR")])
def test_launchers_refuse_a_command_without_config_or_workdir(script, lead, drop, named):
  args = lead + [a for a in ARGS if not a.startswith(drop)]
  result = launch(script, args, PRINT_ONLY="1", COORDINATOR_ADDRESS="n:1", NUM_PROCESSES="2",
                  PROCESS_ID="0")
  assert result.returncode == 2 and result.stdout == ""
  assert f"the flowjax.main arguments lack {named}" in result.stderr


@pytest.mark.parametrize("env, named", [
    ({"NUM_PROCESSES": "2", "PROCESS_ID": "0"}, "COORDINATOR_ADDRESS is not set"),
    ({"COORDINATOR_ADDRESS": "node0", "NUM_PROCESSES": "2", "PROCESS_ID": "0"},
     "COORDINATOR_ADDRESS='node0' is not host:port"),
    ({"COORDINATOR_ADDRESS": "n:1", "PROCESS_ID": "0"}, "NUM_PROCESSES is not set"),
    ({"COORDINATOR_ADDRESS": "n:1", "NUM_PROCESSES": "two", "PROCESS_ID": "0"},
     "NUM_PROCESSES='two' is not a positive integer"),
    ({"COORDINATOR_ADDRESS": "n:1", "NUM_PROCESSES": "2"}, "PROCESS_ID is not set"),
    ({"COORDINATOR_ADDRESS": "n:1", "NUM_PROCESSES": "2", "PROCESS_ID": "-1"},
     "PROCESS_ID='-1' is not a non-negative integer"),
])
def test_gpu_multinode_names_the_variable_that_is_wrong(env, named):
  result = launch(GPU_MULTINODE, ARGS, PRINT_ONLY="1", **env)
  assert result.returncode == 2 and result.stdout == ""
  assert named in result.stderr
  others = {"COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID"} - {named.split("=")[0].split()[0]}
  assert not any(f"{other} is not set" in result.stderr for other in others if other in env)
