"""8 simulated CPU devices, set before jax is imported anywhere in the suite, and one persistent
compilation cache for the session: many tests compile the same micro train step or sampling loop
in fresh closures (or processes), which the in-memory cache cannot share but this one can. Set in
the main process before pytest-xdist starts its workers, so they share it too."""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    # Tests are compile-bound: LLVM's full optimisation costs ~5x in compile time (threefry RNG
    # in parameter init above all) and saves little on tiny shapes.
    " --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ediffi-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
