"""Tiny base model for CPU: 32x32, 1.3 M params, Config-D expert layout for sampling.

`make pretrained` trains it on the procedural shapes dataset (4000 steps at batch 8, ~25 min on
2 cores) and exports the shipped shared model; `make demo` grows its three experts from that and
samples with them. Measured figures and the tuning behind these values are in
docs/NOTES-demo-tuning.md.

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
        # DPM-Solver++(2M) at 20 steps grades the same as Heun at 32 (63 evaluations), 3x cheaper.
        sampler="dpmpp_2m", num_steps=20, sigma_min=0.002, sigma_max=80.0, rho=7.0,
        guidance_scale=3.0, s_churn=0.0,
    ))
    c.train = ml_collections.ConfigDict(dict(
        # Batch 8 learns ~2x more per image than 16 here; cosine decay anneals the short run.
        batch_size=8, steps=4000, lr=1e-3, warmup_steps=100, lr_decay="cosine", grad_clip=1.0,
        ema_decay=0.995, log_every=100, checkpoint_every=800, keep_checkpoints=2,
    ))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
    c.data = ml_collections.ConfigDict(dict(
        name="shapes", path="",
        # Colour + shape captions ("a red circle"): the demo's bar; "full" adds size, position.
        shapes=ml_collections.ConfigDict(dict(max_objects=1, caption_style="short")),
    ))
    return c
