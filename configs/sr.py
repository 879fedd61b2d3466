"""The eDiff-I super-resolution stages (paper appendix, via [S2] in
shared/reference/ediffi-facts.md; Efficient-U-Net-like, as Imagen's):

  256:  64 -> 256, 128 channels, multipliers [1,2,4,8], 2 res blocks x block mult [1,2,4,4]
        (2, 4, 8, 8 blocks at 256, 128, 64, 32), self- and cross-attention at 32 only.
  1024: 256 -> 1024, 128 channels, multipliers [1,2,4,4], 2 x [1,2,4,4] blocks, cross-attention
        only at 32 (no self-attention); trained on random 256x256 crops of 1024x1024 images
        (data.resolution 1024, model.resolution 256) and sampled whole.

The SR256 of Config-B/C/D has two experts E^1_0, E^1_1 (the two equal-mass halves):
`configs/sr.py:256-B`. SR1024 is one model in every configuration.

    python -m ediffi_jax.info --config configs/sr.py:256
    python -m train --config configs/sr.py:1024 --workdir ... --config.data.path=...
"""
import ml_collections

STAGES = ("256", "256-B", "1024")


def get_config(stage: str = "256"):
    if stage not in STAGES:
        raise ValueError(f"sr config takes one of {STAGES}, got {stage!r}")
    side = stage.split("-")[0]
    c = ml_collections.ConfigDict()
    c.name = f"sr{side}"
    model = dict(
        channels=128, num_res_blocks=2, block_mult=(1, 2, 4, 4), attention_resolutions=(32,),
        attention_head_dim=64, scale_shift_norm=True, context_dim=1024, t5_dim=4096,
        t5_length=128, clip_dim=768, clip_length=77, clip_pooled_dim=768, clip_image_dim=768,
        dtype="bfloat16", lowres_scale=4,
    )
    if side == "256":
        model.update(resolution=256, channel_mult=(1, 2, 4, 8))
    else:
        # Patches of 256: the attention resolution 32 is the 8x-downsampled level of a patch.
        model.update(resolution=256, channel_mult=(1, 2, 4, 4), self_attention=False)
    c.model = ml_collections.ConfigDict(model)
    c.experts = ((("0", "1/2"), ("1/2", "1")) if stage == "256-B" else "A")
    c.sampling = ml_collections.ConfigDict(dict(
        sampler="heun", num_steps=16, sigma_min=0.002, sigma_max=80.0, rho=7.0,
        guidance_scale=1.0, noise_aug_sigma=0.002,
    ))
    # ArrayRecords of images at least this large (python -m ediffi_jax.data.prepare); set the
    # path with --config.data.path=...
    c.data = ml_collections.ConfigDict(dict(name="records", path=f"data/images{side}/train",
                                            resolution=int(side)))
    return c
