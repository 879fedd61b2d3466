"""The eDiff-I base model, 64x64 (paper appendix, via [S2] in shared/reference/ediffi-facts.md):
256 channels, multipliers [1,2,4,4], 3 res blocks per level, self- and cross-attention at 32, 16
and 8, scale-shift norm; T5-XXL (4096-d, 128 tokens) + CLIP L/14 text (768-d, 77 tokens) + CLIP
L/14 image (768-d).

The argument picks the paper's Table 1 layout of base-model experts:
  A, B: one model;  C: E^9_511 + complement;  D: E^3_0, complement, E^9_511 (default).

    python -m ediffi_jax.info --config configs/base64.py:D
"""
import ml_collections


def get_config(layout: str = "D"):
    if layout not in ("A", "B", "C", "D"):
        raise ValueError(f"base64 config takes A, B, C or D, got {layout!r}")
    c = ml_collections.ConfigDict()
    c.name = f"base64-config-{layout}"
    c.model = ml_collections.ConfigDict(dict(
        resolution=64,
        channels=256,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=3,
        attention_resolutions=(32, 16, 8),
        attention_head_dim=64,
        scale_shift_norm=True,
        context_dim=1024,
        t5_dim=4096,
        t5_length=128,
        clip_dim=768,
        clip_length=77,
        clip_pooled_dim=768,
        clip_image_dim=768,
        dtype="bfloat16",
    ))
    c.experts = layout
    c.sampling = ml_collections.ConfigDict(dict(
        sampler="heun", num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0,
        guidance_scale=7.5, s_churn=0.0,
    ))
    return c
