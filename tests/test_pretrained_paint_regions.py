"""Paint-with-words on diffusers checkpoints (the tiny SD fixture) beyond one layout of positive
phrases: negative phrases painted over regions (token masks on the negative prompt's tokens,
biasing CFG's negative branch only), and --paint-layout, a layout per prompt in one batch."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ediffi_jax.encoders.prompt import PromptEncoder
from ediffi_jax.paint.bias import PaintSettings
from ediffi_jax.paint.masks import Layout, PaintError, PhraseMask, read_layouts
from ediffi_jax.pipeline.pretrained import load_pretrained
from sample.__main__ import main
from sample.pretrained import layout_masks

SD = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers", "tiny_sd")
H, W = 16, 16


def _half(left: bool) -> np.ndarray:
    mask = np.zeros((H, W), np.float32)
    mask[:, : W // 2] = 1.0
    return mask if left else 1.0 - mask


@pytest.fixture(scope="module")
def encoder():
    return PromptEncoder(SD)


def _painted_columns(masks: np.ndarray) -> list[int]:
    return [j for j in range(masks.shape[-1]) if masks[..., j].any()]


def test_negative_masks_land_on_the_negative_prompts_phrase_only(encoder):
    left, right = [PhraseMask("circle", _half(True))], [PhraseMask("blob", _half(False), 0.5)]
    layouts = [Layout(tuple(left), tuple(right)), Layout((), tuple(right))]
    paint, negative = layout_masks(encoder, ["a red circle", "a blue square"],
                                   ["blurry blob", "a blob"], layouts, 2.0)
    # The positive masks are those of the positive phrases alone; the unpainted prompt: zeros.
    np.testing.assert_array_equal(paint[:1], encoder.paint_masks(["a red circle"], left, 2.0))
    assert not paint[1].any()
    # 'blob' (the tiny tokenizer's 3 pieces) after BOS + 'blurry' (5), and after BOS + 'a':
    # mask x 0.5 x 2.
    assert _painted_columns(negative[0]) == [6, 7, 8]
    assert _painted_columns(negative[1]) == [2, 3, 4]
    np.testing.assert_array_equal(negative[1, ..., 2], _half(False))
    # Only negative phrases: the positive masks are zeros of the same shape (one CFG batch).
    paint, negative = layout_masks(encoder, ["a red circle"], ["blurry blob"],
                                   [Layout((), tuple(right))], 1.0)
    assert paint.shape == negative.shape and not paint.any()
    with pytest.raises(PaintError, match="phrase 'dog' is not in the negative prompt 'blurry "
                                         "blob' .*negative prompt tokens"):
        encoder.paint_masks(["blurry blob"], [PhraseMask("dog", _half(True))], negative=True)
    with pytest.raises(PaintError, match="give the --negative-prompt"):
        layout_masks(encoder, ["a red circle"], None, [Layout((), tuple(right))], 1.0)


def test_negative_paint_moves_the_unconditional_branch_only(encoder):
    pipe = load_pretrained(SD)
    cond = encoder.encode(["a red circle"], ["blurry blob"])
    paint = encoder.paint_masks(["a red circle"], [PhraseMask("circle", _half(True))], 4.0)
    negative = encoder.paint_masks(["blurry blob"], [PhraseMask("blob", _half(False))], 4.0,
                                   negative=True)
    plain = cond.replace(paint=jnp.asarray(paint))
    steered = plain.replace(negative_paint=jnp.asarray(negative))
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4)) * 3.0

    def denoised(c, guidance_scale=1.0):
        plan = pipe.plan(1, sampler="euler", guidance_scale=guidance_scale, sigmas=[3.0, 0.0],
                         paint=PaintSettings("max"))
        return np.asarray(pipe.denoise(plan, c, x))

    np.testing.assert_array_equal(denoised(steered), denoised(plain))  # the prompt's branch
    d_u, d_u_steered = denoised(plain.unconditional()), denoised(steered.unconditional())
    assert np.abs(d_u_steered - d_u).max() > 1e-3
    # CFG D = D_u + w (D_c - D_u), with the negative branch painted by negative_paint.
    d_c = denoised(plain)
    np.testing.assert_allclose(denoised(steered, 3.0), d_u_steered + 3.0 * (d_c - d_u_steered),
                               atol=1e-4)
    with pytest.raises(ValueError, match="negative_paint needs paint too"):
        cond.replace(negative_paint=jnp.asarray(negative)).unconditional()


@pytest.fixture(scope="module")
def layout_dir(tmp_path_factory):
    """Two layouts: a colour map (red left 'circle', white background; its right 'blob' in
    the negative words) and per-phrase masks (right 'square', left negative 'blurry')."""
    d = tmp_path_factory.mktemp("layout")
    colours = np.full((H, W, 3), 255, np.uint8)
    colours[:, : W // 2] = (255, 0, 0)
    Image.fromarray(colours).save(d / "colours.png")
    (d / "words.json").write_text(json.dumps({"#ff0000": "circle,2", "#ffffff": "background"}))
    (d / "masks").mkdir()
    Image.fromarray((_half(False) * 255).astype(np.uint8)).save(d / "masks" / "right.png")
    Image.fromarray((_half(True) * 255).astype(np.uint8)).save(d / "masks" / "left.png")
    layouts = [{"paint": "colours.png", "words": "words.json",
                "negative_words": {"#ffffff": "blob"}},
               {"masks": {"square": "masks/right.png:0.5"},
                "negative_masks": {"blurry": "masks/left.png"}}]
    (d / "layout.json").write_text(json.dumps(layouts))
    return d


def test_a_layout_file_reads_into_layouts(layout_dir):
    first, second = read_layouts(str(layout_dir / "layout.json"), H, W)
    assert [(m.phrase, m.strength) for m in first.masks] == [("circle", 2.0)]
    assert [m.phrase for m in first.negative] == ["blob"]  # red is named in the words only
    np.testing.assert_array_equal(first.negative[0].mask, _half(False))
    assert [(m.phrase, m.strength) for m in second.masks] == [("square", 0.5)]
    np.testing.assert_array_equal(second.negative[0].mask, _half(True))


def test_paint_layout_gives_each_prompt_its_own_masks(layout_dir, encoder, tmp_path,
                                                      monkeypatch, capsys):
    """Two prompts, --num 2, --batch 3: every batch's conditioning carries, per sample, the
    masks of its prompt's layout (the CLI's, recorded before sampling)."""
    import sample.__main__ as cli
    import sample.pretrained as pretrained

    conds = []
    encode = pretrained.encode

    def recorded(*args, **kw):
        conds.append(encode(*args, **kw))
        return conds[-1]

    def encode_only(batches, *rest):  # each batch's conditioning made, its images never
        for _ in batches:
            pass
        return 0

    monkeypatch.setattr(pretrained, "encode", recorded)
    monkeypatch.setattr(cli, "write_batches", encode_only)
    prompts, negatives = ["a red circle", "a blue square"], ["blurry blob", "blurry"]
    rc = main(["--pretrained", SD, "--prompt", prompts[0], "--prompt", prompts[1],
               "--negative-prompt", negatives[0], "--negative-prompt", negatives[1],
               "--num", "2", "--batch", "3", "--mesh=1,1,-1", "--steps", "2",
               "--size", f"{H}x{W}", "--paint-layout", str(layout_dir / "layout.json"), "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    assert [c.batch_size for c in conds] == [3, 1]
    paint = np.concatenate([np.asarray(c.paint) for c in conds])
    negative = np.concatenate([np.asarray(c.negative_paint) for c in conds])
    first, second = read_layouts(str(layout_dir / "layout.json"), H, W)
    assert not np.array_equal(paint[1], paint[2])  # 'circle' on the left, 'square' right
    for k, layout in enumerate((first, second)):
        rows = slice(2 * k, 2 * k + 2)  # --num 2: a prompt's samples share its layout
        want = encoder.paint_masks([prompts[k]], layout.masks)
        want_negative = encoder.paint_masks([negatives[k]], layout.negative, negative=True)
        np.testing.assert_array_equal(paint[rows], np.repeat(want, 2, 0))
        np.testing.assert_array_equal(negative[rows], np.repeat(want_negative, 2, 0))


def test_command_line_negative_mask_samples_the_librarys_image(tmp_path, encoder, capsys):
    """--negative-paint-mask: the PNG is the library's sample with that negative_paint (2 steps,
    CFG), not the one without."""
    from ediffi_jax.pipeline.generate import to_uint8

    Image.fromarray((_half(False) * 255).astype(np.uint8)).save(tmp_path / "right.png")
    rc = main(["--pretrained", SD, "--prompt", "a red circle", "--negative-prompt",
               "blurry blob", "--num", "1", "--steps", "2", "--size", f"{H}x{W}",
               "--paint-weight", "max", "--paint-scale", "4",
               "--negative-paint-mask", f"blob={tmp_path / 'right.png'}",
               "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    got = np.asarray(Image.open(tmp_path / "out" / "0000_a_red_circle.png")).astype(int)
    pipe = load_pretrained(SD)
    negative = encoder.paint_masks(["blurry blob"], [PhraseMask("blob", _half(False))], 4.0,
                                   negative=True)
    cond = encoder.encode(["a red circle"], ["blurry blob"]).replace(
        paint=jnp.zeros(negative.shape), negative_paint=jnp.asarray(negative))
    plan = pipe.plan(2, paint=PaintSettings("max"))
    want = np.asarray(to_uint8(pipe.sample(plan, cond, size=(H, W))))[0].astype(int)
    assert np.abs(got - want).max() <= 1
    plain = np.asarray(to_uint8(pipe.sample(plan, cond.replace(negative_paint=None),
                                            size=(H, W))))[0].astype(int)
    assert np.abs(plain - got).max() > 2


def _write(path, content) -> str:
    path.write_text(json.dumps(content))
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("count", "1 layouts for 2 --prompt: give one for each, in order"),
    ("unknown", "layout 1 has unknown keys ['mask'] (allowed: paint, words, masks"),
    ("missing", "masks/gone.png does not exist"),
    ("with_paint_mask", "--paint-layout gives each prompt its layout: not with --paint-mask"),
    ("not_a_list", "expected a JSON list of one object per prompt"),
    ("no_negative_prompt", "give the --negative-prompt they are phrases of"),
    ("negative_phrase", "phrase 'dog' is not in the negative prompt 'blurry'"),
])
def test_bad_paint_layouts_are_errors_before_sampling(layout_dir, tmp_path, capsys, case,
                                                      message):
    square = {"masks": {"square": "masks/right.png"}}
    files = {
        "count": [square],
        "unknown": [square, {"mask": {"square": "masks/right.png"}}],
        "missing": [square, {"masks": {"square": "masks/gone.png"}}],
        "with_paint_mask": [square, square],
        "not_a_list": {"layouts": [square, square]},
        "no_negative_prompt": [square, {"negative_masks": {"blurry": "masks/left.png"}}],
        "negative_phrase": [square, {"negative_masks": {"dog": "masks/left.png"}}],
    }
    argv = ["--pretrained", SD, "--prompt", "a square", "--prompt", "a red square", "--num", "1",
            "--steps", "2", "--size", f"{H}x{W}", "--out", str(tmp_path / "out"),
            "--paint-layout", _write(layout_dir / f"{case}.json", files[case])]
    if case == "with_paint_mask":
        argv += ["--paint-mask", f"square={layout_dir / 'masks' / 'right.png'}"]
    if case == "negative_phrase":
        argv += ["--negative-prompt", "blurry"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err  # the message alone, no traceback
    assert not (tmp_path / "out").exists()


def test_negative_paint_flags_are_pretrained_only(tmp_path, capsys):
    from tests.test_faults_sampling import SHIPPED

    argv = ["--ensemble", SHIPPED, "--prompt", "a red circle", "--out", str(tmp_path / "out")]
    assert main(argv + ["--negative-paint-mask", "blob=m.png"]) == 2
    assert "--negative-paint-mask: only with --pretrained" in capsys.readouterr().err
    assert main(argv + ["--paint-layout", "layout.json"]) == 2
    assert "--paint-layout: only with --pretrained" in capsys.readouterr().err


def test_experts_carry_negative_masks_per_expert(tmp_path):
    """An experts file: each expert's negative masks (its tokenizer's reading) at [:, k], its
    negative branch painted by them."""
    from ediffi_jax.pipeline.pretrained_experts import prompt_encoder

    path = _write(tmp_path / "experts.json", {"experts": [
        {"pretrained": SD, "quantiles": ["0", "1/2"]},
        {"pretrained": SD, "quantiles": ["1/2", "1"], "clip_skip": 1}]})
    experts = prompt_encoder(path)
    blob = [PhraseMask("blob", _half(False))]
    negative = experts.paint_masks(["blurry blob"], blob, 2.0, negative=True)
    assert negative.shape == (1, 2, H, W, 77)
    cond = experts.encode(["a red circle"], ["blurry blob"]).replace(
        paint=np.zeros_like(negative), negative_paint=negative)
    for k, c in enumerate(cond.conds):
        np.testing.assert_array_equal(c.unconditional().paint, negative[:, k])
        np.testing.assert_array_equal(
            c.negative_paint, experts.encoders[k].paint_masks(["blurry blob"], blob, 2.0,
                                                              negative=True))
