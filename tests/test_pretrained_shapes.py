"""The published checkpoints at their real size, without their weights: from each shipped
config.json (configs/pretrained/), the Flax abstract params map every state-dict tensor that
diffusers builds for it (tools/diffusers_shapes.py, on the meta device) exactly once, with the
same shape, and the parameter counts are the published ones."""
import glob
import json
import os

import jax
import numpy as np
import pytest

from ediffi_jax.encoders import hf
from ediffi_jax.models import diffusers_unet, vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(ROOT, "tests", "fixtures", "diffusers", "shapes")
PUBLISHED = {"sd15_unet": 859.52e6, "sd15_vae": 83.65e6, "sd21_unet": 865.91e6,
             "sdxl_base_unet": 2567.46e6, "sdxl_base_vae": 83.65e6, "sd21_vae": 83.65e6}
MODULES = {"unet": diffusers_unet.DiffusersUNetConfig, "vae": vae.VAEConfig}
ABSTRACT = {"unet": diffusers_unet.abstract_params, "vae": vae.abstract_params}


def listings():
    return sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(SHAPES, "*.json")))


def test_every_published_count_has_a_listing():
    assert set(PUBLISHED) <= set(listings())


@pytest.mark.parametrize("listing", listings())
def test_loader_maps_every_tensor_once(listing):
    name, component = listing.rsplit("_", 1)
    with open(os.path.join(SHAPES, f"{listing}.json")) as f:
        want = json.load(f)
    with open(os.path.join(ROOT, "configs", "pretrained", name, component, "config.json")) as f:
        config = MODULES[component].from_hf(json.load(f))
    abstract = ABSTRACT[component](config)
    names = hf.diffusers_names(abstract)
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    got = {}
    for path, leaf in flat:
        key = tuple(k.key for k in path)
        hf_name, kind = names[key]
        assert hf_name not in got, f"{hf_name} read twice"
        got[hf_name] = list(hf._TO_HF[kind](np.empty(leaf.shape, np.int8)).shape)
    assert sorted(set(want["tensors"]) - set(got)) == []  # nothing missing
    assert sorted(set(got) - set(want["tensors"])) == []  # nothing extra
    wrong = {k: (got[k], v) for k, v in want["tensors"].items() if got[k] != v}
    assert not wrong
    count = sum(int(np.prod(leaf.shape)) for _, leaf in flat)
    assert count == want["params"]
    if listing in PUBLISHED:
        assert round(count / 1e6, 2) == round(PUBLISHED[listing] / 1e6, 2)
