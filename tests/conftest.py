"""8 simulated CPU devices, set before jax is imported anywhere in the suite."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    # Tests are compile-bound: LLVM's full optimisation costs ~5x in compile time (threefry RNG
    # in parameter init above all) and saves little on tiny shapes.
    " --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
