"""State-dict names and shapes of the published U-Nets / VAEs, from their config.json files
(configs/pretrained/<name>/<component>/config.json), built by diffusers on the meta device (no
memory, no weights): what the Flax loader must map one to one.

    .venv-tools/bin/python tools/diffusers_shapes.py   # writes tests/fixtures/diffusers/shapes/
"""
from __future__ import annotations

import glob
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402

CLASSES = {"UNet2DConditionModel": UNet2DConditionModel, "AutoencoderKL": AutoencoderKL}


def main():
    out = "tests/fixtures/diffusers/shapes"
    os.makedirs(out, exist_ok=True)
    for path in sorted(glob.glob("configs/pretrained/*/*/config.json")):
        name, component = path.split(os.sep)[-3:-1]
        with open(path) as f:
            config = json.load(f)
        cls = CLASSES.get(config.get("_class_name"))
        if cls is None:
            continue
        with torch.device("meta"):
            model = cls.from_config(config)
        tensors = {k: list(v.shape) for k, v in model.state_dict().items()}
        count = sum(p.numel() for p in model.parameters())
        with open(os.path.join(out, f"{name}_{component}.json"), "w") as f:
            json.dump({"params": count, "tensors": tensors}, f, separators=(",", ":"))
        print(f"{name}/{component}: {count / 1e6:.2f} M params, {len(tensors)} tensors")


if __name__ == "__main__":
    main()
