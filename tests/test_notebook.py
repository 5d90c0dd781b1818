"""The quickstart notebook runs top to bottom (at smoke size), and the notebook API and plot
command work on the workdirs it trains."""

import json
import os
import subprocess
import sys

import nbclient
import nbformat
import numpy as np
import pytest

from flowjax import api
from flowjax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "notebooks", "quickstart.ipynb")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """(notebook after execution, its workdirs directory)."""
  workdirs = str(tmp_path_factory.mktemp("notebook"))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  env = dict(os.environ, FLOWJAX_NOTEBOOK_SMOKE="1", FLOWJAX_NOTEBOOK_WORKDIRS=workdirs)
  old_env = dict(os.environ)
  os.environ.update(env)
  try:
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()
  finally:
    os.environ.clear()
    os.environ.update(old_env)
  return notebook, workdirs


def test_notebook_runs_and_shows_pictures(executed):
  notebook, workdirs = executed
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  # The 1/4/32-step comparison, the digits grid and the loss curves.
  assert len(images) >= 3
  for name in ("fm_toy2d", "quickstart"):
    assert os.path.exists(os.path.join(workdirs, name, "metrics.jsonl"))


def test_api_loads_a_workdir_and_samples_reproducibly(executed):
  _, workdirs = executed
  trained = api.load(os.path.join(workdirs, "quickstart"))
  config = api.get_config("quickstart", "tiny", overrides={"train.steps": 6})
  assert config_lib.fingerprint(trained.config) == config_lib.fingerprint(config)
  first = trained.sample(4, num_steps=2, seed=3, labels=[1, 2, 3, 4])
  again = trained.sample(4, num_steps=2, seed=3, labels=[1, 2, 3, 4])
  other = trained.sample(4, num_steps=2, seed=4, labels=[1, 2, 3, 4])
  assert first.shape == (4, 8, 8, 1) and np.isfinite(first).all()
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  with pytest.raises(ValueError, match="unconditional"):
    api.load(os.path.join(workdirs, "fm_toy2d")).sample(4, labels=[0, 1, 2, 3])


def test_train_resumes_to_more_steps(executed):
  _, workdirs = executed
  workdir = os.path.join(workdirs, "fm_toy2d")
  state = api.train(api.read_config(workdir), workdir, steps=8)
  assert int(state.step) == 8
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert steps == sorted(set(steps)) and steps[-1] == 8


def test_plot_command_writes_png(executed):
  _, workdirs = executed
  workdir = os.path.join(workdirs, "quickstart")
  result = subprocess.run([sys.executable, "-m", "flowjax.plot", f"--workdir={workdir}"],
                          capture_output=True, text=True, check=True)
  path = json.loads(result.stdout.strip().splitlines()[-1])["png"]
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  bad = subprocess.run([sys.executable, "-m", "flowjax.plot", f"--workdir={workdir}",
                        "--keys=los"], capture_output=True, text=True)
  assert bad.returncode == 1 and "los" in bad.stderr and "loss" in bad.stderr


def test_plot_compare_writes_the_figure_and_its_numbers(executed, tmp_path):
  """--compare draws two workdirs side by side and writes the window medians it plotted, with the
  command and commit, beside the PNG."""
  _, workdirs = executed
  runs = [os.path.join(workdirs, name) for name in ("quickstart", "fm_toy2d")]
  out = tmp_path / "fig.png"
  subprocess.run([sys.executable, "-m", "flowjax.plot", f"--compare={','.join(runs)}",
                  "--keys=loss,error", f"--out={out}", "--window=4"],
                 capture_output=True, text=True, check=True)
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  record = json.loads((tmp_path / "fig.json").read_text())
  assert "--compare=" in record["command"] and len(record["commit"]) >= 7
  quick = record["runs"]["quickstart"]
  rows = [json.loads(line) for line in open(os.path.join(runs[0], "metrics.jsonl"))]
  first = [r["loss"] for r in rows if r["step"] <= 4]
  assert quick["medians"]["loss"][0] == [1, pytest.approx(float(np.median(first)))]
  # The error of flow matching is its loss.
  assert quick["medians"]["error"] == quick["medians"]["loss"]


def test_config_json_round_trip_keeps_the_fingerprint():
  for name in ("quickstart", "imm_toy2d", "fm_imagenet"):
    config = api.get_config(name)
    again = config_lib.from_json(config_lib.to_json(config))
    assert config_lib.fingerprint(again) == config_lib.fingerprint(config)
    assert again.to_dict() == config.to_dict()
