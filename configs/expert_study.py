"""The expert-scaling study's model: Fashion-MNIST with class captions at 32x32, sized for CPU.

One model trained N steps against 2 and 3 experts grown from its own checkpoint at step S by the
binary-tree recipe, at equal total samples seen (benchmarks/expert_study.py runs it; the method,
commands and results are in docs/EXPERIMENTS.md).

    python -m ediffi_jax.data.prepare fashion_mnist --out data/fashion
    python -m train --config configs/expert_study.py --workdir runs/study/s0/base \
        --config.data.path=data/fashion/train

A constant learning rate after warm-up, so that the baseline's checkpoint at step S is a shared
model in its own right (no schedule horizon baked in) and its continuation to N is the baseline;
an EMA half-life of ~140 steps, short enough that a child's EMA weights are the child's and not
its parent's.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "study"
    c.model = ml_collections.ConfigDict(dict(
        resolution=32, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
        attention_resolutions=(8,), attention_head_dim=16, context_dim=32, t5_dim=32,
        t5_length=16, clip_dim=32, clip_length=16, clip_pooled_dim=32, clip_image_dim=32,
        dtype="float32",
    ))
    c.experts = "A"
    c.sampling = ml_collections.ConfigDict(dict(
        sampler="dpmpp_2m", num_steps=20, sigma_min=0.002, sigma_max=80.0, rho=7.0,
        guidance_scale=2.0, s_churn=0.0,
    ))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=32, steps=1000, lr=1e-3, warmup_steps=100, lr_decay="constant",
        grad_clip=1.0, ema_decay=0.995, log_every=100, checkpoint_every=250,
        keep_checkpoints=2,
    ))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
    c.data = ml_collections.ConfigDict(dict(name="records", path="data/fashion/train"))
    return c
