"""The built-in shapes dataset: deterministic examples, truthful captions, an exact checker."""
import re

import numpy as np
import pytest
from scipy import ndimage

from ediffi_jax.data import shapes as S
from ediffi_jax.data.shapes import (
    COLOUR_NAMES,
    COLOURS,
    REGIONS,
    SHAPES,
    SIZES,
    ShapesConfig,
    ShapesSource,
    caption_accuracy,
    check_image,
    count_objects,
    make_caption,
    object_centroids,
    parse_caption,
    render,
    truth_names,
)


def _degrade(image, rng, noise_std=8.0, blur_sigma=0.5):
    """Roughly what a decent diffusion sample does to a clean image: soft edges, grain."""
    x = ndimage.gaussian_filter(image.astype(np.float32), (blur_sigma, blur_sigma, 0))
    x = x + rng.normal(0.0, noise_std, x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ determinism


def test_examples_are_a_pure_function_of_seed_and_index():
    src = ShapesSource(max_objects=3, seed=7)
    first = src[5]
    for i in (9, 0, 123456, 4, 6):
        src[i]
    again = ShapesSource(ShapesConfig(max_objects=3, seed=7))[np.int64(5)]
    for ex in (src[5], again):
        np.testing.assert_array_equal(ex["image"], first["image"])
        assert ex["caption"] == first["caption"]
        for k, v in first["objects"].items():
            np.testing.assert_array_equal(ex["objects"][k], v)
    assert first["image"].dtype == np.uint8 and first["image"].shape == (32, 32, 3)

    exs = [src[i] for i in range(40)]
    images = {ex["image"].tobytes() for ex in exs}
    assert len(images) == 40  # every index draws a different image
    assert len({ex["caption"] for ex in exs}) > 25
    other_seed = ShapesSource(max_objects=3, seed=8)
    assert sum(np.array_equal(other_seed[i]["image"], exs[i]["image"]) for i in range(40)) == 0

    np.testing.assert_array_equal(src[-1]["image"], src[len(src) - 1]["image"])
    assert len(ShapesSource(num_examples=10)) == 10
    with pytest.raises(IndexError):
        ShapesSource(num_examples=10)[10]


def test_works_as_a_grain_source_and_serialises():
    grain = pytest.importorskip("grain")
    from flax import serialization

    src = ShapesSource(max_objects=2)
    batch = grain.MapDataset.source(src).batch(4)[1]
    assert batch["image"].shape == (4, 32, 32, 3) and batch["objects"]["x"].shape == (4, 2)
    assert list(batch["caption"]) == [src[i]["caption"] for i in range(4, 8)]
    assert caption_accuracy(batch["image"], batch["objects"])["all"] == 1.0

    ex = src[3]
    back = serialization.msgpack_restore(serialization.msgpack_serialize(ex))
    np.testing.assert_array_equal(back["image"], ex["image"])
    assert back["caption"] == ex["caption"] and back["objects"]["count"] == ex["objects"]["count"]
    np.testing.assert_array_equal(back["objects"]["x"], ex["objects"]["x"])


# ------------------------------------------------------------------------------ captions


def test_caption_grammar():
    assert make_caption("red", "circle", "small", ["top left"]) == (
        "a small red circle at the top left"
    )
    assert make_caption("blue", "square", "large", ["centre", "left"]) == (
        "two large blue squares on the left and in the centre"
    )
    assert make_caption("cyan", "triangle", "small", ["bottom left", "top", "right"]) == (
        "three small cyan triangles at the top, on the right and at the bottom left"
    )
    assert make_caption("red", "circle", "small", ["top"], style="short") == "a red circle"
    assert make_caption("red", "circle", "small", ["top", "left"], "short") == "two red circles"
    assert parse_caption("two large blue squares on the left and in the centre") == {
        "count": 2, "colour": "blue", "shape": "square", "size": "large",
        "regions": ["left", "centre"],
    }
    assert parse_caption("a red circle") == {
        "count": 1, "colour": "red", "shape": "circle", "size": None, "regions": []}
    for bad in ("a red circles", "two red circle", "a purple circle", "a small red circle at home",
                "two small red circles at the top"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_captions_agree_with_ground_truth_and_pixels():
    src = ShapesSource(max_objects=4, seed=3)
    seen = {"colour": set(), "shape": set(), "size": set(), "count": set(), "region": set()}
    for i in range(300):
        ex = src[i]
        obj = ex["objects"]
        truth = truth_names(obj)
        assert parse_caption(ex["caption"]) == truth, ex["caption"]
        n = obj["count"]
        assert (obj["region"][n:] == -1).all() and np.isnan(obj["x"][n:]).all()
        # The ground truth matches the drawing: each object's centroid is in its cell, and the
        # pixel under the centroid of a circle or square has exactly the object's colour.
        for k in range(n):
            x, y = float(obj["x"][k]), float(obj["y"][k])
            assert S.region_of(x, y, 32) == REGIONS[obj["region"][k]]
            if truth["shape"] != "triangle":
                assert tuple(ex["image"][int(y), int(x)]) == COLOURS[truth["colour"]]
        lit = (ex["image"] != 0).any(-1).sum()
        assert 0 < lit < 0.6 * 32 * 32
        seen["colour"].add(truth["colour"])
        seen["shape"].add(truth["shape"])
        seen["size"].add(truth["size"])
        seen["count"].add(n)
        seen["region"].update(truth["regions"])
    assert seen == {"colour": set(COLOUR_NAMES), "shape": set(SHAPES), "size": set(SIZES),
                    "count": {1, 2, 3, 4}, "region": set(REGIONS)}

    short = ShapesSource(
        caption_style="short", colours=("green",), shapes=("square",), sizes=("small",)
    )
    for i in range(20):
        ex = short[i]
        assert ex["caption"] == "a green square"
        assert truth_names(ex["objects"])["size"] == "small"


def test_mixed_scenes_give_each_object_its_own_colour_and_words():
    src = ShapesSource(max_objects=3, mixed=True, seed=2)
    first_named_is_first_cell, counts, shapes_seen = [], set(), set()
    for i in range(150):
        ex = src[i]
        obj = ex["objects"]
        n = obj["count"]
        counts.add(n)
        truth = sorted((COLOUR_NAMES[obj["colour"][k]], SHAPES[obj["shape"][k]],
                        SIZES[obj["size"][k]], REGIONS[obj["region"][k]]) for k in range(n))
        assert len({t[0] for t in truth}) == n  # every object has its own colour
        shapes_seen.update(t[1] for t in truth)
        # One "a <size> <colour> <shape> <where>" phrase per object, joined by "and".
        said = [parse_caption(p) for p in ex["caption"].split(" and ")]
        assert sorted((p["colour"], p["shape"], p["size"], p["regions"][0]) for p in said) == truth
        for k in range(n):  # and each object is drawn where the ground truth says
            (x, y), = object_centroids(ex["image"], COLOUR_NAMES[obj["colour"][k]])
            assert abs(x - obj["x"][k]) < 0.25 and abs(y - obj["y"][k]) < 0.25
        if n > 1:
            first_named_is_first_cell.append(said[0]["regions"][0] == REGIONS[obj["region"][0]])
            with pytest.raises(ValueError, match="mixed scene"):
                truth_names(obj)
    assert counts == {1, 2, 3} and shapes_seen == set(SHAPES)
    # The order of mention is random, so the words say nothing about where an object is.
    assert 0.3 < np.mean(first_named_is_first_cell) < 0.7
    assert ShapesSource(max_objects=1, mixed=True, caption_style="short",
                        colours=("red",), shapes=("circle",))[0]["caption"] == "a red circle"
    with pytest.raises(ValueError, match="max_objects .3. must be at most the 2 colours"):
        ShapesConfig(max_objects=3, mixed=True, colours=("red", "blue"))


def test_min_objects_sets_the_fewest_objects():
    counts = [ShapesSource(max_objects=3, min_objects=2, mixed=True, seed=2)[i]["objects"]["count"]
              for i in range(60)]
    assert set(counts) == {2, 3}
    uniform = ShapesSource(max_objects=2, min_objects=2, seed=4)
    assert all(uniform[i]["objects"]["count"] == 2 and uniform[i]["caption"].startswith("two ")
               for i in range(20))
    with pytest.raises(ValueError, match=r"min_objects must be in \[1, 2\], got 3"):
        ShapesConfig(max_objects=2, min_objects=3)


# ------------------------------------------------------------------------------ the checker


def test_checker_is_exact_on_clean_images():
    src = ShapesSource(max_objects=3, seed=11)
    exs = [src[i] for i in range(500)]
    rates = caption_accuracy([ex["image"] for ex in exs], [ex["objects"] for ex in exs])
    assert rates == {"n": 500, "colour": 1.0, "shape": 1.0, "colour_shape": 1.0, "count": 1.0,
                     "size": 1.0, "region": 1.0, "all": 1.0}
    # Captions are ground truth too.
    assert caption_accuracy([ex["image"] for ex in exs[:100]],
                            [parse_caption(ex["caption"]) for ex in exs[:100]])["all"] == 1.0
    worst = 0.0
    for ex in exs[:200]:
        obj = ex["objects"]
        n = obj["count"]
        assert count_objects(ex["image"]) == n
        found = np.array(object_centroids(ex["image"], COLOUR_NAMES[obj["colour"][0]]))
        truth = np.stack([obj["x"][:n], obj["y"][:n]], -1)
        d = np.linalg.norm(found[:, None] - truth[None], axis=-1)
        assert (d.min(0) < 0.5).all() and (d.min(1) < 0.5).all()
        worst = max(worst, float(d.min(1).max()))
    assert worst < 0.25  # the soft centroid is sub-pixel exact


def test_checker_is_exact_at_64():
    src = ShapesSource(resolution=64, max_objects=2, seed=2)
    exs = [src[i] for i in range(60)]
    assert exs[0]["image"].shape == (64, 64, 3)
    assert caption_accuracy([e["image"] for e in exs], [e["objects"] for e in exs])["all"] == 1.0


def test_checker_survives_blur_and_noise():
    rng = np.random.default_rng(0)
    src = ShapesSource(max_objects=3, seed=5)
    exs = [src[i] for i in range(300)]
    noisy = [_degrade(ex["image"], rng) for ex in exs]
    assert np.abs(noisy[0].astype(int) - exs[0]["image"]).mean() > 3  # really degraded
    rates = caption_accuracy(noisy, [ex["objects"] for ex in exs])
    assert rates["colour"] >= 0.95 and rates["shape"] >= 0.95, rates
    assert rates["count"] >= 0.95 and rates["region"] >= 0.95, rates


def test_checker_rejects_wrong_answers():
    res = 32
    red_square = render("red", "square", "large", [(16.0, 16.0)], res)
    r = check_image(red_square, "red", "square", 1)
    assert r["ok"] and r["colour"] == "red" and r["shape"] == "square" and r["count"] == 1
    assert r["size"] == "large" and r["region"] == "centre"
    assert np.allclose(r["centroids"][0], (16.0, 16.0), atol=0.05)

    r = check_image(red_square, "blue", "circle")
    assert not r["colour_ok"] and not r["shape_ok"] and not r["ok"] and r["count_ok"] is None
    assert not check_image(red_square, "red", "square", 2)["count_ok"]

    for shape in SHAPES:
        img = render("magenta", shape, "small", [(8.3, 24.6), (25.1, 9.2)], res)
        r = check_image(img, "magenta", shape, 2)
        assert r["ok"] and r["shapes"] == [shape, shape], (shape, r)
        assert sorted(r["regions"]) == ["bottom left", "top right"]
        for other in set(SHAPES) - {shape}:
            assert not check_image(img, "magenta", other)["shape_ok"]

    empty = np.zeros((res, res, 3), np.uint8)
    r = check_image(empty, "red", "square", 1)
    assert r["count"] == 0 and r["colour"] is None and r["shape"] is None
    assert not r["colour_ok"] and not r["shape_ok"] and not r["count_ok"]
    assert check_image(empty, "red", "square", 0)["count_ok"]
    assert count_objects(empty) == 0 and object_centroids(empty, "red") == []
    grey = np.full((res, res, 3), 200, np.uint8)  # bright but not a palette colour
    assert count_objects(grey) == 0

    # count_objects counts every colour; the dominant colour is the one with most pixels.
    both = np.maximum(red_square, render("cyan", "circle", "small", [(5.0, 5.0)], res))
    assert count_objects(both) == 2
    assert check_image(both, "red", "square", 1)["ok"]
    assert object_centroids(both, "cyan")[0] == pytest.approx((5.0, 5.0), abs=0.1)

    with pytest.raises(ValueError, match="allowed"):
        check_image(red_square, "purple", "square")
    with pytest.raises(ValueError, match="hexagon"):
        check_image(red_square, "red", "hexagon")


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"colours": ("red", "purple")}, r"colours.*'purple'.*'red', 'green', 'blue'"),
        ({"colours": "red"}, r"colours.*tuple"),
        ({"colours": ()}, r"colours.*empty"),
        ({"shapes": ("hexagon",)}, r"shapes.*'hexagon'.*'circle', 'square', 'triangle'"),
        ({"sizes": ("medium",)}, r"sizes.*'medium'.*'small', 'large'"),
        ({"caption_style": "long"}, r"caption_style.*'long'.*'full', 'short'"),
        ({"max_objects": 5}, r"max_objects.*\[1, 4\]"),
        ({"max_objects": 0}, r"max_objects"),
        ({"resolution": 8}, r"resolution.*>= 16"),
        ({"resolution": 32.0}, r"resolution.*int"),
        ({"seed": -1}, r"seed"),
        ({"num_examples": 0}, r"num_examples"),
        ({"colours": ("red", "red")}, r"colours.*duplicates"),
    ],
)
def test_config_errors_name_the_field(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ShapesConfig(**kwargs)


def test_config_subsets_are_respected():
    cfg = ShapesConfig(colours=["blue", "yellow"], shapes=("triangle",), sizes=("large",))
    assert cfg.colours == ("blue", "yellow")  # lists become tuples: the config stays hashable
    hash(cfg)
    src = ShapesSource(cfg)
    for i in range(30):
        t = truth_names(src[i]["objects"])
        assert t["colour"] in ("blue", "yellow")
        assert t["shape"] == "triangle" and t["size"] == "large"
        caption = src[i]["caption"]
        assert re.fullmatch(r"a large (blue|yellow) triangle (at|on|in) the [a-z ]+", caption)
