"""Experts across checkpoints, as diffusers does them: the tiny SDXL-like base pipeline
(tests/fixtures/diffusers/tiny_sdxl) denoises the high-noise steps (`denoising_end`), a tiny
refiner of a different architecture (its own U-Net widths, the second text tower only,
aesthetic-score ids) the rest (`denoising_start`), each with its own guidance scale.

Run from the repo root with the tools venv (tools/requirements-torch.txt):

    .venv-tools/bin/python tools/sdxl_refiner_fixture.py --out tests/fixtures/diffusers/tiny_sdxl_refiner

Writes the refiner's pipeline folder (unet/, vae/, text_encoder_2/, tokenizer_2/, scheduler/,
model_index.json; the VAE, second tower and tokenizer are the base's) and reference.npz: the
initial noise, the base's latents at the hand-off, the refiner's final latents and their
decoded image. Offline.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import (EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,  # noqa: E402
                       StableDiffusionXLPipeline, UNet2DConditionModel)

from sd_pipeline_fixture import randomise, with_prefix  # noqa: E402
from sdxl_pipeline_fixture import D2, POOLED, PROMPTS, SCHEDULER, SIZE, TIME_DIM  # noqa: E402

REFINER_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(12, 24), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1),
    cross_attention_dim=D2, attention_head_dim=(3, 6), use_linear_projection=True,
    norm_num_groups=4, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + 5 * TIME_DIM,
)
STEPS, DENOISING_END = 10, 0.8
BASE_GUIDANCE, REFINER_GUIDANCE = 5.0, 7.5
NEGATIVE = ["blurry", "dark"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="tests/fixtures/diffusers/tiny_sdxl")
    ap.add_argument("--out", default="tests/fixtures/diffusers/tiny_sdxl_refiner")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    base = StableDiffusionXLPipeline.from_pretrained(args.base, add_watermarker=False)
    base.set_progress_bar_config(disable=True)
    unet = UNet2DConditionModel(**REFINER_UNET).eval()
    randomise(unet, 21)
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**SCHEDULER),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        add_watermarker=False)
    refiner.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(22)
    noise = torch.tensor(rng.normal(size=(len(PROMPTS), 4, SIZE[0] // 2, SIZE[1] // 2)),
                         dtype=torch.float32)
    with torch.no_grad():
        handoff = base(PROMPTS, negative_prompt=NEGATIVE, height=SIZE[0], width=SIZE[1],
                       num_inference_steps=STEPS, denoising_end=DENOISING_END,
                       guidance_scale=BASE_GUIDANCE, latents=noise.clone(),
                       output_type="latent").images
        latents = refiner(PROMPTS, negative_prompt=NEGATIVE, image=handoff,
                          num_inference_steps=STEPS, denoising_start=DENOISING_END,
                          guidance_scale=REFINER_GUIDANCE, output_type="latent").images
        image = base.vae.decode(latents / base.vae.config.scaling_factor).sample
    refiner.save_pretrained(args.out)
    with_prefix(os.path.join(args.out, "text_encoder_2", "model.safetensors"))
    ref = {"noise": noise.numpy(), "handoff": handoff.numpy(), "latents": latents.numpy(),
           "image": image.numpy(), "steps": np.int32(STEPS),
           "denoising_end": np.float32(DENOISING_END), "size": np.asarray(SIZE, np.int32),
           "base_guidance": np.float32(BASE_GUIDANCE),
           "refiner_guidance": np.float32(REFINER_GUIDANCE)}
    np.savez(os.path.join(args.out, "reference.npz"), **ref)
    for k, v in ref.items():
        print(k, np.shape(v), float(np.abs(v).max()) if np.ndim(v) else v)


if __name__ == "__main__":
    main()
