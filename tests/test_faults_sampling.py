"""Bad input and failures on the sampling side (issue 19): each is a clear error before any
sampling, a warning, or (a failure part-way) finished images kept on disk with a message that
says where; plus per-step progress that changes no sampled value."""
import io
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from analytic import GMM, gmm_denoise
from ediffi_jax.config import ConfigError
from ediffi_jax.paint.masks import (PaintError, from_color_map, parse_mask_spec, read_mask,
                                    read_words)
from test_cascade import write_stage
from tiny import tiny_unet_config

SHIPPED = "pretrained/tiny-shapes"  # 32 x 32, short captions of one object


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny base stage (8 x 8) and an SR stage after it (16 x 16), and a cascade of both."""
    root = tmp_path_factory.mktemp("faults")
    write_stage(root, "base16", 0)
    write_stage(root, "sr32", 3)
    (root / "cascade.json").write_text(json.dumps(
        {"stages": [{"ensemble": "base16"}, {"ensemble": "sr32"}]}))
    return root


def sample_main(argv):
    from sample.__main__ import main

    return main([str(a) for a in argv])


def pngs(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".png"))


# ----------------------------------------------------------------------------- file names

def test_file_names_are_safe_for_any_prompt():
    from sample.__main__ import file_stem

    assert file_stem("a red circle") == "a_red_circle"  # the names so far are kept
    assert file_stem("a red/blue circle") == "a_red_blue_circle"
    assert file_stem("../../etc/passwd") == "etc_passwd"
    assert file_stem("..") == file_stem(".") == file_stem("") == file_stem("ßü ") == "prompt"
    assert file_stem("a  red\tcircle, please!") == "a_red_circle_please"
    assert file_stem("x-y " + "z" * 100) == "x-y_" + "z" * 56


# ----------------------------------------------------------------------------- failures part-way

def test_a_failing_batch_keeps_every_finished_image(exports, tmp_path, capsys, caplog,
                                                    monkeypatch):
    """Batch 0 ('a red/circle') finishes both stages; batch 1 ('..') its base stage, then sr32
    fails: both stages' finished PNGs stay, with a grid of them, and the message says so."""
    from ediffi_jax.pipeline.cascade import CascadeSampler

    run_stage = CascadeSampler.run_stage

    def failing(self, k, prompts, *args, first_index=0, **kw):
        if k == 1 and first_index == 1:
            raise RuntimeError("device lost")
        return run_stage(self, k, prompts, *args, first_index=first_index, **kw)

    monkeypatch.setattr(CascadeSampler, "run_stage", failing)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        code = sample_main(["--cascade", exports / "cascade.json", "--prompt", "a red/hexagon",
                            "--prompt", "..", "--num", 1, "--batch", 1, "--out", out])
    assert code == 1
    assert pngs(out / "base16") == ["0000_a_red_hexagon.png", "0001_prompt.png", "grid.png"]
    assert pngs(out / "sr32") == ["0000_a_red_hexagon.png", "grid.png"]
    assert Image.open(out / "base16" / "grid.png").size == (12, 22)  # 2 rows of 8 x 8, 2 px pad
    err = capsys.readouterr().err
    assert "RuntimeError: device lost" in err
    assert (f"kept what was finished: samples 0-1 and grid.png in {out / 'base16'}; samples 0-0 "
            f"and grid.png in {out / 'sr32'}") in err
    # Progress: a line per quarter of the 3 + 3 steps of each of the two batches (stderr is not
    # a terminal here); the unknown word is named.
    progress = [line for line in err.splitlines() if line.startswith("sampling: step")]
    assert [line.split(",")[0] for line in progress] == [
        "sampling: step 3/12", "sampling: step 6/12", "sampling: step 9/12"]
    assert any("a red/hexagon" in r.getMessage() and "never saw in training: hexagon"
               in r.getMessage() for r in caplog.records)

    def broken(self, *args, **kw):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(CascadeSampler, "run_stage", broken)
    assert sample_main(["--ensemble", exports / "base16", "--prompt", "a red circle",
                        "--out", tmp_path / "none"]) == 1
    assert pngs(tmp_path / "none") == []  # nothing finished: no grid either
    assert f"kept what was finished: no samples in {tmp_path / 'none'}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv,message", [
    (["--resolution", 0], "--resolution must be a positive side in pixels, got 0"),
    (["--resolution", -32], "--resolution must be a positive side in pixels, got -32"),
    (["--resolution", 9], "--resolution 9 cannot be halved 1 time(s) by this U-Net: the side "
                          "must be a multiple of 2"),
    (["--resolution", 6, "--highres", "scalecrafter"],
     "--resolution 6 ('base16' makes 8): ScaleCrafter re-dilates for output sides of at least "
     "1.25x the native one, not 0.75x"),
    (["--num", 0], "--num must be >= 1 and --batch >= 0, got --num 0 and --batch 0"),
    (["--batch", -1], "--num must be >= 1 and --batch >= 0, got --num 4 and --batch -1"),
    (["--seed", -1], "--seed must be in [0, 2**32 - 1], got -1"),  # jax: the seed 2**32 - 1
    (["--seed", 2**40], f"--seed must be in [0, 2**32 - 1], got {2**40}"),  # jax: the seed 0
    (["--paint-mask", "circle=m.png", "--paint-scale", "nan"],
     "--paint-scale must be a finite number, got nan"),
    (["--config.highres.sigma_tau=-1"], "highres: highres.sigma_tau must be a noise level "
                                        "sigma >= 0 (0: every step), got -1.0"),
    (["--paint-mask", "circle=m.png:abc"], "--paint-mask 'circle=m.png:abc': the strength 'abc' "
                                           "(after the last ':') is not a number"),
])
def test_bad_sample_arguments_are_errors_before_sampling(exports, tmp_path, capsys, argv,
                                                         message):
    out = tmp_path / "out"
    assert sample_main(["--ensemble", exports / "base16", "--prompt", "a red circle",
                        "--out", out, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1  # no traceback
    assert not out.exists()


def test_scalecrafter_at_a_scale_its_plan_cannot_express(capsys):
    # The shipped 32 x 32 model at 36: a multiple of its 4, but 1.125x is below the preset's
    # least factor, which used to sample directly without a word.
    assert sample_main(["--ensemble", SHIPPED, "--prompt", "a red circle", "--resolution", 36,
                        "--highres", "scalecrafter"]) == 2
    assert capsys.readouterr().err == (
        "error: --resolution 36 ('tiny' makes 32): ScaleCrafter re-dilates for output sides of "
        "at least 1.25x the native one, not 1.125x: sample this size directly "
        "(highres.method='none') or give highres.dilation\n")


def test_malformed_json_files_are_named_with_the_line(exports, tmp_path, capsys):
    from ediffi_jax.pipeline.cascade import read_cascade
    from ediffi_jax.runs.store import expert_workdirs

    bad = tmp_path / "bad.json"
    bad.write_text('{"experts": [\n  "a",\n}')
    at = "is not valid JSON: Expecting value at line 3 column 1"
    with pytest.raises(ConfigError, match=f"the ensemble file {bad} {at}"):
        expert_workdirs(str(bad))
    with pytest.raises(ConfigError, match=f"the cascade file {bad} {at}"):
        read_cascade(str(bad))
    with pytest.raises(ConfigError, match=f"the paint words file {bad} {at}"):
        read_words(str(bad))
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"experts": "base16"}')
    with pytest.raises(ConfigError, match='expected {"experts": \\[workdir, ...\\]}'):
        expert_workdirs(str(wrong))
    # On the command line: exit 2, the message alone.
    assert sample_main(["--ensemble", bad, "--prompt", "x"]) == 2
    assert capsys.readouterr().err == f"error: the ensemble file {bad} {at}\n"
    assert sample_main(["--ensemble", exports / "base16", "--prompt", "a red circle",
                        "--paint", tmp_path / "map.png", "--paint-words", bad]) == 2
    assert f"the paint words file {bad} {at}" in capsys.readouterr().err


def test_paint_mask_specs(tmp_path):
    assert parse_mask_spec("red circle=m.png") == ("red circle", "m.png", 1.0)
    assert parse_mask_spec("red circle = m.png:0.5") == ("red circle", "m.png", 0.5)
    with pytest.raises(PaintError, match="the strength 'abc' .* is not a number .nor is "
                                         "'m.png:abc' a file"):
        parse_mask_spec("circle=m.png:abc")
    with pytest.raises(PaintError, match="the strength must be finite, got 'nan'"):
        parse_mask_spec("circle=m.png:nan")
    # A ':' inside an existing file's name is part of the path.
    odd = tmp_path / "a:b.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(odd)
    assert parse_mask_spec(f"circle={odd}") == ("circle", str(odd), 1.0)
    with pytest.raises(PaintError, match=f"the mask {tmp_path / 'no.png'} does not exist"):
        read_mask(str(tmp_path / "no.png"), 8, 8)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(PaintError, match="is not a readable image"):
        read_mask(str(tmp_path / "text.png"), 8, 8)


def test_masks_of_another_shape_are_refused_or_resized_with_a_warning(tmp_path, caplog):
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((8, 16), 255, np.uint8)).save(wide)
    with pytest.raises(PaintError, match=f"the mask {wide} is 16x8 .width x height., the output "
                                         "16x16: its aspect ratio differs"):
        read_mask(str(wide), 16, 16)
    colours = tmp_path / "colours.png"
    Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(colours)
    with pytest.raises(PaintError, match=f"the colour map {colours} is 16x8"):
        from_color_map(str(colours), {"#000000": "circle"}, 16, 16)
    with caplog.at_level(logging.WARNING, "ediffi_jax.paint.masks"):
        assert read_mask(str(wide), 8, 16).shape == (8, 16)  # its own size: no word
        assert not caplog.records
        mask = read_mask(str(wide), 4, 8)  # the same aspect ratio, smaller
    assert mask.shape == (4, 8) and mask.min() == 1.0
    assert [r.getMessage() for r in caplog.records] == [
        f"the mask {wide} is 16x8, resized to the output's 8x4"]


def test_evaluate_arguments(exports, tmp_path, capsys):
    from sample.evaluate import main

    for num in ("0", "-5"):
        assert main(["--ensemble", str(exports / "base16"), "--num", num]) == 2
        assert capsys.readouterr().err == f"error: --num must be >= 1 (samples to grade), " \
                                          f"got {num}\n"
    assert main(["--ensemble", str(exports / "base16"),
                 "--out", str(tmp_path / "no" / "g.png")]) == 2
    assert "its folder does not exist" in capsys.readouterr().err
    # A run trained on records has no held-out shapes split to grade.
    records = tmp_path / "records"
    records.mkdir()
    os.symlink(exports / "base16" / "params.safetensors", records / "params.safetensors")
    config = json.loads((exports / "base16" / "config.json").read_text())
    config["data"].update(name="records", path="/data/emoji/train")
    (records / "config.json").write_text(json.dumps(config))
    assert main(["--ensemble", str(records), "--num", "4"]) == 2
    assert capsys.readouterr().err == ("error: the run was trained on data.name='records', not "
                                       "the built-in shapes\n")


# ----------------------------------------------------------------------------- words

def test_the_training_vocabulary_of_the_shipped_model():
    from ediffi_jax.runs.data import training_vocabulary
    from ediffi_jax.runs.store import load_ensemble

    run, _ = load_ensemble(SHIPPED)
    assert training_vocabulary(run) == {"a", "red", "green", "blue", "yellow", "magenta", "cyan",
                                        "circle", "square", "triangle"}


def test_vocabulary_follows_the_shapes_config():
    import dataclasses

    from ediffi_jax.data.shapes import ShapesSource
    from ediffi_jax.encoders.toy import caption_words
    from ediffi_jax.runs.data import shapes_config
    from ediffi_jax.runs.data import training_vocabulary
    from ediffi_jax.runs.store import load_ensemble

    run, _ = load_ensemble(SHIPPED)
    for shapes in ({"mixed": True, "max_objects": 2, "min_objects": 2, "colours": ("red", "blue")},
                   {"max_objects": 3}):
        changed = dataclasses.replace(run, data=dataclasses.replace(run.data, shapes=shapes))
        vocabulary = training_vocabulary(changed)
        source = ShapesSource(shapes_config(changed))
        seen = {w for i in range(300) for w in caption_words(source[i]["caption"])}
        assert seen == vocabulary  # every word the data makes, and no other
    records = dataclasses.replace(run, data=dataclasses.replace(run.data, name="records",
                                                                path="x"))
    assert training_vocabulary(records) is None


def test_unknown_and_cut_words_are_warned_about(caplog):
    from ediffi_jax.encoders.conditioner import EncodersConfig, make_conditioner

    model = tiny_unet_config()  # t5_length 3, clip_length 4
    words = make_conditioner(EncodersConfig(), model, vocabulary={"a", "red", "circle", "big"})
    with caplog.at_level(logging.WARNING, "ediffi_jax.encoders.toy"):
        words.check_words(["a red circle", "A Red, circle!"])
        assert not caplog.records  # known words (case and punctuation aside)
        words.check_words(["a purple hexagon", "a purple hexagon", "a red circle"])
        [unknown] = [r.getMessage() for r in caplog.records]
        caplog.clear()
        words.check_words(["a big red circle big", "a red circle"])
        [cut] = [r.getMessage() for r in caplog.records]
    assert unknown == ("prompt 'a purple hexagon': words the model never saw in training: "
                       "purple, hexagon (it knows: a, big, circle, red)")
    assert cut == ("1 of 2 prompts have more words than the context holds (T5 tokens: 3, CLIP "
                   "tokens: 4) and are cut, e.g. 'a big red circle big': 5 words, 2 dropped "
                   "from the T5 tokens and 1 from the CLIP tokens")


# ----------------------------------------------------------------------------- progress

def test_progress_changes_no_sample_and_hears_every_step_once_on_8_devices():
    from jax.sharding import NamedSharding, PartitionSpec

    from ediffi_jax.diffusion.plan import build_plan
    from ediffi_jax.diffusion.sampling import PlanRunner
    from ediffi_jax.diffusion.schedules import karras_sigmas

    # Three segments (churn only for 0.5 <= sigma <= 10), the batch over all 8 devices.
    plan = build_plan(karras_sigmas(7), sampler="heun", s_churn=5.0, s_tmin=0.5, s_tmax=10.0)
    assert len(plan.segments) == 3
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    params = {k: jnp.asarray(v) for k, v in GMM.items()}
    heard = []
    quiet = PlanRunner(gmm_denoise)
    loud = PlanRunner(gmm_denoise, lambda i, n: heard.append((i, n)))
    runs = [np.asarray(runner.sample(plan, [params], (3,), seed=1, example_indices=np.arange(16),
                                     batch_sharding=NamedSharding(mesh, PartitionSpec("data"))))
            for runner in (quiet, loud, loud)]
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], runs[2])
    assert sorted(heard) == sorted([(i, 7) for i in range(7)] * 2)  # each run: every step once


def test_step_progress_lines():
    from ediffi_jax.pipeline.generate import StepProgress

    log = io.StringIO()  # not a terminal: a line per quarter
    progress = StepProgress(10, stream=log)
    for i in range(10):
        progress(i, 10)
    lines = log.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "sampling: step 3/10", "sampling: step 5/10", "sampling: step 8/10", "sampling: step 10/10"]
    assert all("steps/s, ETA" in line for line in lines)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()  # one line rewritten in place, ended once done
    progress = StepProgress(3, stream=term)
    for i in range(3):
        progress(i, 3)
    text = term.getvalue()
    assert text.startswith("\rsampling: step 1/3") and text.endswith("\n")
    assert text.count("\n") == 1 and "step 3/3" in text
