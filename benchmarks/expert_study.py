"""The expert-scaling study: one model vs 2 vs 3 experts at equal samples seen, FID over guidance.

    python -m ediffi_jax.data.prepare fashion_mnist --out data/fashion
    python -m benchmarks.expert_study --data data/fashion --out runs/study \
        [--seeds 0,1,2] [--layouts 1,2,3,1r] [--steps 1000] [--shared 500] [--level1 100] \
        [--scales 1,2,3,5] [--num 256] [--ref 3000] [--weights default_1.pt]
    python -m benchmarks.expert_study --out runs/study --report   # the tables and the plot

Per seed (`train.seed`, so initialisation, data order and noise all change), every ensemble is
grown from the same shared model, the baseline's own checkpoint at step `--shared` (the config's
learning rate is constant after warm-up, so that checkpoint is a shared model in its own right):

    1   the baseline, trained on to `--steps`
    2   E1_0 + E1_1 (the paper's first split), each (steps - shared) / 2 steps
    3   E2_0 + M_C + E2_3 (Config-D's shape at depth 2: the lowest and highest quarters of the
        noise mass grown through E1_0 / E1_1, the middle half one complement model), five
        fine-tunes of (steps - shared) / 5 steps each
    1r  the control: the baseline's second half as a branch over the whole range (node 0/0),
        i.e. with the fresh optimizer every child starts with

so every ensemble has seen `steps` x batch training samples (the paper's fair comparison, Fig. 7).
Each child starts a fresh AdamW with `CHILD_WARMUP` warm-up steps at the same constant rate.
The 3-expert level-1 nodes are the 2-expert children at step `--level1`: each is trained to
that step, branched from, then continued (training resumes exactly).

Evaluation: for each ensemble and guidance scale, `--num` samples whose prompts are the captions
of the first `--num` test images (the same seed for every ensemble, so they differ in their
denoisers only), FID against `--ref` other test images, and class accuracy: a ridge classifier on
the same Inception features, fitted on the reference images' labels (the floor, the same numbers
for the prompts' own real images, and the probe's accuracy on 500 further real images go to
`<out>/reference.json`). Per ensemble also the held-out EDM loss in 8 equal-mass noise bins.
Every point is appended to `<out>/results.jsonl` / `loss.jsonl` as it is measured and skipped
when rerun, so an interrupted study continues where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from fractions import Fraction

import numpy as np

from ediffi_jax.atomic import write_atomically

CONFIG = "configs/expert_study.py"
LAYOUTS = ("1", "2", "3", "1r")
LABELS = {"1": "1 model", "2": "2 experts", "3": "3 experts",
          "1r": "control: 1 model, fresh optimizer"}
# A child's fresh optimizer warms up for this many steps: 10% of the shortest fine-tune, where
# the config's 100 (made for a run from scratch) would fill the whole of a 100-step child.
CHILD_WARMUP = 10
LOSS_IMAGES = 512  # held-out test images the loss per noise bin is measured on


# ----------------------------------------------------------------------------- the plan

@dataclasses.dataclass(frozen=True)
class Run:
    """One training launch: `workdir` trained to `steps` (from `parent` at node `node`)."""
    workdir: str
    steps: int
    parent: str = ""           # "" for the baseline, trained from scratch
    node: str = ""             # "L/I", or "MC" for the complement of the 3-expert leaves


def study_plan(root: str, steps: int, shared: int, level1: int):
    """(launches in order, {layout: expert workdirs}) for one seed under `root`."""
    if not 0 < shared < steps:
        raise ValueError(f"--shared must lie strictly between 0 and --steps, got {shared}")
    if (steps - shared) % 10:
        raise ValueError(f"--steps - --shared must divide by 10 (2 and 5 children), "
                         f"got {steps - shared}")
    half, fifth = (steps - shared) // 2, (steps - shared) // 5
    if level1 != fifth:
        raise ValueError(f"--level1 must be (steps - shared) / 5 = {fifth} for equal samples "
                         f"seen, got {level1}")
    d = lambda name: os.path.join(root, name)  # noqa: E731
    launches = [
        Run(d("base"), shared),
        # The control: the baseline's second half with a fresh optimizer, as every child has.
        Run(d("R"), steps - shared, d("base"), "0/0"),
        Run(d("E1_0"), level1, d("base"), "1/0"), Run(d("E2_0"), fifth, d("E1_0"), "2/0"),
        Run(d("E1_0"), half, d("base"), "1/0"),
        Run(d("E1_1"), level1, d("base"), "1/1"), Run(d("E2_3"), fifth, d("E1_1"), "2/3"),
        Run(d("E1_1"), half, d("base"), "1/1"),
        Run(d("MC"), fifth, d("base"), "MC"),
        Run(d("base"), steps),
    ]
    experts = {"1": [d("base")], "2": [d("E1_0"), d("E1_1")],
               "3": [d("E2_0"), d("MC"), d("E2_3")], "1r": [d("R")]}
    return launches, experts


def branch_points(launches) -> dict[str, tuple[str, int]]:
    """{child workdir: (parent, the parent's step when the child is first launched)}."""
    reached, branched = {}, {}
    for r in launches:
        if r.parent and r.workdir not in branched:
            branched[r.workdir] = (r.parent, reached[r.parent])
        reached[r.workdir] = r.steps
    return branched


def samples_seen(launches, experts, layout: str, batch: int) -> int:
    """Training samples behind an ensemble: its experts' own steps plus every ancestor's steps
    up to the point it was branched from (each counted once)."""
    branched = branch_points(launches)
    final = {r.workdir: r.steps for r in launches}
    counted: dict[str, int] = {}   # workdir -> steps of it counted so far
    for w in experts[layout]:
        at, step = w, final[w]
        while True:
            counted[at] = max(counted.get(at, 0), step)
            if at not in branched:
                break
            at, step = branched[at]
    return sum(counted.values()) * batch


def missing_data(data: str, prepare: str = "") -> str | None:
    """What is missing of the prepared Fashion-MNIST splits, with the command that makes them."""
    for name in ("train", "test"):
        if not os.path.exists(os.path.join(data, f"{name}.json")):
            return (f"{data}/{name} is missing: run `python -m ediffi_jax.data.prepare "
                    f"fashion_mnist {prepare}--out {data}`")
    return None


def last_step(workdir: str) -> int:
    """The newest checkpoint step of a run (0 if none)."""
    path = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(path) if n.isdigit()] if os.path.isdir(path) else []
    return max(steps, default=0)


def needed(launches, experts, layouts) -> set:
    """Workdirs the chosen layouts' experts are made from (themselves and their ancestors)."""
    branched = branch_points(launches)
    out = set()
    for w in (w for layout in layouts for w in experts[layout]):
        while w and w not in out:
            out.add(w)
            w = branched.get(w, ("", 0))[0]
    return out


def train_seed(root: str, seed: int, data: str, steps: int, shared: int, level1: int,
               layouts=LAYOUTS, log=print) -> dict:
    """Run the launches the chosen layouts need (each skipped when its workdir has reached its
    step) and write one ensemble.json per layout; returns {layout: ensemble path}.

    A child added later, after its from-scratch parent has trained past the branch step, is
    branched from a copy of the parent retrained to that step (`<parent>@<step>`): training
    is deterministic, so the copy is the parent as it was there (bitwise, measured)."""
    launches, experts = study_plan(root, steps, shared, level1)
    todo, branched = needed(launches, experts, layouts), branch_points(launches)
    common = [f"--config.train.seed={seed}", f"--config.data.path={os.path.join(data, 'train')}"]
    roots = {r.workdir for r in launches if not r.parent}

    def launch(r: Run):
        if not r.parent:
            cmd = ["-m", "train", "--config", CONFIG]
        elif r.node == "MC":
            cmd = ["-m", "train.branch", "--parent", r.parent, "--complement-of", "2/0", "2/3"]
        else:
            cmd = ["-m", "train.branch", "--parent", r.parent, "--node", r.node]
        if r.parent:
            cmd.append(f"--config.train.warmup_steps={CHILD_WARMUP}")
        cmd += ["--workdir", r.workdir, f"--config.train.steps={r.steps}", *common]
        t = time.perf_counter()
        subprocess.run([sys.executable, *cmd], check=True, stdout=subprocess.DEVNULL)
        log(f"  seed {seed}: {os.path.basename(r.workdir)} -> step {r.steps} "
            f"({time.perf_counter() - t:.0f} s)")

    for r in launches:
        if r.workdir not in todo or last_step(r.workdir) >= r.steps:
            continue
        at = branched[r.workdir][1] if r.parent else 0
        if r.parent and last_step(r.workdir) == 0 and last_step(r.parent) != at:
            if r.parent not in roots or last_step(r.parent) < at:
                raise RuntimeError(f"{r.workdir} is missing but its parent {r.parent} is at step "
                                   f"{last_step(r.parent)}, not {at}: start this seed again in "
                                   f"a fresh --out")
            copy = f"{r.parent}@{at}"
            if last_step(copy) < at:
                launch(Run(copy, at))
            r = dataclasses.replace(r, parent=copy)
        launch(r)
    ensembles = {}
    for layout in layouts:
        path = os.path.join(root, f"ensemble{layout}.json")
        if not os.path.exists(path):
            subprocess.run([sys.executable, "-m", "train.ensemble", "--out", path,
                            *experts[layout]], check=True, stdout=subprocess.DEVNULL)
        ensembles[layout] = path
    return ensembles


# ----------------------------------------------------------------------------- measuring

def ridge_classifier(features: np.ndarray, labels: np.ndarray, classes: int, lam: float = 1.0):
    """A linear one-vs-all least-squares classifier on standardised features: predict(X)."""
    mu, sd = features.mean(0), features.std(0) + 1e-6
    x = (features - mu) / sd
    y = np.eye(classes)[labels]
    w = np.linalg.solve(x.T @ x + lam * len(x) * np.eye(x.shape[1]), x.T @ (y - y.mean(0)))
    b = y.mean(0)
    return lambda f: np.argmax(((f - mu) / sd) @ w + b, axis=1)


class Evaluator:
    """FID and class accuracy of sample sets, with the reference statistics and classifier made
    once from the test split (features cached in `<out>/reference.npz`). The floor, the same
    measures on the prompts' own real images, goes to `<out>/reference.json`."""

    def __init__(self, data: str, out: str, num: int, ref: int, weights: str | None, log=print):
        from ediffi_jax.eval import fid
        from ediffi_jax.eval.sweep import inception_features, records

        stop = num + ref + 500  # prompts, then the reference, then the probe's real check
        test = records(os.path.join(data, "test"), max(stop, LOSS_IMAGES), field=None)
        field = lambda name, span: [r[name] for r in test[span]]  # noqa: E731
        images = lambda span: np.stack([np.asarray(im) for im in field("image", span)])  # noqa: E731
        self.features = inception_features(weights)
        self.captions = field("caption", slice(0, num))
        self.labels = np.asarray(field("label", slice(0, num)))
        # The held-out loss's images: the first test images (the prompts' own among them).
        self.loss_captions = field("caption", slice(0, LOSS_IMAGES))
        self.loss_images = images(slice(0, LOSS_IMAGES))
        path = os.path.join(out, "reference.npz")
        cache = dict(np.load(path)) if os.path.exists(path) else {}
        for key, span in (("features", slice(num, stop)), ("prompt_features", slice(0, num))):
            if key not in cache:
                log(f"reference: Inception features of test images {span.start}..{span.stop - 1}")
                cache[key] = self.features(images(span))
                np.savez(path, **cache)
        feats, ref_labels = cache["features"], np.asarray(field("label", slice(num, stop)))
        self.ref_stats = fid.statistics(feats[:ref])
        self.classify = ridge_classifier(feats[:ref], ref_labels[:ref], 10)
        probe = float(np.mean(self.classify(feats[ref:]) == ref_labels[ref:]))
        self.real = {"probe_accuracy": probe, "reference": ref, "num": num,
                     **self.measure_features(cache["prompt_features"])}
        with open(os.path.join(out, "reference.json"), "w") as f:
            json.dump(self.real, f, indent=1)
        log(f"reference: {ref} test images; the probe's class accuracy on 500 other real test "
            f"images {self.real['probe_accuracy']:.3f}; the prompts' own {num} real images: FID "
            f"{self.real['fid']:.2f}, class accuracy {self.real['accuracy']:.3f}")

    def measure_features(self, feats: np.ndarray) -> dict:
        from ediffi_jax.eval import fid

        return {"fid": fid.fid(fid.statistics(feats), self.ref_stats),
                "accuracy": float(np.mean(self.classify(feats) == self.labels))}

    def measure(self, images: np.ndarray) -> dict:
        return self.measure_features(self.features(images))


def evaluate(ensemble_path: str, layout: str, seed: int, scales, ev: Evaluator, results: str,
             done: set, num_steps: int, log=print, step: int | None = None) -> None:
    """FID and class accuracy of the ensemble (its experts' checkpoint `step`, default the
    newest) at each guidance scale not yet in `done`, appended to `results`."""
    from ediffi_jax.diffusion.sampling import PlanRunner
    from ediffi_jax.encoders.conditioner import make_conditioner
    from ediffi_jax.eval.sweep import sample_images
    from ediffi_jax.models.unet import UNet
    from ediffi_jax.pipeline.denoise import unet_denoise_fn
    from ediffi_jax.runs.store import load_ensemble

    todo = [s for s in scales if (layout, seed, s) not in done]
    if not todo:
        return
    run, ensemble = load_ensemble(ensemble_path, step=step)
    runner = PlanRunner(unet_denoise_fn(UNet(run.stage.model)))
    conditioner = make_conditioner(run.encoders, run.stage.model)
    for scale in todo:
        t = time.perf_counter()
        sampling = dataclasses.replace(run.stage.sampling, guidance_scale=float(scale),
                                       num_steps=num_steps)
        # Sampling seed 0 for every ensemble and scale: they differ in their denoisers only.
        images = sample_images(run, ensemble, ev.captions, seed=0, sampling=sampling,
                               runner=runner, conditioner=conditioner, batch=128)
        point = {"layout": layout, "experts": len(ensemble.intervals), "seed": seed,
                 "guidance_scale": float(scale),
                 **ev.measure(images), "num": len(images), "seconds": time.perf_counter() - t}
        with open(results, "a") as f:
            f.write(json.dumps(point) + "\n")
        log(f"  {LABELS.get(layout, layout)}, seed {seed}, w={scale:g}: FID {point['fid']:.2f}, "
            f"class accuracy {point['accuracy']:.3f} ({point['seconds']:.0f} s)")


def heldout_loss(ensemble_path: str, images: np.ndarray, captions, bins: int = 8,
                 seed: int = 0, step: int | None = None) -> list[dict]:
    """The EDM training loss on held-out images at the middle quantile of each of `bins`
    equal-mass bins of the training log-normal, each bin denoised by the expert owning it (with
    the caption, no dropout; the same noise for every ensemble). Where the experts beat the one
    model, and where not, at equal samples seen."""
    import jax
    import jax.numpy as jnp

    from ediffi_jax.diffusion import edm
    from ediffi_jax.diffusion.plan import SegmentSettings
    from ediffi_jax.encoders.conditioner import make_conditioner
    from ediffi_jax.models.unet import UNet
    from ediffi_jax.pipeline.denoise import unet_denoise_fn
    from ediffi_jax.runs.store import load_ensemble

    run, ensemble = load_ensemble(ensemble_path, step=step)
    denoise = jax.jit(unet_denoise_fn(UNet(run.stage.model)), static_argnums=4)
    cond = jax.tree.map(jnp.asarray,
                        make_conditioner(run.encoders, run.stage.model).encode(list(captions)))
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    out = []
    for k in range(bins):
        q = Fraction(2 * k + 1, 2 * bins)
        expert = next(i for i, iv in enumerate(ensemble.intervals) if iv.q_lo < q <= iv.q_hi)
        sigma = jnp.full((len(x),), edm.sigma_at_quantile_np(float(q)), jnp.float32)
        noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), k), x.shape)
        d = denoise(ensemble.params[expert], x + edm.expand_to(sigma, x) * noise, sigma, cond,
                    SegmentSettings())
        out.append({"bin": k, "q": float(q), "sigma": float(sigma[0]),
                    "expert": ensemble.intervals[expert].name,
                    "loss": float(jnp.mean(edm.edm_loss(d, x, sigma)))})
    return out


def loss_table(rows: list[dict]) -> str:
    """Held-out loss per noise bin: the 1 model's mean over seeds, and each other layout's
    change relative to it (mean and spread over seeds of the per-seed ratio)."""
    by = {}
    for r in rows:
        by.setdefault((layout_of(r), r["bin"]), {})[r["seed"]] = r
    bins = sorted({b for _, b in by})
    layouts = ordered({layout for layout, _ in by})
    lines = ["| sigma (bin middle) | " + " | ".join(
                 f"{LABELS[x]}: loss" if x == "1" else f"{LABELS[x]} vs 1 model"
                 for x in layouts) + " |",
             "|---|" + "---|" * len(layouts)]
    for b in bins:
        base = by.get(("1", b), {})
        cells = []
        for layout in layouts:
            if layout == "1":
                cells.append(f"{np.mean([r['loss'] for r in base.values()]):.4f}")
                continue
            mine = by.get((layout, b), {})
            ratios = [mine[s]["loss"] / base[s]["loss"] - 1 for s in mine if s in base]
            cells.append(f"{100 * np.mean(ratios):+.1f}% ± {100 * np.std(ratios, ddof=1):.1f}"
                         if len(ratios) > 1 else (f"{100 * ratios[0]:+.1f}%" if ratios else ""))
        sigma = next(r["sigma"] for (_, b2), rs in by.items() if b2 == b for r in rs.values())
        lines.append(f"| {sigma:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- report

def load_results(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def layout_of(row: dict) -> str:
    return row.get("layout", str(row["experts"]))  # rows written before the control arm


def ordered(layouts) -> list[str]:
    return sorted(layouts, key=LAYOUTS.index)


def summarise(points: list[dict]) -> dict:
    """{(layout, scale): {"fid": (mean, std, n), "accuracy": (mean, std, n)}} over seeds."""
    groups: dict = {}
    for p in points:
        groups.setdefault((layout_of(p), p["guidance_scale"]), []).append(p)
    return {key: {m: (float(np.mean([p[m] for p in ps])),
                      float(np.std([p[m] for p in ps], ddof=1)) if len(ps) > 1 else 0.0,
                      len(ps)) for m in ("fid", "accuracy")}
            for key, ps in groups.items()}


def report(points: list[dict], plot: str | None) -> str:
    summary = summarise(points)
    scales = sorted({s for _, s in summary})
    layouts = ordered({layout for layout, _ in summary})
    lines = ["| ensemble | " + " | ".join(f"w={s:g}" for s in scales) + " |",
             "|---|" + "---|" * len(scales)]
    for metric, fmt in (("fid", "{:.2f} ± {:.2f}"), ("accuracy", "{:.3f} ± {:.3f}")):
        for layout in layouts:
            cells = [fmt.format(*summary[(layout, s)][metric][:2])
                     + f" (n={summary[(layout, s)][metric][2]})"
                     if (layout, s) in summary else "" for s in scales]
            lines.append(f"| {LABELS[layout]}: {'FID' if metric == 'fid' else 'class acc.'} | "
                         + " | ".join(cells) + " |")
    if plot:
        _plot(summary, layouts, scales, plot)
    return "\n".join(lines)


def _plot(summary, layouts, scales, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for layout in layouts:
        ss = [s for s in scales if (layout, s) in summary]
        fid_m = [summary[(layout, s)]["fid"][0] for s in ss]
        fid_s = [summary[(layout, s)]["fid"][1] for s in ss]
        acc = [summary[(layout, s)]["accuracy"][0] for s in ss]
        n = min(summary[(layout, s)]["fid"][2] for s in ss)
        label = f"{LABELS[layout]} ({n} seed{'s' if n > 1 else ''})"
        style = "--" if layout == "1r" else "-"
        left.errorbar(ss, fid_m, yerr=fid_s, marker="o", capsize=3, label=label, linestyle=style)
        right.plot(acc, fid_m, marker="o", linestyle=style, label=label)
        for a, f, s in zip(acc, fid_m, ss):
            right.annotate(f"w={s:g}", (a, f), textcoords="offset points", xytext=(4, 4),
                           fontsize=7)
    left.set_xlabel("guidance scale w")
    left.set_ylabel("FID (mean ± std over seeds)")
    right.set_xlabel("class accuracy (linear probe on Inception features)")
    right.set_ylabel("FID (mean over seeds)")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format="png"))


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.expert_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/fashion", help="prepare fashion_mnist's output")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help=f"which ensembles to train and measure, of {','.join(LAYOUTS)} "
                        "(1r: the control, the baseline's second half on a fresh optimizer)")
    p.add_argument("--steps", type=int, default=1000, help="training steps behind every ensemble")
    p.add_argument("--shared", type=int, default=500, help="the shared model's steps")
    p.add_argument("--level1", type=int, default=100)
    p.add_argument("--scales", default="1,2,3,5")
    p.add_argument("--num", type=int, default=256, help="samples per point")
    p.add_argument("--ref", type=int, default=3000, help="reference test images for FID")
    p.add_argument("--num-steps", type=int, default=12, help="DPM-Solver++(2M) steps")
    p.add_argument("--weights", help="FID Inception weights (default: the installed package's)")
    p.add_argument("--report", action="store_true", help="only print the table, write the plot")
    p.add_argument("--plot", default="docs/expert-study.png")
    args = p.parse_args(argv)
    from ediffi_jax.eval.sweep import parse_scales

    seeds = [int(s) for s in args.seeds.split(",")]
    layouts = args.layouts.split(",")
    if not set(layouts) <= set(LAYOUTS):
        print(f"error: --layouts: unknown {sorted(set(layouts) - set(LAYOUTS))}; "
              f"choose from {','.join(LAYOUTS)}", file=sys.stderr)
        return 2
    scales = parse_scales(args.scales)
    results = os.path.join(args.out, "results.jsonl")
    losses = os.path.join(args.out, "loss.jsonl")
    if not args.report:
        study_plan(args.out, args.steps, args.shared, args.level1)  # bad numbers fail first
        missing = missing_data(args.data)
        if missing:
            print(f"error: {missing}", file=sys.stderr)
            return 2
        os.makedirs(args.out, exist_ok=True)
        from ediffi_jax.parallel.host import configure_cpu_host

        configure_cpu_host()
        ev = Evaluator(args.data, args.out, args.num, args.ref, args.weights)
        # What earlier invocations measured; this one only adds (layout, seed) pairs of its own.
        done = {(layout_of(q), q["seed"], q["guidance_scale"]) for q in load_results(results)}
        has_loss = {(layout_of(r), r["seed"]) for r in load_results(losses)}
        for seed in seeds:
            root = os.path.join(args.out, f"s{seed}")
            ensembles = train_seed(root, seed, args.data, args.steps, args.shared, args.level1,
                                   layouts, log=lambda m: print(m, flush=True))
            launches, experts = study_plan(root, args.steps, args.shared, args.level1)
            for layout in layouts:
                seen = samples_seen(launches, experts, layout, 1)
                print(f"seed {seed}: {LABELS[layout]}, {seen} training steps in all", flush=True)
                evaluate(ensembles[layout], layout, seed, scales, ev, results, done,
                         args.num_steps, log=lambda m: print(m, flush=True))
                if (layout, seed) not in has_loss:
                    rows = heldout_loss(ensembles[layout], ev.loss_images, ev.loss_captions)
                    with open(losses, "a") as f:
                        f.writelines(json.dumps({"layout": layout, "experts": len(experts[layout]),
                                                 "seed": seed, **r})
                                     + "\n" for r in rows)
    print(report(load_results(results), args.plot))
    loss_rows = load_results(losses)
    if loss_rows:
        print(f"\nheld-out EDM loss by noise level ({LOSS_IMAGES} test images):\n"
              + loss_table(loss_rows))
    floor = os.path.join(args.out, "reference.json")
    if os.path.exists(floor):
        with open(floor) as f:
            real = json.load(f)
        print(f"real images (the prompts' own {real['num']} test images against the same "
              f"{real['reference']}): FID {real['fid']:.2f}, class accuracy "
              f"{real['accuracy']:.3f}; the probe on 500 other real images: "
              f"{real['probe_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
