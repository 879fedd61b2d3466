"""Paint-with-words' measurement model: two objects of different colours, text through
cross-attention only, so that where a phrase is attended is where its object is drawn.

The tiny U-Net of `configs/tiny.py` with two changes: the pooled CLIP vector stays out of the
noise embedding (`pooled_text=False`; through it the whole caption reaches every pixel, and
painting cannot move anything), and cross-attention also runs at 16x16, where an object is a few
tokens wide. The data are mixed scenes, "a red circle and a blue square", so a pixel must read its
own object's words to draw the right colour. `benchmarks/paint.py` measures placement on it.

    python -m train --config configs/paint_shapes.py --workdir runs/paint/shared
    python -m benchmarks.paint --model runs/paint/shared

The figures in BENCHMARKS.md are from this run continued twice, 3000 steps each, the second time
on scenes that all have two objects (`--config.data.shapes.min_objects=2`); the commands are there.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "paint"
    c.model = ml_collections.ConfigDict(dict(
        resolution=32, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
        attention_resolutions=(16, 8), attention_head_dim=16, context_dim=32, t5_dim=32,
        t5_length=16, clip_dim=32, clip_length=16, clip_pooled_dim=32, clip_image_dim=32,
        pooled_text=False, dtype="float32",
    ))
    c.experts = "A"
    c.sampling = ml_collections.ConfigDict(dict(
        sampler="dpmpp_2m", num_steps=20, sigma_min=0.002, sigma_max=80.0, rho=7.0,
        guidance_scale=3.0, s_churn=0.0,
    ))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=8, steps=4000, lr=1e-3, warmup_steps=100, lr_decay="cosine", grad_clip=1.0,
        ema_decay=0.995, log_every=100, checkpoint_every=500, keep_checkpoints=2,
    ))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
    c.data = ml_collections.ConfigDict(dict(
        name="shapes", path="",
        shapes=ml_collections.ConfigDict(dict(max_objects=2, min_objects=1, mixed=True,
                                              caption_style="short")),
    ))
    return c
