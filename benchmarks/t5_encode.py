"""T5 encoder throughput on CPU: the project's Flax T5Encoder vs transformers' PyTorch
T5EncoderModel, the same random T5-small-shaped weights and the same batch, in one run.

    python -m benchmarks.t5_encode [--batch 16 --length 128 --rounds 6 --iters 3]
                                   [--jax-devices 2] [--dtype bfloat16]

Writes seeded random T5-small-shaped weights (vocab 32128, d_model 512, 6 layers, 8 heads,
ReLU feed-forward) once to a temporary directory in Hugging Face layout; the JAX side loads it
with `conditioner.load_t5`, the torch side (a persistent subprocess in the tools venv,
benchmarks/_torch_t5_worker.py) with `T5EncoderModel.from_pretrained`. Inputs are fixed seeded
random token ids with a padding mask (real lengths between length/4 and length, pad id 0).
Both sides compile / warm up first; their outputs are compared (asserted to agree). Then the
sides alternate in A-B, B-A rounds (so drift and a neighbouring job hit both alike), each round
timing `--iters` calls; a round's figure is its median call. Reported: prompts/s per side
(median over rounds) and the time ratio JAX / torch as the median of the per-round paired
ratios, with their min and max. Each round also records how many cores' worth of CPU *other*
processes took meanwhile (/proc/stat minus this benchmark's processes); the ratio over the quiet
rounds is reported separately when there are any, since a neighbouring job on a 2-core machine
slows torch's OpenMP threads far more than XLA's thread pool.

JAX runs on one CPU device with XLA's default flags; `--jax-devices 2` forces 2 host devices
(XLA_FLAGS, before jax starts) and shards the batch over them. `--dtype bfloat16` computes the
JAX side in bfloat16 (torch stays float32): not a like-for-like comparison, labelled so.
Needs the tools venv for the torch side (tools/requirements-torch.txt).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "benchmarks", "_torch_t5_worker.py")

QUIET = 0.15  # cores' worth of other processes' CPU below which a round counts as quiet

T5_SMALL = dict(
    architectures=["T5EncoderModel"], model_type="t5", vocab_size=32128, d_model=512, d_kv=64,
    d_ff=2048, num_layers=6, num_heads=8, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, feed_forward_proj="relu", layer_norm_epsilon=1e-6,
    is_encoder_decoder=False, pad_token_id=0, eos_token_id=1, dropout_rate=0.0, use_cache=False,
)

TOOLS_HELP = """\
The torch side needs the tools venv ({python} is missing). Make it (Python 3.11; see
tools/requirements-torch.txt):
    ~/.pyenv/versions/3.11.7/bin/python3.11 -m venv .venv-tools
    .venv-tools/bin/pip install torch==2.13.0
    .venv-tools/bin/pip install -r tools/requirements-torch.txt
or pass --torch-python PATH to a Python with torch + transformers."""


def write_checkpoint(directory: str, seed: int) -> None:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from ediffi_jax.encoders import hf, t5
    from ediffi_jax.encoders.tiny import random_params

    cfg = t5.T5Config.from_hf(T5_SMALL)
    module = t5.T5Encoder(cfg)
    ids = jnp.zeros((1, 4), jnp.int32)
    abstract = jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.key(0), ids, ids))["params"])
    hf.save(directory, hf.to_hf_tensors(random_params(abstract, seed), t5.hf_names(cfg)), T5_SMALL)


def make_inputs(batch: int, length: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, length // 4), length + 1, size=batch)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(3, 32000, size=(batch, length)).astype(np.int32)
    ids[np.arange(batch), lengths - 1] = 1  # end of sequence, as a tokenizer writes it
    ids = np.where(mask == 1, ids, 0).astype(np.int32)  # pad id 0
    return ids, mask, lengths


class TorchWorker:
    """The persistent torch subprocess; one JSON line per command each way."""

    def __init__(self, python: str, checkpoint: str, inputs: str, threads: int, log_path: str):
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("XLA_FLAGS", None)
        self.proc = subprocess.Popen(
            [python, WORKER, checkpoint, inputs, "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            bufsize=1, env=env, cwd=ROOT)
        self.info = self._read()
        if not self.info.get("ready"):
            raise RuntimeError(f"torch worker did not start: {self.info}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self._log.flush()
            with open(self.log_path) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"torch worker exited (rc {self.proc.poll()}); its stderr:\n{tail}")
        return json.loads(line)

    def call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if not reply.get("ok"):
            raise RuntimeError(f"torch worker: {reply}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call(cmd="quit")
                self.proc.wait(timeout=10)
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _busy_jiffies() -> int:
    """Non-idle CPU time of the whole machine so far (clock ticks, /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # minus idle and iowait


def _process_jiffies(pid: int) -> int:
    """utime + stime of one process, all its threads (clock ticks, /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class OtherLoad:
    """How many cores' worth of CPU *other* processes used while a block ran: the machine's busy
    time minus this benchmark's (main process + torch worker), over the wall time. ~0 on a quiet
    machine; ~1 when a neighbouring job keeps one of the cores busy."""

    def __init__(self, pids):
        self.pids = pids
        self.hz = os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        self.t = time.perf_counter()
        self.busy = _busy_jiffies()
        self.ours = sum(_process_jiffies(p) for p in self.pids)
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t
        others = (_busy_jiffies() - self.busy) - (sum(_process_jiffies(p) for p in self.pids) - self.ours)
        self.cores = max(0.0, others / self.hz / wall)


def machine() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        date = time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime())
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        nproc = str(len(os.sched_getaffinity(0)))
    return {"cpu": model, "nproc": nproc, "date": date}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.t5_encode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--rounds", type=int, default=6, help="A-B / B-A rounds (each side once a round)")
    p.add_argument("--iters", type=int, default=3, help="timed calls per side per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per side after compile")
    p.add_argument("--jax-devices", type=int, default=1,
                   help="XLA CPU devices; >1 forces host devices and shards the batch over them")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="JAX compute dtype (torch is always float32)")
    p.add_argument("--torch-python", default=os.path.join(ROOT, ".venv-tools", "bin", "python"))
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if not os.path.exists(args.torch_python):
        print(TOOLS_HELP.format(python=args.torch_python), file=sys.stderr)
        return 2
    if args.jax_devices > 1:
        if args.batch % args.jax_devices:
            p.error(f"--batch {args.batch} must be a multiple of --jax-devices {args.jax_devices}")
        if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
            p.error("XLA_FLAGS already forces a host device count; unset it for this benchmark")
        os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                                   f"--xla_force_host_platform_device_count={args.jax_devices}").strip()

    # jax is imported only now, after XLA_FLAGS is final
    import jax
    import jaxlib
    import numpy as np

    from ediffi_jax.encoders.conditioner import load_t5

    # a plain `kill` (SIGTERM) should still clean up: turn it into SystemExit, which runs `finally`
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = machine()
    load_before = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="t5_encode_")
    worker = None
    try:
        ckpt = os.path.join(tmp, "t5_small_random")
        t = time.perf_counter()
        write_checkpoint(ckpt, args.seed)
        print(f"wrote random T5-small-shaped checkpoint in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        ids, mask, lengths = make_inputs(args.batch, args.length, args.seed)
        inputs = os.path.join(tmp, "inputs.npz")
        np.savez(inputs, ids=ids, mask=mask)

        t = time.perf_counter()
        worker = TorchWorker(args.torch_python, ckpt, inputs, args.torch_threads,
                             os.path.join(tmp, "torch_worker.log"))
        torch_load = time.perf_counter() - t
        if worker.info["loading_problems"]:
            raise RuntimeError(f"transformers loaded the checkpoint with {worker.info['loading_problems']}")

        # JAX side
        mesh = None
        devices = jax.devices()
        if args.jax_devices > 1:
            from ediffi_jax.parallel.mesh import batch_sharding, make_mesh

            if len(devices) != args.jax_devices:
                raise RuntimeError(f"asked for {args.jax_devices} JAX devices, got {len(devices)}")
            mesh = make_mesh((-1, 1, 1))
        t = time.perf_counter()
        tower = load_t5(ckpt, dtype=args.dtype, mesh=mesh)
        jax_load = time.perf_counter() - t
        if mesh is None:
            ids_j, mask_j = jax.device_put(ids, devices[0]), jax.device_put(mask, devices[0])
        else:
            ids_j = jax.device_put(ids, batch_sharding(mesh, 2))
            mask_j = jax.device_put(mask, batch_sharding(mesh, 2))

        def jax_call():
            return tower.apply(tower.params, ids_j, mask_j).block_until_ready()

        t = time.perf_counter()
        jax_out = jax_call()
        jax_first = time.perf_counter() - t
        jax_out_shards = len(jax_out.sharding.device_set)
        jax_out = np.asarray(jax_out, np.float32)
        for _ in range(args.warmup):
            jax_call()
        t = time.perf_counter()
        worker.call(cmd="time", iters=args.warmup)  # torch warm-up (its first calls are slower)
        torch_warm = time.perf_counter() - t

        # parity: same weights and inputs must give the same last hidden state
        check_path = os.path.join(tmp, "torch_out.npz")
        worker.call(cmd="check", out=check_path)
        torch_out = np.load(check_path)["hidden"]
        assert torch_out.shape == jax_out.shape, (torch_out.shape, jax_out.shape)
        scale = float(np.max(np.abs(torch_out)))
        diff = float(np.max(np.abs(jax_out - torch_out)))
        real = mask.astype(bool)
        diff_real = float(np.max(np.abs(jax_out[real] - torch_out[real])))
        rel = diff / scale
        rms_rel = float(np.sqrt(np.mean((jax_out - torch_out) ** 2) / np.mean(torch_out ** 2)))
        print(f"parity: max |jax - torch| = {diff:.3g} (real tokens {diff_real:.3g}); output scale "
              f"max|torch| = {scale:.3g}; relative {rel:.3g}; relative RMS {rms_rel:.3g}", file=sys.stderr)
        if args.dtype == "float32":  # like for like: the max difference, against the output scale
            tol, what, value = 1e-3, "relative max abs diff", rel
        else:  # bfloat16 rounding compounds over 6 layers of these random weights (peaked
            # attention, a growing residual): torch's own bfloat16 run is ~11% RMS off its float32.
            # A sanity bound on the typical error, which a wrong model (~140%) would fail.
            tol, what, value = 0.25, "relative RMS diff", rms_rel
        if not value < tol:
            raise AssertionError(f"JAX and torch outputs differ: {what} {value:.3g} >= {tol:g}")

        def jax_round(k):
            out = []
            for _ in range(k):
                t = time.perf_counter()
                jax_call()
                out.append(time.perf_counter() - t)
            return out

        def torch_round(k):
            return worker.call(cmd="time", iters=k)["times"]

        sides = {"jax": jax_round, "torch": torch_round}
        medians = {"jax": [], "torch": []}
        others = {"jax": [], "torch": []}
        pids = [os.getpid(), worker.proc.pid]
        for r in range(args.rounds):
            for side in (("jax", "torch") if r % 2 == 0 else ("torch", "jax")):
                time.sleep(0.1)  # let the other side's spinning worker threads park
                with OtherLoad(pids) as load:
                    times = sides[side](args.iters)
                medians[side].append(statistics.median(times))
                others[side].append(load.cores)
            print(f"round {r + 1}/{args.rounds}: jax {medians['jax'][-1]:.3f} s (others' load "
                  f"{others['jax'][-1]:.2f} cores), torch {medians['torch'][-1]:.3f} s (others' "
                  f"{others['torch'][-1]:.2f})", file=sys.stderr)
        load_after = os.getloadavg()

        ratios = [a / b for a, b in zip(medians["jax"], medians["torch"])]
        jax_s = statistics.median(medians["jax"])
        torch_s = statistics.median(medians["torch"])
        ratio = statistics.median(ratios)
        quiet = [x for x, a, b in zip(ratios, others["jax"], others["torch"])
                 if a < QUIET and b < QUIET]
        tokens = int(mask.sum())

        import flax

        cmd = "python -m benchmarks.t5_encode " + " ".join(
            a for a in [f"--batch {args.batch}", f"--length {args.length}", f"--rounds {args.rounds}",
                        f"--iters {args.iters}",
                        f"--jax-devices {args.jax_devices}" if args.jax_devices != 1 else "",
                        f"--dtype {args.dtype}" if args.dtype != "float32" else "",
                        f"--torch-threads {args.torch_threads}" if args.torch_threads != 2 else ""] if a)
        like = args.dtype == "float32"
        jax_label = (f"JAX/Flax, {len(devices)} CPU device{'s' if len(devices) > 1 else ''}"
                     + (f" (batch sharded over {jax_out_shards})" if mesh is not None else "")
                     + f", {args.dtype}" + ("" if like else " **(not like-for-like)**"))
        n = worker.info["threads"]
        torch_label = (f"PyTorch eager, {n} thread{'s' if n != 1 else ''}, float32 "
                       f"(attn: {worker.info['attn_implementation']})")
        compile_est = jax_first - jax_s
        print()
        print(f"## T5 encoder throughput, JAX vs PyTorch, CPU ({info['date']})\n")
        print(f"`{cmd}`  ")
        print(f"Machine: {info['nproc']} CPU cores (nproc), {info['cpu']}; jax {jax.__version__}, "
              f"jaxlib {jaxlib.__version__}, flax {flax.__version__}, {len(devices)} JAX CPU "
              f"device(s); torch {worker.info['torch']}, transformers {worker.info['transformers']}, "
              f"torch.get_num_threads() = {worker.info['threads']}. Load average before/after: "
              f"{load_before[0]:.2f} / {load_after[0]:.2f}.  ")
        print(f"Random T5-small-shaped encoder (6 layers, d_model 512, 8 heads, d_ff 2048, ReLU, "
              f"vocab 32128), batch {args.batch} x {args.length} tokens ({tokens} real, "
              f"lengths {int(lengths.min())}-{int(lengths.max())}, pad 0). {args.rounds} rounds "
              f"(A-B, B-A) x {args.iters} calls per side; round figure = median call.\n")
        print("| side | median s/call | prompts/s | tokens/s (real) | load (s) | first call (s) |")
        print("|---|---|---|---|---|---|")
        print(f"| {jax_label} | {jax_s:.3f} | {args.batch / jax_s:.1f} | {tokens / jax_s:.0f} | "
              f"{jax_load:.1f} | {jax_first:.2f} (compile ~{compile_est:.2f}) |")
        print(f"| {torch_label} | {torch_s:.3f} | {args.batch / torch_s:.1f} | {tokens / torch_s:.0f} | "
              f"{torch_load:.1f} (process start + load) | warm-up {args.warmup} calls: {torch_warm:.2f} |")
        print()
        print(f"Time ratio JAX / torch: **{ratio:.3f}** (median of {len(ratios)} paired rounds; "
              f"min {min(ratios):.3f}, max {max(ratios):.3f}); >1 means JAX is slower."
              + ("" if like else " JAX computes in bfloat16 here, torch in float32: not like-for-like."))
        print(f"Other processes' CPU during the rounds (cores' worth, of {info['nproc']}): JAX "
              f"{[round(x, 2) for x in others['jax']]}, torch {[round(x, 2) for x in others['torch']]}; "
              + (f"ratio over the {len(quiet)} quiet rounds (both sides < {QUIET} cores of others): "
                 f"**{statistics.median(quiet):.3f}** (min {min(quiet):.3f}, max {max(quiet):.3f})."
                 if quiet else "no round was quiet (a neighbouring job shared the cores throughout).")
              + "  ")
        print(f"Parity: max |JAX - torch| = {diff:.2e} over all positions ({diff_real:.2e} over real "
              f"tokens), output scale max|torch| = {scale:.2f}, relative {rel:.2e}, relative RMS {rms_rel:.2e} ({what} asserted < {tol:g}).  ")
        print(f"Per-round medians (s): JAX {[round(x, 3) for x in medians['jax']]}, "
              f"torch {[round(x, 3) for x in medians['torch']]}")
        return 0
    finally:
        if worker is not None:
            worker.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
