"""The PyTorch side of benchmarks/sd15_vs_diffusers.py: diffusers' SD 1.5 U-Net and VAE at
their real size (configs/pretrained/sd15), random weights, float32, SDPA attention.

    .venv-tools/bin/python benchmarks/_torch_sd15_worker.py [--threads 2] [--size 64]

One JSON command per stdin line, one JSON line back:
    {"cmd": "time", "what": "cfg_step" | "decode", "iters": K} -> {"ok": true, "times": [...]}
    {"cmd": "quit"}
cfg_step: one U-Net call on the conditional and unconditional latents together (batch 2,
77 x 768 context), the guidance combination and an Euler update; decode: the VAE decoder on
one latent (latents / scaling_factor). The first line written is {"ready": true, ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(component):
    with open(os.path.join(ROOT, "configs", "pretrained", "sd15", component, "config.json")) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=64, help="latent side (64: 512 x 512 images)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config("unet")).eval()
    vae = AutoencoderKL.from_config(config("vae")).eval()
    latents = torch.randn(1, 4, args.size, args.size)
    context = torch.randn(2, 77, 768)
    t = torch.tensor([500.0])

    def cfg_step():
        x_in = torch.cat([latents, latents]) / (1 + 14.6 ** 2) ** 0.5
        out = unet(x_in, t, encoder_hidden_states=context).sample
        uncond, cond = out.chunk(2)
        return latents + (-0.5) * (uncond + 7.5 * (cond - uncond))

    def decode():
        return vae.decode(latents / vae.config.scaling_factor).sample

    work = {"cfg_step": cfg_step, "decode": decode}
    count = sum(p.numel() for p in unet.parameters())
    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "unet_params": count}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        times = []
        with torch.inference_mode():
            for _ in range(cmd["iters"]):
                start = time.perf_counter()
                work[cmd["what"]]()
                times.append(time.perf_counter() - start)
        print(json.dumps({"ok": True, "times": times}), flush=True)


if __name__ == "__main__":
    main()
