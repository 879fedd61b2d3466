"""Grade samples of the built-in shapes dataset from their pixels: prompts are held-out captions
(a different seed from training), the checker reads colour, shape, count, size and position.

    python -m sample.evaluate --ensemble runs/tiny/ensemble.json [--num 256] [--seed 0]
        [--out samples.png] [--config.sampling.num_steps=32 ...]
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def evaluate_shapes(run, ensemble, num: int = 256, seed: int = 0, sampling=None, batch: int = 64):
    """Rates of samples matching their caption (see ediffi_jax.data.shapes.caption_accuracy)."""
    from ediffi_jax.data.shapes import ShapesConfig, ShapesSource, caption_accuracy, parse_caption
    from ediffi_jax.config import section, to_dict
    from ediffi_jax.encoders.conditioner import make_conditioner
    from sample.generate import generate

    fields = dict(to_dict(run.data.shapes) or {})
    fields.update(resolution=run.stage.model.resolution, seed=int(fields.get("seed", 0)) + 1000)
    source = ShapesSource(section(ShapesConfig, fields, "data.shapes"))
    captions = [source[i]["caption"] for i in range(num)]
    conditioner = make_conditioner(run.encoders, run.stage.model)
    images = np.concatenate([
        generate(run, ensemble, captions[i:i + batch], seed=seed, sampling=sampling, first_index=i,
                 conditioner=conditioner)
        for i in range(0, num, batch)])
    rates = caption_accuracy(images, [parse_caption(c) for c in captions])
    return rates, images, captions


def main(argv=None) -> int:
    from ediffi_jax.config import split_overrides
    from ediffi_jax.parallel.host import configure_cpu_host

    overrides, rest = split_overrides(list(sys.argv[1:] if argv is None else argv))
    p = argparse.ArgumentParser(prog="python -m sample.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ensemble", required=True)
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the graded samples as one PNG grid")
    args = p.parse_args(rest)
    configure_cpu_host()
    from ediffi_jax.config import ConfigError
    from sample.generate import grid, load_ensemble, sampling_with_overrides

    try:
        run, ensemble = load_ensemble(args.ensemble)
        sampling = sampling_with_overrides(run, [o.replace("--config.", "", 1) for o in overrides])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rates, images, _ = evaluate_shapes(run, ensemble, args.num, args.seed, sampling)
    if args.out:
        from PIL import Image

        Image.fromarray(grid(images, columns=16)).save(args.out)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rates.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
