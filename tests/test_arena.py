"""The arena trains each method of a suite on one budget and writes its table and plot."""

import json

from flowjax import arena


def test_toy2d_arena_writes_table_and_plot(tmp_path, monkeypatch):
  suite = dict(arena.SUITES["toy2d"])
  # Flow matching, the method that distils it (its teacher is the arena's own FM run) and the
  # flow that samples in one pass of sequential calls; every other method's tiny training run is
  # a test of its own.
  suite["methods"] = {name: (experiment, [1], method, *extra)
                      for name, (experiment, _, method, *extra) in suite["methods"].items()
                      if name in ("flow_matching", "ctm", "starflow")}
  suite["methods"]["starflow"] = suite["methods"]["starflow"][:3] + (
      {"model.hidden_size": 16, "model.num_blocks": 2},)
  suite["overrides"] = dict(suite["overrides"], **{"model.hidden_size": 32, "model.depth": 1,
                                                  "train.batch_size": 64})
  suite["num_samples"] = 256
  monkeypatch.setitem(arena.SUITES, "toy2d", suite)
  results = arena.run("toy2d", str(tmp_path), budget=2)
  # STARFlow's one pass on 2 tokens through 2 blocks is 4 sequential network calls.
  assert {(r.method, r.num_steps) for r in results} == {
      ("flow_matching", 1), ("ctm", 1), ("starflow", 4)}
  table = (tmp_path / "arena.md").read_text()
  for method in suite["methods"]:
    assert f"| {method} |" in table
  assert (tmp_path / "arena.png").stat().st_size > 1000
  assert (tmp_path / "arena_samples.png").stat().st_size > 1000
  records = json.loads((tmp_path / "arena.json").read_text())
  assert all(r["metrics"]["energy_distance"] >= 0 for r in records)
  for method in suite["methods"]:
    assert (tmp_path / method / "checkpoints" / "2").is_dir()


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
