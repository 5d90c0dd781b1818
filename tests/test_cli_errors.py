"""Bad input to `python -m flowjax.main` is one message naming the problem and the fix, before
anything compiles or trains; `--help` shows the override syntax; `python -m flowjax.catalog`
lists what a config may name."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, timeout=120):
  return subprocess.run([sys.executable, "-m"] + args, cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("config, overrides, code, message", [
    ("experiments/nope.py", [], 2, "FATAL --config: no experiment file 'experiments/nope.py'"),
    ("experiments/fm_toy2d.py:tiny", ["--config.objective.name=meanflow"], 1,
     "ConfigError: config.objective.name='meanflow' reads keys that config.objective does not "
     "have: adaptive_eps"),
    ("experiments/fm_toy2d.py:tiny", ["--config.model.name=dit"], 1,
     "ConfigError: config.model.name='dit' reads keys that config.model does not have"),
    ("experiments/fm_toy2d.py:tiny", ["--config.sample.method=eulr"], 1,
     "ConfigError: config.sample (method='eulr', num_steps=4, guidance=1.0): Unknown ODE method "
     "'eulr'. Did you mean 'euler'?"),
    ("experiments/quickstart.py:tiny", ["--config.data.name=tfds:doesnotexist"], 1,
     "ConfigError: Unknown TFDS dataset in data.name='tfds:doesnotexist'"),
])
def test_bad_input_is_one_message_before_compiling(tmp_path, config, overrides, code, message):
  done = run(["flowjax.main", f"--config={config}", f"--workdir={tmp_path / 'w'}",
              "--num_cpu_devices=1"] + overrides)
  assert done.returncode == code, done.stderr[-3000:]
  assert message in done.stderr, done.stderr[-3000:]
  assert "Traceback" not in done.stderr
  assert "Compiled the train step" not in done.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_help_shows_the_override_syntax_and_the_catalog():
  done = run(["flowjax.main", "--help"])
  assert "--config.SECTION.KEY=VALUE" in done.stdout + done.stderr
  assert "flowjax.catalog" in done.stdout + done.stderr


def test_catalog_lists_experiments_presets_objectives_models_and_data():
  done = run(["flowjax.catalog"])
  assert done.returncode == 0, done.stderr
  lines = done.stdout.splitlines()
  quickstart = [line for line in lines if line.split()[:1] == ["quickstart"]]
  assert quickstart and "flow_matching" in quickstart[0] and "dit" in quickstart[0]
  assert "presets: tiny" in quickstart[0]
  fm_imagenet = [line for line in lines if line.split()[:1] == ["fm_imagenet"]][0]
  assert "presets: B, XL, tiny" in fm_imagenet
  objectives = [line for line in lines if line.startswith("Objectives: ")][0]
  assert all(name in objectives for name in ("flow_matching", "imm", "meanflow", "shortcut",
                                             "ctm", "consistency", "starflow"))
  assert "Models: " in done.stdout and "tarflow" in done.stdout
  assert "Data sources (data.name): digits, synthetic, toy2d, tfds:<name>, latents:<DIR>" in (
      done.stdout)


TINY = ["flowjax.main", "--config=experiments/fm_toy2d.py:tiny", "--num_cpu_devices=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir of fm_toy2d:tiny trained to its end through the command line; tests copy it."""
  workdir = tmp_path_factory.mktemp("trained") / "w"
  done = run(TINY + [f"--workdir={workdir}"])
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


def copy_of(trained, tmp_path, name):
  return shutil.copytree(trained, tmp_path / name)


def test_sample_mode_on_a_workdir_of_another_config_names_the_differences(tmp_path, trained):
  workdir = copy_of(trained, tmp_path, "w")
  other = run(["flowjax.main", "--config=experiments/quickstart.py:tiny", f"--workdir={workdir}",
               "--num_cpu_devices=1", "--mode=sample"])
  assert other.returncode == 1
  assert f"WorkdirError: --workdir={workdir} was trained with a different config" in other.stderr
  assert "model.name: 'mlp' -> 'dit'" in other.stderr
  assert "Traceback" not in other.stderr and "cannot be restored" not in other.stderr
  same = run(TINY + [f"--workdir={workdir}", "--mode=sample"])
  assert same.returncode == 0, same.stderr[-3000:]
  assert os.path.exists(os.path.join(workdir, "samples", "final.png"))


def test_init_from_a_run_of_other_shapes_lists_the_differences(tmp_path, trained):
  source = copy_of(trained, tmp_path, "source")
  done = run(TINY + [f"--workdir={tmp_path / 'new'}", f"--config.ckpt.init_from={source}",
                     "--config.model.hidden_size=64"])
  assert done.returncode == 1
  assert f"CheckpointError: ckpt.init_from='{source}': the parameters of its step 4 do not fit " \
         "this model" in done.stderr, done.stderr[-3000:]
  assert "['in']['kernel']: checkpoint (2, 32), model (2, 64)" in done.stderr
  assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr


def test_resuming_a_run_of_other_shapes_lists_them_and_moves_nothing(tmp_path, trained):
  workdir = copy_of(trained, tmp_path, "w")
  base = TINY + [f"--workdir={workdir}"]
  done = run(base + ["--allow_config_change", "--config.model.hidden_size=64"])
  assert done.returncode == 1
  assert "holds parameters of other shapes than this config's model" in done.stderr, (
      done.stderr[-3000:])
  assert "['in']['kernel']: checkpoint (2, 32), model (2, 64)" in done.stderr
  assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
