"""Paint-with-words: the bias formula, token masks in both streams, the unconditional branch,
inputs a person makes, and their errors."""
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.encoders.toy import WordEncoder
from ediffi_jax.models.layers import attention
from ediffi_jax.paint.bias import PaintSettings, bias_fn
from ediffi_jax.paint.masks import (PaintError, PhraseMask, from_color_map, from_mask_specs,
                                    paint_conditioning)
from tests.tiny import tiny_conditioning, tiny_params, tiny_unet_config


@pytest.mark.parametrize("weight", ["max", "std", "std_sq"])
def test_bias_equals_the_formula(weight):
    rng = np.random.default_rng(0)
    b, nq, nk, heads, d = 2, 6, 5, 2, 4
    side = 3  # a 2x3 feature map would do too; 6 image tokens = 2 x 3
    q, k, v = (rng.normal(size=(b, n, heads, d)).astype(np.float32) for n in (nq, nk, nk))
    key_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    paint = rng.uniform(size=(b, 2, side, nk)).astype(np.float32)  # masks already at 2x3
    sigma = np.array([0.5, 3.0], np.float32)
    got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), key_mask=jnp.asarray(key_mask),
                    bias_fn=bias_fn(jnp.asarray(paint), sigma, jnp.asarray(key_mask), 2, side, weight))
    qk = np.einsum("bqhd,bkhd->bhqk", q, k)
    want = np.zeros_like(q)
    for i in range(b):
        valid = qk[i][..., key_mask[i] == 1]
        stat = valid.max() if weight == "max" else valid.std()
        factor = math.log1p(sigma[i] ** 2) if weight == "std_sq" else math.log1p(sigma[i])
        a = paint[i].reshape(nq, nk)  # [image tokens, text tokens]
        logits = (qk[i] + factor * stat * a[None]) / math.sqrt(d)
        logits = np.where(key_mask[i][None, None] == 1, logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        want[i] = np.einsum("hqk,khd->qhd", p, v[i])
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


CFG = tiny_unet_config(t5_length=6, clip_length=6)


def _denoise(cond, paint_settings):
    from ediffi_jax.diffusion.plan import SegmentSettings
    from ediffi_jax.models.unet import UNet
    from ediffi_jax.pipeline.denoise import unet_denoise_fn

    x = jax.random.normal(jax.random.key(0), (cond.batch_size, 16, 16, 3))
    fn = unet_denoise_fn(UNet(CFG))
    return np.asarray(fn(tiny_params(CFG), x, jnp.full((cond.batch_size,), 2.0), cond,
                         SegmentSettings(paint=paint_settings)))


def _masks(strength=1.0):
    mask = np.zeros((16, 16), np.float32)
    mask[:8, :8] = 1.0
    return [PhraseMask("red circle", mask, strength)]


def test_zero_strength_is_no_masks_and_the_unconditional_branch_is_untouched():
    enc = WordEncoder.for_model(CFG)
    cond = jax.tree.map(jnp.asarray, enc.encode(["a red circle", "a big red circle"]))
    base = tiny_conditioning(CFG, 2)
    cond = base.replace(t5_mask=cond.t5_mask, clip_mask=cond.clip_mask)
    plain = _denoise(cond, None)
    zero = paint_conditioning(enc, CFG, ["a red circle", "a big red circle"], _masks(0.0))
    np.testing.assert_allclose(_denoise(cond.replace(paint=jnp.asarray(zero)), PaintSettings()),
                               plain, atol=1e-6)
    painted = paint_conditioning(enc, CFG, ["a red circle", "a big red circle"], _masks(2.0))
    assert np.abs(_denoise(cond.replace(paint=jnp.asarray(painted)), PaintSettings()) - plain).max() > 1e-4
    # The unconditional branch gets zeros (Conditioning.unconditional), so it equals no paint.
    uncond = cond.replace(paint=jnp.asarray(painted)).unconditional()
    assert float(jnp.abs(uncond.paint).max()) == 0.0
    np.testing.assert_allclose(_denoise(uncond, PaintSettings()),
                               _denoise(cond.unconditional(), None), atol=1e-6)
    # Only the named layers: a layer list without the attention block changes nothing.
    np.testing.assert_allclose(
        _denoise(cond.replace(paint=jnp.asarray(painted)), PaintSettings(layers=("none",))), plain,
        atol=1e-6)


def test_every_occurrence_in_both_streams_gets_the_mask():
    model = tiny_unet_config(t5_length=8, clip_length=8)
    enc = WordEncoder.for_model(model)
    a = paint_conditioning(enc, model, ["a red circle near a red circle"], _masks(0.5))[0]
    assert a.shape == (16, 16, 8 + 8 + 2)
    columns = np.flatnonzero(a.max(axis=(0, 1)))
    # words: a red circle near a red circle -> positions 1, 2 and 5, 6 in each stream (T5 first,
    # CLIP from offset t5_length = 8); the image and null tokens get nothing.
    assert list(columns) == [1, 2, 5, 6, 9, 10, 13, 14]
    np.testing.assert_allclose(a[..., 1], 0.5 * _masks()[0].mask)
    # A phrase cut off by the token limit is not in the prompt as the model reads it.
    short = tiny_unet_config(t5_length=4, clip_length=4)
    with pytest.raises(PaintError, match="not in the prompt"):
        paint_conditioning(WordEncoder.for_model(short), short, ["a big shiny red circle"], _masks())


def test_pretrained_tokenizers_map_phrases_in_each_stream(tmp_path):
    from ediffi_jax.encoders.conditioner import EncodersConfig, PretrainedEncoder
    from ediffi_jax.encoders.tiny import write_tiny_encoders

    dirs = write_tiny_encoders(str(tmp_path), width=8)
    model = tiny_unet_config(t5_dim=8, t5_length=12, clip_dim=8, clip_length=12,
                             clip_pooled_dim=8, clip_image_dim=8)
    enc = PretrainedEncoder(EncodersConfig(**dirs), model)
    prompt = "a red circle and a red circle"
    a = paint_conditioning(enc, model, [prompt], _masks())[0]
    streams = {s.name: s for s in enc.token_streams(prompt)}
    for name, stream in streams.items():
        phrase = enc.phrase_tokens(name, "red circle")
        cols = [stream.offset + i for i in range(len(stream.ids)) if a[..., stream.offset + i].max() > 0]
        # Two occurrences, each len(phrase) tokens, in this stream's columns.
        assert len(cols) == 2 * len(phrase.ids), (name, stream.tokens, phrase.tokens)
    clip = streams["clip"]
    assert clip.tokens[:3] == ("<|startoftext|>", "a</w>", "red</w>")
    assert a[..., clip.offset + 2].max() == 1.0 and a[..., clip.offset + 1].max() == 0.0
    with pytest.raises(PaintError, match=r"'blue square' is not in the prompt .* prompt tokens"):
        paint_conditioning(enc, model, [prompt], [PhraseMask("blue square", _masks()[0].mask)])


def test_colour_map_inputs_and_their_errors(tmp_path, caplog):
    from PIL import Image

    image = np.zeros((20, 30, 3), np.uint8)
    image[:, 15:] = (255, 0, 0)
    image[:5, :5] = (0, 0, 255)
    masks = from_color_map(image, {"#ff0000": "red circle,0.8", "0,0,255": "blue square",
                                   "(0, 0, 0)": "background"}, 16, 24)
    by_phrase = {m.phrase: m for m in masks}
    assert set(by_phrase) == {"red circle", "blue square"}
    assert by_phrase["red circle"].strength == 0.8 and by_phrase["blue square"].strength == 1.0
    assert by_phrase["red circle"].mask.shape == (16, 24)
    assert by_phrase["red circle"].mask[:, -1].min() == 1.0 and by_phrase["red circle"].mask[:, 0].max() == 0
    with pytest.raises(PaintError, match="colours the mapping does not name: #000000"):
        from_color_map(image, {"#ff0000": "red circle", "#0000ff": "blue square"}, 16, 24)
    with pytest.raises(PaintError, match="'#rrggbb' or 'r,g,b'"):
        from_color_map(image, {"red": "red circle"}, 16, 24)
    # Mask files: resized to the canvas, with a warning (another aspect ratio is an error:
    # tests/test_faults_sampling.py).
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(tmp_path / "big.png")
    with caplog.at_level(logging.WARNING):
        [m] = from_mask_specs([f"red circle={tmp_path / 'big.png'}:0.3"], 16, 16)
    assert m.strength == 0.3 and m.mask.shape == (16, 16) and m.mask.min() == 1.0
    assert any("is 40x40, resized to the output's 16x16" in r.getMessage() for r in caplog.records)
    with pytest.raises(PaintError, match="phrase=mask.png"):
        from_mask_specs(["red circle"], 16, 16)
    with pytest.raises(ValueError, match="paint weight must be one of"):
        PaintSettings(weight="mean")


def test_pooled_text_off_leaves_cross_attention_as_the_only_text_path():
    from ediffi_jax.models.unet import UNet, abstract_params

    cfg = tiny_unet_config(pooled_text=False)
    assert "clip_pooled_proj" not in abstract_params(cfg)
    assert "clip_pooled_proj" in abstract_params(tiny_unet_config())
    cond = tiny_conditioning(cfg, 1)
    x = jnp.zeros((1, 16, 16, 3))
    params = tiny_params(cfg)
    apply = lambda c: UNet(cfg).apply({"params": params}, x, jnp.zeros((1,)), c)  # noqa: E731
    np.testing.assert_array_equal(apply(cond), apply(cond.replace(clip_pooled=cond.clip_pooled * 5)))


def test_the_placement_benchmark_paints_each_object_over_its_own_region():
    from benchmarks.paint import LAYOUTS, cases, paint_for, region_mask

    model = tiny_unet_config(resolution=30, attention_resolutions=(15,), t5_length=8,
                             clip_length=8)
    for layout in ("halves", "columns"):
        todo = cases(8, layout)
        paint = paint_for(todo, 4.0, "std", model.resolution)
        for i, (prompt, objects) in enumerate(todo):
            (p0, c0, r0), (p1, c1, r1) = objects
            assert c0 != c1 and prompt == f"a {p0} and a {p1}"
            assert (r0, r1) == LAYOUTS[layout][i % 4]
            m0, m1 = region_mask(r0, 30), region_mask(r1, 30)
            assert not (m0 * m1).any()  # the two regions never overlap
            # halves cover the canvas; a column or a row is 3 of the 9 cells
            assert m0.sum() == m1.sum() == (450 if layout == "halves" else 300)
            a = paint_conditioning(WordEncoder.for_model(model), model, [prompt],
                                   paint.masks[i])[0]
            # words: a <p0> and a <p1> -> p0 at 1, 2 and p1 at 5, 6 in each stream (CLIP from 8)
            for column, mask in [(1, m0), (2, m0), (5, m1), (6, m1), (9, m0), (13, m1)]:
                np.testing.assert_array_equal(a[..., column], mask)
            assert not a[..., [0, 3, 4, 8, 11, 12]].any()
    np.testing.assert_array_equal(region_mask("left half", 4)[0], [1, 1, 0, 0])
    np.testing.assert_array_equal(region_mask("bottom half", 4)[:, 0], [0, 0, 1, 1])


def test_sampling_overrides_by_name():
    from types import SimpleNamespace

    from ediffi_jax.config import ConfigError
    from ediffi_jax.diffusion.plan import SamplingConfig
    from ediffi_jax.pipeline.generate import sampling_with_overrides

    run = SimpleNamespace(stage=SimpleNamespace(sampling=SamplingConfig(num_steps=20)))
    s = sampling_with_overrides(run, ["sampling.sampler=heun", "sampling.s_churn=40",
                                      "sampling.guidance_scale=5"])
    assert (s.sampler, s.s_churn, s.guidance_scale, s.num_steps) == ("heun", 40, 5, 20)
    with pytest.raises(ConfigError, match="s_chrun"):
        sampling_with_overrides(run, ["sampling.s_chrun=40"])
