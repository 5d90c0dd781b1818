"""The arena trains each method of a suite on one budget and writes its table and plot; the
README's arena tables are generated from committed result files, and a rerun of the smoke arena
reproduces its file."""

import json
import pathlib
import re

import pytest

from flowjax import arena, arena_report, config as config_lib, metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = "experiments/results/arena_toy2d_smoke.json"
# How far a rerun of the smoke arena may land from its committed file, relative: 8 fake devices
# and XLA's lower CPU optimisation level (this test suite's settings) against the 1 device of the
# command that wrote the file moved its numbers by about 1e-6; a change to training, sampling or
# evaluation moves them by percents.
RERUN_RTOL = 1e-3


def test_toy2d_arena_writes_table_and_plot(tmp_path, monkeypatch):
  suite = dict(arena.SUITES["toy2d"])
  # Flow matching, a method that distils it (its teacher is the arena's own FM run: DMD2, with
  # its two parameter sets) and the flow that samples in one pass of sequential calls; every other
  # method's tiny training run is a test of its own.
  suite["methods"] = {name: (experiment, [1], method, *extra)
                      for name, (experiment, _, method, *extra) in suite["methods"].items()
                      if name in ("flow_matching", "starflow", "dmd2")}
  suite["methods"]["starflow"] = suite["methods"]["starflow"][:3] + (
      {"model.hidden_size": 16, "model.num_blocks": 2},)
  suite["overrides"] = dict(suite["overrides"], **{"model.hidden_size": 32, "model.depth": 1,
                                                  "train.batch_size": 64, "train.log_every": 1,
                                                  "sample.num": 64})
  suite["num_samples"] = 256
  monkeypatch.setitem(arena.SUITES, "toy2d", suite)
  results = arena.run("toy2d", str(tmp_path), budget=2)
  # STARFlow's one pass on 2 tokens through 2 blocks is 4 sequential network calls.
  assert {(r.method, r.num_steps) for r in results} == {
      ("flow_matching", 1), ("starflow", 4), ("dmd2", 1)}
  table = (tmp_path / "arena.md").read_text()
  for method in suite["methods"]:
    assert f"| {arena_report.LABELS[method]} |" in table
  assert "| 1 step | 4 calls |" in table
  assert (tmp_path / "arena.png").stat().st_size > 1000
  assert (tmp_path / "arena_samples.png").stat().st_size > 1000
  assert (tmp_path / "arena_error.png").stat().st_size > 1000
  # The error curves are each method's logged unweighted error, step by step.
  curves = arena.error_curves(str(tmp_path), suite["methods"])
  for method in suite["methods"]:
    logged = [(r["step"], r["error"]) for r in metrics.read_metrics(str(tmp_path / method))]
    assert curves[arena_report.LABELS[method]] == logged and logged
  record = json.loads((tmp_path / "arena.json").read_text())
  (run,) = record["runs"]
  assert run["seeds"] == [0] and "commit" in run and run["machine"]["cpu_count"] >= 1
  assert len(record["floor"]["values"]) == arena.FLOOR_SEEDS
  for method in suite["methods"]:
    assert (tmp_path / method / "checkpoints" / "2").is_dir()


def test_heavy_tail_arena_compares_noise_laws_and_reports_the_tail_error(tmp_path, monkeypatch):
  suite = dict(arena.SUITES["toy2d_heavy"])
  suite["methods"] = {name: (experiment, [1], method, *extra)
                      for name, (experiment, _, method, *extra) in suite["methods"].items()
                      if name in ("flow_matching", "t_flow", "meanflow_t")}
  suite["overrides"] = dict(suite["overrides"], **{"model.hidden_size": 32, "model.depth": 1,
                                                  "train.batch_size": 64, "sample.num": 64})
  suite["num_samples"] = 256
  monkeypatch.setitem(arena.SUITES, "toy2d_heavy", suite)
  arena.run("toy2d_heavy", str(tmp_path), budget=2)
  noise = {}
  for method in suite["methods"]:
    saved = json.loads((tmp_path / method / "config.json").read_text())
    assert saved["data"]["toy_distribution"] == "student_t"
    noise[method] = (saved["objective"]["noise"], saved["objective"]["noise_nu"])
  assert noise["flow_matching"][0] == "gaussian"
  assert noise["t_flow"] == noise["meanflow_t"] == ("student_t", 3.0)
  record = json.loads((tmp_path / "arena.json").read_text())
  floors = record["extra_metrics"]["tail_error"]
  assert len(floors) == arena.FLOOR_SEEDS and all(f > 0 for f in floors)
  assert all("tail_error" in r["metrics"] for r in record["results"])
  table = (tmp_path / "arena.md").read_text()
  caption = arena_report.EXTRA_METRICS["tail_error"]
  assert f"{caption} (lower is better):" in table
  tail_table = table.split(caption)[1]
  for method in suite["methods"]:
    assert f"| {arena_report.LABELS[method]} |" in tail_table
  assert "Real-data floor of tail_error:" in tail_table


def test_text_arena_samples_from_captions_and_scores_their_digits():
  """The digits_text suite draws each sample from the caption features of the prompt it is
  scored against: sample i asks for digit i % 10 in style (i // 10) % 3, and the labels the
  classifier checks are those digits; a class-conditional source still gets cycling labels."""
  import numpy as np

  from flowjax import config as config_lib, data
  from flowjax.data import digits
  spec = arena.SUITES["digits_text"]
  assert set(spec["methods"]) == {"flow_matching", "meanflow", "starflow"}
  for experiment, *_ in spec["methods"].values():
    config = config_lib.load_experiment(str(ROOT / "experiments" / experiment))
    assert config.data.text.encoder == "words"
  config = config_lib.load_experiment(str(ROOT / "experiments" / "fm_digits_text.py"))
  info = data.data_info(config.data)
  conditions, labels = arena.sample_conditions(info, 60)
  assert labels.tolist() == [i % 10 for i in range(60)]
  captions = [digits.caption(i % 10, digits.STYLES[(i // 10) % 3]) for i in range(60)]
  assert captions[13] == "a handwritten three" and captions[27] == "a thick handwritten seven"
  np.testing.assert_array_equal(np.asarray(conditions), info.text.encode(captions))
  class_info = data.data_info(config_lib.load_experiment(
      str(ROOT / "experiments" / "quickstart.py")).data)
  conditions, labels = arena.sample_conditions(class_info, 12)
  assert np.asarray(labels).tolist() == [i % 10 for i in range(12)]
  record = {"suite": "digits_text", "metric": "fd", "conditioning": "text",
            "budget": {"train_steps": 2, "batch_size": 8, "num_samples": 4}, "methods": {},
            "runs": [], "results": [{"method": "flow_matching", "num_steps": 1, "nfe": 1,
                                     "seed": 0, "metrics": {"fd": 1.0, "accuracy": 0.5}}]}
  table = arena_report.markdown(record)
  assert "each method's own experiment's backbone" in table
  assert "against the digit their caption names" in table


def test_an_unknown_method_name_stops_before_anything_runs(tmp_path):
  import subprocess
  import sys
  done = subprocess.run([sys.executable, "-m", "flowjax.arena", "--suite=toy2d",
                         f"--workdir={tmp_path}", "--methods=meanflow,meenflow"],
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  assert "Unknown --methods entry of suite 'toy2d' 'meenflow'. Did you mean 'meanflow'?" in (
      done.stderr)
  assert "Traceback" not in done.stderr
  assert not any(tmp_path.iterdir())


def test_every_readme_arena_table_is_generated_from_its_committed_file():
  readme = (ROOT / "README.md").read_text()
  blocks = [m.group(1) for m in arena_report.BLOCK.finditer(readme)]
  assert SMOKE in blocks
  assert arena_report.readme_mismatches(readme, str(ROOT)) == []
  for path in re.findall(r"\]\((experiments/gallery/[\w.-]+\.png)\)", readme):
    assert (ROOT / path).is_file(), f"README shows {path}, which is not committed"


def test_a_readme_table_left_behind_or_a_missing_file_is_reported():
  readme = (ROOT / "README.md").read_text()
  block = next(m for m in arena_report.BLOCK.finditer(readme) if m.group(1) == SMOKE)
  row = next(line for line in block.group(2).splitlines() if line.startswith("| flow matching"))
  number = re.search(r"\d\.\d+", row).group()
  moved = number[:-1] + str((int(number[-1]) + 1) % 10)
  planted = readme.replace(row, row.replace(number, moved, 1))
  (problem,) = arena_report.readme_mismatches(planted, str(ROOT))
  assert SMOKE in problem and moved in problem and "--readme=README.md" in problem
  renamed = readme.replace(f"<!-- arena report: {SMOKE} -->", "<!-- arena report: gone.json -->")
  assert "gone.json, which does not exist" in arena_report.readme_mismatches(renamed, str(ROOT))[0]


def test_the_smoke_arena_reproduces_its_committed_result_file(tmp_path):
  committed = arena_report.load(str(ROOT / SMOKE))
  seeds = max(r["seed"] for r in committed["results"]) + 1
  assert seeds >= 2
  arena.run(committed["suite"], str(tmp_path), seeds=seeds)
  rerun = arena_report.load(str(tmp_path / "arena.json"))
  assert rerun["budget"] == committed["budget"] and rerun["methods"] == committed["methods"]
  assert arena_report.differences(committed, rerun, RERUN_RTOL, 0.0) == [], (
      "The smoke arena no longer reproduces its committed numbers. If the change is meant to move "
      f"them, refresh the file and the README: python -m flowjax.arena --suite=toy2d_smoke "
      f"--workdir=workdirs/arena_toy2d_smoke --seeds={seeds} && cp "
      f"workdirs/arena_toy2d_smoke/arena.json {SMOKE} && python -m flowjax.arena "
      f"--report={SMOKE} --readme=README.md")
  # Seed 0 keeps the single-seed layout; seed k trains in DIR/seed_<k>/<method>.
  steps = str(committed["budget"]["train_steps"])
  for method in committed["methods"]:
    assert (tmp_path / method / "checkpoints" / steps).is_dir()
    assert (tmp_path / f"seed_{seeds - 1}" / method / "checkpoints" / steps).is_dir()


def test_differences_report_a_moved_number_and_a_missing_record():
  committed = arena_report.load(str(ROOT / SMOKE))
  assert arena_report.differences(committed, committed, 0.0, 0.0) == []
  moved = json.loads(json.dumps(committed))
  moved["results"][0]["metrics"]["energy_distance"] *= 1.01
  (problem,) = arena_report.differences(committed, moved, RERUN_RTOL, 0.0)
  assert "energy_distance" in problem
  assert arena_report.differences(committed, moved, 0.02, 0.0) == []
  del moved["results"][-1]
  assert any("only in the committed file" in p
             for p in arena_report.differences(committed, moved, 0.02, 0.0))


def test_the_header_names_only_the_smaller_seed_counts():
  record = arena_report.load(str(ROOT / "experiments/results/arena_digits28.json"))
  single = next(r for r in record["results"] if r["method"] == "flow_matching")
  record["results"] = [r for r in record["results"] if r["method"] == "flow_matching"] + [
      dict(single, method="shortcut", seed=0)]
  header = arena_report.markdown(record).split("\n\n")[0]
  assert "over 3 seeds" in header and "Some entries have fewer seeds (1);" in header, header
  assert "(1 seed)" in arena_report.markdown(record) and "(1 seeds)" not in arena_report.markdown(
      record)
  record["results"] = record["results"][:-1]
  assert "fewer seeds" not in arena_report.markdown(record)


def test_every_method_has_a_row_name_and_the_guided_imm_row_trains_imm():
  for suite, spec in arena.SUITES.items():
    assert set(spec["methods"]) <= set(arena_report.LABELS), suite
  assert "imm_guided" in arena.SUITES["digits28"]["methods"]
  assert "imm_guided" not in arena.SUITES["digits"]["methods"]
  imm, guided, a2 = (arena.method_config("digits28", m, 1, 1500, "/w")
                     for m in ("imm", "imm_guided", "imm_a2"))
  # The same training (sample.* may change on resume, so it is not part of the identity) ...
  assert config_lib.identity(guided) == config_lib.identity(imm)
  assert config_lib.identity(a2) != config_lib.identity(imm)
  # ... sampled with more guidance, at the suite's size.
  assert (guided.sample.guidance, imm.sample.guidance) == (5.0, 1.5)
  assert (imm.data.image_size, imm.objective.weight_a, a2.objective.weight_a) == (28, 1.0, 2.0)


def test_statistics_and_which_entries_the_seeds_tell_apart():
  s = arena_report.statistics([1.0, 2.0, 3.0])
  assert (s["mean"], s["std"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 1.0, 3.0, 3)
  assert arena_report.statistics([5.0])["std"] is None
  column = {"a": arena_report.statistics([1.0, 1.2]), "b": arena_report.statistics([1.2, 1.4]),
            "c": arena_report.statistics([3.0, 3.2])}
  # b is 0.2 above a, both with a standard deviation of 0.14: within twice the spread; c is not.
  assert arena_report.resolved_best(column) == {"a", "b"}
  assert arena_report.resolved_best(column, lower_is_better=False) == {"c"}
  single = {m: arena_report.statistics([s["min"]]) for m, s in column.items()}
  assert arena_report.resolved_best(single) == {"a"}
  # A single-seed entry beside a spread: compared within twice the spread that is known.
  mixed = dict(column, b=arena_report.statistics([1.3]), d=arena_report.statistics([1.5]))
  assert arena_report.resolved_best(mixed) == {"a", "b"}


def test_first_seed_trains_only_the_later_seeds_and_keeps_the_earlier_results(tmp_path,
                                                                              monkeypatch):
  """--first_seed=1 --seeds=2 trains seed 1 alone (seed 0's run is not retrained, even when its
  directory is gone) and the result file keeps seed 0's records with the run that made them."""
  import shutil
  suite = dict(arena.SUITES["toy2d"])
  suite["methods"] = {"flow_matching": ("fm_toy2d.py", [1], "euler")}
  suite["overrides"] = dict(suite["overrides"], **{"model.hidden_size": 16, "model.depth": 1,
                                                  "train.batch_size": 32, "sample.num": 16})
  suite["num_samples"] = 64
  monkeypatch.setitem(arena.SUITES, "toy2d", suite)
  arena.run("toy2d", str(tmp_path), budget=2, command="first")
  shutil.rmtree(tmp_path / "flow_matching")
  results = arena.run("toy2d", str(tmp_path), budget=2, seeds=2, command="second", first_seed=1)
  assert not (tmp_path / "flow_matching").exists()
  assert (tmp_path / "seed_1" / "flow_matching" / "checkpoints" / "2").is_dir()
  assert sorted((r.seed, r.run) for r in results) == [(0, 0), (1, 1)]
  record = json.loads((tmp_path / "arena.json").read_text())
  assert [(run["command"], run["seeds"]) for run in record["runs"]] == [("first", [0]),
                                                                      ("second", [1])]
  with pytest.raises(ValueError, match="first_seed"):
    arena.run("toy2d", str(tmp_path), budget=2, seeds=2, first_seed=2)


def test_earlier_results_keep_other_methods_and_seeds_with_their_commands(tmp_path):
  record = lambda method, seed, run: dict(method=method, num_steps=1, nfe=1, train_steps=2,
                                          metrics={"energy_distance": 0.1}, seed=seed, run=run)
  (tmp_path / "arena.json").write_text(json.dumps({
      "runs": [{"command": "first"}, {"command": "second"}],
      "results": [record("flow_matching", 0, 0), record("ctm", 0, 1), record("ctm", 1, 1),
                  dict(record("ctm", 0, 1), train_steps=3)]}))
  kept, runs = arena.earlier_results(str(tmp_path), 2, {("flow_matching", 0), ("ctm", 0)})
  assert [(r.method, r.seed, r.run) for r in kept] == [("ctm", 1, 0)]
  assert runs == [{"command": "second"}]
  # An arena.json from before result files had headers: a list of seed-0 records.
  (tmp_path / "arena.json").write_text(json.dumps([
      {k: v for k, v in record("imm", 0, 0).items() if k not in ("seed", "run")}]))
  kept, runs = arena.earlier_results(str(tmp_path), 2, set())
  assert [(r.method, r.seed, r.run) for r in kept] == [("imm", 0, None)] and runs == []


def test_report_prints_a_result_file_and_rewrites_its_readme_block(tmp_path, capsys,
                                                                   monkeypatch):
  arena.main([f"--report={ROOT / SMOKE}"])
  text = capsys.readouterr().out
  assert text == arena_report.markdown(arena_report.load(str(ROOT / SMOKE)))
  assert "± " in text and "--seeds=" in text
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n<!-- arena report: {SMOKE} -->\nold\n<!-- end arena report -->\nend\n")
  monkeypatch.chdir(ROOT)
  arena.main([f"--report={SMOKE}", f"--readme={readme}"])
  assert readme.read_text() == f"intro\n{arena_report.readme_block(SMOKE, text)}\nend\n"
  assert arena_report.readme_mismatches(readme.read_text(), str(ROOT)) == []


def test_provenance_counts_code_changes_but_not_written_results(tmp_path, monkeypatch):
  """A result file or picture written into experiments/ does not mark the tree as changed (the
  next bench of a series runs the same code); any other change does."""
  import subprocess

  from flowjax import provenance

  def git(*args):
    subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

  git("init", "-q")
  (tmp_path / "code.py").write_text("x = 1\n")
  for folder in ("experiments/results", "experiments/gallery"):
    (tmp_path / folder).mkdir(parents=True)
    (tmp_path / folder / "old").write_text("0\n")
  git("add", "-A")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
  monkeypatch.setattr(provenance, "_ROOT", str(tmp_path))
  assert provenance.commit()["uncommitted_changes"] is False
  (tmp_path / "experiments" / "results" / "old").write_text("1\n")
  (tmp_path / "experiments" / "results" / "new.json").write_text("{}\n")
  (tmp_path / "experiments" / "gallery" / "new.png").write_bytes(b"png")
  state = provenance.commit()
  assert state["uncommitted_changes"] is False and len(state["commit"]) == 40
  (tmp_path / "experiments" / "notes.txt").write_text("a change\n")
  assert provenance.commit()["uncommitted_changes"] is True
  (tmp_path / "experiments" / "notes.txt").unlink()
  (tmp_path / "code.py").write_text("x = 2\n")
  assert provenance.commit()["uncommitted_changes"] is True


def test_samples_figure_draws_only_the_methods_whose_runs_are_in_the_workdir(tmp_path):
  """Results kept from an earlier workdir (no DIR/<method>/samples) get no empty row."""
  from PIL import Image
  (tmp_path / "tvm" / "samples").mkdir(parents=True)
  for n in (1, 2):
    Image.new("L", (16, 16), 128).save(tmp_path / "tvm" / "samples" / f"arena_{n}_steps.png")
  entries = {n: {"metrics": {"fd": 1.0}} for n in (1, 2)}
  drawn = arena.samples_figure(str(tmp_path / "samples.png"), str(tmp_path),
                               {"imm": entries, "tvm": entries, "ctm": entries}, "fd")
  assert drawn == ["tvm"]
  assert Image.open(tmp_path / "samples.png").size[1] <= 250  # one row of 2.0 inches at 100 dpi
  assert arena.samples_figure(str(tmp_path / "none.png"), str(tmp_path), {"imm": entries},
                              "fd") == []
