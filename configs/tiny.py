"""Tiny base model for CPU: 32x32, 1.3 M params, Config-D expert layout for sampling.

Training 1000 steps at batch 16 on the procedural shapes dataset takes ~12 min on 2 cores.

    python -m ediffi_jax.info --config configs/tiny.py
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "tiny"
    c.model = ml_collections.ConfigDict(dict(
        resolution=32,
        channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        attention_head_dim=16,
        context_dim=32,
        t5_dim=32,
        t5_length=16,
        clip_dim=32,
        clip_length=16,
        clip_pooled_dim=32,
        clip_image_dim=32,
        dtype="float32",
    ))
    c.experts = "D"
    c.sampling = ml_collections.ConfigDict(dict(
        sampler="heun", num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0,
        guidance_scale=3.0, s_churn=0.0,
    ))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=16, steps=1000, lr=1e-3, warmup_steps=100, grad_clip=1.0,
        ema_decay=0.995, log_every=50, checkpoint_every=500, keep_checkpoints=2,
    ))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
    c.data = ml_collections.ConfigDict(dict(
        name="shapes", path="",
        # Colour + shape captions ("a red circle"): the demo's bar; "full" adds size, position.
        shapes=ml_collections.ConfigDict(dict(max_objects=1, caption_style="short")),
    ))
    return c
