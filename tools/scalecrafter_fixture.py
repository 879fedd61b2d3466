"""Parity fixture for the project's ScaleCrafter re-dilation (models/layers.py redilated_conv
under highres/ settings) against the OFFICIAL implementation: YingqingHe/ScaleCrafter's
ReDilateConvProcessor (model.py), imported at run time from a checkout of the official repo
(none of its code is committed here), patched onto a tiny random SD-like diffusers
UNet2DConditionModel the way the official text2image.py patches it for one denoising step.

Run from the repo root with the tools venv (tools/requirements-torch.txt):

    git -C <mirror of YingqingHe/ScaleCrafter> show HEAD:model.py > /tmp/scalecrafter/model.py
    .venv-tools/bin/python tools/scalecrafter_fixture.py --official /tmp/scalecrafter \
        --out tests/fixtures/scalecrafter

Writes config.json + diffusion_pytorch_model.safetensors (float32, diffusers layout),
settings.json (per case: the official settings table `module name: factor` as the official
settings files write it, dilate_tau, progressive, the step index i, the timestep t_i of the
official 50-step DDIM run, the factor each module got at that step) and io.npz (sample NCHW,
encoder_hidden_states, output_<case> for every case; "plain" and "plain_i13" are the
undilated U-Net at steps 0 and 13; "attn_sf" is step 0 with the official ScaledAttnProcessor
on every attention, given pixel counts as the official reference script does). The U-Net runs
at twice its config's sample_size (non-square, so H and W rounding are both exercised).
Deterministic and offline.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: E402

from sd_pipeline_fixture import randomise  # noqa: E402

# SD 1.x's layout shrunk to 3 levels: cross-attention down blocks 0-1, a plain down block 2
# (no downsampler), a plain up block 0, cross-attention up blocks 1-2. Upsamplers in up
# blocks 0 and 1, downsamplers in down blocks 0 and 1.
UNET = dict(
    sample_size=(8, 12), in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(8, 8, 12),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4,
)
# runwayml/stable-diffusion-v1-5's scheduler config: the official run's DDIMScheduler
# (leading spacing, steps_offset 1: t_i = 981 - 20 i over 50 steps).
SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule":
             "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "trained_betas": None, "clip_sample": False}
NUM_STEPS = 50
BATCH, TOKENS = 1, 5


def inner_convs(levels: int = 3, layers: int = 1) -> list[str]:
    """Every 3x3 conv the official settings files re-dilate at 4x area (the 1024^2/1280^2
    files' pattern on this U-Net): all but the outermost level's, the upsampler into the
    outermost level included."""
    resnet = lambda block: [f"{block}.conv1", f"{block}.conv2"]  # noqa: E731
    out = []
    for i in range(1, levels):
        for j in range(layers):
            out += resnet(f"down_blocks.{i}.resnets.{j}")
        if i < levels - 1:
            out.append(f"down_blocks.{i}.downsamplers.0.conv")
    for j in range(2):
        out += resnet(f"mid_block.resnets.{j}")
    for i in range(levels - 1):
        for j in range(layers + 1):
            out += resnet(f"up_blocks.{i}.resnets.{j}")
        out.append(f"up_blocks.{i}.upsamplers.0.conv")
    return out


def cases() -> dict[str, dict]:
    inner = inner_convs()
    # SD 2.1 2048^2's taper on 3 levels: the inner encoder level 3 (its downsampler 4), the
    # deepest level and the decoder's first block 4, then 3, the outermost decoder level 2.
    taper = {}
    for name in inner:
        if name.startswith("down_blocks.1."):
            taper[name] = 4.0 if "downsamplers" in name else 3.0
        elif name.startswith("up_blocks.1."):
            taper[name] = 3.0
        else:
            taper[name] = 4.0
    taper.update({f"up_blocks.2.resnets.{j}.conv{k}": 2.0 for j in range(2) for k in (1, 2)})
    one = dict(dilate_tau=30, progressive=False, step=0)
    return {
        "plain": dict(dilate_settings={}, **one),
        "plain_i13": dict(dilate_settings={}, dilate_tau=37, progressive=False, step=13),
        "pf2": dict(dilate_settings={n: 2.0 for n in inner}, **one),
        "pf2.5": dict(dilate_settings={n: 2.5 for n in inner}, **one),
        "pf4": dict(dilate_settings={n: 4.0 for n in inner}, **one),
        # One fractional resampler conv on its own: the stride-2 downsampler (its output
        # resized to H/2) and the upsampler conv after the nearest 2x upsampling.
        "pf2.5_downsampler": dict(dilate_settings={"down_blocks.1.downsamplers.0.conv": 2.5},
                                  **one),
        "pf2.5_upsampler": dict(dilate_settings={"up_blocks.1.upsamplers.0.conv": 2.5}, **one),
        # Progressive (tau 37 as SD 2.1 2048^2) at step 13: 4 -> 3, 3 -> 2, 2 stays 2.
        "progressive_i13": dict(dilate_settings=taper, dilate_tau=37, progressive=True, step=13),
    }


def load_official(directory: str):
    """The official model.py in `directory` (ReDilateConvProcessor, ScaledAttnProcessor)."""
    path = os.path.join(directory, "model.py")
    if not os.path.isfile(path):
        raise SystemExit(f"--official {directory}: no model.py there (extract it from the "
                         "official repository, YingqingHe/ScaleCrafter)")
    spec = importlib.util.spec_from_file_location("scalecrafter_official_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_step(unet, processor, case, args):
    """One U-Net call of the official text2image.py denoising loop at step i = case["step"]:
    every module named in the dilation settings gets its forward replaced by
    ReDilateConvProcessor(module, factor, mode='bilinear', activate=i < dilate_tau), the factor
    first scheduled as max(ceil(factor (tau - i) / tau), 2) in progressive mode; the original
    forwards are restored after the call. Returns (output, {module name: factor used})."""
    settings, tau, i = case["dilate_settings"], case["dilate_tau"], case["step"]
    backup, used = {}, {}
    for name, module in unet.named_modules():
        if name in settings.keys():
            backup[name] = module.forward
            dilate = settings[name]
            if case["progressive"]:
                dilate = max(math.ceil(dilate * ((tau - i) / tau)), 2)
            used[name] = dilate
            module.forward = processor(module, dilate, mode="bilinear", activate=i < tau)
    missing = sorted(set(settings) - set(used))
    if missing:  # the official loop would skip them silently; here a fixture bug
        raise SystemExit(f"settings name modules the U-Net lacks: {missing}")
    with torch.no_grad():
        out = unet(*args).sample
    for name, module in unet.named_modules():
        if name in backup:
            module.forward = backup[name]
    return out, used


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True,
                        help="a directory holding the official ScaleCrafter model.py")
    parser.add_argument("--out", default="tests/fixtures/scalecrafter")
    args = parser.parse_args()
    official = load_official(args.official)
    processor = official.ReDilateConvProcessor

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET).eval()
    randomise(unet, seed=20)
    g = torch.Generator().manual_seed(120)
    h, w = (2 * s for s in UNET["sample_size"])
    sample = torch.randn((BATCH, UNET["in_channels"], h, w), generator=g)
    context = torch.randn((BATCH, TOKENS, UNET["cross_attention_dim"]), generator=g)
    scheduler = DDIMScheduler.from_config(SCHEDULER)
    scheduler.set_timesteps(NUM_STEPS)

    io = dict(sample=sample.numpy(), encoder_hidden_states=context.numpy())
    table = {}
    for name, case in cases().items():
        t = scheduler.timesteps[case["step"]]
        timestep = torch.full((BATCH,), float(t))
        out, used = official_step(unet, processor, case, (sample, timestep, context))
        io[f"output_{name}"] = out.numpy()
        table[name] = dict(case, timestep=int(t), factors_used=used)
        print(f"{name}: step {case['step']} t={int(t)} |out| max {out.abs().max():.3f}, "
              f"{len(used)} convs re-dilated")

    # Attn-SF: every attention through the official ScaledAttnProcessor around the classic
    # processor (which honours attn.scale), test / train pixels as its reference script passes.
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor({name: official.ScaledAttnProcessor(
        AttnProcessor(), test_res=h * w, train_res=h * w // 4) for name in unet.attn_processors})
    with torch.no_grad():
        io["output_attn_sf"] = unet(sample, torch.full((BATCH,), float(scheduler.timesteps[0])),
                                    context).sample.numpy()
    unet.set_attn_processor(AttnProcessor())
    table["attn_sf"] = dict(step=0, timestep=int(scheduler.timesteps[0]), area_ratio=4.0)
    print(f"attn_sf: |out - plain| max "
          f"{np.abs(io['output_attn_sf'] - io['output_plain']).max():.4f}")

    if os.path.isdir(args.out):
        for entry in ("config.json", "diffusion_pytorch_model.safetensors", "io.npz",
                      "settings.json"):
            if os.path.exists(os.path.join(args.out, entry)):
                os.remove(os.path.join(args.out, entry))
    os.makedirs(args.out, exist_ok=True)
    unet.save_pretrained(args.out, safe_serialization=True)
    np.savez_compressed(os.path.join(args.out, "io.npz"), **io)
    with open(os.path.join(args.out, "settings.json"), "w") as f:
        json.dump(dict(cases=table, scheduler_config=SCHEDULER, num_inference_steps=NUM_STEPS),
                  f, indent=1)
        f.write("\n")
    for entry in os.listdir(args.out):  # safetensors writes 0600
        os.chmod(os.path.join(args.out, entry), 0o644)
    print("wrote", args.out, "with", ", ".join(f"{k} {v}" for k, v in (
        ("torch", torch.__version__), ("diffusers", __import__("diffusers").__version__),
        ("python", sys.version.split()[0]))))


if __name__ == "__main__":
    main()
