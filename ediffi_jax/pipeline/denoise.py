"""The U-Net as a sampler's denoiser: where the plan's static segment settings (ScaleCrafter's
conv settings, paint-with-words) meet the network, which knows neither the sampler nor the
plan: it is given conv settings and a cross-attention bias, and sigma reaches the bias as data.
"""
from __future__ import annotations

from ediffi_jax.diffusion import edm
from ediffi_jax.diffusion.plan import SegmentSettings
from ediffi_jax.models.unet import UNet, check_conv_settings
from ediffi_jax.paint.bias import cross_attention_bias


def unet_denoise_fn(unet: UNet):
    """denoise_fn(params, x, sigma, cond, settings) for PlanRunner: the EDM-preconditioned
    U-Net with the segment's per-layer conv settings and, when the segment paints and cond
    carries token masks, the paint-with-words bias at this sigma."""

    def denoise_fn(params, x, sigma, cond, settings: SegmentSettings):
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
