"""flowjax.bench: FLOPs from XLA's cost analysis against closed forms (a matmul, a convolution),
loops flagged as lower bounds, the peak table and the MFU arithmetic, the CPU probe, the XLA:CPU
flags it adds, the STARFlow bench preset, and one end-to-end run that writes every field."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from flowjax import bench, sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_matmul_costs_two_flops_per_multiply_add():
  m, k, n = 96, 80, 48
  compiled = jax.jit(jnp.matmul).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
  assert bench.compiled_flops(compiled) == (2.0 * m * k * n, True)


def test_a_convolution_costs_two_flops_per_multiply_add_of_its_window():
  """[B, H, W, C] * [3, 3, C, O], stride 1, 'valid': B H' W' O outputs of 9 C multiply-adds."""
  batch, size, channels, out = 2, 10, 5, 7
  x, kernel = jnp.ones((batch, size, size, channels)), jnp.ones((3, 3, channels, out))
  conv = lambda x, kernel: jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  flops, exact = bench.compiled_flops(jax.jit(conv).lower(x, kernel).compile())
  assert exact and flops == 2.0 * batch * (size - 2) ** 2 * out * 9 * channels


def test_a_loop_of_matmuls_is_counted_once_and_flagged():
  """XLA's analysis counts a while body once; the bench says so instead of reporting an MFU."""
  a = jnp.ones((64, 64))
  looped = jax.jit(lambda a: jax.lax.fori_loop(0, 10, lambda i, x: jnp.tanh(x @ a), a))
  flops, exact = bench.compiled_flops(looped.lower(a).compile())
  assert not exact and 2 * 64**3 <= flops < 10 * 2 * 64**3
  assert bench.utilisation(flops, exact, 1.0, 1e12)["mfu"] is None
  elementwise_loop = jax.jit(lambda a: jax.lax.fori_loop(0, 10, lambda i, x: jnp.tanh(x), a))
  assert bench.compiled_flops(elementwise_loop.lower(a).compile())[1]


def test_utilisation_is_flops_over_seconds_over_peak():
  assert bench.utilisation(3e12, True, 2.0, 1e12) == {
      "flops": 3e12, "flops_exact": True, "achieved_flops_per_sec": 1.5e12, "mfu": 1.5}
  assert bench.utilisation(1e9, True, 0.5, None)["mfu"] is None


@pytest.mark.parametrize("kind, dtype, precision, expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", "default", 989e12),
    ("NVIDIA H100 80GB HBM3", "float32", "default", 494.7e12),     # TF32 matmuls
    ("NVIDIA H100 80GB HBM3", "float32", "float32", 66.9e12),
    ("NVIDIA H100 PCIe", "bfloat16", "default", 756e12),           # not the SXM figure
    ("NVIDIA H200", "bfloat16", "default", 989e12),
    ("NVIDIA A100-SXM4-80GB", "float32", "tensorfloat32", 156e12),
    ("NVIDIA A100-SXM4-80GB", "float32", "bfloat16", 312e12),
    ("TPU v4", "float32", "default", 275e12),
    ("TPU v5 lite", "bfloat16", "default", 197e12),
    ("TPU v5", "bfloat16", "default", 459e12),
    ("TPU v6 lite", "bfloat16", "default", 918e12),
    ("cpu", "float32", "default", None),
])
def test_peak_flops_table(kind, dtype, precision, expected):
  assert bench.peak_flops(kind, dtype, precision) == expected


def test_the_cpu_probe_times_a_matmul():
  peak = bench.cpu_matmul_peak("float32", size=128, repeats=2)
  assert 1e8 < peak < 1e14  # a CPU between 0.1 GFLOP/s and 100 TFLOP/s


def test_starflow_bench_preset_is_the_tiny_pixel_model_of_the_pytorch_comparison():
  """32x32x3, patch 2, width 128, 2 heads of 64, blocks of 1, 1, 1 and 4 layers, unconditional:
  1,407,504 parameters, of which 1,792 are LayerNorm biases (14 per-layer norms of width 128)."""
  spec = importlib.util.spec_from_file_location(
      "starflow_imagenet", os.path.join(ROOT, "experiments", "starflow_imagenet.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("bench_tiny")
  model = config.model
  assert (model.patch_size, model.hidden_size, model.hidden_size // model.num_heads,
          model.num_blocks, model.layers_per_block, model.deep_layers) == (2, 128, 64, 4, 1, 4)
  params = train.build(config).abstract_state.params
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  assert sum(leaf.size for _, leaf in flat) == 1_407_504
  norm_biases = [leaf.size for path, leaf in flat
                 if "norm" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path)]
  assert sum(norm_biases) == 1_792


def test_the_bench_reports_flops_and_mfu_of_the_step_and_the_sampler(tmp_path):
  out = tmp_path / "result.json"
  done = subprocess.run(
      [sys.executable, "-m", "flowjax.bench", "--config=experiments/fm_toy2d.py",
       "--config.model.hidden_size=64", "--config.train.batch_size=64",
       "--config.sample.num=32", "--config.sample.num_steps=2", "--steps=2",
       "--sample_repeats=1", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result["command"].startswith("python -m flowjax.bench --config=experiments/fm_toy2d.py")
  assert len(result["commit"]) == 40 and result["seed"] == 0
  assert result["xla_flags_added_by_bench"] == list(sharding.CPU_XLA_FLAGS)
  assert result["peak_source"].startswith("measured") and result["peak_flops_per_sec"] > 0
  step = result["step_utilisation"]
  assert step["flops"] == result["step_flops"] > 0 and step["flops_exact"]
  # FLOPs / achieved FLOP/s is the median step time (rounded to 10 us in the result).
  assert abs(step["flops"] / step["achieved_flops_per_sec"] - result["step_seconds_median"]) < 1e-5
  assert step["mfu"] == pytest.approx(
      step["achieved_flops_per_sec"] / result["peak_flops_per_sec"], abs=1e-4)
  assert result["sample_utilisation"]["flops"] > 0


OBJECTIVE_COSTS = "experiments/results/objective_costs_toy2d_2cpu.json"


def test_objective_costs_time_every_experiment_against_the_first_and_give_ctm_a_teacher():
  overrides = bench.parse_overrides(["model.hidden_size=16", "model.depth=1",
                                     "train.batch_size=32", "model.num_heads=4"])
  assert overrides == {"model.hidden_size": 16, "model.depth": 1, "train.batch_size": 32,
                       "model.num_heads": 4}
  result = bench.objective_costs(["fm_toy2d", "ctm_toy2d"], overrides, steps=1, rounds=2)
  rows = {row["experiment"]: row for row in result["objectives"]}
  assert rows["fm_toy2d"]["ratio_rounds"] == [1.0, 1.0]
  for row in rows.values():
    assert row["batch_size"] == 32 and len(row["step_seconds_rounds"]) == 2
    # Each round's ratio is that round's step time over the first experiment's.
    base = rows["fm_toy2d"]["step_seconds_rounds"]
    assert row["ratio_rounds"] == pytest.approx(
        [m / b for m, b in zip(row["step_seconds_rounds"], base)], rel=0.02)
  assert rows["ctm_toy2d"]["objective"] == "ctm"
  # The shared overrides an experiment lacks (an MLP's num_heads) are left out, not errors, and
  # the others apply: 16 wide, one layer (5,618 parameters for flow matching against 1,188,098
  # in fm_toy2d's own MLP).
  for row in rows.values():
    assert row["num_params"] < 20_000, row
  with pytest.raises(Exception, match="KEY=VALUE"):
    bench.parse_overrides(["model.depth"])


def test_the_readme_objective_cost_table_is_generated_from_its_committed_file():
  with open(os.path.join(ROOT, OBJECTIVE_COSTS)) as f:
    record = json.load(f)
  names = [row["experiment"] for row in record["objectives"]]
  assert names[0] == "fm_toy2d" and {"tvm_toy2d", "imf_toy2d", "ctm_toy2d"} <= set(names)
  table = bench.objective_table(record)
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  assert table in readme, (
      f"The README's objective step-cost table differs from {OBJECTIVE_COSTS}; print it with "
      f"python -m flowjax.bench --report={OBJECTIVE_COSTS} and paste it.")
