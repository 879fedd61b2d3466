"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from the `distributed`
config section and the cluster environment.

    mode = "off"   never initialise: every process is a single-host run of its own;
    mode = "on"    always initialise; fields left unset (coordinator_address "", num_processes 0,
                   process_id -1, local_device_ids ()) are None to JAX, whose cluster detection
                   (SLURM, Open MPI, Cloud TPU / GKE TPU, Kubernetes indexed Jobs; mpi4py when
                   cluster_detection_method="mpi4py") fills them;
    mode = "auto"  (default) initialise only when this process is one of several: the config
                   names a coordinator or more than one process, JAX_COORDINATOR_ADDRESS is set,
                   or one of JAX's own cluster environments (`ClusterEnv.is_env_present()`, in
                   JAX's order) is present and reports more than one process. Otherwise nothing
                   happens and jax is not touched: a laptop, a one-task SLURM job or a one-host
                   TPU VM stay plain single-process runs.

`initialize` must run before anything initialises a jax backend (jax.devices(), a computation,
creating an orbax CheckpointManager): jax refuses afterwards.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

MODES = ("auto", "off", "on")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """The `distributed` config section. These are properties of a launch, not of a run."""

    mode: str = "auto"  # "auto" | "off" | "on"
    coordinator_address: str = ""  # "host:port" of process 0; "" = JAX_COORDINATOR_ADDRESS/auto
    num_processes: int = 0  # 0 = auto
    process_id: int = -1  # -1 = auto
    local_device_ids: tuple[int, ...] = ()  # devices this process uses; () = JAX's default
    cluster_detection_method: str = ""  # "" = JAX's order; "mpi4py", "slurm", "deactivate", ...
    initialization_timeout: int = 300  # seconds to wait for all processes to connect

    def __post_init__(self):
        object.__setattr__(self, "local_device_ids",
                           tuple(int(i) for i in self.local_device_ids or ()))
        if self.mode not in MODES:
            raise ValueError(f"distributed.mode must be one of {MODES}, got {self.mode!r}")
        if self.num_processes < 0:
            raise ValueError(f"num_processes must be >= 0 (0 = auto), got {self.num_processes}")
        if self.process_id < -1:
            raise ValueError(f"process_id must be >= 0, or -1 for auto, got {self.process_id}")
        if self.num_processes and self.process_id >= self.num_processes:
            raise ValueError(f"process_id {self.process_id} is not below num_processes "
                             f"{self.num_processes}")
        if self.coordinator_address and ":" not in self.coordinator_address:
            raise ValueError(f"coordinator_address must be host:port, got "
                             f"{self.coordinator_address!r}")
        if any(i < 0 for i in self.local_device_ids):
            raise ValueError(f"local_device_ids must be >= 0, got {self.local_device_ids}")
        if self.initialization_timeout <= 0:
            raise ValueError("initialization_timeout must be positive")


def _cluster_envs(method: str) -> list[type]:
    """JAX's cluster environments in the order jax.distributed.initialize tries them (none for
    method "deactivate")."""
    from jax._src import clusters  # the registry of ClusterEnv subclasses, in declaration order

    envs = list(clusters.ClusterEnv._cluster_types)  # noqa: SLF001
    if method:
        return [e for e in envs if e.name == method]
    return [e for e in envs if not e.opt_in_only_method]


def _is_k8s(env: type) -> bool:
    return env.__name__ == "K8sCluster"


def detect(cfg: DistributedConfig) -> str | None:
    """Why this process should join a multi-process job (a short description), or None.

    Mirrors what jax.distributed.initialize would do with the same arguments, but answers
    "single process" where JAX would start a one-process distributed system."""
    if cfg.mode == "off":
        return None
    if cfg.coordinator_address:
        return f"distributed.coordinator_address={cfg.coordinator_address}"
    if cfg.num_processes > 1:
        return f"distributed.num_processes={cfg.num_processes}"
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return f"JAX_COORDINATOR_ADDRESS={os.environ['JAX_COORDINATOR_ADDRESS']}"
    if cfg.num_processes == 1:  # the config says: a single process, whatever the cluster
        return None
    for env in _cluster_envs(cfg.cluster_detection_method):
        if _is_k8s(env):
            # Every pod has KUBERNETES_SERVICE_HOST; JAX can only bootstrap indexed Jobs, and its
            # check needs the `kubernetes` package (it only warns when that is missing).
            if not ("KUBERNETES_SERVICE_HOST" in os.environ
                    and "JOB_COMPLETION_INDEX" in os.environ):
                continue
            try:
                import kubernetes  # noqa: F401
            except ImportError as e:
                raise RuntimeError(
                    "a Kubernetes indexed Job (JOB_COMPLETION_INDEX is set), but JAX needs the "
                    "`kubernetes` package (pip install 'jax[k8s]') to find its peers. Install it, "
                    "or set JAX_COORDINATOR_ADDRESS and distributed.num_processes/process_id, or "
                    "distributed.mode=off for a single-process run") from e
        if not env.is_env_present():
            continue
        name = env.name or env.__name__
        try:
            count = int(env.get_process_count())
        except Exception as e:  # noqa: BLE001 -- whatever the environment's lookup raises
            raise RuntimeError(
                f"cluster environment {name!r} detected, but its process count could not be "
                f"read ({type(e).__name__}: {e}); set distributed.num_processes, or "
                "distributed.mode=off for a single-process run") from e
        # JAX uses the first environment present; a one-process job stays a plain run.
        return f"{name} cluster, {count} processes" if count > 1 else None
    return None


def _ensure_cpu_collectives() -> None:
    """Multi-process CPU computations need cross-process collectives. jax >= 0.5 defaults to
    gloo; older versions default to none (cross-process computations then fail)."""
    import jax

    try:
        if jax.config.jax_cpu_collectives_implementation is None:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # a jax without the option
        pass


def initialize(cfg: DistributedConfig | None = None, *,
               log: Callable[[str], None] = lambda s: print(s, flush=True)) -> bool:
    """Join the multi-process job if `cfg` (and the environment, in "auto" mode) says so.

    Returns True when this process is part of an initialised distributed system (also when it
    already was), False for a single-process run. Logs one line, only when distributed."""
    cfg = cfg or DistributedConfig()
    import jax

    if jax.distributed.is_initialized():
        return True
    if cfg.mode == "off":
        return False
    reason = "distributed.mode=on" if cfg.mode == "on" else detect(cfg)
    if reason is None:
        return False
    _ensure_cpu_collectives()
    kwargs = dict(
        coordinator_address=cfg.coordinator_address or None,
        num_processes=cfg.num_processes or None,
        process_id=cfg.process_id if cfg.process_id >= 0 else None,
        local_device_ids=list(cfg.local_device_ids) or None,
        cluster_detection_method=cfg.cluster_detection_method or None,
        initialization_timeout=cfg.initialization_timeout,
    )
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError, TypeError) as e:
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if v is not None)
        raise RuntimeError(f"jax.distributed.initialize failed ({reason}; {given}): {e}") from e
    log(f"distributed: process {jax.process_index()} of {jax.process_count()} ({reason}); "
        f"{jax.local_device_count()} local / {jax.device_count()} global "
        f"{jax.default_backend()} devices")
    return True


__all__ = ["MODES", "DistributedConfig", "detect", "initialize"]
