"""Bad input is rejected with a clear message naming the field, before any compile."""
import math
import re

import pytest

from ediffi_jax import info
from ediffi_jax.config import ConfigError, load_config
from ediffi_jax.models.unet import UNetConfig, count_params, init_params
from ediffi_jax.runs.spec import parse_config


def test_shipped_configs_parse():
    tiny = parse_config(load_config("configs/tiny.py"))
    assert tiny.model.resolution == 32 and len(tiny.experts) == 3
    for layout, n in [("A", 1), ("B", 1), ("C", 2), ("D", 3)]:
        spec = parse_config(load_config(f"configs/base64.py:{layout}"))
        assert len(spec.experts) == n
        assert spec.model.channels == 256 and spec.model.channel_mult == (1, 2, 4, 4)
        assert spec.model.num_res_blocks == 3 and spec.model.attention_resolutions == (32, 16, 8)
    # The SR stages: Efficient-U-Net-like block counts, attention at 32 only, SR1024 patch-trained
    # without self-attention; Config-B's SR256 has two equal-mass experts.
    from ediffi_jax.models.unet import attention_block_names, conv3x3_levels
    from ediffi_jax.runs.spec import image_resolution, parse_run, run_schema

    sr256 = parse_run(load_config("configs/sr.py:256", schema=run_schema()))
    assert [sr256.stage.model.blocks(lvl) for lvl in range(4)] == [2, 4, 8, 8]
    assert sr256.stage.model.attention_levels == {3} and sr256.stage.model.lowres_scale == 4
    assert sum(k.startswith("down3_res") and k.endswith("conv1") for k in conv3x3_levels(sr256.stage.model)) == 8
    sr1024 = parse_run(load_config("configs/sr.py:1024", schema=run_schema()))
    assert image_resolution(sr1024) == 1024 and sr1024.stage.model.resolution == 256
    assert not sr1024.stage.model.self_attention and len(attention_block_names(sr1024.stage.model)) == 8 + 1 + 9
    assert [str(e.q_hi) for e in parse_config(load_config("configs/sr.py:256-B")).experts] == ["1/2", "1"]


def test_unknown_override_key_suggests_close_match():
    with pytest.raises(ConfigError, match=r"model\.chanels.*did you mean 'channels'"):
        load_config("configs/tiny.py", ["--config.model.chanels=64"])
    with pytest.raises(ConfigError, match=r"did you mean 'sampling'"):
        load_config("configs/tiny.py", ["--config.samplng.num_steps=3"])


def test_override_applies_and_checks_types():
    cfg = load_config("configs/tiny.py", ["--config.model.channels=48", "--config.sampling.guidance_scale=2"])
    spec = parse_config(cfg)
    assert spec.model.channels == 48 and spec.sampling.guidance_scale == 2.0
    with pytest.raises(ConfigError, match="expected int"):
        load_config("configs/tiny.py", ["--config.model.channels=wide"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("configs/tiny.py", ["--config.model.channels"])


def test_unknown_key_in_a_config_file_section(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "    return ml_collections.ConfigDict(dict(model=dict(resolution=32, num_res_block=2)))\n"
    )
    with pytest.raises(ConfigError, match=r"model\.num_res_block.*did you mean 'num_res_blocks'"):
        parse_config(load_config(str(path)))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.py")


def test_resolution_that_cannot_be_halved():
    with pytest.raises(ValueError, match=r"resolution 36 cannot be halved 3 times.*multiple of 8"):
        UNetConfig(resolution=36, channel_mult=(1, 2, 2, 2), attention_resolutions=())
    with pytest.raises(ConfigError, match=r"model: resolution 30 cannot be halved 2 times"):
        parse_config(load_config("configs/tiny.py", ["--config.model.resolution=30"]))


def test_attention_resolution_that_does_not_occur():
    with pytest.raises(ValueError, match=r"attention_resolutions \[12\] do not occur.*\[32, 16, 8\]"):
        UNetConfig(resolution=32, channel_mult=(1, 2, 2), attention_resolutions=(8, 12))


def test_expert_layout_errors():
    with pytest.raises(ConfigError, match="unknown expert layout 'E'"):
        parse_config(load_config("configs/tiny.py", ["--config.experts=E"]))
    with pytest.raises(ConfigError, match=r"gap .* quantiles \(1/4, 1/2\]"):
        parse_config(_with_experts([("0", "1/4"), ("1/2", "1")]))
    assert len(parse_config(_with_experts([("0", "1/2"), ("1/2", "1")])).experts) == 2


def _with_experts(layout):
    import ml_collections

    return ml_collections.ConfigDict({**load_config("configs/tiny.py").to_dict(), "experts": layout})


def test_bad_sampler_and_mesh_values():
    with pytest.raises(ConfigError, match=r"sampler must be one of \('euler', 'heun', 'dpmpp_2m'\)"):
        parse_config(load_config("configs/tiny.py", ["--config.sampling.sampler=ddim"]))


def test_info_command_reports_params_and_flops(capsys):
    assert info.main(["--config", "configs/tiny.py", "--config.model.channels=16"]) == 0
    out = capsys.readouterr().out
    spec = parse_config(load_config("configs/tiny.py", ["--config.model.channels=16"]))
    import jax

    n = count_params(jax.eval_shape(lambda: init_params(spec.model, jax.random.key(0))))
    assert f"params per expert {n:,}" in out
    flops = float(re.search(r"forward FLOPs\s+([0-9.e+]+)", out).group(1))
    assert math.isfinite(flops) and flops > 2 * n  # at least one multiply-add per weight


def test_every_section_field_can_be_overridden_even_if_the_file_omits_it():
    from ediffi_jax.runs.spec import parse_run, run_schema

    from configs.tiny import get_config

    assert "drop_t5" not in get_config().train  # the file leaves it at its default
    with pytest.raises(ConfigError, match="drop_t5"):  # without the schema: only the file's keys
        load_config("configs/tiny.py", ["--config.train.drop_t5=0.5"])
    cfg = load_config("configs/tiny.py", ["--config.train.drop_t5=0.5",
                                          "--config.train.weight_decay=0.1"], run_schema())
    run = parse_run(cfg)
    assert run.train.drop_t5 == 0.5 and run.train.weight_decay == 0.1
    assert run.train.steps == get_config().train.steps  # the file's own values are kept
    with pytest.raises(ConfigError, match="did you mean 'drop_t5'"):
        load_config("configs/tiny.py", ["--config.train.drop_t6=0.5"], run_schema())
    base = load_config("configs/base64.py:D", ["--config.train.batch_size=2048"], run_schema())
    assert parse_run(base).train.batch_size == 2048  # a model-only config gains train defaults
