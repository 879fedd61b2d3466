"""A tiny DeepFloyd-IF-like stage-I pipeline and what diffusers' own IFPipeline makes with it:
the end-to-end reference for IF's text side (T5 with its padding mask, prompts lower-cased)
and its pixel-space sampling (6 output channels: epsilon + learned variance; dynamic
thresholding of the guided x0) with DPM-Solver++(2M), the scheduler IF's model card uses.

Run from the repo root with the tools venv (tools/requirements-torch.txt):

    .venv-tools/bin/python tools/if_pipeline_fixture.py --out tests/fixtures/diffusers/tiny_if

(stage II goes to the same path + "2": tests/fixtures/diffusers/tiny_if2).

Writes a pipeline folder (unet/, text_encoder/, tokenizer/ (a 41-piece SentencePiece
unigram model trained here on a few captions), scheduler/ (IF-I's DDPMScheduler config),
model_index.json; float32 safetensors) and reference.npz: the prompt and negative
embeddings, the initial noise the pipeline drew, and its final images (output_type="pt"), for
thresholding on and off. Offline.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402
from diffusers import (DDPMScheduler, DPMSolverMultistepScheduler, IFPipeline,  # noqa: E402
                       IFSuperResolutionPipeline, UNet2DConditionModel)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from transformers import T5Config, T5EncoderModel, T5Tokenizer  # noqa: E402

from sd_pipeline_fixture import randomise  # noqa: E402

T5_DIM = 20
UNET = dict(
    sample_size=16, in_channels=3, out_channels=6, layers_per_block=1,
    block_out_channels=(16, 32, 48),
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                      "SimpleCrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                    "ResnetUpsampleBlock2D"),
    cross_attention_dim=32, encoder_hid_dim=T5_DIM, encoder_hid_dim_type="text_proj",
    addition_embed_type="text", addition_embed_type_num_heads=4, attention_head_dim=8,
    act_fn="gelu", resnet_skip_time_act=True, resnet_time_scale_shift="scale_shift",
    time_embedding_act_fn="gelu", cross_attention_norm="group_norm", norm_num_groups=8,
)
# Stage II (IF-II-like): the 3 noisy channels + the upsampled low-res image's 3, its noise
# level as a timestep class embedding; 16 -> 32 pixels here (IF: 64 -> 256).
UNET2 = dict(
    sample_size=32, in_channels=6, out_channels=6, layers_per_block=(1, 2),
    block_out_channels=(16, 24),
    down_block_types=("SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D"),
    cross_attention_dim=12, encoder_hid_dim=T5_DIM, encoder_hid_dim_type="text_proj",
    addition_embed_type="text", addition_embed_type_num_heads=2, attention_head_dim=(4, 8),
    act_fn="gelu", resnet_skip_time_act=True, resnet_time_scale_shift="scale_shift",
    time_embedding_act_fn="gelu", class_embed_type="timestep", norm_num_groups=4,
    resnet_out_scale_factor=1.25,
)
# The low-res image's augmentation schedule (IFSuperResolutionPipeline's image_noising_scheduler).
NOISING = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
               beta_end=0.02, clip_sample=True, prediction_type="epsilon",
               variance_type="fixed_small")
NOISE_LEVEL, GUIDANCE2, STEPS2 = 250, 4.0, 4
# IF-I-XL's scheduler_config.json (DDPMScheduler).
SCHEDULER = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
    beta_end=0.02, clip_sample=True, clip_sample_range=1.0, thresholding=True,
    dynamic_thresholding_ratio=0.95, sample_max_value=1.5, prediction_type="epsilon",
    variance_type="learned_range",
)
CORPUS = ["a red circle", "two blue squares on grass", "a photo of a cat", "blurry",
          "low quality", "a corgi wearing a hat", "the sky at night with stars"]
PROMPTS = ["A Red Circle ", "two blue squares on grass"]  # IF lower-cases and strips
NEGATIVE = ["blurry", ""]
GUIDANCE, STEPS, SEED = 7.0, 6, 5


def tiny_t5_tokenizer(directory):
    """A SentencePiece unigram T5 tokenizer (pad 0, eos 1, unk 2) over a few captions."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=64,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=1.0, hard_vocab_limit=False, num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=77)
    tok.save_pretrained(directory)
    return tok


def published_scheduler(folder, config):
    """A scheduler config as IF publishes it (diffusers 0.16): no timestep_spacing key, so a
    scheduler made from it (DPMSolverMultistepScheduler.from_config) takes its own default."""
    with open(os.path.join(folder, "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "DDPMScheduler", "_diffusers_version": "0.16.0", **config},
                  f, indent=2)


def stage_two(out, tok, t5, lowres):
    """The tiny stage II from stage I's images: IFSuperResolutionPipeline with DPM-Solver++(2M)
    and thresholding; its two draws (the initial noise, then the low-res image's augmentation
    noise) are recorded by replaying the seeded generator."""
    if os.path.exists(out):
        shutil.rmtree(out)
    unet = UNet2DConditionModel(**UNET2).eval()
    randomise(unet, 23)
    scheduler = DDPMScheduler(**SCHEDULER)
    pipe = IFSuperResolutionPipeline(
        tokenizer=tok, text_encoder=t5, unet=unet, scheduler=scheduler,
        image_noising_scheduler=DDPMScheduler(**NOISING), safety_checker=None,
        feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    size = UNET2["sample_size"]
    generator = torch.Generator().manual_seed(SEED + 1)
    shape = (len(PROMPTS), 3, size, size)
    ref = {"lowres_input": lowres.numpy(), "noise": randn_tensor(shape, generator=generator).numpy(),
           "augmentation_noise": randn_tensor(shape, generator=generator).numpy(),
           "noise_level": np.int32(NOISE_LEVEL), "guidance": np.float32(GUIDANCE2),
           "steps": np.int32(STEPS2)}
    with torch.no_grad():
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config,
                                                                 algorithm_type="dpmsolver++")
        ref["images"] = pipe(PROMPTS, image=lowres, negative_prompt=NEGATIVE,
                             num_inference_steps=STEPS2, guidance_scale=GUIDANCE2, height=size,
                             width=size, noise_level=NOISE_LEVEL,
                             generator=torch.Generator().manual_seed(SEED + 1),
                             output_type="pt", clean_caption=False).images.numpy()
        upscaled = torch.nn.functional.interpolate(lowres, (size, size), mode="bilinear",
                                                   align_corners=True)
        ref["lowres"] = pipe.image_noising_scheduler.add_noise(
            upscaled, torch.tensor(ref["augmentation_noise"]),
            torch.tensor([NOISE_LEVEL] * len(PROMPTS))).numpy()
    pipe.scheduler = scheduler
    pipe.save_pretrained(out)
    published_scheduler(os.path.join(out, "scheduler"), SCHEDULER)
    published_scheduler(os.path.join(out, "image_noising_scheduler"), NOISING)
    np.savez(os.path.join(out, "reference.npz"), **ref)
    for k, v in ref.items():
        print("stage II", k, np.shape(v), float(np.abs(v).max()) if np.ndim(v) else v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/diffusers/tiny_if")
    out = ap.parse_args().out
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if os.path.exists(out):
        shutil.rmtree(out)
    tok = tiny_t5_tokenizer(os.path.join(out, "tokenizer"))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=T5_DIM, d_kv=8, d_ff=24, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0,
        eos_token_id=1)).eval()
    unet = UNet2DConditionModel(**UNET).eval()
    randomise(t5, 21, w_std=0.5)
    randomise(unet, 22)
    scheduler = DDPMScheduler(**SCHEDULER)
    pipe = IFPipeline(tokenizer=tok, text_encoder=t5, unet=unet, scheduler=scheduler,
                      safety_checker=None, feature_extractor=None, watermarker=None,
                      requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    size = UNET["sample_size"]
    shape = (len(PROMPTS), 3, size, size)
    ref = {"noise": randn_tensor(shape, generator=torch.Generator().manual_seed(SEED)).numpy(),
           "guidance": np.float32(GUIDANCE), "steps": np.int32(STEPS)}
    with torch.no_grad():
        emb, neg = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True,
                                      negative_prompt=NEGATIVE, device="cpu",
                                      clean_caption=False)
        ref.update(context=emb.numpy(), negative=neg.numpy())
        for name, thresholding in (("threshold", True), ("plain", False)):
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(
                {**scheduler.config, "thresholding": thresholding},
                algorithm_type="dpmsolver++")
            images = pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                          guidance_scale=GUIDANCE, height=size, width=size,
                          generator=torch.Generator().manual_seed(SEED), output_type="pt",
                          clean_caption=False).images
            ref[f"{name}_images"] = images.numpy()
            ref[f"{name}_sigmas"] = np.asarray(pipe.scheduler.sigmas, np.float64)
    stage_two(out + "2", tok, t5, torch.tensor(ref["threshold_images"]))
    pipe.scheduler = scheduler
    pipe.save_pretrained(out)
    published_scheduler(os.path.join(out, "scheduler"), SCHEDULER)
    np.savez(os.path.join(out, "reference.npz"), **ref)
    for k, v in ref.items():
        print(k, np.shape(v), float(np.abs(v).max()) if np.ndim(v) else v)


if __name__ == "__main__":
    main()
