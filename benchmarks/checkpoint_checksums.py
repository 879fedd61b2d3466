"""What the checkpoints' per-array checksums cost: the checksum pass against the time a save
blocks training and against one train step, on a train state of a given U-Net width.

    python -m benchmarks.checkpoint_checksums [--channels 64] [--repeats 5]

The sums run on the device, where the state lives (one reduction per array, read once); the
save's own blocking part copies the same bytes off the device.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    import jax

    from ediffi_jax.models.unet import init_params
    from tests.tiny import tiny_unet_config
    from ediffi_jax.runs.checkpoint import Checkpointer, checksums
    from ediffi_jax.training.step import TrainConfig, init_state, make_optimizer

    model = tiny_unet_config(resolution=32, channels=args.channels, channel_mult=(1, 2, 2))
    state = init_state(init_params(model, jax.random.key(0)), make_optimizer(TrainConfig()))
    state = jax.block_until_ready(state)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    checksums(state)  # compile
    sums, saves = [], []
    with tempfile.TemporaryDirectory() as d:
        ckpt = Checkpointer(f"{d}/checkpoints", keep=1)
        for i in range(args.repeats):
            t = time.perf_counter()
            checksums(state)
            sums.append(time.perf_counter() - t)
            ckpt.save(i, state)  # blocking part includes its own checksum pass
            saves.append(ckpt.last_blocking_seconds)
            ckpt.wait()
        ckpt.close()
    s, b = statistics.median(sums), statistics.median(saves)
    print(f"state {nbytes / 2**20:.1f} MiB on {jax.devices()[0].platform}: checksums {s * 1e3:.1f} ms, "
          f"save blocking {b * 1e3:.1f} ms (checksums {s / b:.0%} of it), "
          f"{nbytes / s / 2**30:.2f} GiB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
