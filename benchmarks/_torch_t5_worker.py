"""The PyTorch side of benchmarks/t5_encode.py: a persistent transformers T5EncoderModel.

    .venv-tools/bin/python benchmarks/_torch_t5_worker.py CHECKPOINT_DIR INPUTS.npz [--threads 2]

Runs in the tools venv (torch + transformers; tools/requirements-torch.txt), not the project's.
Loads the checkpoint (float32, eval, offline), reads `ids` and `mask` from INPUTS.npz, then
answers one JSON command per stdin line with one JSON line on stdout:

    {"cmd": "time", "iters": K}      -> {"ok": true, "times": [seconds per forward, ...]}
    {"cmd": "check", "out": PATH}    -> {"ok": true, "path": PATH}  (last_hidden_state saved
                                        to the .npz PATH as `hidden`)
    {"cmd": "quit"}                  -> exits

The first line it writes is {"ready": true, ...} with versions and torch's thread count.
Everything else it prints goes to stderr, so stdout stays the protocol.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("inputs")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    protocol = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol

    import numpy as np
    import torch
    import transformers
    from transformers import T5EncoderModel

    torch.set_num_threads(args.threads)
    model, info = T5EncoderModel.from_pretrained(args.checkpoint, dtype=torch.float32,
                                                 output_loading_info=True)
    model.eval()
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys",
                                                              "mismatched_keys")}
    data = np.load(args.inputs)
    ids = torch.from_numpy(data["ids"].astype(np.int64))
    mask = torch.from_numpy(data["mask"].astype(np.int64))

    def forward():
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state

    def reply(obj):
        protocol.write(json.dumps(obj) + "\n")
        protocol.flush()

    reply({"ready": True, "torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
           "dtype": str(next(model.parameters()).dtype), "loading_problems": problems,
           "attn_implementation": getattr(model.config, "_attn_implementation", None)})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            if cmd["cmd"] == "time":
                times = []
                for _ in range(int(cmd["iters"])):
                    t = time.perf_counter()
                    forward()
                    times.append(time.perf_counter() - t)
                reply({"ok": True, "times": times})
            elif cmd["cmd"] == "check":
                np.savez(cmd["out"], hidden=forward().numpy())
                reply({"ok": True, "path": cmd["out"]})
            elif cmd["cmd"] == "quit":
                reply({"ok": True})
                return 0
            else:
                reply({"ok": False, "error": f"unknown command {cmd['cmd']!r}"})
        except Exception as e:  # report, keep serving: the parent decides
            reply({"ok": False, "error": f"{type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
