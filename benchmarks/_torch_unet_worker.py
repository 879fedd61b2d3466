"""The PyTorch side of benchmarks/vs_diffusers.py: a persistent diffusers UNet2DConditionModel.

    .venv-tools/bin/python benchmarks/_torch_unet_worker.py SPEC.json [--threads 2]

Runs in the tools venv (torch + diffusers; tools/requirements-torch.txt), not the project's.
SPEC.json holds {"unet": UNet2DConditionModel kwargs, "variant": "stock" | "matched",
"train_batch": B, "sample_batch": B, "context_length": L, "sample_steps": K,
"guidance_scale": w, "seed": s}. "matched" removes what our attention block does not have:
each transformer block's feed-forward (GEGLU, 4x) and its LayerNorm, and the transformer's
proj_in / proj_out, so a block is GroupNorm, LayerNorm + self-attention, LayerNorm +
cross-attention, as ours is GroupNorm + self-attention, GroupNorm + cross-attention.

The work timed is the same as the JAX side's:
- train: EDM training step on a fixed batch (log-normal sigma per example, noise, the
  preconditioned denoiser D = c_skip x + c_out F(c_in x, c_noise), the EDM-weighted loss,
  per-example conditioning dropout of the context tokens), backward, global-norm clipping at 1,
  AdamW (foreach), and an EMA of the params;
- sample: K Euler steps of classifier-free guidance, the conditional and unconditional
  branches in one batched U-Net call (batch 2B), D = D_u + w (D_c - D_u).

Random weights: every weight (also those diffusers would zero) is drawn normal / sqrt(fan in),
so no layer is an all-zero shortcut. One JSON command per stdin line, one JSON line back:

    {"cmd": "time", "what": "train" | "sample", "iters": K} -> {"ok": true, "times": [...]}
    {"cmd": "flops"} -> {"ok": true, "train": F, "sample_step": F} (torch.utils.flop_counter:
                        matmuls, convs and attention, 2 flops per multiply-add)
    {"cmd": "quit"}

The first line it writes is {"ready": true, ...} with versions, thread count and param count.
Everything else goes to stderr, so stdout stays the protocol.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

SIGMA_DATA = 0.5
P_MEAN, P_STD = -1.2, 1.2


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("spec")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    protocol = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol

    import torch
    import diffusers
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    with open(args.spec) as f:
        spec = json.load(f)
    torch.set_num_threads(args.threads)
    torch.manual_seed(spec["seed"])
    model = UNet2DConditionModel(**spec["unet"])

    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    if spec["variant"] == "matched":
        for m in model.modules():
            if isinstance(m, BasicTransformerBlock):
                m.norm3, m.ff = torch.nn.Identity(), Zero()
            if isinstance(m, Transformer2DModel):
                m.proj_in, m.proj_out = torch.nn.Identity(), torch.nn.Identity()
    elif spec["variant"] != "stock":
        raise ValueError(f"unknown variant {spec['variant']!r}")
    with torch.no_grad():
        for name, w in model.named_parameters():
            if w.ndim >= 2:  # linear [out, in], conv [out, in, kh, kw]
                w.normal_(0.0, 1.0 / math.sqrt(w[0].numel()))
    params = [w for w in model.parameters()]
    n_params = sum(w.numel() for w in params)

    u = spec["unet"]
    res, ch = u["sample_size"], u["in_channels"]
    length, width = spec["context_length"], u["cross_attention_dim"]
    gen = torch.Generator().manual_seed(spec["seed"])
    tb, sb = spec["train_batch"], spec["sample_batch"]
    images = torch.rand(tb, ch, res, res, generator=gen) * 2 - 1
    context = torch.randn(tb, length, width, generator=gen)
    sample_x = torch.randn(sb, ch, res, res, generator=gen)
    sample_cond = torch.randn(sb, length, width, generator=gen)
    sample_uncond = torch.zeros(sb, length, width)

    def precondition(sigma):
        total = sigma**2 + SIGMA_DATA**2
        return (SIGMA_DATA**2 / total, sigma * SIGMA_DATA / total.sqrt(), 1 / total.sqrt(),
                sigma.log() / 4)

    def expand(v):
        return v[:, None, None, None]

    def denoise(x, sigma, ctx):
        c_skip, c_out, c_in, c_noise = precondition(sigma)
        f = model(expand(c_in) * x, c_noise, encoder_hidden_states=ctx).sample
        return expand(c_skip) * x + expand(c_out) * f

    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01, foreach=True)
    ema = [w.detach().clone() for w in params]
    model.train()

    def train_step():
        sigma = (torch.randn(tb) * P_STD + P_MEAN).exp()
        noise = torch.randn_like(images)
        keep = (torch.rand(tb) >= 0.25).float()[:, None, None]
        d = denoise(images + expand(sigma) * noise, sigma, context * keep)
        weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
        loss = (weight * ((d - images) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [w.detach() for w in params], 1 - 0.999)
        return loss

    steps = spec["sample_steps"]
    # EDM's (Karras et al.) rho = 7 schedule of `steps` sigmas from 80 to 0.002, then 0: the
    # sigmas of the JAX side's plan (ediffi_jax.diffusion.schedules.karras_sigmas).
    rho, lo, hi = 7.0, 0.002, 80.0
    ramp = [i / (steps - 1) for i in range(steps)] if steps > 1 else [0.0]
    sigmas = [(hi ** (1 / rho) + r * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for r in ramp]
    sigmas.append(0.0)
    guidance = spec["guidance_scale"]
    state = {"x": sample_x * sigmas[0]}

    def sample_step(x, i):
        s, s_next = sigmas[i], sigmas[i + 1]
        sigma = torch.full((2 * sb,), s)
        d = denoise(torch.cat([x, x]), sigma, torch.cat([sample_cond, sample_uncond]))
        d_c, d_u = d.chunk(2)
        d = d_u + guidance * (d_c - d_u)
        return x + (s_next - s) * (x - d) / s

    def sample_run():
        with torch.inference_mode():
            x = state["x"]
            for i in range(steps):
                x = sample_step(x, i)
        return x

    def reply(obj):
        protocol.write(json.dumps(obj) + "\n")
        protocol.flush()

    reply({"ready": True, "torch": torch.__version__, "diffusers": diffusers.__version__,
           "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
           "params": n_params, "variant": spec["variant"],
           "attn_processor": type(next(iter(model.attn_processors.values()))).__name__})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            if cmd["cmd"] == "time":
                fn = {"train": train_step, "sample": sample_run}[cmd["what"]]
                times = []
                for _ in range(int(cmd["iters"])):
                    t = time.perf_counter()
                    out = fn()
                    float(out.flatten()[0])  # materialised (torch CPU is synchronous anyway)
                    times.append(time.perf_counter() - t)
                reply({"ok": True, "times": times})
            elif cmd["cmd"] == "flops":
                from torch.utils.flop_counter import FlopCounterMode

                saved = [w.detach().clone() for w in params], opt.state_dict()
                with FlopCounterMode(display=False) as counter:
                    train_step()
                train_flops = counter.get_total_flops()
                with torch.no_grad():  # undo that step: timing continues from the same state
                    for p_, v in zip(params, saved[0]):
                        p_.copy_(v)
                opt.load_state_dict(saved[1])
                with FlopCounterMode(display=False) as counter, torch.inference_mode():
                    sample_step(state["x"], 0)
                reply({"ok": True, "train": train_flops, "sample_step": counter.get_total_flops()})
            elif cmd["cmd"] == "quit":
                reply({"ok": True})
                return 0
            else:
                reply({"ok": False, "error": f"unknown command {cmd['cmd']!r}"})
        except Exception as e:  # report, keep serving: the parent decides
            import traceback

            traceback.print_exc()
            reply({"ok": False, "error": f"{type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
