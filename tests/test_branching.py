"""Binary-tree branching, ensemble assembly and the sampling CLI, end to end on a micro model."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from ediffi_jax.config import load_config
from sample.__main__ import main as sample_main
from ediffi_jax.runs.store import load_ensemble, run_config
from train.branch import main as branch_main
from ediffi_jax.runs.store import write_ensemble
from ediffi_jax.runs.store import load_params
from ediffi_jax.training.trainer import train

MICRO = [
    "--config.model.resolution=16", "--config.model.channels=8", "--config.model.channel_mult=(1,2)",
    "--config.model.attention_resolutions=(8,)", "--config.model.attention_head_dim=4",
    "--config.model.context_dim=8", "--config.model.t5_dim=8", "--config.model.t5_length=8",
    "--config.model.clip_dim=8", "--config.model.clip_length=8", "--config.model.clip_pooled_dim=8",
    "--config.model.clip_image_dim=8", "--config.train.batch_size=8", "--config.train.steps=2",
    "--config.train.log_every=1", "--config.train.checkpoint_every=2",
    "--config.sampling.num_steps=3", "--config.train.warmup_steps=0",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    train(load_config("configs/tiny.py", MICRO), str(root / "shared"), log=lambda *_: None)
    assert branch_main(["--parent", str(root / "shared"), "--node", "1/1",
                        "--workdir", str(root / "E1_1"), "--config.train.steps=1"]) == 0
    return root


def test_children_start_from_the_parent_and_own_their_interval(runs):
    cfg = run_config(str(runs / "E1_1"))
    assert tuple(cfg.train.sigma_quantiles) == ("1/2", "1")
    assert cfg.train.init_from == str(runs / "shared")
    parent, _, _ = load_params(str(runs / "shared"))
    child, _, step = load_params(str(runs / "E1_1"))
    assert step == 1
    # One small AdamW step away from the parent: close, not equal.
    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(_leaves(parent), _leaves(child))]
    assert 0 < max(diffs) < 0.05


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_branch_outside_the_parent_interval_is_an_error(runs, capsys):
    assert branch_main(["--parent", str(runs / "E1_1"), "--node", "2/0",
                        "--workdir", str(runs / "bad")]) == 2
    assert "outside the parent's" in capsys.readouterr().err
    assert not os.path.exists(runs / "bad")
    assert branch_main(["--parent", str(runs / "shared"), "--workdir", str(runs / "bad")]) == 2
    assert "exactly one of --node" in capsys.readouterr().err


def test_child_interval_of_tree_nodes_and_complements():
    from fractions import Fraction

    from train.branch import child_interval

    assert (child_interval("9/511", None).q_lo, child_interval("9/511", None).q_hi) == (Fraction(511, 512), 1)
    mc = child_interval(None, ["3/0", "9/511"])
    assert (mc.q_lo, mc.q_hi) == (Fraction(1, 8), Fraction(511, 512))


def test_ensemble_assembly_and_sampling_cli(runs, tmp_path):
    out = runs / "ensemble.json"
    with pytest.raises(ValueError, match="gap"):  # E^1_1 alone leaves (0, 1/2] unowned
        write_ensemble(str(out), [str(runs / "E1_1")])
    assert not os.path.exists(out)
    write_ensemble(str(out), [str(runs / "shared")])
    run, ensemble = load_ensemble(str(out))
    assert len(ensemble) == 1 and json.loads(out.read_text())["experts"] == ["shared"]

    samples = tmp_path / "samples"
    assert sample_main(["--ensemble", str(out), "--prompt", "a red circle", "--prompt", "a blue square",
                        "--num", "2", "--out", str(samples), "--config.sampling.num_steps=2"]) == 0
    grid = np.asarray(Image.open(samples / "grid.png"))
    assert grid.shape == (2 * 18 + 2, 2 * 18 + 2, 3)
    assert len([p for p in os.listdir(samples) if p.endswith(".png")]) == 5


def test_export_round_trip_and_branch_from_it(runs):
    from train.export import main as export_main

    out = runs / "exported"
    assert export_main(["--workdir", str(runs / "shared"), "--out", str(out), "--dtype", "float16"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "params.safetensors"]
    _, ema, step = load_params(str(runs / "shared"))
    params, ema2, step2 = load_params(str(out))
    assert step2 == step == 2
    for a, b, c in zip(_leaves(ema), _leaves(params), _leaves(ema2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-5)  # float16
        np.testing.assert_array_equal(np.asarray(b), np.asarray(c))
    assert run_config(str(out)).model == run_config(str(runs / "shared")).model
    # A child grows from the export as from a workdir; the export samples as an ensemble of one.
    assert branch_main(["--parent", str(out), "--node", "1/0", "--workdir", str(runs / "E1_0x"),
                        "--config.train.steps=1"]) == 0
    assert tuple(run_config(str(runs / "E1_0x")).train.sigma_quantiles) == ("0", "1/2")
    _, ensemble = load_ensemble(str(out))
    assert len(ensemble) == 1


def test_damaged_or_mismatched_export_is_a_clear_error(runs, tmp_path, monkeypatch):
    import shutil

    import safetensors.numpy

    from safetensors.numpy import load_file, save_file

    from ediffi_jax.runs.store import write_export

    out = tmp_path / "exp"
    write_export(str(runs / "shared"), str(out))
    flat = load_file(out / "params.safetensors")
    name = sorted(flat)[0]
    flat[name] = np.zeros((3, 3), np.float32)
    save_file(flat, out / "params.safetensors")
    with pytest.raises(ValueError, match=f"{name} has shape"):
        load_params(str(out))
    (out / "params.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="unreadable"):
        load_params(str(out))
    # A failed export leaves the previous one in place.
    shutil.rmtree(out)
    write_export(str(runs / "shared"), str(out))
    before = (out / "params.safetensors").read_bytes()
    with pytest.raises(ValueError, match="dtype must be one of"):
        write_export(str(runs / "shared"), str(out), dtype="int8")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    with pytest.raises(OSError):
        write_export(str(runs / "shared"), str(out))
    assert (out / "params.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["exp"]  # no temporary directory left behind


def test_sampling_cli_paints_words_and_samples_past_the_training_size(runs, tmp_path, capsys):
    mask = np.zeros((16, 16), np.uint8)
    mask[:, :8] = 255
    Image.fromarray(mask).save(tmp_path / "left.png")
    out = tmp_path / "painted"
    common = ["--ensemble", str(runs / "shared"), "--prompt", "a red circle", "--num", "1",
              "--config.sampling.num_steps=2"]
    assert sample_main(common + ["--out", str(out), "--paint-mask",
                                 f"red circle={tmp_path / 'left.png'}:0.5"]) == 0
    assert "paint-with-words (std)" in capsys.readouterr().out
    overlay = np.asarray(Image.open(out / "0000_a_red_circle_masks.png"))
    assert overlay.shape == (16, 2 * 16 + 2, 3)
    # A phrase that is not in the prompt fails before sampling, showing the prompt's tokens.
    assert sample_main(common + ["--out", str(tmp_path / "bad"), "--paint-mask",
                                 f"blue square={tmp_path / 'left.png'}"]) == 2
    err = capsys.readouterr().err
    assert "'blue square' is not in the prompt" in err and "'red', 'circle'" in err
    assert not os.path.exists(tmp_path / "bad")
    # Twice the training side with ScaleCrafter's preset: the plan re-dilates, the images are 32.
    big = tmp_path / "big"
    assert sample_main(common + ["--out", str(big), "--resolution", "32", "--highres",
                                 "scalecrafter"]) == 0
    assert "layers [d2 x" in capsys.readouterr().out
    assert np.asarray(Image.open(big / "0000_a_red_circle.png")).shape == (32, 32, 3)
    assert sample_main(common + ["--out", str(tmp_path / "odd"), "--resolution", "31"]) == 2
    assert "cannot be halved" in capsys.readouterr().err
