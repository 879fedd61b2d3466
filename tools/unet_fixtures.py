"""Parity fixtures for the Flax ports of diffusers' UNet2DConditionModel and AutoencoderKL:
tiny random models of each family with deliberately odd configs (non-square inputs, odd
group counts, per-block heads, two transformer depths in one block...), every norm scale and
bias moved away from 1 / 0, and their outputs on fixed inputs.

Run from the repo root with the tools venv (tools/requirements-torch.txt):

    .venv-tools/bin/python tools/unet_fixtures.py --out tests/fixtures/diffusers/parity

Writes <family>/config.json + diffusion_pytorch_model.safetensors (float32) and
<family>/io.npz (inputs NCHW as diffusers takes them, output). Deterministic and offline.
"""
from __future__ import annotations

import argparse
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402

from sd_pipeline_fixture import randomise  # noqa: E402

# Each family as its published configs shape it, shrunk.
UNETS = {
    # SD 1.x: conv proj_in/out, one head count for all blocks, 3 levels.
    "sd1": dict(
        in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 24, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=20, attention_head_dim=4, norm_num_groups=8,
    ),
    # SD 2.x: linear projections, heads per block, upcast_attention, v-prediction's config.
    "sd2": dict(
        in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(24, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=28,
        attention_head_dim=(3, 4), use_linear_projection=True, upcast_attention=True,
        norm_num_groups=4,
    ),
    # SDXL base: transformer_layers_per_block per block, text_time with 6 ids, heads by
    # attention_head_dim, a DownBlock2D first.
    "sdxl": dict(
        in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 24, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=36,
        attention_head_dim=(2, 3, 4), use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=12 + 6 * 8,
    ),
    # SDXL refiner: 5 ids (aesthetic score), no cross-attention in the outer blocks.
    "sdxl_refiner": dict(
        in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=2,
        cross_attention_dim=20, attention_head_dim=4, use_linear_projection=True,
        norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=6,
        projection_class_embeddings_input_dim=10 + 5 * 6,
    ),
    # The switches SD does not use: scale-shift resnets, a timestep class embedding (IF-II's
    # noise level), odd conv kernels, no mid block attention resnet scale 1, centring.
    "variants": dict(
        in_channels=5, out_channels=6, layers_per_block=(1, 2), block_out_channels=(16, 24),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=12,
        attention_head_dim=2, norm_num_groups=4, resnet_time_scale_shift="scale_shift",
        class_embed_type="timestep", conv_in_kernel=5, conv_out_kernel=1,
        mid_block_scale_factor=1.5, resnet_out_scale_factor=1.25, center_input_sample=True,
        freq_shift=1, flip_sin_to_cos=False, downsample_padding=0,
    ),
    # DeepFloyd IF stage I: resampling resnets, added-KV attention on projected T5 tokens,
    # attention-pooled text in the time embedding, GELU, scale-shift, 6 output channels.
    "if1": dict(
        in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(16, 32, 48),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                          "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                        "ResnetUpsampleBlock2D"),
        cross_attention_dim=32, encoder_hid_dim=20, encoder_hid_dim_type="text_proj",
        addition_embed_type="text", addition_embed_type_num_heads=4, attention_head_dim=8,
        act_fn="gelu", resnet_skip_time_act=True, resnet_time_scale_shift="scale_shift",
        time_embedding_act_fn="gelu", cross_attention_norm="group_norm", norm_num_groups=8,
    ),
    # IF stage II: the low-res image as 3 more input channels, its noise level as a timestep
    # class embedding; head widths per block (diffusers gives up block i down block i's).
    "if2": dict(
        in_channels=6, out_channels=6, layers_per_block=(1, 2), block_out_channels=(16, 24),
        down_block_types=("SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D"),
        cross_attention_dim=12, encoder_hid_dim=20, encoder_hid_dim_type="text_proj",
        addition_embed_type="text", addition_embed_type_num_heads=2, attention_head_dim=(4, 8),
        act_fn="gelu", resnet_skip_time_act=True, resnet_time_scale_shift="scale_shift",
        time_embedding_act_fn="gelu", class_embed_type="timestep", norm_num_groups=4,
        resnet_out_scale_factor=1.25,
    ),
    # IF stage II as diffusers converts it (only_cross_attention: the added-KV attention
    # attends to the text alone), here per block and for the mid block on its own.
    "if2_cross": dict(
        in_channels=6, out_channels=6, layers_per_block=(1, 2), block_out_channels=(16, 24),
        down_block_types=("SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D"),
        only_cross_attention=(True, False), mid_block_only_cross_attention=True,
        cross_attention_dim=12, encoder_hid_dim=20, encoder_hid_dim_type="text_proj",
        addition_embed_type="text", addition_embed_type_num_heads=2, attention_head_dim=(4, 8),
        act_fn="gelu", resnet_skip_time_act=True, resnet_time_scale_shift="scale_shift",
        time_embedding_act_fn="gelu", class_embed_type="timestep", norm_num_groups=4,
        resnet_out_scale_factor=1 / 0.7071, mid_block_scale_factor=1 / 0.7071,
    ),
}
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 24),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=2, norm_num_groups=4, sample_size=16, scaling_factor=0.13025,
)
SIZE = (8, 12)  # latent height x width, non-square; 16 x 24 for the 3-level U-Nets
BATCH, TOKENS = 2, 5


def unet_io(name, cfg, model, g):
    levels = len(cfg["block_out_channels"])
    h, w = (SIZE[0] * 2 ** (levels - 2), SIZE[1] * 2 ** (levels - 2))
    sample = torch.randn((BATCH, cfg["in_channels"], h, w), generator=g)
    timestep = torch.tensor([37.5, 801.0])
    width = cfg.get("encoder_hid_dim") or cfg["cross_attention_dim"]
    context = torch.randn((BATCH, TOKENS, width), generator=g)
    mask = torch.ones((BATCH, TOKENS))
    # Padding keys the U-Net must not attend to; diffusers' added-KV attention cannot take a
    # mask with only_cross_attention (IF's pipelines never pass one): all ones, none given.
    cross_only = cfg.get("only_cross_attention") or cfg.get("mid_block_only_cross_attention")
    if not cross_only:
        mask[1, -2:] = 0
    io = dict(sample=sample, timestep=timestep, encoder_hidden_states=context,
              encoder_attention_mask=mask)
    kwargs = {}
    if cfg.get("addition_embed_type") == "text_time":
        n_ids = 6 if name == "sdxl" else 5
        pooled = cfg["projection_class_embeddings_input_dim"] - n_ids * cfg["addition_time_embed_dim"]
        io["text_embeds"] = torch.randn((BATCH, pooled), generator=g)
        io["time_ids"] = torch.tensor([[1024.0, 768, 0, 16, 1024, 768, 0, 0, 0][:n_ids],
                                       [512.0, 512, 32, 0, 6.0, 0][:n_ids]])
        kwargs["added_cond_kwargs"] = dict(text_embeds=io["text_embeds"], time_ids=io["time_ids"])
    if cfg.get("class_embed_type") == "timestep":
        io["class_labels"] = torch.tensor([20.0, 250.0])
        kwargs["class_labels"] = io["class_labels"]
    with torch.no_grad():
        out = model(sample, timestep, context, encoder_attention_mask=None if cross_only
                    else mask, **kwargs).sample
    return {k: v.numpy() for k, v in io.items()} | {"output": out.numpy()}


def vae_io(model, g):
    images = torch.rand((BATCH, 3, 4 * SIZE[0], 4 * SIZE[1]), generator=g) * 2 - 1
    latents = torch.randn((BATCH, 4, SIZE[0], SIZE[1]), generator=g)
    with torch.no_grad():
        posterior = model.encode(images).latent_dist
        decoded = model.decode(latents).sample
    return dict(images=images.numpy(), mean=posterior.mean.numpy(),
                logvar=posterior.logvar.numpy(), latents=latents.numpy(),
                decoded=decoded.numpy())


def write(model, io, directory):
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    model.save_pretrained(directory, safe_serialization=True)
    np.savez_compressed(os.path.join(directory, "io.npz"), **io)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="tests/fixtures/diffusers/parity")
    parser.add_argument("--only", nargs="*", help="write these families only (each from its "
                        "own seed, so the others' files stay as committed)")
    args = parser.parse_args()
    for i, (name, cfg) in enumerate(UNETS.items()):
        if args.only is not None and name not in args.only:
            continue
        torch.manual_seed(i)
        model = UNet2DConditionModel(**cfg).eval()
        randomise(model, seed=10 + i)
        write(model, unet_io(name, cfg, model, torch.Generator().manual_seed(100 + i)),
              os.path.join(args.out, name))
    if args.only is not None and "vae" not in args.only:
        return
    torch.manual_seed(len(UNETS))
    vae = AutoencoderKL(**VAE).eval()
    randomise(vae, seed=50)
    write(vae, vae_io(vae, torch.Generator().manual_seed(150)), os.path.join(args.out, "vae"))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
