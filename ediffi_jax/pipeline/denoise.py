"""The U-Net as a sampler's denoiser: where the plan's static segment settings (ScaleCrafter's
conv settings, paint-with-words) meet the network, which knows neither the sampler nor the
plan: it is given conv settings and a cross-attention bias, and sigma reaches the bias as data.
"""
from __future__ import annotations

import jax.numpy as jnp

from ediffi_jax.diffusion import discrete, edm
from ediffi_jax.diffusion.plan import SegmentSettings
from ediffi_jax.models import diffusers_unet
from ediffi_jax.models.unet import UNet, check_conv_settings
from ediffi_jax.paint.bias import cross_attention_bias


def unet_denoise_fn(unet: UNet):
    """denoise_fn(params, x, sigma, cond, settings) for PlanRunner: the EDM-preconditioned
    U-Net with the segment's per-layer conv settings and, when the segment paints and cond
    carries token masks, the paint-with-words bias at this sigma."""

    def denoise_fn(params, x, sigma, cond, settings: SegmentSettings):
        if settings.attention_area_ratio is not None:
            raise ValueError("attention entropy scaling is a diffusers U-Net option; the "
                             "project's U-Net scales to other sizes with its highres settings")
        conv_settings = dict(settings.layers)
        if conv_settings:
            check_conv_settings(params, conv_settings)
        if cond.paint is not None and settings.paint is None:
            raise ValueError("cond.paint holds paint-with-words masks but the plan does not "
                             "paint (give PaintSettings)")
        bias = None
        if settings.paint is not None and cond.paint is not None:
            bias = cross_attention_bias(cond.paint, sigma, settings.paint)
        network = lambda x_in, c_noise, cond: unet.apply(  # noqa: E731
            {"params": params}, x_in, c_noise, cond, conv_settings=conv_settings,
            cross_attention_bias=bias)
        return edm.denoise(network, x, sigma, cond)

    return denoise_fn


def diffusers_denoise_fn(unet, schedule):
    """denoise_fn for a discrete-time diffusers U-Net (models/diffusers_unet.py): the
    checkpoint's schedule turns sigma into its timestep and its epsilon / v output into the
    EDM denoised image (diffusion/discrete.py), so the project's samplers, plans and CFG run
    on it unchanged. `cond` is a PromptConditioning; the segment's conv settings and
    paint-with-words bias reach the network as for the project's own U-Net."""

    def denoise_fn(params, x, sigma, cond, settings: SegmentSettings):
        conv_settings = dict(settings.layers)
        if conv_settings:
            diffusers_unet.check_conv_settings(params, conv_settings)
        bias = None
        if settings.paint is not None and cond.paint is not None:
            bias = cross_attention_bias(cond.paint, sigma, settings.paint)
        elif cond.paint is not None:
            raise ValueError("cond.paint holds paint-with-words masks but the plan does not "
                             "paint (give PaintSettings)")

        def network(x_in, t):
            if cond.lowres is not None:  # IF stage II: [noisy image, augmented low-res]
                x_in = jnp.concatenate([x_in, cond.lowres.astype(x_in.dtype)], axis=-1)
            return unet.apply(
                {"params": params}, x_in, t, cond.context,
                encoder_attention_mask=cond.context_mask, text_embeds=cond.pooled,
                time_ids=cond.time_ids, class_labels=cond.noise_level,
                conv_settings=conv_settings, cross_attention_bias=bias,
                attention_area_ratio=settings.attention_area_ratio)

        return discrete.vp_denoise(network, x, sigma, schedule)

    return denoise_fn
