"""The expert-scaling study's capacity-bound model: Fashion-MNIST with class captions at 16x16
and a U-Net small enough (8 channels, two levels; 16 channels in the first seed-0 run of
docs/EXPERIMENTS.md, which had not plateaued at 8000 steps) to approach a plateau of its
held-out loss on a CPU, the regime where eDiff-I's experts branch from their shared model
(benchmarks/expert_scaling.py runs the study; the results are in docs/EXPERIMENTS.md).

    python -m ediffi_jax.data.prepare fashion_mnist --resolution 16 --out data/fashion16
    python -m train --config configs/expert_scaling.py --workdir runs/scaling/s0/parent \
        --config.data.path=data/fashion16/train

A constant learning rate after warm-up (a checkpoint is a model in its own right and a
continuation of it is a fair baseline); every child is a `train.branch` with a fresh AdamW.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "scaling"
    c.model = ml_collections.ConfigDict(dict(
        resolution=16, channels=8, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(8,), attention_head_dim=16, context_dim=32, t5_dim=32,
        t5_length=16, clip_dim=32, clip_length=16, clip_pooled_dim=32, clip_image_dim=32,
        dtype="float32",
    ))
    c.experts = "A"
    c.sampling = ml_collections.ConfigDict(dict(
        sampler="dpmpp_2m", num_steps=12, sigma_min=0.002, sigma_max=80.0, rho=7.0,
        guidance_scale=2.0, s_churn=0.0,
    ))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=32, steps=4000, lr=1e-3, warmup_steps=100, lr_decay="constant",
        grad_clip=1.0, ema_decay=0.995, log_every=250, checkpoint_every=500,
        keep_checkpoints=9,
    ))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
    c.data = ml_collections.ConfigDict(dict(name="records", path="data/fashion16/train"))
    return c
