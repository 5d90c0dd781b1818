"""Meshes, logical-axis rules and shardings: the only module that knows about physical devices."""

import collections
import contextlib
import json
import logging
import math
import os
import subprocess
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def start_runtime(num_cpu_devices: int | None = None, coordinator_address: str | None = None,
                  num_processes: int = 1, process_id: int = 0) -> None:
  """Process start-up shared by every command: partitionable random numbers (draws do not depend
  on the device layout), optional fake CPU devices, and jax.distributed for multi-process runs.

  jax.distributed is initialized in exactly two cases, never by accident:
  - explicitly: a coordinator address and `num_processes > 1` (flags or FLOWJAX_* variables, as
    launch/local_multiprocess.sh and launch/gpu_multinode.sh pass them);
  - auto-detected, when no coordinator is given and the environment clearly is one process of a
    multi-process cluster: a TPU pod slice (TPU_WORKER_HOSTNAMES lists more than one host, or,
    when that variable is absent, CLOUD_TPU_TASK_ID is set) or a SLURM job step with more than one
    task (SLURM_JOB_ID set and SLURM_NTASKS > 1). Then `jax.distributed.initialize()` is called
    with no arguments and JAX reads the coordinator, process count and id from the cluster.
  A single process - a laptop, one GPU node, a single-host TPU VM, a notebook, a SLURM job with
  one task - initializes nothing. Inside a multi-task SLURM allocation, start every process with
  srun (launch/gpu_multinode.sh does); a single python started directly in such an allocation is
  taken for one process of the job, so run it with SLURM_NTASKS=1.
  """
  jax.config.update("jax_threefry_partitionable", True)
  if num_cpu_devices:
    jax.config.update("jax_num_cpu_devices", num_cpu_devices)
  if coordinator_address:
    if num_processes > 1:
      jax.distributed.initialize(coordinator_address=coordinator_address,
                                 num_processes=num_processes, process_id=process_id)
    return
  cluster = _detect_cluster(os.environ)
  if cluster is not None and not jax.distributed.is_initialized():
    try:
      jax.distributed.initialize()
    except ValueError as e:
      raise RuntimeError(
          f"this looks like one process of a multi-process {cluster} job, but "
          f"jax.distributed.initialize() could not auto-detect it ({e}). Start every process "
          "with the launcher (launch/tpu_pod.sh, launch/gpu_multinode.sh), or pass "
          "--coordinator_address/--num_processes/--process_id.") from e


# XLA:CPU compiler options flowjax starts CPU runs with. jaxlib 0.10 hands convolutions to YNNPACK,
# whose kernel gradients (large-window convolutions over transposed activations) run about 3x
# slower than XLA's own convolutions: a U-Net train step takes 0.5-0.7x the time without it
# (python -m flowjax.bench, README "Performance"). Accelerator programs ignore these options.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)


def _flag_cache_path() -> str:
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "flowjax", "xla_flags.json")


def _jaxlib_version() -> str:
  import jaxlib
  return getattr(jaxlib, "__version__", "unknown")


def use_cpu_xla_flags(flags: Sequence[str] = CPU_XLA_FLAGS) -> list[str]:
  """Adds `flags` to the XLA_FLAGS environment variable; call before JAX starts its backend
  (XLA reads XLA_FLAGS once, when the first device is used). Returns the flags added.

  A flag is left out when XLA_FLAGS already names it (the user's value wins, and
  `--xla_cpu_experimental_ynn_fusion_type=` with no value restores XLA's default) or when this
  jaxlib does not know it: XLA aborts the process on an unknown flag, so a child process tries
  them first (about two seconds) and the answer is cached per jaxlib version in
  $XDG_CACHE_HOME/flowjax/xla_flags.json (~/.cache when unset).
  """
  current = os.environ.get("XLA_FLAGS", "")
  names = current.replace("=", " ").split()
  wanted = [f for f in flags if f.split("=")[0] not in names]
  if not wanted:
    return []
  key = f"jaxlib {_jaxlib_version()}: {' '.join(wanted)}"
  path = _flag_cache_path()
  try:
    with open(path) as f:
      cache = json.load(f)
  except (OSError, ValueError):
    cache = {}
  combined = " ".join([current] + wanted).strip()
  known = cache.get(key)
  if known is None:
    env = dict(os.environ, XLA_FLAGS=combined, JAX_PLATFORMS="cpu")
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1.0)"],
                           env=env, capture_output=True)
    known = probe.returncode == 0
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      temporary = f"{path}.{os.getpid()}.tmp"
      with open(temporary, "w") as f:
        json.dump(dict(cache, **{key: known}), f)
      os.replace(temporary, path)
    except OSError:
      pass  # a read-only home: probe again next time
  if not known:
    logging.warning("XLA rejected %s; running without them.", wanted)
    return []
  os.environ["XLA_FLAGS"] = combined
  return wanted


def _detect_cluster(environ: Mapping[str, str]) -> str | None:
  """'TPU pod' or 'SLURM' when `environ` is one process of a multi-process cluster, else None."""
  hosts = environ.get("TPU_WORKER_HOSTNAMES")
  if hosts is not None:
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
      return "TPU pod"
  elif environ.get("CLOUD_TPU_TASK_ID"):
    return "TPU pod"
  ntasks = environ.get("SLURM_NTASKS", "")
  if environ.get("SLURM_JOB_ID") and ntasks.strip().isdigit() and int(ntasks) > 1:
    return "SLURM"
  return None


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Mesh with axes (data, fsdp, tensor) from `config.mesh`; -1 takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [mesh_config.data, mesh_config.fsdp, mesh_config.tensor]
  fixed = math.prod(s for s in sizes if s > 0)
  sizes = [s if s > 0 else len(devices) // fixed for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"found {len(devices)}; set config.mesh so the product equals the count.")
  return jax.make_mesh(tuple(sizes), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def rules(sharding_config) -> tuple[tuple[str, Any], ...]:
  """The logical-axis rule table of config.sharding: its preset with `rules` overriding entries."""
  from flowjax import config as config_lib
  return config_lib.resolved_rules(sharding_config)


def check_rules(sharding_config, abstract_boxed, mesh) -> None:
  """Fails on rules that cannot do what they say, given the model's parameters:
  an override in sharding.rules that shards an axis no parameter has, and a parameter whose
  dimensions the rules send to the same mesh axis twice (the second would silently stay whole).
  """
  from flowjax.config import ConfigError
  table = dict(rules(sharding_config))
  named = jax.tree_util.tree_flatten_with_path(nn.get_partition_spec(abstract_boxed),
                                               is_leaf=lambda x: isinstance(x, P))[0]
  used = {name for _, spec in named for name in spec if isinstance(name, str)}
  for name, target in sharding_config.rules:
    if target is not None and name not in used and name not in ("batch", "length"):
      raise ConfigError(
          f"config.sharding.rules maps {name!r} to {target!r}, but no parameter of this model has "
          f"a {name!r} axis, so the rule does nothing; the model's parameter axes are "
          f"{', '.join(sorted(used))}. Remove the rule or map one of those.")
  for path, spec in named:
    seen: dict[str, str] = {}
    for name in spec:
      target = table.get(name) if isinstance(name, str) else None
      for axis in (target if isinstance(target, tuple) else (target,)):
        if axis is None or mesh.shape[axis] == 1:
          continue
        if axis in seen and seen[axis] != name:
          raise ConfigError(
              f"config.sharding rules send both {seen[axis]!r} and {name!r} to mesh axis "
              f"{axis!r} for parameter {jax.tree_util.keystr(path)} {tuple(spec)}; a mesh axis "
              "can shard one dimension only. Map one of them elsewhere (or to None) in "
              "config.sharding.rules, or pick another sharding.preset.")
        seen[axis] = name


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


class DispatchWindow:
  """Bounds how far a loop of jitted steps runs ahead of the devices: `add` one output of each
  dispatched step (one that no later step donates) and it waits until at most `depth` of them
  are unfinished.

  XLA:CPU admits at most 32 programs in flight per device. A loop of multi-device programs with
  collectives that dispatches further ahead than that (nothing fetched from any step) can stall:
  in a core dump of such a stall, seven devices waited in an all-reduce while the eighth
  device's launch waited for a free slot, and XLA aborted the process after 40 s ("Termination
  timeout for all reduce ... only 7 of them arrived"). Two steps in flight keep the devices
  busy; the trainer's loop fetches each step's metrics one step later for the same bound.
  """

  def __init__(self, depth: int = 2):
    if depth < 1:
      raise ValueError(f"DispatchWindow depth must be at least 1, got {depth}.")
    self.depth = depth
    self._pending = collections.deque()

  def add(self, value: jax.Array) -> None:
    self._pending.append(value)
    while len(self._pending) > self.depth:
      jax.block_until_ready(self._pending.popleft())

  def pending(self) -> int:
    """How many added values are not yet computed."""
    return sum(not value.is_ready() for value in self._pending)


def logical_to_sharding(logical_spec, shape: Sequence[int], mesh, axis_rules) -> NamedSharding:
  """NamedSharding for one array from its logical axis names.

  A mesh axis is used at most once per array, and a dimension that its mesh axes do not divide
  is replicated instead (e.g. a 3-channel output layer on a 4-way tensor axis).
  """
  table = dict(axis_rules)
  used: set[str] = set()
  spec = []
  names = tuple(logical_spec) if logical_spec is not None else ()
  names = names + (None,) * (len(shape) - len(names))
  for dim, name in zip(shape, names):
    target = table.get(name) if name is not None else None
    targets = target if isinstance(target, tuple) else ((target,) if target else ())
    targets = tuple(t for t in targets if t not in used and mesh.shape[t] > 1)
    size = math.prod(mesh.shape[t] for t in targets)
    if not targets or dim % size != 0:
      spec.append(None)
      continue
    used.update(targets)
    spec.append(targets if len(targets) > 1 else targets[0])
  return NamedSharding(mesh, P(*spec))


def tree_shardings(abstract_boxed, mesh, axis_rules):
  """Shardings for a tree whose leaves may be flax LogicallyPartitioned boxes.

  Returns a tree shaped like the unboxed tree: boxed leaves follow their logical names, every
  other leaf (step counters, optimizer counts) is replicated.
  """
  specs = nn.get_partition_spec(abstract_boxed)
  shapes = nn.meta.unbox(abstract_boxed)
  return jax.tree.map(
      lambda spec, leaf: logical_to_sharding(spec, leaf.shape, mesh, axis_rules),
      specs, shapes, is_leaf=lambda x: isinstance(x, P))


def for_compute(shardings):
  """The shardings arrays take inside a step: `shardings` with the batch axes (data, fsdp)
  removed from every dimension, so parameters are gathered over data x fsdp where they are used
  and stay split only over the model-parallel axis (tensor).

  Storage (state, checkpoints, optimizer) keeps the declared shardings; the step constrains its
  parameters to these compute shardings and its gradients back to the storage shardings, which
  is fully sharded data parallelism (ZeRO-3) written out rather than left to the partitioner. It
  is also what keeps the gradients right: when an operand's batch dimension is split over
  (data, fsdp) and a parameter's dimension over fsdp, with data and tensor above 1 as well,
  XLA's SPMD partitioner (jax 0.10.2, Shardy and GSPMD alike) transposes the batch blocks of the
  cotangent of a dot product and does not transpose them back, so the gradients of the layers
  below come out wrong (BUILD.md has a 20-line reproducer).
  """
  def strip(sharding):
    if not isinstance(sharding, NamedSharding):
      return sharding
    spec = []
    for entry in sharding.spec:
      axes = entry if isinstance(entry, tuple) else ((entry,) if entry is not None else ())
      kept = tuple(a for a in axes if a not in BATCH_AXES)
      spec.append(kept if len(kept) > 1 else (kept[0] if kept else None))
    return NamedSharding(sharding.mesh, P(*spec))
  return jax.tree.map(strip, shardings)


def describe(shardings, abstract, max_rows: int = 60) -> str:
  """A table of each array's shape, sharding and bytes per device."""
  rows = []
  total = 0
  for (path, sharding), leaf in zip(jax.tree_util.tree_flatten_with_path(shardings)[0],
                                    jax.tree.leaves(abstract)):
    local = sharding.shard_shape(leaf.shape)
    nbytes = math.prod(local) * jnp.dtype(leaf.dtype).itemsize
    total += nbytes
    rows.append((jax.tree_util.keystr(path), tuple(leaf.shape), str(sharding.spec), nbytes))
  rows.sort(key=lambda r: -r[3])
  lines = [f"{'array':60s} {'shape':>22s} {'spec':>28s} {'MiB/device':>11s}"]
  for name, shape, spec, nbytes in rows[:max_rows]:
    lines.append(f"{name[-60:]:60s} {str(shape):>22s} {spec:>28s} {nbytes / 2**20:11.3f}")
  if len(rows) > max_rows:
    lines.append(f"... {len(rows) - max_rows} more arrays")
  lines.append(f"total {total / 2**20:.1f} MiB per device over {len(rows)} arrays")
  return "\n".join(lines)


def context(mesh, rules, precision: str = "default") -> contextlib.ExitStack:
  """The mesh, logical-axis rules and matmul precision ("default" leaves the backend's) under
  which models trace and run."""
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(rules))
  if precision != "default":
    stack.enter_context(jax.default_matmul_precision(precision))
  return stack
