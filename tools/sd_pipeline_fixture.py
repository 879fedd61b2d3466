"""A tiny SD-like diffusers pipeline and the images diffusers samples with it: the end-to-end
reference for the Flax port (U-Net + discrete-time bridge + CFG + VAE decode).

Run from the repo root with the tools venv (tools/requirements-torch.txt):

    .venv-tools/bin/python tools/sd_pipeline_fixture.py --out tests/fixtures/diffusers/tiny_sd

Writes unet/, vae/, scheduler/ (save_pretrained, float32 safetensors), model_index.json and
reference.npz: the prompt and negative embeddings (given, not encoded: the text towers have
their own parity fixtures), the initial noise, and for EulerDiscreteScheduler and
DPMSolverMultistepScheduler (dpmsolver++, order 2) the final latents and decoded images of a
CFG run, the loop written as StableDiffusionPipeline runs it. Deterministic and offline.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerDiscreteScheduler, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 48), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
    attention_head_dim=4, norm_num_groups=8,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 24),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1, norm_num_groups=8, sample_size=16, scaling_factor=0.18215,
)
# Stable Diffusion 1.5's scheduler_config.json (PNDM there; the bridge reads only the betas).
SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
)
PROMPTS = ["a red circle", "two blue squares on grass"]
NEGATIVE = ["", "blurry"]
GUIDANCE, STEPS, BATCH, LATENT = 4.0, 8, 2, (4, 8, 12)  # a non-square latent


def randomise(model, seed, w_std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                fan_in = max(1, p[0].numel()) if p.ndim > 1 else 1
                p.copy_(noise * min(w_std, 1.0 / np.sqrt(fan_in)))


def byte_unicode():
    """GPT-2 / CLIP's byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_tokenizer(directory, pad_token="<|endoftext|>"):
    """A CLIP BPE tokenizer over single characters and a few merges (the real vocabulary's
    49408 rows would make the text tower's embedding several MB)."""
    chars = byte_unicode()
    merges = ["r e", "re d</w>", "c i", "ci r", "l e</w>", "s q", "b l"]
    vocab = chars + [c + "</w>" for c in chars] + ["re", "red</w>", "ci", "cir", "le</w>", "sq",
                                                    "bl", "<|startoftext|>", "<|endoftext|>"]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"),
                        pad_token=pad_token, model_max_length=77)
    tok.save_pretrained(directory)
    return tok, len(vocab)


def encode(tok, text_encoder, prompts):
    """StableDiffusionPipeline.encode_prompt (no clip_skip, no attention mask)."""
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def with_prefix(path):
    """transformers 5 saves CLIPTextModel's tensors without the `text_model.` prefix that the
    published SD checkpoints (saved by transformers 4) carry; store them as published."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file({k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
               for k, v in tensors.items()}, path, metadata={"format": "pt"})


def run(unet, vae, scheduler, noise, cond, uncond):
    scheduler.set_timesteps(STEPS)
    latents = noise * scheduler.init_noise_sigma
    context = torch.cat([uncond, cond])
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        out = unet(x_in, t, encoder_hidden_states=context).sample
        out_uncond, out_cond = out.chunk(2)
        latents = scheduler.step(out_uncond + GUIDANCE * (out_cond - out_uncond), t,
                                 latents).prev_sample
    image = vae.decode(latents / vae.config.scaling_factor).sample
    return latents, image, np.asarray(scheduler.sigmas, np.float64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/diffusers/tiny_sd")
    out = ap.parse_args().out
    torch.manual_seed(0)
    torch.set_num_threads(1)
    unet = UNet2DConditionModel(**UNET).eval()
    vae = AutoencoderKL(**VAE).eval()
    randomise(unet, 1)
    randomise(vae, 2)
    rng = np.random.default_rng(3)
    cond = torch.tensor(rng.normal(size=(BATCH, 7, 24)), dtype=torch.float32)
    uncond = torch.tensor(rng.normal(size=(BATCH, 7, 24)), dtype=torch.float32)
    noise = torch.tensor(rng.normal(size=(BATCH,) + LATENT), dtype=torch.float32)
    ref = {"cond": cond.numpy(), "uncond": uncond.numpy(), "noise": noise.numpy(),
           "guidance": np.float32(GUIDANCE), "steps": np.int32(STEPS)}
    schedulers = {
        "euler": EulerDiscreteScheduler(**SCHEDULER),
        "dpmpp_2m": DPMSolverMultistepScheduler(**SCHEDULER, algorithm_type="dpmsolver++",
                                                solver_order=2),
    }
    with torch.no_grad():
        for name, scheduler in schedulers.items():
            latents, image, sigmas = run(unet, vae, scheduler, noise, cond, uncond)
            ref[f"{name}_latents"] = latents.numpy()
            ref[f"{name}_image"] = image.numpy()
            ref[f"{name}_sigmas"] = sigmas
    if os.path.exists(out):
        shutil.rmtree(out)
    tok, vocab_size = tiny_tokenizer(os.path.join(out, "tokenizer"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)).eval()
    randomise(text_encoder, 4)
    with torch.no_grad():
        text = encode(tok, text_encoder, PROMPTS)
        negative = encode(tok, text_encoder, NEGATIVE)
        scheduler = EulerDiscreteScheduler(**SCHEDULER)
        latents, image, _ = run(unet, vae, scheduler, noise, text, negative)
    ref.update(text_cond=text.numpy(), text_uncond=negative.numpy(),
               text_euler_image=image.numpy(), text_ids=np.asarray(tok(PROMPTS)["input_ids"][0]))
    text_encoder.save_pretrained(os.path.join(out, "text_encoder"))
    with_prefix(os.path.join(out, "text_encoder", "model.safetensors"))
    unet.save_pretrained(os.path.join(out, "unet"))
    vae.save_pretrained(os.path.join(out, "vae"))
    schedulers["euler"].save_pretrained(os.path.join(out, "scheduler"))
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
                   "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"],
                   "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                   "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"],
                   "safety_checker": [None, None], "feature_extractor": [None, None],
                   "requires_safety_checker": False}, f, indent=1)
    np.savez(os.path.join(out, "reference.npz"), **ref)
    for k, v in ref.items():
        print(k, np.shape(v), float(np.abs(v).max()) if np.ndim(v) else v)


if __name__ == "__main__":
    main()
