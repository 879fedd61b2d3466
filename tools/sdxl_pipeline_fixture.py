"""A tiny SDXL-like diffusers pipeline and what diffusers' own StableDiffusionXLPipeline makes
with it: the end-to-end reference for SDXL's text side (two towers, penultimate hidden
states, the pooled projection, size / crop ids, zeros for an empty negative prompt, clip_skip)
and its sampling through the Flax port.

Run from the repo root with the tools venv (tools/requirements-torch.txt):

    .venv-tools/bin/python tools/sdxl_pipeline_fixture.py --out tests/fixtures/diffusers/tiny_sdxl

Writes a pipeline folder (unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/,
tokenizer_2/, scheduler/, model_index.json; float32 safetensors) and reference.npz: for each
case, encode_prompt's four outputs, the add_time_ids, and the pipeline's final latents
(output_type="latent") and VAE-decoded image from the given initial noise. Offline.
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
from diffusers import (AutoencoderKL, EulerDiscreteScheduler,  # noqa: E402
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel,  # noqa: E402
                          CLIPTextModelWithProjection)

from sd_pipeline_fixture import randomise, tiny_tokenizer, with_prefix  # noqa: E402

D1, D2, POOLED, TIME_DIM = 16, 24, 20, 8
UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
    cross_attention_dim=D1 + D2, attention_head_dim=(2, 4), use_linear_projection=True,
    norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.13025,
    force_upcast=False,
)
# SDXL base's scheduler_config.json (EulerDiscreteScheduler).
SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    interpolation_type="linear", use_karras_sigmas=False,
)
PROMPTS = ["a red circle", "two blue squares on grass"]
NEGATIVE = ["blurry", ""]
GUIDANCE, STEPS, SIZE = 5.0, 6, (16, 24)  # image H x W (latents 8 x 12)
# (name, negative prompts, clip_skip)
CASES = (("zeros", None, None), ("negative", NEGATIVE, None), ("skip", NEGATIVE, 1))


def tower(cls, hidden, layers, tok, seed, **extra):
    model = cls(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
        hidden_act="gelu", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **extra)).eval()
    randomise(model, seed)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/diffusers/tiny_sdxl")
    out = ap.parse_args().out
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if os.path.exists(out):
        shutil.rmtree(out)
    tok, _ = tiny_tokenizer(os.path.join(out, "tokenizer"))
    tok2, _ = tiny_tokenizer(os.path.join(out, "tokenizer_2"), pad_token="!")
    unet = UNet2DConditionModel(**UNET).eval()
    vae = AutoencoderKL(**VAE).eval()
    randomise(unet, 11)
    randomise(vae, 12)
    te1 = tower(CLIPTextModel, D1, 3, tok, 13)
    te2 = tower(CLIPTextModelWithProjection, D2, 3, tok2, 14, projection_dim=POOLED)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet,
                                     scheduler=EulerDiscreteScheduler(**SCHEDULER),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(15)
    noise = torch.tensor(rng.normal(size=(len(PROMPTS), 4, SIZE[0] // 2, SIZE[1] // 2)),
                         dtype=torch.float32)
    ref = {"noise": noise.numpy(), "guidance": np.float32(GUIDANCE), "steps": np.int32(STEPS),
           "size": np.asarray(SIZE, np.int32)}
    with torch.no_grad():
        for name, negative, clip_skip in CASES:
            emb, neg, pooled, neg_pooled = pipe.encode_prompt(
                PROMPTS, device="cpu", do_classifier_free_guidance=True,
                negative_prompt=negative, clip_skip=clip_skip)
            latents = pipe(PROMPTS, negative_prompt=negative, clip_skip=clip_skip,
                           height=SIZE[0], width=SIZE[1], num_inference_steps=STEPS,
                           guidance_scale=GUIDANCE, latents=noise.clone(),
                           output_type="latent").images
            image = vae.decode(latents / vae.config.scaling_factor).sample
            ref.update({f"{name}_context": emb.numpy(), f"{name}_negative": neg.numpy(),
                        f"{name}_pooled": pooled.numpy(), f"{name}_negative_pooled": neg_pooled.numpy(),
                        f"{name}_latents": latents.numpy(), f"{name}_image": image.numpy()})
        ref["time_ids"] = pipe._get_add_time_ids(
            SIZE, (0, 0), SIZE, dtype=torch.float32,
            text_encoder_projection_dim=POOLED).numpy()
        pipe.scheduler.set_timesteps(STEPS)
        ref["sigmas"] = np.asarray(pipe.scheduler.sigmas, np.float64)
    pipe.save_pretrained(out)
    for sub in ("text_encoder", "text_encoder_2"):
        with_prefix(os.path.join(out, sub, "model.safetensors"))
    np.savez(os.path.join(out, "reference.npz"), **ref)
    for k, v in ref.items():
        print(k, np.shape(v), float(np.abs(v).max()) if np.ndim(v) else v)


if __name__ == "__main__":
    main()
