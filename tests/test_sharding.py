"""Sharding: parameters placed as the logical-axis rules say, rule validation and gradient
accumulation (8 fake CPU devices from conftest). That every mesh layout computes the 1-device
gradients and losses is tests/test_mesh_equivalence.py."""

import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from flowjax import config as config_lib
from flowjax import data, models, objectives, sharding, step as step_lib, train
from flowjax.state import TrainState

NUM_STEPS = 4  # the first step must agree to 1e-5, the next ones to 1e-3
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]


def tiny_dit_config(mesh=(-1, 1, 1)):
  """Class-conditional flow matching with a DiT (hidden 32, 2 heads) on 8x8 digits."""
  c = config_lib.base_config()
  c.objective = objectives.default_config("flow_matching")
  c.objective.time_sampler = "logit_normal"
  c.model = models.default_config("dit")
  c.model.update(dict(patch_size=2, hidden_size=32, depth=1, num_heads=2, mlp_ratio=2.0))
  c.data.update(dict(name="digits", conditional=True, image_size=8, prefetch=0))
  c.optim.update(dict(lr=1e-3, ema_decays=(0.9,)))
  c.train.update(dict(steps=NUM_STEPS, batch_size=16))
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  return c.lock()


# Only LLVM's optimisation level: halves the CPU compile time, changes no partitioning pass.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.lru_cache(maxsize=None)
def run_steps(mesh):
  """(setup, init shardings, final state, losses) of NUM_STEPS steps on `mesh` (None: 1 device).

  Like train.run: init and step are compiled ahead of time (lower().compile()) and run under
  train.context; the same seed gives the same global batches on every mesh.
  """
  if mesh is None:
    setup = train.build(tiny_dit_config(), devices=jax.devices()[:1])
  else:
    setup = train.build(tiny_dit_config(mesh))
  config = setup.config
  batches = data.build(config.data, split="train", global_batch_size=config.train.batch_size,
                       seed=config.seed, sharding=sharding.batch_sharding(setup.mesh))
  losses = []
  with train.context(setup):
    init = setup.init_fn.lower().compile(compiler_options=FAST_COMPILE)
    step = setup.train_step.lower(setup.abstract_state, setup.batch_spec).compile(
        compiler_options=FAST_COMPILE)
    state = init()
    init_shardings = jax.tree.map(lambda x: x.sharding, state)
    for _ in range(NUM_STEPS):
      state, metrics = step(state, next(batches))
      losses.append(float(metrics["loss"]))
  batches.close()
  return setup, init_shardings, state, losses


def spec_of(x):
  """The PartitionSpec with trailing Nones dropped (P('fsdp', None) == P('fsdp'))."""
  spec = list(x.sharding.spec)
  while spec and spec[-1] is None:
    spec.pop()
  return tuple(spec)


@pytest.mark.parametrize("mesh", MESHES[1:], ids=lambda m: "x".join(map(str, m)))
def test_init_places_the_state_on_the_declared_shardings(mesh):
  setup, init_shardings, state, _ = run_steps(mesh)
  for declared, initial, final in zip(jax.tree.leaves(setup.state_shardings),
                                      jax.tree.leaves(init_shardings),
                                      jax.tree.leaves(state)):
    assert initial.is_equivalent_to(declared, len(final.shape))
    assert final.sharding.is_equivalent_to(declared, final.ndim)


@pytest.mark.parametrize("mesh, expected, divisors", [
    ((2, 4, 1), ("fsdp",), (4, 1)),
    ((2, 2, 2), ("fsdp", "tensor"), (2, 2)),
])
def test_embed_mlp_kernels_follow_the_rules(mesh, expected, divisors):
  _, _, state, _ = run_steps(mesh)
  # ('embed', 'mlp') kernels: the MLP's fc1 [D, mlp] and the adaLN modulation [D, 6D].
  for kernel in (state.params["block_0"]["mlp"]["fc1"]["kernel"],
                 state.params["block_0"]["adaLN_modulation"]["kernel"]):
    assert spec_of(kernel) == expected
    shard_shape = (kernel.shape[0] // divisors[0], kernel.shape[1] // divisors[1])
    assert len(kernel.addressable_shards) == 8
    assert all(shard.data.shape == shard_shape for shard in kernel.addressable_shards)
    # Each device holds 1/4 of the kernel, and the shards put together give it back.
    assert math.prod(shard_shape) * 4 == kernel.size
    full = np.zeros(kernel.shape, np.float32)
    for shard in kernel.addressable_shards:
      full[shard.index] = np.asarray(shard.data)
    np.testing.assert_array_equal(full, np.asarray(kernel))


def test_attention_heads_use_the_tensor_axis():
  _, _, state, _ = run_steps((2, 2, 2))
  attn = state.params["block_0"]["attn"]
  for name in ("query", "key", "value"):  # ('embed', 'heads')
    assert spec_of(attn[name]["kernel"]) == ("fsdp", "tensor")
    assert spec_of(attn[name]["bias"]) == ("tensor",)
  assert spec_of(attn["out"]["kernel"]) == ("tensor", "fsdp")  # ('heads', 'embed')


@pytest.mark.parametrize("mesh", MESHES[1:], ids=lambda m: "x".join(map(str, m)))
def test_optimizer_state_and_ema_follow_the_params(mesh):
  _, _, state, _ = run_steps(mesh)
  param_specs = jax.tree.map(spec_of, state.params)
  adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: hasattr(s, "mu"))
          if hasattr(s, "mu")]
  assert len(adam) == 1
  assert jax.tree.map(spec_of, adam[0].mu) == param_specs
  assert jax.tree.map(spec_of, adam[0].nu) == param_specs
  assert spec_of(adam[0].count) == ()
  assert set(state.ema) == {"0.9"}
  assert jax.tree.map(spec_of, state.ema["0.9"]) == param_specs
  # Something really is sharded (not everything replicated).
  assert any(spec for spec in jax.tree.leaves(param_specs, is_leaf=lambda s: isinstance(s, tuple)))


@pytest.mark.parametrize("mesh", MESHES[1:], ids=lambda m: "x".join(map(str, m)))
def test_counters_are_replicated(mesh):
  _, _, state, _ = run_steps(mesh)
  for counter in (state.step, state.skipped):
    assert counter.sharding.is_fully_replicated
    assert counter.shape == ()


# logical_to_sharding without a model.

@pytest.fixture(scope="module")
def mesh_224():
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))


def test_logical_to_sharding_follows_the_default_rules(mesh_224):
  rules = config_lib.DEFAULT_RULES
  spec = lambda names, shape: sharding.logical_to_sharding(names, shape, mesh_224, rules).spec
  assert spec(("embed", "mlp"), (8, 16)) == P("fsdp", "tensor")
  assert spec(("mlp", "embed"), (16, 8)) == P("tensor", "fsdp")
  assert spec(("batch", "embed"), (8, 8)) == P(("data", "fsdp"), None)  # fsdp used once only
  assert spec(("conv_in", "embed"), (12, 8)) == P(None, "fsdp")
  assert spec(None, (4, 4)) == P(None, None)
  assert spec(("embed",), (8, 3)) == P("fsdp", None)  # unnamed trailing dims are replicated


def test_logical_to_sharding_replicates_dims_the_mesh_does_not_divide(mesh_224):
  rules = config_lib.DEFAULT_RULES
  spec = lambda names, shape: sharding.logical_to_sharding(names, shape, mesh_224, rules).spec
  assert spec(("embed", "mlp"), (3, 16)) == P(None, "tensor")
  assert spec(("embed", "mlp"), (8, 3)) == P("fsdp", None)
  assert spec(("batch",), (6,)) == P(None)  # 6 rows over data x fsdp = 4
  # A replicated dim does not use up its mesh axis: the next dim may still take it.
  custom = (("embed", "fsdp"), ("mlp", "fsdp"))
  assert sharding.logical_to_sharding(("embed", "mlp"), (3, 8), mesh_224, custom).spec == P(
      None, "fsdp")


def test_mesh_axes_of_size_one_are_not_used():
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1)))
  s = sharding.logical_to_sharding(("embed", "mlp"), (8, 16), mesh, config_lib.DEFAULT_RULES)
  assert s.spec == P("fsdp", None)
  assert s.shard_shape((8, 16)) == (2, 16)


def test_make_mesh_fills_minus_one_and_rejects_a_bad_product():
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=1)))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(ValueError, match="needs"):
    sharding.make_mesh(ml_collections.ConfigDict(dict(data=3, fsdp=2, tensor=1)))


def test_batch_sharding_splits_rows_over_data_and_fsdp():
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  s = sharding.batch_sharding(mesh)
  assert s.shard_shape((16, 8, 8, 3)) == (4, 8, 8, 3)


# Gradient accumulation.

def test_split_microbatches_is_a_permutation_of_the_rows():
  batch = {"image": jnp.arange(12 * 3).reshape(12, 3), "label": jnp.arange(12)}
  micro = step_lib._split_microbatches(batch, 3)
  assert micro["image"].shape == (3, 4, 3)
  assert micro["label"].shape == (3, 4)
  rows = np.asarray(micro["label"]).reshape(-1)
  np.testing.assert_array_equal(np.sort(rows), np.arange(12))
  # Images stay with their labels.
  np.testing.assert_array_equal(np.asarray(micro["image"])[..., 0], 3 * np.asarray(micro["label"]))
  # Each microbatch takes one row out of every `num` consecutive rows (a device's rows stay local).
  for j in range(3):
    np.testing.assert_array_equal(np.asarray(micro["label"][j]), np.arange(j, 12, 3))


class MeanObjective:
  """loss = mean((x - w)^2) with no randomness; metric `u` = a uniform draw from the key."""

  def loss(self, params, batch, rng, step, view):
    del step, view
    loss = jnp.mean(jnp.square(batch["image"] - params["w"]))
    return loss, {"u": jax.random.uniform(rng), "rows": jnp.sum(batch["label"])}


def accumulation_run(accum):
  train_config = ml_collections.ConfigDict(dict(grad_accum_steps=accum))
  optim_config = ml_collections.ConfigDict(dict(ema_decays=(0.5,), ema_start_step=0))
  tx = optax.sgd(0.1)
  step_rng = jax.random.key(3)
  step_fn = jax.jit(step_lib.make_train_step(MeanObjective(), tx, optax.constant_schedule(0.1),
                                             optim_config, train_config, step_rng))
  params = {"w": jnp.zeros((3,))}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     ema={"0.5": params}, extra={}, skipped=jnp.zeros((), jnp.int32))
  batch = {"image": jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3) / 10,
           "label": jnp.arange(8)}
  new_state, metrics = step_fn(state, batch)
  return new_state, metrics, step_rng


def test_gradient_accumulation_matches_one_big_batch_for_a_deterministic_loss():
  one, metrics_one, _ = accumulation_run(1)
  two, metrics_two, step_rng = accumulation_run(2)
  assert int(one.step) == int(two.step) == 1  # one update, not one per microbatch
  np.testing.assert_allclose(metrics_two["loss"], metrics_one["loss"], rtol=1e-6)
  np.testing.assert_allclose(two.params["w"], one.params["w"], rtol=1e-6)
  np.testing.assert_allclose(two.ema["0.5"]["w"], one.ema["0.5"]["w"], rtol=1e-6)
  assert np.abs(np.asarray(one.params["w"])).min() > 0  # the update did something
  # Every row was seen exactly once over the microbatches (the metric is their mean).
  assert float(metrics_two["rows"]) * 2 == sum(range(8))
  # Microbatch j draws from fold_in(step key, j); the metric is the mean over microbatches.
  step_key = jax.random.fold_in(step_rng, 0)
  expected_u = np.mean([float(jax.random.uniform(jax.random.fold_in(step_key, j)))
                        for j in range(2)])
  np.testing.assert_allclose(metrics_two["u"], expected_u, rtol=1e-6)
  np.testing.assert_allclose(metrics_one["u"], float(jax.random.uniform(step_key)), rtol=1e-6)


def test_gradient_accumulation_validation_names_the_key():
  c = tiny_dit_config()
  with c.unlocked():
    c.train.grad_accum_steps = 3
  with pytest.raises(config_lib.ConfigError, match="grad_accum_steps"):
    config_lib.validate(c, 8)
  with c.unlocked():
    c.train.grad_accum_steps = 4  # micro-batch 4 over 8 batch shards
  with pytest.raises(config_lib.ConfigError, match="batch shards"):
    config_lib.validate(c, 8)


# Rule presets and rule validation.

def test_rule_presets_resolve_and_overrides_replace_single_entries():
  c = tiny_dit_config((2, 2, 2)).unlock()
  assert sharding.rules(c.sharding) == config_lib.DEFAULT_RULES
  c.sharding.preset = "data_parallel"
  table = dict(sharding.rules(c.sharding))
  assert table["batch"] == ("data", "fsdp") and table["embed"] is None and table["mlp"] is None
  c.sharding.preset = "fsdp"
  table = dict(sharding.rules(c.sharding))
  assert table["embed"] == "fsdp" and table["mlp"] is None and table["heads"] is None
  c.sharding.rules = (("mlp", "fsdp"), ("embed", None))
  table = dict(sharding.rules(c.sharding))
  assert table["mlp"] == "fsdp" and table["embed"] is None and table["batch"] == ("data", "fsdp")
  c.sharding.preset = "fsdp_tensr"
  with pytest.raises(config_lib.ConfigError, match="fsdp_tensor"):
    config_lib.validate(c, 8)
  c.sharding.preset = "fsdp"
  c.sharding.rules = (("emebd", "fsdp"),)
  with pytest.raises(config_lib.ConfigError, match="emebd.*logical axes are"):
    config_lib.validate(c, 8)


def test_data_parallel_preset_keeps_parameters_whole():
  c = tiny_dit_config((2, 2, 2)).unlock()
  c.sharding.preset = "data_parallel"
  setup = train.build(c.lock())
  specs = {spec_of_sharding(s) for s in jax.tree.leaves(setup.state_shardings.params)}
  assert specs == {P()}


def spec_of_sharding(s):
  return P(*[a for a in s.spec if a is not None]) if any(a is not None for a in s.spec) else P()


@pytest.mark.parametrize("rules, match", [
    ((("kv", "tensor"),), "no parameter of this model has a 'kv' axis"),
    ((("mlp", "fsdp"),), "both 'embed' and 'mlp' to mesh axis 'fsdp'"),
])
def test_build_refuses_unused_and_conflicting_rules(rules, match):
  c = tiny_dit_config((2, 2, 2)).unlock()
  c.sharding.rules = rules
  with pytest.raises(config_lib.ConfigError, match=match):
    train.build(c.lock())


# Memory planning: the analytic count against XLA's plan.

def test_analytic_state_bytes_equal_the_compiled_arguments():
  from flowjax import memory
  c = tiny_dit_config((1, 8, 1)).unlock()
  c.train.batch_size = 64
  setup = train.build(c.lock())
  with train.context(setup):
    compiled = setup.train_step.lower(setup.abstract_state, setup.batch_spec).compile()
  analysis = compiled.memory_analysis()
  state = setup.abstract_state
  per_device = lambda tree, shardings: memory._tree_bytes_per_device(tree, shardings)
  state_bytes = sum(per_device(getattr(state, k), getattr(setup.state_shardings, k))
                    for k in ("params", "opt_state", "ema", "extra", "step", "skipped"))
  batch_bytes = sum(math.prod(v.sharding.shard_shape(v.shape)) * v.dtype.itemsize
                    for v in setup.batch_spec.values())
  assert state_bytes + batch_bytes == analysis.argument_size_in_bytes
  plan = memory.plan(setup)
  assert plan["examples_per_device"] == 8
  # 8x8 images in 2x2 patches: 16 tokens of width 32, 2 heads, 1 block, float32.
  blocks, s, h, a = 1, 16, 32, 2
  assert plan["activations_mib"] == round(8 * 4 * (18 * s * h + a * s * s) * blocks / 2**20, 1)


def test_cpu_xla_flags_keep_the_users_value_skip_unknown_flags_and_cache_the_probe(
    monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  flag = sharding.CPU_XLA_FLAGS[0]
  name = flag.split("=")[0]
  monkeypatch.setenv("XLA_FLAGS", f"{name}=")
  assert sharding.use_cpu_xla_flags() == [] and os.environ["XLA_FLAGS"] == f"{name}="
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert sharding.use_cpu_xla_flags(("--xla_cpu_no_such_flag=1",)) == []
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
  assert sharding.use_cpu_xla_flags() == [flag]
  assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {flag}"
  # Both answers are cached: no second probe, the same answers.
  with open(tmp_path / "flowjax" / "xla_flags.json") as f:
    cached = json.load(f)
  assert sorted(cached.values()) == [False, True]

  def no_probe(*args, **kwargs):
    raise AssertionError("probed again despite the cache")

  monkeypatch.setattr(subprocess, "run", no_probe)
  monkeypatch.setenv("XLA_FLAGS", "")
  assert sharding.use_cpu_xla_flags(("--xla_cpu_no_such_flag=1",)) == []
  assert sharding.use_cpu_xla_flags() == [flag] and os.environ["XLA_FLAGS"] == flag


@pytest.mark.parametrize("extra, added", [([], True), (["--nocpu_xla_flags"], False)])
def test_main_starts_cpu_runs_with_the_xla_flags(tmp_path, extra, added):
  """python -m flowjax.main adds CPU_XLA_FLAGS before XLA starts (a config error after start-up
  ends the run cheaply)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(
      [sys.executable, "-m", "flowjax.main", "--config=experiments/fm_toy2d.py:tiny",
       f"--workdir={tmp_path / 'w'}", "--num_cpu_devices=1", "--config.sample.method=eulr"]
      + extra, cwd=root, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", XDG_CACHE_HOME=str(tmp_path)))
  assert done.returncode == 1 and "Unknown ODE method" in done.stderr, done.stderr[-3000:]
  assert "flowjax: process 0 of 1" in done.stderr
  assert (f"XLA_FLAGS={sharding.CPU_XLA_FLAGS[0]}" in done.stderr) == added, done.stderr[-3000:]


def test_analytic_activations_count_prefix_tokens_and_remat():
  """A text flow's conditioned (deep) block attends over its caption's prefix tokens too, and
  model.remat='full' keeps only each layer's float32 input plus one layer being recomputed."""
  from flowjax import memory
  model = models.default_config("tarflow")
  model.update(dict(patch_size=1, hidden_size=8, num_heads=2, num_blocks=3, layers_per_block=2,
                    deep_layers=4, text_dim=6, text_length=5, dtype="bfloat16"))
  config = ml_collections.ConfigDict(dict(model=model, objective=dict(name="starflow")))
  info = data.DataInfo((4, 4, 3), 0, 100)
  layer = lambda s: 2 * (18 * s * 8 + 2 * s * s)
  shallow, deep = 16, 16 + 5  # 4x4 tokens; the deep block reads the 5 caption tokens first
  assert memory.activation_bytes(config, info, 3) == 3 * (4 * layer(shallow) + 4 * layer(deep))
  model.remat = "full"
  kept = 4 * 4 * shallow * 8 + 4 * 4 * deep * 8 + layer(deep)
  assert memory.activation_bytes(config, info, 3) == 3 * kept


def test_dispatch_window_keeps_at_most_depth_steps_unfinished():
  """A chain of slow sharded steps: without the window the host runs ahead (more than two
  unfinished), with DispatchWindow(2) never more than two are unfinished after add()."""
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=8, fsdp=1, tensor=1)))
  placed = jax.device_put(jnp.ones((8, 192, 192)), sharding.batch_sharding(mesh))

  @jax.jit
  def slow_step(x):
    x = jax.lax.fori_loop(0, 12, lambda _, y: jnp.tanh(y @ y) / 4 + 1, x)
    return x, jnp.mean(x)  # the mean is an all-reduce over the 8 devices

  jax.block_until_ready(slow_step(placed))

  def most_unfinished(window):
    x, most, outputs = placed, 0, []
    for _ in range(8):
      x, mean = slow_step(x)
      outputs.append(mean)
      if window is not None:
        window.add(mean)
      most = max(most, sum(not value.is_ready() for value in outputs))
    jax.block_until_ready(x)
    return most

  assert most_unfinished(None) > 2
  window = sharding.DispatchWindow(2)
  assert most_unfinished(window) <= 2 and window.pending() <= 2
  with pytest.raises(ValueError, match="at least 1"):
    sharding.DispatchWindow(0)
