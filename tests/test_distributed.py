"""Multi-process start-up: when `initialize` joins a job (env/config detection, with
jax.distributed.initialize recorded instead of called), and a real two-process CPU job on
localhost whose processes feed one global batch through the input pipeline and reduce it."""
import os
import socket
import subprocess
import sys
import textwrap

import jax
import pytest

from ediffi_jax.config import ConfigError, load_config, section
from ediffi_jax.parallel.distributed import DistributedConfig, detect, initialize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
# Every variable one of JAX's cluster environments (or jax.distributed itself) reads to decide.
CLUSTER_VARS = (
    "JAX_COORDINATOR_ADDRESS", "JAX_LOCAL_DEVICE_IDS", "JAX_COORDINATOR_PORT",
    "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri", "OMPI_VERSION", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
    "TPU_PROCESS_ADDRESSES_PATH", "TPU_WORKER_ID", "MEGASCALE_COORDINATOR_ADDRESS",
    "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID", "KUBERNETES_SERVICE_HOST",
    "JOB_COMPLETION_INDEX",
)


@pytest.fixture
def calls(monkeypatch):
    """A clean environment; jax.distributed.initialize records its arguments instead."""
    for var in CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    recorded = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(recorded))
    return recorded


def slurm(monkeypatch, ntasks: int, procid: int = 0):
    for var, value in (("SLURM_JOB_ID", "4242"), ("SLURM_STEP_NODELIST", "node[003-004]"),
                       ("SLURM_NTASKS", str(ntasks)), ("SLURM_PROCID", str(procid)),
                       ("SLURM_LOCALID", "0")):
        monkeypatch.setenv(var, value)


def test_single_host_is_a_no_op(calls):
    assert detect(DistributedConfig()) is None
    assert initialize(DistributedConfig()) is False
    assert calls == []


def test_slurm_one_task_stays_single_process(calls, monkeypatch):
    slurm(monkeypatch, ntasks=1)
    assert initialize(DistributedConfig()) is False
    assert calls == []


def test_slurm_several_tasks_initialise_with_jax_filling_the_rest(calls, monkeypatch, capsys):
    slurm(monkeypatch, ntasks=4, procid=2)
    assert detect(DistributedConfig()) == "slurm cluster, 4 processes"
    assert detect(DistributedConfig(num_processes=1)) is None  # the config overrules
    assert initialize(DistributedConfig()) is True
    # Unset fields are None, so JAX's own SLURM detection fills them (node003:<port>, 4, 2).
    assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None,
                          local_device_ids=None, cluster_detection_method=None,
                          initialization_timeout=300)]
    assert "distributed: process" in capsys.readouterr().out
    # Already initialised: a second call (train.branch, then train) does nothing.
    assert initialize(DistributedConfig()) is True
    assert len(calls) == 1


def test_coordinator_env_var_initialises(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert initialize(DistributedConfig(num_processes=2, process_id=1)) is True
    assert calls[0]["coordinator_address"] is None  # jax reads the variable itself
    assert (calls[0]["num_processes"], calls[0]["process_id"]) == (2, 1)


def test_config_fields_are_passed_through(calls):
    cfg = DistributedConfig(coordinator_address="host0:5555", num_processes=8, process_id=0,
                            local_device_ids=(0, 1), initialization_timeout=60)
    assert initialize(cfg) is True
    assert calls == [dict(coordinator_address="host0:5555", num_processes=8, process_id=0,
                          local_device_ids=[0, 1], cluster_detection_method=None,
                          initialization_timeout=60)]


def test_mode_off_never_and_mode_on_always(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    slurm(monkeypatch, ntasks=4)
    assert initialize(DistributedConfig(mode="off")) is False
    assert calls == []
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    slurm(monkeypatch, ntasks=1)
    assert initialize(DistributedConfig(mode="on")) is True  # e.g. a one-task job, on purpose
    assert calls[0]["num_processes"] is None


def test_tpu_pod_and_kubernetes_detection(calls, monkeypatch):
    from jax._src.clusters import cloud_tpu_cluster

    # A GKE TPU slice of 4 hosts (JAX requires a Cloud TPU VM for this environment).
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: not a GCE TPU VM
    monkeypatch.setenv("MEGASCALE_NUM_SLICES", "1")  # else JAX asks the metadata server
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w-0,w-1,w-2,w-3")
    assert detect(DistributedConfig()) == "gketpu cluster, 4 processes"
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w-0")  # a one-host TPU VM
    assert detect(DistributedConfig()) is None
    monkeypatch.setenv("MEGASCALE_NUM_SLICES", "2")  # ... unless it is one of two slices
    assert detect(DistributedConfig()) == "gketpu cluster, 2 processes"
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    # Any pod has KUBERNETES_SERVICE_HOST: not a multi-process job by itself.
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert detect(DistributedConfig()) is None
    # An indexed Job: JAX needs the kubernetes package to bootstrap it; say so, do not guess.
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="kubernetes"):
            detect(DistributedConfig())
    assert detect(DistributedConfig(mode="off")) is None
    assert calls == []


def test_config_section_and_validation():
    from ediffi_jax.runs.spec import run_schema

    config = load_config(TINY, ["--config.distributed.mode=on",
                                "--config.distributed.process_id=3",
                                "--config.distributed.local_device_ids=0,1",
                                "--config.distributed.coordinator_address=n1:99"], run_schema())
    cfg = section(DistributedConfig, config.distributed, "distributed")
    assert cfg == DistributedConfig(mode="on", process_id=3, local_device_ids=(0, 1),
                                    coordinator_address="n1:99")
    with pytest.raises(ConfigError, match="mode"):
        section(DistributedConfig, {"mode": "yes"}, "distributed")
    with pytest.raises(ConfigError, match="num_processes"):
        section(DistributedConfig, {"num_processes": 2, "process_id": 2}, "distributed")
    with pytest.raises(ConfigError, match="did you mean 'process_id'"):
        load_config(TINY, ["--config.distributed.proces_id=1"], run_schema())


WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    from ediffi_jax.parallel.distributed import DistributedConfig, initialize

    pid, port = int(sys.argv[1]), sys.argv[2]
    assert initialize(DistributedConfig(coordinator_address=f"localhost:{port}", num_processes=2,
                                        process_id=pid, initialization_timeout=40))
    import jax
    from jax.sharding import NamedSharding, PartitionSpec
    from ediffi_jax.data.pipeline import make_pipeline, to_global_arrays
    from ediffi_jax.parallel.mesh import make_mesh

    mesh = make_mesh((-1, 1, 1))  # both processes' devices
    source = [{"x": np.full((3,), 10.0 * i, np.float32)} for i in range(16)]
    batch = next(iter(make_pipeline(source, global_batch_size=4, seed=0, shuffle=False)))
    arrays = to_global_arrays(batch, mesh)  # this process's half of the global batch
    total = jax.jit(lambda a: (a["index"].sum(), a["x"].sum()),
                    out_shardings=NamedSharding(mesh, PartitionSpec()))(arrays)
    print("RESULT", jax.process_index(), jax.process_count(), jax.device_count(),
          batch["index"].tolist(), int(total[0]), float(total[1]), flush=True)
    jax.distributed.shutdown()
""")


def test_two_processes_on_localhost_share_one_global_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=90)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out
        assert "distributed: process" in out and "2 global" in out, out
        result = [line for line in out.splitlines() if line.startswith("RESULT")]
        # Process i reads global batch positions [2i, 2i + 2); the reduction sees all four:
        # indices 0+1+2+3, values 3 * 10 * (0+1+2+3).
        assert result == [f"RESULT {i} 2 2 {[2 * i, 2 * i + 1]} 6 180.0"], out
