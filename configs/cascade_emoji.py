"""A tiny three-stage cascade on emoji with their names, for CPU: base16 -> sr32 -> sr64.

The paper's 64 -> 256 -> 1024 shape at 1/16 the side: a base U-Net, an Efficient-U-Net-like SR
stage (more blocks at low resolution, cross-attention at the lowest resolution only), and a top
SR stage trained on 32x32 patches of 64x64 images with cross-attention only (no self-attention),
sampled at 64x64 fully convolutionally. Every stage conditions on the emoji's name.

    python -m ediffi_jax.data.prepare emoji --out data/emoji \
        --source-file emoji-datasource-google-16.0.0.tgz   # (after `npm pack` of the package)
    python -m train --config configs/cascade_emoji.py:base16 --workdir runs/emoji/base16 \
        --config.data.path=data/emoji/train
    (the same with :sr32 and :sr64), then a cascade.json listing the three workdirs and
    python -m sample --cascade runs/emoji/cascade.json --prompt "grinning face"

The commands and the measured figures are in BENCHMARKS.md ("Cascade").
"""
import ml_collections

STAGES = ("base16", "sr32", "sr64")


def get_config(stage: str = "base16"):
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    c = ml_collections.ConfigDict()
    c.name = stage
    model = dict(
        channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_head_dim=16,
        context_dim=32, t5_dim=32, t5_length=16, clip_dim=32, clip_length=16,
        clip_pooled_dim=32, clip_image_dim=32, dtype="float32",
    )
    data = dict(name="records", path="data/emoji/train")
    if stage == "base16":
        model.update(resolution=16, attention_resolutions=(8, 4))
    elif stage == "sr32":
        # Efficient-U-Net-like: 1, 2, 2 blocks at 32, 16, 8; cross-attention at 8 only.
        model.update(resolution=32, lowres_scale=2, block_mult=(1, 2, 2),
                     attention_resolutions=(8,))
    else:
        # Patch-trained top stage: 32x32 windows of the 64x64 images, no self-attention.
        model.update(resolution=32, lowres_scale=2, block_mult=(1, 2, 2),
                     attention_resolutions=(8,), self_attention=False)
        data.update(resolution=64)
    c.model = ml_collections.ConfigDict(model)
    c.experts = "A"
    c.sampling = ml_collections.ConfigDict(dict(
        sampler="dpmpp_2m", num_steps=20 if stage == "base16" else 12, sigma_min=0.002,
        sigma_max=80.0, rho=7.0, guidance_scale=2.0 if stage == "base16" else 1.0,
        noise_aug_sigma=0.002,
    ))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=16, steps=3000, lr=1e-3, warmup_steps=100, lr_decay="cosine", grad_clip=1.0,
        ema_decay=0.995, log_every=100, checkpoint_every=500, keep_checkpoints=2,
        noise_aug_sigma=(0.002, 0.5),
    ))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
    c.data = ml_collections.ConfigDict(data)
    return c
