"""The diffusers side of tests/test_diffusers_export.py: a U-Net folder exported by the project
(ediffi_jax/runs/diffusers_export.py) read by diffusers' own UNet2DConditionModel.from_pretrained
and run on fixed inputs. The tools venv has no jax, so the project venv writes the export first:

    .venv/bin/python -m tests.test_diffusers_export --out /tmp/ediffi-export-unet
    .venv-tools/bin/python tools/diffusers_export_fixture.py /tmp/ediffi-export-unet \
        --out tests/fixtures/diffusers/export

Checks that diffusers loads every tensor of the file into its model, with none missing,
unexpected or misshapen, and bit for bit; then writes to --out: config.json (the export's,
verbatim), tensors.json (each tensor's shape, dtype and sha256: the test re-exports and
compares, so the committed output refers to these weights without committing them) and
io.npz (inputs NCHW as diffusers takes them, and the output). Deterministic and offline.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"
BATCH, TOKENS, SIZE = 2, 5, (8, 12)  # latents 8 x 12: non-square, a multiple of 2 levels


def load_checked(directory: str) -> UNet2DConditionModel:
    """The folder's U-Net in float32, every file tensor loaded into it unchanged."""
    model, info = UNet2DConditionModel.from_pretrained(directory, output_loading_info=True,
                                                       torch_dtype=torch.float32)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"diffusers did not load {directory} cleanly: {problems}")
    state = model.state_dict()
    tensors = load_file(os.path.join(directory, WEIGHTS))
    if sorted(state) != sorted(tensors):
        raise SystemExit(f"state dict and file differ: only in the model "
                         f"{sorted(set(state) - set(tensors))[:5]}, only in the file "
                         f"{sorted(set(tensors) - set(state))[:5]}")
    for name, value in tensors.items():
        if not np.array_equal(state[name].numpy(), value.astype(np.float32)):
            raise SystemExit(f"{name}: diffusers holds other values than the file")
    return model.eval()


def inputs(config: dict, g: torch.Generator) -> dict:
    sample = torch.randn((BATCH, config["in_channels"], *SIZE), generator=g)
    timestep = torch.tensor([37.5, 801.0])
    context = torch.randn((BATCH, TOKENS, config["cross_attention_dim"]), generator=g)
    mask = torch.ones((BATCH, TOKENS))
    mask[1, -2:] = 0  # padding keys the U-Net must not attend to
    return dict(sample=sample, timestep=timestep, encoder_hidden_states=context,
                encoder_attention_mask=mask)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="the exported U-Net folder (config.json + weights)")
    parser.add_argument("--out", default="tests/fixtures/diffusers/export")
    args = parser.parse_args()
    model = load_checked(args.export)
    with open(os.path.join(args.export, "config.json")) as f:
        config = json.load(f)
    io = inputs(config, torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = model(io["sample"], io["timestep"], io["encoder_hidden_states"],
                    encoder_attention_mask=io["encoder_attention_mask"]).sample
    tensors = load_file(os.path.join(args.export, WEIGHTS))
    manifest = {name: {"shape": list(v.shape), "dtype": str(v.dtype),
                       "sha256": hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()}
                for name, v in sorted(tensors.items())}
    os.makedirs(args.out, exist_ok=True)
    shutil.copyfile(os.path.join(args.export, "config.json"), os.path.join(args.out, "config.json"))
    with open(os.path.join(args.out, "tensors.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    np.savez_compressed(os.path.join(args.out, "io.npz"),
                        **{k: v.numpy() for k, v in io.items()}, output=out.numpy())
    print(f"wrote {args.out}: {len(manifest)} tensors, output {tuple(out.shape)}")


if __name__ == "__main__":
    main()
