"""Evaluation beyond FID: the CLIP score (against transformers' reference embeddings and a numpy
computation), prompt fidelity and paint-with-words placement on shapes (clean images whose
truth is known), and the guidance sweep end to end on a tiny random model with a cheap feature
function standing in for Inception (the sweep's logic does not depend on which features)."""
import dataclasses
import json
import os

import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from PIL import Image
from safetensors.numpy import save_file

from ediffi_jax.data import shapes
from ediffi_jax.eval import clip_score, fid, fidelity, sweep
from ediffi_jax.runs.store import load_ensemble

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "encoders")


def fixture(name):
    return os.path.join(FIXTURES, name), np.load(os.path.join(FIXTURES, name, "reference.npz"))

# ----------------------------------------------------------------------------- CLIP score


def reference_scores(image_embeds, text_embeds):
    """100 * max(cos, 0) for every (image, text) pair, [images, texts], in numpy."""
    a = image_embeds / np.linalg.norm(image_embeds, axis=1, keepdims=True)
    b = text_embeds / np.linalg.norm(text_embeds, axis=1, keepdims=True)
    return 100 * np.maximum(a @ b.T, 0)


def test_clip_scores_is_100_times_the_clipped_cosine():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    got = clip_score.clip_scores(img, txt)
    np.testing.assert_allclose(got, np.diag(reference_scores(img, txt)), rtol=1e-12)
    assert (got == 0).any() and (got > 0).any()  # some pairs are clipped, some not
    # Norms do not matter; a pair of equal directions scores 100, opposite ones 0.
    np.testing.assert_allclose(clip_score.clip_scores(3 * img, 0.5 * txt), got, rtol=1e-12)
    np.testing.assert_allclose(clip_score.clip_scores(img, 2 * img), 100.0)
    np.testing.assert_allclose(clip_score.clip_scores(img, -img), 0.0)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        clip_score.clip_scores(img, txt[:5])


def test_own_caption_scores_highest_on_constructed_embeddings():
    """Images whose embedding is its caption's plus noise: each image's own caption scores
    above every other caption, and the set's score drops when the captions are shuffled."""
    rng = np.random.default_rng(1)
    text = rng.normal(size=(8, 64))
    images = text + 0.6 * rng.normal(size=text.shape)
    matrix = reference_scores(images, text)
    own = clip_score.clip_scores(images, text)
    np.testing.assert_allclose(own, np.diag(matrix), rtol=1e-12)
    off = matrix[~np.eye(8, dtype=bool)].reshape(8, 7)
    assert (own > off.max(axis=1)).all()
    shuffled = clip_score.clip_scores(images, np.roll(text, 1, axis=0))
    assert shuffled.mean() < own.mean() - 30


def test_clip_scorer_matches_transformers_reference_embeddings():
    """The fixtures' towers (CLIPTextModelWithProjection / CLIPVisionModelWithProjection, both
    projecting to 24) through the scorer give the scores of transformers' own embeddings."""
    text_dir, text_ref = fixture("clip_text")
    vision_dir, vision_ref = fixture("clip_vision")
    scorer = clip_score.CLIPScorer(text_dir, vision_dir, batch_size=1)
    t = scorer.text_embeddings_from_ids(text_ref["input_ids"], text_ref["attention_mask"])
    v = scorer.pixel_embeddings(vision_ref["pixel_values"].transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-6)
    expected = reference_scores(vision_ref["image_embeds"], text_ref["text_embeds"])
    # [[0, 12.70], [8.61, 32.17]]: the clipping and both signs are exercised.
    assert expected[0, 0] == 0 and expected[1, 1] > 30
    np.testing.assert_allclose(reference_scores(v, t), expected, atol=2e-3)
    np.testing.assert_allclose(clip_score.clip_scores(v, t), np.diag(expected), atol=2e-3)
    # A tokenizer whose ids overflow the tower's vocabulary is an error, not a silent gather.
    with pytest.raises(ValueError, match="tokenizer is not this model's"):
        scorer.text_embeddings(["a red circle"])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from ediffi_jax.encoders.tiny import write_clip

    out = tmp_path_factory.mktemp("clip") / "clip"
    write_clip(str(out), width=32, projection=16, image_size=32, patch_size=8)
    return str(out)


def shapes_set(n, **config):
    source = shapes.ShapesSource(shapes.ShapesConfig(**config))
    examples = [source[i] for i in range(n)]
    return np.stack([e["image"] for e in examples]), [e["caption"] for e in examples]


def test_clip_scorer_on_images_and_captions(tiny_clip):
    """A CLIPModel directory with its tokenizer: scores are the clipped cosines of the
    preprocessed images' and the tokenized captions' embeddings, pair by pair, independent of
    batching and of sharding the batch over the 8 devices."""
    from ediffi_jax.encoders.clip import preprocess_images
    from ediffi_jax.encoders.tokenizers import clip_tokenizer, tokenize
    from ediffi_jax.parallel.mesh import make_mesh

    images, captions = shapes_set(5, resolution=24)  # CLIP preprocessing resizes 24 -> 32
    scorer = clip_score.CLIPScorer(tiny_clip, batch_size=2)
    ids, mask = tokenize(clip_tokenizer(tiny_clip), captions, 77)
    t = scorer.text_embeddings_from_ids(ids, mask)
    v = scorer.pixel_embeddings(preprocess_images(images, 32))
    np.testing.assert_allclose(scorer.text_embeddings(captions), t, atol=1e-6)
    np.testing.assert_allclose(scorer.image_embeddings(images), v, atol=1e-6)
    scores = scorer.scores(images, captions)
    np.testing.assert_allclose(scores, np.diag(reference_scores(v, t)), atol=1e-4)
    assert scorer(images, captions) == pytest.approx(scores.mean(), abs=1e-9)
    order = [3, 0, 4, 1, 2]
    np.testing.assert_allclose(scorer.scores(images[order], [captions[i] for i in order]),
                               scores[order], atol=1e-4)
    sharded = clip_score.CLIPScorer(tiny_clip, batch_size=2, mesh=make_mesh())
    assert sharded.batch_size == 8
    np.testing.assert_allclose(sharded.scores(images, captions), scores, atol=1e-4)
    with pytest.raises(ValueError, match="5 images but 4 captions"):
        scorer.scores(images, captions[:4])


# ----------------------------------------------------------------------------- shapes fidelity


def _recolour(caption, to):
    truth = shapes.parse_caption(caption)
    return caption.replace(f" {truth['colour']} ", f" {to} ", 1)


def test_prompt_fidelity_rates_on_clean_images_with_known_errors():
    images, captions = shapes_set(12, max_objects=3, seed=5)
    perfect = fidelity.prompt_fidelity(images, captions)
    assert perfect == {"n": 12, "colour": 1.0, "shape": 1.0, "colour_shape": 1.0, "count": 1.0,
                       "size": 1.0, "region": 1.0, "all": 1.0}
    # A third of the captions name another colour: exactly those fail colour (and all).
    wrong = [_recolour(c, next(k for k in shapes.COLOUR_NAMES if f" {k} " not in c))
             if i % 3 == 0 else c for i, c in enumerate(captions)]
    rates = fidelity.prompt_fidelity(images, wrong)
    assert rates["colour"] == pytest.approx(8 / 12) and rates["all"] == pytest.approx(8 / 12)
    assert rates["shape"] == rates["count"] == rates["region"] == 1.0
    # Short captions state no size or position.
    short_images, short = shapes_set(4, caption_style="short")
    rates = fidelity.prompt_fidelity(short_images, short)
    assert rates["size"] is None and rates["region"] is None and rates["all"] == 1.0
    with pytest.raises(ValueError, match="not a shapes caption"):
        fidelity.prompt_fidelity(images[:1], ["a photo of a cat"])
    with pytest.raises(ValueError, match="12 images but 11 captions"):
        fidelity.prompt_fidelity(images, captions[:11])


def _cell_centre(region, res=32):
    x0, y0, x1, y1 = shapes.region_box(region, res)
    return ((x0 + x1) / 2, (y0 + y1) / 2)


def _cells(*regions, res=32):
    return shapes.cells_mask(regions, res)


def test_paint_position_accuracy_reads_centroids_against_painted_regions():
    pair = _cells("top left", "bottom right")
    two = shapes.render("red", "circle", "small", [_cell_centre("top left"),
                                                   _cell_centre("bottom right")], 32)
    one = shapes.render("red", "circle", "small", [_cell_centre("top left")], 32)
    assert fidelity.paint_placement(two, "red", pair) and fidelity.paint_placement(one, "red", pair)
    assert not fidelity.paint_placement(two, "red", _cells("top left"))  # one outside
    assert not fidelity.paint_placement(two, "blue", pair)  # no blue object
    acc = fidelity.paint_position_accuracy(
        [two, one, two, two], [[("red", pair)], [("red", pair)], [("red", _cells("left"))],
                               [("blue", pair)]])
    assert acc == {"n": 4, "placed": 0.5, "objects_placed": 0.5}
    # A mixed scene: each colour against its own region; the image counts only if all are placed.
    scene = np.maximum(shapes.render("red", "circle", "small", [_cell_centre("left")], 32),
                       shapes.render("blue", "square", "large", [_cell_centre("right")], 32))
    left_half = np.zeros((32, 32)); left_half[:, :16] = 1
    acc = fidelity.paint_position_accuracy(
        [scene, scene], [[("red", left_half), ("blue", 1 - left_half)],
                         [("red", left_half), ("blue", left_half)]])
    assert acc == {"n": 2, "placed": 0.5, "objects_placed": 0.75}
    with pytest.raises(ValueError, match="2 images but 1 target lists"):
        fidelity.paint_position_accuracy([scene, scene], [[("red", left_half)]])
    with pytest.raises(ValueError, match=r"region \(16, 16\) but image \(32, 32\)"):
        fidelity.paint_placement(scene, "red", np.ones((16, 16)))


# ----------------------------------------------------------------------------- the sweep

MICRO = ["model.resolution=16", "model.channels=8", "model.channel_mult=(1,2)",
         "model.attention_resolutions=(8,)", "model.attention_head_dim=4", "model.context_dim=8",
         "model.t5_dim=8", "model.t5_length=8", "model.clip_dim=8", "model.clip_length=8",
         "model.clip_pooled_dim=8", "model.clip_image_dim=8", "sampling.num_steps=2",
         "sampling.sampler='euler'"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random shapes model as an export (config.json + params.safetensors)."""
    from ediffi_jax.config import load_config, section
    from ediffi_jax.models.unet import UNetConfig
    from tiny import tiny_params
    from ediffi_jax.runs.spec import run_schema

    config = load_config("configs/tiny.py", MICRO, schema=run_schema())
    out = tmp_path_factory.mktemp("sweep") / "tiny"
    out.mkdir()
    params = tiny_params(section(UNetConfig, config.model, "model"), 3)
    save_file({k: np.asarray(v) for k, v in flatten_dict(params, sep="/").items()},
              str(out / "params.safetensors"))
    (out / "config.json").write_text(json.dumps(config.to_dict()))
    return str(out)


def pooled_features(images):
    """A cheap stand-in for Inception: 4 x 4 average-pooled pixels (48 dimensions)."""
    x = np.asarray(images, np.float64)
    n, h, w, c = x.shape
    return x.reshape(n, 4, h // 4, 4, w // 4, c).mean(axis=(2, 4)).reshape(n, -1)


def test_measure_of_reference_images_is_perfect():
    images, captions = shapes_set(16, caption_style="short", seed=9)  # 32 x 32: exact
    stats = fid.statistics(pooled_features(images))
    got = sweep.measure(images, captions, stats, pooled_features)
    assert got["fid"] == pytest.approx(0, abs=1e-9) and got["clip_score"] is None
    assert got["prompt_fidelity"]["all"] == 1.0
    blank = sweep.measure(np.zeros_like(images), captions, stats, pooled_features)
    assert blank["prompt_fidelity"]["all"] == 0.0 and blank["fid"] > 100


def test_held_out_split_is_the_one_sample_evaluate_grades(tiny_model, monkeypatch):

    run, ensemble = load_ensemble(tiny_model)
    monkeypatch.setattr(sweep, "generate",
                        lambda run, ens, prompts, **kw: np.zeros((len(prompts), 16, 16, 3), np.uint8))
    _, _, captions = sweep.evaluate_shapes(run, ensemble, num=6)
    source = sweep.held_out_shapes(run)
    assert [source[i]["caption"] for i in range(6)] == captions
    assert source.config.resolution == 16 and source.config.seed == 1000


def test_sweep_end_to_end_on_a_tiny_model(tiny_model, tiny_clip, tmp_path):
    """The CLI on a tiny random export: per scale, FID against held-out shapes statistics,
    prompt fidelity and the CLIP score, each equal to its recomputation from the samples the
    run keeps; the samples are the plain sampler's at that scale; the plot is a PNG."""
    from ediffi_jax.pipeline.generate import generate
    from ediffi_jax.runs.store import load_ensemble

    png, out_json, ref_npz = tmp_path / "sweep.png", tmp_path / "sweep.json", tmp_path / "ref.npz"
    kept = tmp_path / "samples.npz"
    args = ["--ensemble", tiny_model, "--scales", "0,1,3", "--num", "6", "--batch", "4",
            "--ref-shapes", "12", "--save-ref", str(ref_npz), "--clip", tiny_clip,
            "--out", str(png), "--json", str(out_json), "--samples", str(kept), "--seed", "2"]
    assert sweep.main(args, features=pooled_features) == 0
    data = json.loads(out_json.read_text())
    assert data["num"] == 6 and data["x_metric"] == "clip_score"
    assert data["reference"]["count"] == 12
    assert data["sampling"] == {"sampler": "euler", "num_steps": 2}
    points = data["points"]
    assert [p["guidance_scale"] for p in points] == [0.0, 1.0, 3.0]
    with np.load(kept) as k:
        images, scales, captions = k["images"], list(k["scales"]), [str(c) for c in k["captions"]]
    assert images.shape == (3, 6, 16, 16, 3) and images.dtype == np.uint8 and scales == [0, 1, 3]

    # The reference: the first 12 held-out shapes images; the prompts: the first 6 captions.
    run, ensemble = load_ensemble(tiny_model)
    source = sweep.held_out_shapes(run)
    assert captions == [source[i]["caption"] for i in range(6)]
    ref = fid.load_statistics(str(ref_npz))
    refs = np.stack([source[i]["image"] for i in range(12)])
    np.testing.assert_allclose(ref.sigma, fid.statistics(pooled_features(refs)).sigma)
    scorer = clip_score.CLIPScorer(tiny_clip)
    for p, imgs in zip(points, images):
        assert set(p) == {"guidance_scale", "fid", "prompt_fidelity", "clip_score",
                          "sample_seconds", "seconds"}
        assert 0 < p["sample_seconds"] <= p["seconds"]
        assert p["fid"] > 0 and p["fid"] == pytest.approx(
            fid.fid(fid.statistics(pooled_features(imgs)), ref), rel=1e-12)
        assert p["prompt_fidelity"] == fidelity.prompt_fidelity(imgs, captions)
        rates = p["prompt_fidelity"]
        assert rates["n"] == 6 and rates["size"] is None and rates["region"] is None
        assert rates["all"] <= min(rates["colour"], rates["shape"], rates["count"]) <= 1
        assert 0 <= p["clip_score"] <= 100
        assert p["clip_score"] == pytest.approx(scorer(imgs, captions), abs=1e-4)
    # Scale 3 is the plain sampler at guidance 3 with the same seed (the sweep ran batches of
    # 4, the second padded); guidance changes the images.
    at_3 = generate(run, ensemble, captions[:4], seed=2,
                    sampling=dataclasses.replace(run.stage.sampling, guidance_scale=3.0))
    np.testing.assert_array_equal(images[2, :4], at_3)
    assert not np.array_equal(images[0], images[2])
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (550, 400)
        assert np.asarray(im.convert("L")).std() > 5  # something is drawn


def test_reference_images_and_captions_from_records(tiny_model, tmp_path, capsys):
    from ediffi_jax.data.records import write_records

    images, captions = shapes_set(5, resolution=16)
    grey = images[..., 0]  # [N, H, W] records (as the greyscale datasets store them)
    write_records(tmp_path / "rgb", ({"image": im, "caption": c} for im, c in zip(images, captions)),
                  progress=False)
    write_records(tmp_path / "grey", ({"image": g, "caption": "a photo of a cat"} for g in grey),
                  progress=False)
    np.testing.assert_array_equal(sweep.reference_images(str(tmp_path / "rgb")), images)
    np.testing.assert_array_equal(sweep.reference_images(str(tmp_path / "grey")),
                                  np.repeat(grey[..., None], 3, axis=-1))
    assert sweep.records(str(tmp_path / "rgb"), 3, "caption") == captions[:3]
    with pytest.raises(ValueError, match="holds 5 records, 6 are asked for"):
        sweep.records(str(tmp_path / "rgb"), 6)
    # Captions that are not shapes captions need the CLIP score: an error before any sampling.
    args = ["--ensemble", tiny_model, "--num", "4", "--captions", str(tmp_path / "grey"),
            "--ref-images", str(tmp_path / "rgb"), "--out", str(tmp_path / "s.png")]
    assert sweep.main(args, features=pooled_features) == 2
    assert "give --clip CLIP_DIR" in capsys.readouterr().err


def test_sweep_command_line_errors(tiny_model, tmp_path, capsys):
    base = ["--ensemble", tiny_model, "--out", str(tmp_path / "s.png")]
    cases = [(["--scales", "0,a", "--ref-shapes", "8"], "--scales must be"),
             (["--scales", "1,2,1", "--ref-shapes", "8"], "a scale twice"),
             (["--scales", "-1", "--ref-shapes", "8"], ">= 0"),
             (["--num", "1", "--ref-shapes", "8"], "--num must be at least 2"),
             (["--ref-stats", str(tmp_path / "none.npz")], "no such statistics file"),
             (["--ref-stats", "x.npz", "--save-ref", "y.npz"], "--save-ref writes"),
             (["--ref-shapes", "8", "--json", str(tmp_path / "no" / "s.json")],
              "folder does not exist")]
    for extra, message in cases:
        assert sweep.main(base + extra, features=pooled_features) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "s.png").exists()
