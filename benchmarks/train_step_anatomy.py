"""What the compiled CPU train step is made of, and what its update part costs: where the time
against torch (benchmarks/vs_diffusers.py) cannot be hiding.

    python -m benchmarks.train_step_anatomy [--rounds 3] [--iters 20]

On `vs_diffusers`' small U-Net (1 XLA CPU device, batch 8, the same compiled `train_step`):
- the kernel census of the optimised program: the top-level instructions of its entry
  computation, and its kernels (each fusion, or op left unfused, is one kernel the thunk
  runtime launches) by what they compute: convolution, dot, reduction, elementwise, ...;
- the update part alone (finite check, global-norm clip + AdamW, EMA, the cond that skips a
  non-finite step: ediffi_jax/training/step.py's `apply_update`), jitted with donation, per leaf
  as the trainer runs it against the same on one raveled vector (the multi-tensor form torch's
  fused optimizers use), paired per round.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import time


NOT_KERNELS = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant"}


def census(hlo_text: str) -> dict:
    """Top-level instructions of the ENTRY computation, and its kernels (every instruction that
    runs: a fusion, or a convolution / dot / copy left unfused) by what they compute: a
    convolution or dot (YNNPACK / Eigen), one wrapped op, a reduction, or elementwise work."""
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}",
                                                          hlo_text, re.S)}
    start = hlo_text.index("\nENTRY")
    entry = hlo_text[start:hlo_text.index("\n}\n", start)]
    ops, kernels = collections.Counter(), collections.Counter()
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = .*? ([a-z][\w\-]*)\(", line)
        if not m:
            continue
        op = m.group(1)
        ops[op] += 1
        if op in NOT_KERNELS:
            continue
        call = re.search(r"calls=%?([\w.\-]+)", line)
        if op != "fusion" or not call:
            kernels[op] += 1
            continue
        body = bodies.get(call.group(1), "")
        wrapped = re.match(r"wrapped_([\w\-]+?)_computation", call.group(1))
        kernels["convolution" if " convolution(" in body else "dot" if " dot(" in body else
                wrapped.group(1) if wrapped else "reduce" if " reduce(" in body else
                "elementwise"] += 1
    return {"ops": dict(ops.most_common()), "kernels": dict(kernels.most_common())}


def update_timings(rounds: int, iters: int) -> list[tuple[float, float]]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.flatten_util import ravel_pytree

    from benchmarks.vs_diffusers import CONFIGS
    from ediffi_jax.models.unet import UNetConfig, abstract_params
    from ediffi_jax.training.step import (TrainConfig, all_finite, apply_update, init_state, make_optimizer)

    cfg = TrainConfig(lr=1e-4, weight_decay=0.01, grad_clip=1.0, ema_decay=0.999, ema_warmup=False)
    optimizer = make_optimizer(cfg)
    rng = np.random.default_rng(0)
    abstract = abstract_params(UNetConfig(**CONFIGS["small"]))
    params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32) * 0.02, abstract)
    grads = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32) * 0.01, abstract)

    def update(state, grads):  # train_step after compute_grads, as there
        state = apply_update(state, grads, all_finite(grads), cfg=cfg, optimizer=optimizer)
        return state, optax.tree.norm(grads)

    step = jax.jit(update, donate_argnums=0)
    forms = {"per leaf": (params, grads),
             "raveled": (ravel_pytree(params)[0], ravel_pytree(grads)[0])}
    states = {k: init_state(jax.tree.map(jnp.asarray, p), optimizer) for k, (p, _) in forms.items()}
    grads_dev = {k: jax.tree.map(jnp.asarray, g) for k, (_, g) in forms.items()}
    for k in forms:  # compile
        states[k], _ = step(states[k], grads_dev[k])
        jax.block_until_ready(states[k])

    def timed(k):
        ts = []
        for _ in range(iters):
            t = time.perf_counter()
            states[k], _ = step(states[k], grads_dev[k])
            jax.block_until_ready(states[k])
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    out = []
    for r in range(rounds):
        order = list(forms) if r % 2 == 0 else list(forms)[::-1]
        got = {k: timed(k) for k in order}
        out.append((got["per leaf"], got["raveled"]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step_anatomy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        p.error("XLA_FLAGS already forces a host device count; this benchmark uses 1 device")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=1").strip()

    from benchmarks.vs_diffusers import CONFIGS, build_jax
    from ediffi_jax.parallel.mesh import make_mesh

    build = argparse.Namespace(what=["train"], train_batch=8, seed=0)
    side = build_jax(CONFIGS["small"], "base", build, make_mesh((-1, 1, 1)))
    for _ in range(2):
        side["train"]()
    step_s = statistics.median(_time(side["train"]) for _ in range(5))
    c = census(side["train_compiled"].as_text())
    print(f"train step (small U-Net, batch 8, 1 device): {step_s * 1e3:.0f} ms")
    print("entry computation:", ", ".join(f"{k} {v}" for k, v in c["ops"].items()))
    print(f"kernels ({sum(c['kernels'].values())}) by what they compute:",
          ", ".join(f"{k} {v}" for k, v in c["kernels"].items()))
    rows = update_timings(args.rounds, args.iters)
    print("\n| round | update per leaf (ms) | raveled (ms) | raveled / per leaf | per leaf / step |")
    print("|---|---|---|---|---|")
    for r, (a, b) in enumerate(rows):
        print(f"| {r + 1} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.3f} | {a / step_s:.3f} |")
    print(f"median raveled / per leaf: {statistics.median(b / a for a, b in rows):.3f}")
    return 0


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    raise SystemExit(main())
