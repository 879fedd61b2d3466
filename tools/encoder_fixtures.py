"""Generate PyTorch/HF reference fixtures for the Flax T5 / CLIP encoder ports.

Run from the repo root with the tools venv (see tools/requirements-torch.txt):

    .venv-tools/bin/python tools/encoder_fixtures.py --out tests/fixtures/encoders

For each tiny, randomly initialised HF model this writes a directory with the
`save_pretrained` output (config.json + safetensors weights; `t5_gated` is
sharded with a model.safetensors.index.json) and `reference.npz` holding the
inputs and the HF outputs (float32 / int32).  CI reads only those files and
never imports torch.

Deterministic: fixed torch / numpy seeds per model, single-threaded torch,
float32, eval mode, no_grad, eager attention.  Offline: no hub access.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

# Offline before transformers / huggingface_hub are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
)

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

ATTN_IMPL = "eager"  # the plain math path; sdpa is checked against it below

# Re-initialisation scales (HF's own init leaves T5 norms at exactly 1, biases
# at 0, etc., which would let a port get some wiring wrong unnoticed).
W_STD = 0.2  # weights, embeddings, projections
NORM_STD = 0.1  # LayerNorm / T5 RMSNorm weights: 1 + N(0, NORM_STD)
BIAS_STD = 0.1  # biases
T5_REL_BIAS_STD = 1.0  # T5 relative_attention_bias (so the bucket table clearly matters)


# --------------------------------------------------------------------------- utils


def _norm_param_names(model: torch.nn.Module) -> set[str]:
    """Names of the weights of LayerNorm and T5LayerNorm (RMSNorm) modules."""
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    names = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.LayerNorm, T5LayerNorm)):
            for p_name, _ in mod.named_parameters(recurse=False):
                if p_name == "weight":
                    names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


@torch.no_grad()
def reinit_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    norm_names = _norm_param_names(model)
    # named_parameters() de-duplicates tied parameters (T5 shared/embed_tokens).
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name in norm_names:
            p.copy_(1.0 + NORM_STD * noise)
        elif name.endswith("bias"):
            p.copy_(BIAS_STD * noise)
        elif name.endswith("relative_attention_bias.weight"):
            p.copy_(T5_REL_BIAS_STD * noise)
        else:
            p.copy_(W_STD * noise)


def f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).numpy().astype(np.float32)


def i32(t) -> np.ndarray:
    return np.asarray(t, dtype=np.int32)


def save_model(model, out_dir: Path, max_shard_size=None) -> None:
    import inspect

    kwargs = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    # transformers v4 needed safe_serialization=True; v5 always writes safetensors
    # and no longer has the argument.
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(out_dir, **kwargs)
    assert not list(out_dir.glob("*.bin")), "expected safetensors only"


def safetensors_listing(out_dir: Path) -> list[tuple[str, str, tuple[int, ...], str]]:
    """(file, tensor name, shape, dtype) for every tensor in the saved weights."""
    rows = []
    for f in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="np") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                rows.append((f.name, k, tuple(sl.get_shape()), sl.get_dtype()))
    return rows


def write_index_manually(out_dir: Path, state: dict[str, torch.Tensor], n_shards: int) -> None:
    """Fallback: shard + index in HF's format, if save_pretrained won't shard this small."""
    from safetensors.torch import save_file

    for f in out_dir.glob("model*.safetensors*"):
        f.unlink()
    names = sorted(state)
    chunks = [names[i::n_shards] for i in range(n_shards)]
    weight_map, total = {}, 0
    for i, chunk in enumerate(chunks, 1):
        fname = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in chunk}, str(out_dir / fname), metadata={"format": "pt"})
        for k in chunk:
            weight_map[k] = fname
            total += state[k].numel() * state[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def check_reload(cls, out_dir: Path, ref_fn, refs: dict[str, np.ndarray]) -> None:
    """Reload from disk (offline, local) and make sure the outputs are bit-identical."""
    m = cls.from_pretrained(out_dir, attn_implementation=ATTN_IMPL).eval()
    again = ref_fn(m)
    for k, v in again.items():
        if not np.array_equal(v, refs[k]):
            raise AssertionError(f"{out_dir.name}: reload mismatch for {k}: {np.abs(v - refs[k]).max()}")


def check_sdpa(cls, out_dir: Path, ref_fn, refs: dict[str, np.ndarray]) -> float:
    m = cls.from_pretrained(out_dir, attn_implementation="sdpa").eval()
    again = ref_fn(m)
    return max(float(np.abs(v - refs[k]).max()) for k, v in again.items() if v.dtype == np.float32)


@torch.no_grad()
def check_sensitivity(model, ref_fn, refs: dict[str, np.ndarray], seed: int, tol: float = 1e-4) -> None:
    """Every saved tensor must influence the reference outputs: perturb each one
    and require the output to move.  (A tensor that has no effect could be
    mis-mapped by a port without any parity test noticing.)

    Exception: attention key biases (CLIP k_proj.bias) are provably inert --
    q.(k + b) shifts every logit of a query row by the same q.b, and softmax is
    shift-invariant -- so no fixture can test them."""
    gen = torch.Generator().manual_seed(seed)
    dead = []
    for name, p in model.named_parameters():
        if name.endswith("k_proj.bias"):
            continue
        orig = p.detach().clone()
        p.add_(0.05 * torch.randn(p.shape, generator=gen))
        out = ref_fn(model)
        p.copy_(orig)
        delta = max(float(np.abs(out[k] - refs[k]).max()) for k in out if out[k].dtype == np.float32)
        if delta < tol:
            dead.append((name, delta))
    if dead:
        raise AssertionError(f"parameters with no effect on outputs: {dead}")


# --------------------------------------------------------------------------- T5


def t5_config(gated: bool) -> T5Config:
    return T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=3 if gated else 2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu" if gated else "relu",
        dropout_rate=0.0,
    )


def t5_inputs(seed: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 64, size=(2, 11))  # [1, 63]
    mask = np.ones((2, 11), dtype=np.int64)
    ids[1, -4:] = 0  # pad id 0
    mask[1, -4:] = 0
    return ids, mask


def t5_ref_fn(ids, mask):
    ids_t = torch.tensor(ids, dtype=torch.long)
    mask_t = torch.tensor(mask, dtype=torch.long)

    @torch.no_grad()
    def fn(model):
        block_out = []
        hooks = [
            blk.register_forward_hook(lambda _m, _i, o: block_out.append(o[0] if isinstance(o, tuple) else o))
            for blk in model.encoder.block
        ]
        try:
            out = model(input_ids=ids_t, attention_mask=mask_t, output_hidden_states=True)
        finally:
            for h in hooks:
                h.remove()
        hs = out.hidden_states
        return {
            "last_hidden_state": f32(out.last_hidden_state),
            "hidden_states_0": f32(hs[0]),
            "hidden_states_all": f32(torch.stack(list(hs))),
            "block_outputs": f32(torch.stack(block_out)),
        }

    return fn


def make_t5(out_root: Path, name: str, gated: bool, seed: int) -> Path:
    out_dir = out_root / name
    shutil.rmtree(out_dir, ignore_errors=True)
    torch.manual_seed(seed)
    model = T5EncoderModel(t5_config(gated))
    model.config._attn_implementation = ATTN_IMPL
    try:
        model.set_attn_implementation(ATTN_IMPL)
    except Exception:
        pass
    reinit_(model, seed)
    model.eval()
    # sanity: the tied embedding really is one tensor
    assert model.shared.weight is model.encoder.embed_tokens.weight

    ids, mask = t5_inputs(seed + 1)
    fn = t5_ref_fn(ids, mask)
    refs = fn(model)
    # HF's hidden_states tuple: [0]=embeddings, [i]=output of block i-1 for i<L,
    # [L] = last_hidden_state (post final_layer_norm, "tied" last state).
    assert np.array_equal(refs["hidden_states_all"][-1], refs["last_hidden_state"])
    assert np.array_equal(refs["hidden_states_all"][1:-1], refs["block_outputs"][:-1])
    check_sensitivity(model, fn, refs, seed + 2)

    if gated:
        save_model(model, out_dir, max_shard_size="20KB")
        shards = sorted(out_dir.glob("model-*-of-*.safetensors"))
        if not (out_dir / "model.safetensors.index.json").exists() or len(shards) < 2:
            print("  save_pretrained did not shard; writing shards + index manually")
            state = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
            write_index_manually(out_dir, state, n_shards=3)
        shards = sorted(out_dir.glob("model-*-of-*.safetensors"))
        assert (out_dir / "model.safetensors.index.json").exists() and len(shards) >= 2
        assert not (out_dir / "model.safetensors").exists()
        index = json.loads((out_dir / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {s.name for s in shards}
    else:
        save_model(model, out_dir)
        assert (out_dir / "model.safetensors").exists()

    check_reload(T5EncoderModel, out_dir, fn, refs)
    sdpa_diff = check_sdpa(T5EncoderModel, out_dir, fn, refs)
    np.savez(out_dir / "reference.npz", input_ids=i32(ids), attention_mask=i32(mask), **refs)
    print(f"  {name}: eager-vs-sdpa max |diff| = {sdpa_diff:.2e}")
    return out_dir


# --------------------------------------------------------------------------- CLIP text

CLIP_BOS, CLIP_EOS = 998, 999
CLIP_LEN = 16


def clip_text_config(legacy: bool) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_LEN,
        projection_dim=24,
        hidden_act="gelu" if legacy else "quick_gelu",
        bos_token_id=CLIP_BOS,
        eos_token_id=2 if legacy else CLIP_EOS,
        pad_token_id=CLIP_EOS,
    )


def clip_text_inputs(seed: int):
    rng = np.random.default_rng(seed)
    ids = np.full((2, CLIP_LEN), CLIP_EOS, dtype=np.int64)  # pad = eos = 999
    mask = np.zeros((2, CLIP_LEN), dtype=np.int64)
    for row, n in enumerate((10, 5)):
        ids[row, 0] = CLIP_BOS
        ids[row, 1 : 1 + n] = rng.integers(3, 991, size=n)  # [3, 990]
        ids[row, 1 + n] = CLIP_EOS
        mask[row, : n + 2] = 1  # through the eos
    # the EOT id is the row max (HF's legacy eos_token_id == 2 path relies on it)
    assert all(ids[r].max() == CLIP_EOS and ids[r].argmax() == mask[r].sum() - 1 for r in range(2))
    return ids, mask


def clip_text_ref_fn(ids, mask):
    ids_t = torch.tensor(ids, dtype=torch.long)
    mask_t = torch.tensor(mask, dtype=torch.long)

    @torch.no_grad()
    def fn(model):
        res = {}
        for suffix, m in (("", mask_t), ("_nomask", None)):
            # CLIPTextModelWithProjection's output has no pooler_output in v5:
            # run the inner text_model, then the projection ourselves, and check
            # against the wrapper's text_embeds.
            inner = model.text_model(input_ids=ids_t, attention_mask=m, output_hidden_states=True)
            outer = model(input_ids=ids_t, attention_mask=m)
            emb = model.text_projection(inner.pooler_output)
            assert torch.equal(emb, outer.text_embeds)
            assert torch.equal(inner.last_hidden_state, outer.last_hidden_state)
            res[f"last_hidden_state{suffix}"] = f32(inner.last_hidden_state)
            res[f"pooler_output{suffix}"] = f32(inner.pooler_output)
            res[f"text_embeds{suffix}"] = f32(outer.text_embeds)
            # [0]=embeddings (token+position), [i]=output of encoder layer i-1;
            # the last one is BEFORE final_layer_norm (CLIP does not tie it).
            res[f"hidden_states_all{suffix}"] = f32(torch.stack(list(inner.hidden_states)))
        return res

    return fn


def make_clip_text(out_root: Path, name: str, legacy: bool, seed: int) -> Path:
    out_dir = out_root / name
    shutil.rmtree(out_dir, ignore_errors=True)
    torch.manual_seed(seed)
    cfg = clip_text_config(legacy)
    cfg._attn_implementation = ATTN_IMPL
    model = CLIPTextModelWithProjection(cfg)
    reinit_(model, seed)
    model.eval()

    ids, mask = clip_text_inputs(seed + 1)
    fn = clip_text_ref_fn(ids, mask)
    refs = fn(model)

    eos_pos = mask.sum(1) - 1
    ln = refs["last_hidden_state"]
    assert np.array_equal(refs["pooler_output"], ln[np.arange(2), eos_pos])
    # causal attention: everything up to and including the EOS is identical
    # with or without the padding mask, so the pooled outputs agree too.
    for r in range(2):
        np.testing.assert_allclose(
            refs["last_hidden_state_nomask"][r, : eos_pos[r] + 1], ln[r, : eos_pos[r] + 1], rtol=0, atol=1e-5
        )
    np.testing.assert_allclose(refs["pooler_output_nomask"], refs["pooler_output"], rtol=0, atol=1e-5)
    check_sensitivity(model, fn, refs, seed + 2)

    save_model(model, out_dir)
    assert (out_dir / "model.safetensors").exists()
    check_reload(CLIPTextModelWithProjection, out_dir, fn, refs)
    sdpa_diff = check_sdpa(CLIPTextModelWithProjection, out_dir, fn, refs)
    np.savez(out_dir / "reference.npz", input_ids=i32(ids), attention_mask=i32(mask), **refs)
    print(f"  {name}: eager-vs-sdpa max |diff| = {sdpa_diff:.2e}")
    return out_dir


# --------------------------------------------------------------------------- CLIP vision


def clip_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=24,
        hidden_act="gelu",
        num_channels=3,
    )


def clip_vision_ref_fn(pixels):
    px = torch.tensor(pixels, dtype=torch.float32)

    @torch.no_grad()
    def fn(model):
        inner = model.vision_model(pixel_values=px, output_hidden_states=True)
        outer = model(pixel_values=px)
        assert torch.equal(model.visual_projection(inner.pooler_output), outer.image_embeds)
        return {
            "last_hidden_state": f32(inner.last_hidden_state),
            "pooler_output": f32(inner.pooler_output),
            "image_embeds": f32(outer.image_embeds),
            # [0] = embeddings AFTER pre_layrnorm (input of layer 0), [i] = output of layer i-1
            "hidden_states_all": f32(torch.stack(list(inner.hidden_states))),
        }

    return fn


def make_clip_vision(out_root: Path, name: str, seed: int) -> Path:
    out_dir = out_root / name
    shutil.rmtree(out_dir, ignore_errors=True)
    torch.manual_seed(seed)
    cfg = clip_vision_config()
    cfg._attn_implementation = ATTN_IMPL
    model = CLIPVisionModelWithProjection(cfg)
    reinit_(model, seed)
    model.eval()

    pixels = np.random.default_rng(seed + 1).standard_normal((2, 3, 32, 32)).astype(np.float32)  # NCHW
    fn = clip_vision_ref_fn(pixels)
    refs = fn(model)
    assert refs["last_hidden_state"].shape == (2, 17, 32)
    check_sensitivity(model, fn, refs, seed + 2)

    save_model(model, out_dir)
    assert (out_dir / "model.safetensors").exists()
    check_reload(CLIPVisionModelWithProjection, out_dir, fn, refs)
    sdpa_diff = check_sdpa(CLIPVisionModelWithProjection, out_dir, fn, refs)
    np.savez(out_dir / "reference.npz", pixel_values=pixels, **refs)
    print(f"  {name}: eager-vs-sdpa max |diff| = {sdpa_diff:.2e}")
    return out_dir


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/encoders"))
    ap.add_argument("--list", action="store_true", help="also print every safetensors tensor name/shape")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    np.random.seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")

    dirs = [
        make_t5(args.out, "t5_relu", gated=False, seed=1000),
        make_t5(args.out, "t5_gated", gated=True, seed=2000),
        make_clip_text(args.out, "clip_text", legacy=False, seed=3000),
        make_clip_text(args.out, "clip_text_legacy_eos", legacy=True, seed=4000),
        make_clip_vision(args.out, "clip_vision", seed=5000),
    ]

    total = 0
    for d in dirs:
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        total += size
        print(f"{d.name}/  {size / 1024:.1f} KiB")
        for f in sorted(d.iterdir()):
            print(f"    {f.name:45s} {f.stat().st_size:8d} B")
        if args.list:
            with np.load(d / "reference.npz") as z:
                for k in z.files:
                    print(f"    npz  {k:28s} {str(z[k].dtype):8s} {z[k].shape}")
            for fname, k, shape, dtype in safetensors_listing(d):
                print(f"    st   {fname:32s} {k:60s} {dtype} {shape}")
    print(f"total: {total / 1024:.1f} KiB in {len(dirs)} fixture directories")
    return 0


if __name__ == "__main__":
    sys.exit(main())
