"""Test set-up: 8 fake CPU devices, fast CPU compiles and partitionable threefry, before jax
starts."""

import os

# Lower LLVM optimisation halves CPU compile times; programs and their numerics are unchanged.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Full float32 matrix products: the exact invariants (inverses, JVPs against finite differences)
# hold to float32 tolerances on GPUs too, whose default for float32 is TensorFloat-32.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "float32")
# One compilation cache for the whole session, shared with the subprocesses that tests start
# (resumed and multi-process runs compile the same programs again): a cache hit returns the
# executable XLA built before for the identical program and options.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="flowjax_test_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

from flowjax import sharding  # noqa: E402

# The XLA:CPU options flowjax.main starts with, so that runs in the test process and in the
# subprocesses the tests start compile the same programs.
sharding.use_cpu_xla_flags()
jax.config.update("jax_threefry_partitionable", True)
