"""Test set-up: 8 fake CPU devices, fast CPU compiles and partitionable threefry, before jax
starts."""

import os

# Lower LLVM optimisation halves CPU compile times; programs and their numerics are unchanged.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
