"""Encode a dataset's captions (and images) once, so training reads embeddings, not encoders
(`python -m train.precompute`).

The output is written chunk by chunk, each chunk a complete shard renamed into place; a rerun
after an interruption skips the chunks already written, and the dataset becomes readable (its
sidecar appears) only when every chunk is there. A rerun with other settings is an error rather
than a mix.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
from tqdm.auto import tqdm

from ediffi_jax.config import ConfigError
from ediffi_jax.data.embeddings import PARTS, STORAGE_DTYPES, pack
from ediffi_jax.data.records import (RecordSource, describe_features, shard_name, sidecar_path,
                                     write_shard, write_sidecar)
from ediffi_jax.encoders.conditioner import PretrainedEncoder
from ediffi_jax.parallel.mesh import make_mesh
from ediffi_jax.runs.spec import parse_run


def precompute(config, data: str, out: str, *, images: bool = False, dtype: str = "float16",
               batch: int = 64, chunk: int = 4096, log=print) -> str:
    """Write the encoded copy of `data` at `out` (a records prefix); returns `out`."""
    run = parse_run(config)
    model, enc = run.stage.model, run.encoders
    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"--dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    if not (enc.t5 or enc.clip_text):
        raise ConfigError("precompute runs real encoders: set encoders.t5 and/or encoders.clip_text")
    if images and not enc.clip_vision:
        raise ConfigError("--images needs a CLIP vision tower: set encoders.clip_vision")
    source = RecordSource(data)
    if "caption" not in source.features:
        raise ConfigError(f"{data}: records have no `caption` field (fields: {sorted(source.features)})")
    if images and "image" not in source.features:
        raise ConfigError(f"{data}: --images given but records have no `image` field")
    if os.path.abspath(out) == os.path.abspath(data):
        raise ConfigError("--out must differ from --data")

    settings = {"data": os.path.abspath(data), "encoders": json.loads(json.dumps(
        {k: getattr(enc, k) for k in ("t5", "clip_text", "clip_vision", "dtype")})),
        "t5_length": model.t5_length, "clip_length": model.clip_length, "images": images,
        "dtype": dtype, "chunk": chunk}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    state_file = f"{out}.precompute.json"
    if os.path.exists(state_file):
        with open(state_file) as f:
            earlier = json.load(f)
        if earlier != settings:
            changed = sorted(k for k in settings if earlier.get(k) != settings[k])
            raise ConfigError(f"{out} was started with other settings ({', '.join(changed)} "
                              f"differ); remove {state_file} and its shards to start over")
    else:
        with open(state_file, "w") as f:
            json.dump(settings, f, indent=1)

    mesh = make_mesh((-1, 1, 1))
    devices = mesh.devices.size
    batch = -(-batch // devices) * devices  # the batch splits evenly over the devices
    encoder = PretrainedEncoder(enc, model, mesh)
    parts = [p for p, on in zip(PARTS, (enc.t5, enc.clip_text, images)) if on]
    n = len(source)
    chunks = math.ceil(n / chunk)
    shards = [shard_name(out, c, chunks) for c in range(chunks)]
    todo = [c for c in range(chunks) if not os.path.exists(shards[c])]
    if len(todo) < chunks:
        log(f"resuming: {chunks - len(todo)} of {chunks} chunks already written")
    bar = tqdm(total=n, initial=(chunks - len(todo)) * chunk if todo else n, unit="ex",
               desc=f"encoding {os.path.basename(data)}")

    def encoded(c):
        for start in range(c * chunk, min(n, (c + 1) * chunk), batch):
            idx = list(range(start, min(n, (c + 1) * chunk, start + batch)))
            records = source.__getitems__(idx)
            captions = [r["caption"] for r in records]
            captions = [x.decode() if isinstance(x, bytes) else str(x) for x in captions]
            pad = batch - len(captions)  # the last batch: padded to the compiled shape
            imgs = [r["image"] for r in records] + [records[0]["image"]] * pad if images else None
            cond = encoder.encode(captions + [""] * pad, imgs)
            for i, record in enumerate(records):
                yield {**record, "cond": pack(cond, i, parts, dtype)}
            bar.update(len(records))

    t = time.perf_counter()
    try:
        for c in todo:
            write_shard(shards[c], encoded(c))
    finally:
        bar.close()
    features = describe_features(RecordSource([shards[0]])[0])
    metadata = {**source.metadata, "conditioning": {
        "parts": parts, "dtype": dtype, "encoders": settings["encoders"], "source": settings["data"]}}
    write_sidecar(out, shards, n, features, metadata)
    os.remove(state_file)
    log(f"wrote {n} encoded records to {out} ({sidecar_path(out)}) in "
        f"{time.perf_counter() - t:.1f} s on {jax.device_count()} devices")
    return out
