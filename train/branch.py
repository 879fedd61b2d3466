"""Grow an expert from a parent run by the paper's binary-tree recipe.

    python -m train.branch --parent runs/base/shared --node 1/1 --workdir runs/base/E1_1 \\
        [--config.train.steps=40000 ...]
    python -m train.branch --parent runs/base/shared --complement-of 3/0 9/511 --workdir runs/base/MC

`--node L/I` is E^L_I, the I-th of 2^L equal-mass intervals of the training log-normal; it must
lie inside the parent's interval. `--complement-of` trains the one model owning everything the
listed nodes do not (the paper's M_C). The child starts from the parent's latest params and EMA
with a fresh optimizer, inherits the parent's config, and trains only on sigmas of its interval.
Then `python -m train.ensemble` assembles experts into one ensemble that sampling loads.

    python -m train.branch --pretrained stable-diffusion-v1-5 --node 1/0 --workdir runs/sd-E1_0 \
        --config.data.name=records --config.data.path=data/... [--config.train.steps=...]

`--pretrained DIR` grows the expert from a diffusers checkpoint instead (training/pretrained.py):
its U-Net fine-tuned on timesteps [q_lo T, q_hi T) of the node, its own loss; `python -m
train.export` then writes it as a pipeline folder for an experts file
(pipeline/pretrained_experts.py) beside its parent.
"""
from __future__ import annotations

import argparse
import os
import sys

from ediffi_jax.config import split_overrides


def child_interval(node: str | None, complement_of: list[str] | None):
    from ediffi_jax.diffusion.intervals import complement, tree_node

    parse = lambda s: tree_node(*(int(v) for v in s.split("/")))  # noqa: E731
    if (node is None) == (not complement_of):
        raise ValueError("give exactly one of --node L/I or --complement-of L/I [L/I ...]")
    if node is not None:
        return parse(node)
    return complement([parse(s) for s in complement_of], "complement")


def main(argv=None) -> int:
    from ediffi_jax.parallel.host import configure_cpu_host

    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m train.branch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parent = p.add_mutually_exclusive_group(required=True)
    parent.add_argument("--parent", help="the parent run's workdir")
    parent.add_argument("--pretrained", metavar="DIR", help="a diffusers pipeline folder")
    p.add_argument("--workdir", required=True, help="the child run's workdir")
    p.add_argument("--node", help="L/I: the tree node E^L_I")
    p.add_argument("--complement-of", nargs="+", metavar="L/I")
    from train.__main__ import add_resume_arguments, exit_after_failed_save

    add_resume_arguments(p)
    args = p.parse_args(rest)
    configure_cpu_host()

    from fractions import Fraction

    import ml_collections

    from ediffi_jax.config import ConfigError, apply_override, fill_defaults, section
    from ediffi_jax.parallel.distributed import DistributedConfig, initialize
    from ediffi_jax.runs.checkpoint import CheckpointSaveError
    from ediffi_jax.runs.spec import parse_run
    from ediffi_jax.runs.store import run_config
    from ediffi_jax.training.trainer import train

    try:
        child = child_interval(args.node, args.complement_of)
        # This launch's `distributed` section (never the parent's: it belongs to the parent's
        # launch), applied before reading the parent's checkpoint starts a jax backend.
        launch = ml_collections.ConfigDict()
        fill_defaults(launch, "distributed", DistributedConfig)
        for item in overrides:
            if item.startswith("--config.distributed."):
                apply_override(launch, item)
        if args.pretrained:
            from ediffi_jax.training.pretrained import finetune_config, train_pretrained

            if not os.path.isdir(args.pretrained):
                raise ConfigError(f"--pretrained {args.pretrained}: no such folder")
            config = finetune_config(args.pretrained, (child.q_lo, child.q_hi),
                                     f"{os.path.basename(os.path.normpath(args.pretrained))}"
                                     f"-{child.name}")
            config.distributed = launch.distributed
            for item in overrides:
                apply_override(config, item)
            config.lock()
            train_pretrained(config, args.workdir, changes=args.change,
                             restart_if_unreadable=args.restart_if_unreadable)
            return 0
        initialize(section(DistributedConfig, launch.distributed, "distributed"))
        config = run_config(args.parent)
        parent_lo, parent_hi = (Fraction(q) for q in parse_run(config).train.sigma_quantiles)
        if not (parent_lo <= child.q_lo and child.q_hi <= parent_hi):
            raise ConfigError(
                f"{child.name} owns quantiles ({child.q_lo}, {child.q_hi}], outside the parent's "
                f"({parent_lo}, {parent_hi}]: branch from an ancestor whose interval contains it")
        config.unlock()
        config.distributed = launch.distributed
        config.train.init_from = args.parent
        config.train.sigma_quantiles = (str(child.q_lo), str(child.q_hi))
        config.name = f"{config.get('name', 'stage')}-{child.name}"
        for item in overrides:
            apply_override(config, item)
        config.lock()
        train(config, args.workdir, changes=args.change,
              restart_if_unreadable=args.restart_if_unreadable)
    except CheckpointSaveError as e:
        exit_after_failed_save(e)
    except (ConfigError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
