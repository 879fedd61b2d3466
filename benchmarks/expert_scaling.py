"""The expert-scaling study in the paper's regime: experts grown from a shared model that has
stopped improving, as *added* compute (the paper's protocol) and at *equal* compute, for 1 / 2 /
4 / 8 experts (the binary tree to depth 3, equal-mass intervals) and Config-D's shape, with soft
intervals and a merged-back one-model baseline.

    python -m ediffi_jax.data.prepare fashion_mnist --resolution 16 --out data/fashion16
    python -m benchmarks.expert_scaling --data data/fashion16 --out runs/scaling [--seeds 0,1,2]
        [--parent-steps 128000] [--expert-steps 400] [--counts 2,4,8] [--soft-p 0.2]
        [--soft-counts 2] [--scales 1,2,4] [--num 256] [--ref 3000] [--weights ...]
    python -m benchmarks.expert_scaling --out runs/scaling --report   # tables + the plot

Per seed (`train.seed`: initialisation, data order, noise), under `<out>/s<seed>/`:

    parent      configs/expert_scaling.py from scratch for P = --parent-steps, a checkpoint every
                P/8; its held-out loss at each is the plateau curve (the bar: < 1% change over
                the last quarter). Every other run branches from it (fresh AdamW, 10 warm-up
                steps, the parent's weights and EMA).
    L<l>_<i>    node l/i of the tree (l = 1, 2, 3: 2, 4, 8 experts), S = --expert-steps steps on
                its interval, a checkpoint every S/8
    D_*         Config-D's shape: E3_0, E9_511 and their complement M_C, S steps each
    soft<l>_<i> as L<l>_<i> with train.soft_interval_p = --soft-p
    B           the one-model baseline: the parent continued over the whole range (node 0/0,
                the same fresh optimizer) for 8 S steps, a checkpoint every S
    merged<n>   train.merge of the n experts (equal weights): one network, n S steps of training

Measured arms (an ensemble at one checkpoint step of its experts):
  added compute   n experts at step S (n S steps added to the parent) against "1 model, +nS"
                  (B at step n S), the merged n, and the soft n; Config-D against B at 3 S
  equal compute   n experts at step S / n (S steps added in all) against B at step S

Each arm: FID and class accuracy over guidance scales (the Evaluator of benchmarks/expert_study.py:
the captions of the first --num test images as prompts, the same sampling seed for every arm)
and the held-out EDM loss in 8 equal-mass noise bins, each bin denoised by the expert owning it.
Every point is appended to `<out>/results.jsonl`, `loss.jsonl`, `curve.jsonl` as measured and
skipped when rerun; training resumes exactly; an interrupted study continues where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

from benchmarks.expert_study import (CHILD_WARMUP, LOSS_IMAGES, Evaluator, evaluate,
                                     heldout_loss, last_step, load_results, missing_data)

CONFIG = "configs/expert_scaling.py"
PLATEAU = 0.01  # the bar: held-out loss changes by less than this over the last quarter


@dataclasses.dataclass(frozen=True)
class Launch:
    """One training run under the seed's root: `name` trained to `steps`."""
    name: str
    steps: int
    node: str = ""     # "": from scratch; "L/I": that tree node; "MC": Config-D's complement
    every: int = 0     # checkpoint spacing
    soft: float = 0.0  # train.soft_interval_p


@dataclasses.dataclass(frozen=True)
class Arm:
    """An ensemble the study measures: `experts` (run names) at their checkpoint `step`
    (None: an export's only weights)."""
    label: str
    experts: tuple[str, ...]
    step: int | None
    protocol: str      # "parent", "added" or "equal"
    compute: int       # training steps added to the parent, all its runs together
    kind: str          # "1 model", "experts", "soft", "merged"
    merge_of: str = ""  # a merged arm: the label of the arm whose experts it averages


def study_plan(parent_steps: int, expert_steps: int, counts=(2, 4, 8), soft_p: float = 0.2,
               soft_counts=(2, 8), config_d: bool = True) -> tuple[list[Launch], list[Arm]]:
    """(training runs in order, measured arms) for one seed."""
    p, s = parent_steps, expert_steps
    if p % 8 or s % 8 or p <= 0 or s <= 0:
        raise ValueError(f"--parent-steps and --expert-steps must be positive multiples of 8 "
                         f"(checkpoints at eighths), got {p} and {s}")
    bad = [n for n in (*counts, *soft_counts) if n not in (2, 4, 8)]
    if bad or not set(soft_counts) <= set(counts):
        raise ValueError(f"expert counts are 2, 4 or 8 (tree depth 1-3), soft counts among them; "
                         f"got --counts {counts}, --soft-counts {soft_counts}")
    if not 0 <= soft_p <= 1:
        raise ValueError(f"--soft-p must be in [0, 1], got {soft_p}")
    most = max([*counts, 3 if config_d else 1])
    launches = [Launch("parent", p, every=p // 8), Launch("B", most * s, "0/0", every=s)]
    arms = [Arm("parent", ("parent",), p, "parent", 0, "1 model"),
            Arm("1 model, +S", ("B",), s, "both", s, "1 model")]
    for n in sorted(counts):
        level = n.bit_length() - 1
        names = tuple(f"L{level}_{i}" for i in range(n))
        launches += [Launch(name, s, f"{level}/{i}", s // 8) for i, name in enumerate(names)]
        arms += [Arm(f"{n} experts", names, s, "added", n * s, "experts"),
                 Arm(f"1 model, +{n}S", ("B",), n * s, "added", n * s, "1 model"),
                 Arm(f"{n} merged", (f"merged{n}",), None, "added", n * s, "merged",
                     merge_of=f"{n} experts"),
                 Arm(f"{n} experts, equal compute", names, s // n, "equal", s, "experts")]
        if n in soft_counts and soft_p > 0:
            soft = tuple(f"soft{level}_{i}" for i in range(n))
            launches += [Launch(name, s, f"{level}/{i}", s, soft_p) for i, name in enumerate(soft)]
            arms.append(Arm(f"{n} experts, soft p={soft_p:g}", soft, s, "added", n * s, "soft"))
    if config_d:
        launches += [Launch("D_E3_0", s, "3/0", s), Launch("D_E9_511", s, "9/511", s),
                     Launch("D_MC", s, "MC", s)]
        arms += [Arm("Config-D (3 experts)", ("D_E3_0", "D_MC", "D_E9_511"), s, "added", 3 * s,
                     "experts"),
                 Arm("1 model, +3S", ("B",), 3 * s, "added", 3 * s, "1 model")]
    return launches, arms


def matched_baseline(arm: Arm, arms: list[Arm]) -> Arm | None:
    """The one-model arm with the same added compute (B at that step)."""
    if arm.kind == "1 model":
        return None
    return next((a for a in arms if a.kind == "1 model" and a.experts == ("B",)
                 and a.compute == arm.compute), None)


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")


def train_seed(root: str, seed: int, data: str, launches, arms, log=print) -> dict[str, str]:
    """Runs the launches (each skipped when its workdir has reached its step), writes each
    arm's ensemble file and the merged exports; returns {arm label: ensemble path}."""
    common = [f"--config.train.seed={seed}", f"--config.data.path={os.path.join(data, 'train')}",
              "--config.train.keep_checkpoints=9"]
    d = lambda name: os.path.join(root, name)  # noqa: E731
    for r in launches:
        if last_step(d(r.name)) >= r.steps:
            continue
        if not r.node:
            cmd = ["-m", "train", "--config", CONFIG]
        else:
            cmd = ["-m", "train.branch", "--parent", d("parent"),
                   *(["--complement-of", "3/0", "9/511"] if r.node == "MC" else ["--node", r.node]),
                   f"--config.train.warmup_steps={CHILD_WARMUP}"]
            if r.soft:
                cmd.append(f"--config.train.soft_interval_p={r.soft}")
        cmd += ["--workdir", d(r.name), f"--config.train.steps={r.steps}",
                f"--config.train.checkpoint_every={r.every}", *common]
        t = time.perf_counter()
        subprocess.run([sys.executable, *cmd], check=True, stdout=subprocess.DEVNULL)
        log(f"  seed {seed}: {r.name} -> step {r.steps} ({time.perf_counter() - t:.0f} s)")
    paths = {}
    for arm in arms:
        path = d(f"ensemble_{slug(arm.label)}.json")
        if arm.kind == "merged":
            source = paths[arm.merge_of]
            if not os.path.exists(d(arm.experts[0])):
                subprocess.run([sys.executable, "-m", "train.merge", source, "--out",
                                d(arm.experts[0])], check=True, stdout=subprocess.DEVNULL)
        if not os.path.exists(path):
            subprocess.run([sys.executable, "-m", "train.ensemble", "--out", path,
                            *[d(e) for e in arm.experts]], check=True, stdout=subprocess.DEVNULL)
        paths[arm.label] = path
    return paths


def plateau_curve(root: str, seed: int, parent_steps: int, ev: Evaluator, curve: str,
                  log=print) -> None:
    """The parent's held-out loss (8 noise bins) at each of its checkpoints (eighths of P)."""
    have = {(r["seed"], r["step"]) for r in load_results(curve)}
    for k in range(1, 9):
        step = k * parent_steps // 8
        if (seed, step) in have:
            continue
        rows = heldout_loss(os.path.join(root, "parent"), ev.loss_images, ev.loss_captions,
                            step=step)
        with open(curve, "a") as f:
            f.writelines(json.dumps({"seed": seed, "step": step, **r}) + "\n" for r in rows)
        log(f"  seed {seed}: parent at step {step}: held-out loss "
            f"{np.mean([r['loss'] for r in rows]):.4f}")


# ----------------------------------------------------------------------------- report

def _mean_std(values) -> str:
    values = list(values)
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{np.mean(values):.4g} ± {np.std(values, ddof=1):.2g}"


def curve_table(rows: list[dict]) -> tuple[str, dict]:
    """The parent's held-out loss (mean over bins) per step, and per seed the change over the
    last quarter (the plateau bar)."""
    by: dict = {}
    for r in rows:
        by.setdefault((r["seed"], r["step"]), []).append(r["loss"])
    loss = {k: float(np.mean(v)) for k, v in by.items()}
    steps = sorted({s for _, s in loss})
    seeds = sorted({s for s, _ in loss})
    lines = ["| parent step | held-out loss (mean of 8 bins) |", "|---|---|"]
    for step in steps:
        lines.append(f"| {step} | {_mean_std(loss[(s, step)] for s in seeds if (s, step) in loss)} |")
    change = {}
    if len(steps) >= 8:
        last, quarter = steps[-1], steps[-3]  # eighths: 6P/8 -> P is the last quarter
        change = {s: loss[(s, last)] / loss[(s, quarter)] - 1 for s in seeds
                  if (s, last) in loss and (s, quarter) in loss}
    return "\n".join(lines), change


def results_table(points: list[dict], arms: list[Arm], protocol: str) -> str:
    """FID and class accuracy per guidance scale (mean ± std over seeds) of one protocol's
    arms, each next to its compute-matched one model."""
    chosen = [a for a in arms if a.protocol in (protocol, "both", "parent")]
    chosen.sort(key=lambda a: (a.compute, a.kind != "1 model", a.label))
    scales = sorted({p["guidance_scale"] for p in points})
    lines = ["| arm | added steps | " + " | ".join(f"FID w={s:g}" for s in scales) + " | "
             + " | ".join(f"acc. w={s:g}" for s in scales) + " |",
             "|---|---|" + "---|" * (2 * len(scales))]
    for arm in chosen:
        mine = [p for p in points if p["layout"] == arm.label]
        if not mine:
            continue
        cells = [_mean_std(p[m] for p in mine if p["guidance_scale"] == s)
                 for m in ("fid", "accuracy") for s in scales]
        lines.append(f"| {arm.label} | {arm.compute} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def loss_table(rows: list[dict], arms: list[Arm]) -> str:
    """Held-out loss per noise bin of every arm against its compute-matched one model: the
    per-seed ratio - 1, mean ± std (negative: the arm beats one model at that noise level)."""
    by = {(r["layout"], r["seed"], r["bin"]): r for r in rows}
    bins = sorted({r["bin"] for r in rows})
    sigmas = {r["bin"]: r["sigma"] for r in rows}
    lines = ["| arm vs its one model | " + " | ".join(f"sigma {sigmas[b]:.3g}" for b in bins)
             + " |", "|---|" + "---|" * len(bins)]
    for arm in arms:
        base = matched_baseline(arm, arms)
        if base is None or not any(r["layout"] == arm.label for r in rows):
            continue
        cells = []
        for b in bins:
            ratios = [by[(arm.label, s, b)]["loss"] / by[(base.label, s, b)]["loss"] - 1
                      for (label, s, b2) in list(by) if label == arm.label and b2 == b
                      and (base.label, s, b) in by]
            cells.append(f"{100 * np.mean(ratios):+.1f}%" + (
                f" ± {100 * np.std(ratios, ddof=1):.1f}" if len(ratios) > 1 else "")
                if ratios else "")
        lines.append(f"| {arm.label} vs {base.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def loss_by_count(rows: list[dict], arms: list[Arm]) -> dict[str, list[tuple]]:
    """Per kind of arm, (n, mean, std over seeds) of its held-out loss (the mean of the bins)
    relative to the parent's, in %: n experts at n S added steps (equal compute: at S), the one
    model at n S. Config-D is left out (its n S is not a tree)."""
    by: dict = {}
    for r in rows:
        by.setdefault((r["layout"], r["seed"]), []).append(r["loss"])
    mean = {k: float(np.mean(v)) for k, v in by.items()}
    s = next(a.compute for a in arms if a.label == "1 model, +S")
    series: dict = {}
    for a in arms:
        if a.protocol == "parent" or a.label.startswith("Config-D"):
            continue
        equal = a.protocol == "equal"
        rel = [mean[(a.label, seed)] / mean[("parent", seed)] - 1 for (label, seed) in mean
               if label == a.label and ("parent", seed) in mean]
        if rel:
            series.setdefault(a.kind + (", equal compute" if equal else ""), []).append(
                (len(a.experts) if equal else a.compute // s, 100 * float(np.mean(rel)),
                 100 * float(np.std(rel, ddof=1)) if len(rel) > 1 else 0.0))
    return {k: sorted(v) for k, v in series.items()}


def plot(points: list[dict], arms: list[Arm], path: str, rows: list[dict] = ()) -> None:
    """Left: best FID over w against added compute, per kind of arm (added protocol). Middle:
    FID against class accuracy over w (Fig. 7's axes) for n experts and 1 model + nS. Right:
    the held-out loss against n, relative to the parent (the clearest signal at this n)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    left, middle, right = (fig.add_subplot(1, 3, k) for k in (1, 2, 3))
    seeds = sorted({p["seed"] for p in points})

    def best(label):
        per_seed = [min(p["fid"] for p in points if p["layout"] == label and p["seed"] == s)
                    for s in seeds if any(p["layout"] == label and p["seed"] == s for p in points)]
        return (np.mean(per_seed), np.std(per_seed, ddof=1) if len(per_seed) > 1 else 0.0) \
            if per_seed else None

    for kind, style in (("1 model", "k-o"), ("experts", "b-s"), ("merged", "g--^"),
                        ("soft", "m:d")):
        chosen = sorted((a for a in arms if a.kind == kind and a.protocol in ("added", "both")
                         and a.label.split(" ")[0] != "Config-D"), key=lambda a: a.compute)
        xs, ms, ss = [], [], []
        for a in chosen:
            b = best(a.label)
            if b is not None:
                xs.append(a.compute)
                ms.append(b[0])
                ss.append(b[1])
        if xs:
            left.errorbar(xs, ms, yerr=ss, fmt=style, capsize=3, label=kind)
    left.set_xlabel("training steps added to the parent")
    left.set_ylabel("best FID over w (mean ± std over seeds)")
    left.legend(fontsize=8)
    for arm in arms:
        if arm.protocol not in ("added", "both") or arm.kind not in ("1 model", "experts"):
            continue
        mine = sorted((p for p in points if p["layout"] == arm.label),
                      key=lambda p: p["guidance_scale"])
        scales = sorted({p["guidance_scale"] for p in mine})
        acc = [np.mean([p["accuracy"] for p in mine if p["guidance_scale"] == s]) for s in scales]
        fid = [np.mean([p["fid"] for p in mine if p["guidance_scale"] == s]) for s in scales]
        if scales:
            middle.plot(acc, fid, "--" if arm.kind == "1 model" else "-", marker="o",
                       label=arm.label)
    middle.set_xlabel("class accuracy")
    middle.set_ylabel("FID")
    middle.legend(fontsize=7)
    styles = {"1 model": "k-o", "experts": "b-s", "merged": "g--^", "soft": "m:d",
              "experts, equal compute": "c-.s"}
    for name, pts in loss_by_count(list(rows), arms).items():
        n, m, sd = zip(*pts)
        right.errorbar(n, m, yerr=sd, fmt=styles.get(name, "-o"), capsize=3, label=name)
    if rows:
        right.axhline(0.0, color="0.6", lw=0.8)
        right.set_xscale("log", base=2)
        right.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        right.set_xlabel("n (experts; added compute n S, equal compute S)")
        right.set_ylabel("held-out loss vs the parent (%, ± std)")
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def report(out: str, arms: list[Arm], plot_path: str | None) -> str:
    points = load_results(os.path.join(out, "results.jsonl"))
    parts = []
    curve, change = curve_table(load_results(os.path.join(out, "curve.jsonl")))
    parts.append(f"The shared parent's held-out EDM loss ({LOSS_IMAGES} test images, 8 bins):\n"
                 + curve)
    if change:
        verdict = ", ".join(f"seed {s}: {100 * c:+.2f}%" for s, c in sorted(change.items()))
        ok = all(abs(c) < PLATEAU for c in change.values())
        parts.append(f"change over the last quarter: {verdict} -> "
                     f"{'plateaued' if ok else 'NOT plateaued'} (bar: < {100 * PLATEAU:g}%)")
    num = points[0]["num"] if points else 0
    for protocol, title in (("added", "Added compute (the paper's protocol)"),
                            ("equal", "Equal compute")):
        parts.append(f"{title}: FID ({num} samples) and class accuracy\n"
                     + results_table(points, arms, protocol))
    rows = load_results(os.path.join(out, "loss.jsonl"))
    if rows:
        parts.append("Held-out EDM loss per noise bin against the compute-matched one model:\n"
                     + loss_table(rows, arms))
    if plot_path and points:
        plot(points, arms, plot_path, rows)
    return "\n\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.expert_scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/fashion16")
    p.add_argument("--out", default="runs/scaling")
    p.add_argument("--seeds", default="0")
    p.add_argument("--parent-steps", type=int, default=128000)
    p.add_argument("--expert-steps", type=int, default=400)
    p.add_argument("--counts", default="2,4,8")
    p.add_argument("--soft-p", type=float, default=0.2)
    p.add_argument("--soft-counts", default="2")
    p.add_argument("--no-config-d", action="store_true")
    p.add_argument("--scales", default="1,2,4")
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--ref", type=int, default=3000)
    p.add_argument("--num-steps", type=int, default=12, help="sampler steps")
    p.add_argument("--weights", help="the FID Inception weights (default: make eval's)")
    p.add_argument("--report", action="store_true", help="only print the tables and the plot")
    p.add_argument("--plot", help="where the plot goes (default: OUT/expert-scaling.png, so a "
                   "study never overwrites a committed figure unless asked to)")
    args = p.parse_args(argv)
    ints = lambda text: tuple(int(x) for x in text.split(",") if x.strip())  # noqa: E731
    try:
        launches, arms = study_plan(args.parent_steps, args.expert_steps, ints(args.counts),
                                    args.soft_p, ints(args.soft_counts), not args.no_config_d)
        seeds = ints(args.seeds)
        from ediffi_jax.eval.sweep import parse_scales

        scales = parse_scales(args.scales)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.report:
        missing = missing_data(args.data, "--resolution 16 ")
        if missing:
            print(f"error: {missing}", file=sys.stderr)
            return 2
        os.makedirs(args.out, exist_ok=True)
        from ediffi_jax.parallel.host import configure_cpu_host

        configure_cpu_host()
        say = lambda m: print(m, flush=True)  # noqa: E731
        ev = Evaluator(args.data, args.out, args.num, args.ref, args.weights, log=say)
        results, losses = (os.path.join(args.out, n) for n in ("results.jsonl", "loss.jsonl"))
        for seed in seeds:
            root = os.path.join(args.out, f"s{seed}")
            t = time.perf_counter()
            paths = train_seed(root, seed, args.data, launches, arms, log=say)
            say(f"seed {seed}: trained in {time.perf_counter() - t:.0f} s")
            plateau_curve(root, seed, args.parent_steps, ev,
                          os.path.join(args.out, "curve.jsonl"), log=say)
            done = {(q["layout"], q["seed"], q["guidance_scale"]) for q in load_results(results)}
            has_loss = {(r["layout"], r["seed"]) for r in load_results(losses)}
            for arm in arms:
                evaluate(paths[arm.label], arm.label, seed, scales, ev, results, done,
                         args.num_steps, log=say, step=arm.step)
                if (arm.label, seed) not in has_loss:
                    rows = heldout_loss(paths[arm.label], ev.loss_images, ev.loss_captions,
                                        step=arm.step)
                    with open(losses, "a") as f:
                        f.writelines(json.dumps({"layout": arm.label, "seed": seed, **r}) + "\n"
                                     for r in rows)
    print(report(args.out, arms, args.plot or os.path.join(args.out, "expert-scaling.png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
