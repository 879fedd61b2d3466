"""Paint-with-words inputs a person can make, and the token masks they become.

Two ways to give phrase masks:
- a colour-map PNG plus a JSON mapping each colour to "phrase,strength" (the convention of the
  public paint-with-words tools), e.g. {"#ff0000": "red circle,1.0", "0,0,255": "blue square",
  "#000000": "background"}; every colour in the image must be mapped or declared "background";
- a list of (phrase, mask PNG, strength): the mask is the image's brightness (or alpha), 0..1.

A mask of another size than the canvas is resized to it (bilinear, with a warning) if its aspect
ratio is the canvas's; another aspect ratio is an error (stretching would move what it marks).
Then every token of every occurrence of a phrase, in each token stream of the conditioning (T5
and CLIP tokenize differently), gets the phrase's mask x strength in its column of the context.
A phrase that is not in the prompt is an error that shows the prompt's tokens.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Mapping, Sequence

import numpy as np
from ediffi_jax.config import read_json

log = logging.getLogger(__name__)


class PaintError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class PhraseMask:
    phrase: str
    mask: np.ndarray  # [H, W] float32 in [0, 1]
    strength: float = 1.0


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """One token stream of a prompt: its tokens, their ids, and where its columns start in the
    U-Net's cross-attention context."""

    name: str
    offset: int
    tokens: tuple[str, ...]
    ids: tuple


def _resize(mask: np.ndarray, height: int, width: int, what: str) -> np.ndarray:
    if mask.shape == (height, width):
        return mask.astype(np.float32)
    h, w = mask.shape
    if abs(h * width / w - height) >= 1:  # scaled to the canvas's width, off by a pixel or more
        raise PaintError(f"{what} is {w}x{h} (width x height), the output {width}x{height}: "
                         "its aspect ratio differs; give a mask of the output's shape")
    log.warning("%s is %dx%d, resized to the output's %dx%d", what, w, h, width, height)
    from PIL import Image

    img = Image.fromarray(mask.astype(np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.BILINEAR), np.float32)


def _open_image(path: str, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except FileNotFoundError:
        raise PaintError(f"{what} {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise PaintError(f"{what} {path} is not a readable image: {e}") from None


def read_mask(path: str, height: int, width: int) -> np.ndarray:
    """A mask PNG -> [height, width] in [0, 1]: its alpha if it has one, else its brightness."""
    img = _open_image(path, "the mask")
    if img.mode in ("RGBA", "LA"):
        values = np.asarray(img.getchannel("A"), np.float32)
    else:
        values = np.asarray(img.convert("L"), np.float32)
    return np.clip(_resize(values / 255.0, height, width, f"the mask {path}"), 0.0, 1.0)


def parse_colour(key: str) -> tuple[int, int, int]:
    text = key.strip()
    if re.fullmatch(r"#[0-9a-fA-F]{6}", text):
        return tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))
    parts = re.findall(r"-?\d+", text)
    if len(parts) == 3 and re.fullmatch(r"\(?\s*\d+\s*,\s*\d+\s*,\s*\d+\s*\)?", text):
        rgb = tuple(int(p) for p in parts)
        if all(0 <= c <= 255 for c in rgb):
            return rgb
    raise PaintError(f"colour {key!r}: write it as '#rrggbb' or 'r,g,b' (0-255)")


def parse_phrase(value: str, where: str) -> tuple[str, float] | None:
    """'phrase,strength' or 'phrase' -> (phrase, strength); 'background' -> None."""
    text = str(value).strip()
    if text.lower() == "background":
        return None
    phrase, _, strength = text.rpartition(",")
    if not phrase:  # no comma: the whole value is the phrase
        phrase, strength = text, "1.0"
    try:
        value = float(strength)
    except ValueError:
        phrase, value = text, 1.0  # a comma inside the phrase, no strength
    if not phrase.strip():
        raise PaintError(f"{where}: empty phrase in {text!r}")
    return phrase.strip(), value


def from_color_map(image, mapping: Mapping[str, str], height: int, width: int) -> list[PhraseMask]:
    """Masks from a colour-map image (path or uint8 [H, W, 3]) and colour -> "phrase,strength"."""
    what = f"the colour map {image}" if isinstance(image, str) else "the colour map"
    if isinstance(image, str):
        pixels = np.asarray(_open_image(image, "the colour map").convert("RGB"))
    else:
        pixels = np.asarray(image)[..., :3]
    colours = {parse_colour(k): parse_phrase(v, f"colour {k}") for k, v in mapping.items()}
    present, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    unmapped = [(tuple(int(c) for c in rgb), int(n)) for rgb, n in zip(present, counts)
                if tuple(int(c) for c in rgb) not in colours]
    if unmapped:
        listed = ", ".join(f"#{r:02x}{g:02x}{b:02x} ({n} px)" for (r, g, b), n in unmapped[:8])
        raise PaintError(f"the colour map has colours the mapping does not name: {listed}; map "
                         "each to 'phrase,strength' or to 'background' (anti-aliased edges "
                         "make such colours: paint with a hard brush)")
    out = []
    for rgb, entry in colours.items():
        if entry is None:
            continue
        exact = np.all(pixels == np.asarray(rgb, pixels.dtype), axis=-1).astype(np.float32)
        if not exact.any():
            log.warning("colour #%02x%02x%02x (%s) does not occur in the colour map", *rgb, entry[0])
        out.append(PhraseMask(entry[0], _resize(exact, height, width, what), entry[1]))
    return out


def read_words(path: str) -> dict[str, str]:
    mapping = read_json(path, "the paint words file")
    if not isinstance(mapping, dict):
        raise PaintError(f"{path}: expected a JSON object mapping colours to 'phrase,strength'")
    return mapping


def parse_mask_spec(spec: str) -> tuple[str, str, float]:
    """'phrase=mask.png[:strength]' -> (phrase, path, strength). A ':' in the path itself is
    read as part of it only when the whole text names an existing file."""
    import math
    import os

    phrase, sep, rest = spec.partition("=")
    if not sep or not phrase.strip() or not rest:
        raise PaintError(f"--paint-mask {spec!r}: write it as 'phrase=mask.png[:strength]'")
    rest = rest.strip()
    path, colon, tail = rest.rpartition(":")
    if not colon or os.path.isfile(rest):
        return phrase.strip(), rest, 1.0
    try:
        strength = float(tail)
    except ValueError:
        raise PaintError(f"--paint-mask {spec!r}: the strength {tail!r} (after the last ':') "
                         f"is not a number (nor is {rest!r} a file)") from None
    if not math.isfinite(strength):
        raise PaintError(f"--paint-mask {spec!r}: the strength must be finite, got {tail!r}")
    return phrase.strip(), path, strength


def from_mask_specs(specs: Sequence[str], height: int, width: int) -> list[PhraseMask]:
    """'phrase=mask.png' or 'phrase=mask.png:strength' -> masks."""
    out = []
    for spec in specs:
        phrase, path, strength = parse_mask_spec(spec)
        out.append(PhraseMask(phrase, read_mask(path, height, width), strength))
    return out


def _occurrences(seq: Sequence, sub: Sequence) -> list[int]:
    n = len(sub)
    return [i for i in range(len(seq) - n + 1) if n and tuple(seq[i:i + n]) == tuple(sub)]


def token_masks(masks: Sequence[PhraseMask], streams: Sequence[TokenStream], phrase_tokens,
                context_length: int, prompt: str, scale: float = 1.0) -> np.ndarray:
    """[H, W, context_length] float32: each phrase's mask x strength x scale in the columns of
    its tokens, every occurrence, every stream. `phrase_tokens(stream name, phrase)` gives the
    TokenStream of a phrase as that stream's tokenizer reads it inside a prompt."""
    if not masks:
        raise PaintError("paint-with-words needs at least one phrase mask")
    h, w = masks[0].mask.shape
    out = np.zeros((h, w, context_length), np.float32)
    for m in masks:
        if m.mask.shape != (h, w):
            raise PaintError(f"mask of {m.phrase!r} is {m.mask.shape}, the others {(h, w)}")
        for stream in streams:
            phrase = phrase_tokens(stream.name, m.phrase)
            starts = _occurrences(stream.ids, phrase.ids)
            if not starts:
                raise PaintError(
                    f"phrase {m.phrase!r} is not in the prompt {prompt!r} as the {stream.name} "
                    f"tokenizer reads it: prompt tokens {list(stream.tokens)}, phrase tokens "
                    f"{list(phrase.tokens)}")
            for start in starts:
                for j in range(len(phrase.ids)):
                    out[:, :, stream.offset + start + j] += scale * m.strength * m.mask
    return out


def batch_token_masks(encoder, prompts: Sequence[str], masks, context_length: int,
                      scale: float = 1.0) -> np.ndarray:
    """token_masks for each prompt, [B, H, W, context_length], from an encoder's
    token_streams(prompt) and phrase_tokens(stream, phrase). `masks`: PhraseMasks shared by
    every prompt, or one sequence of PhraseMasks per prompt."""
    per_prompt = bool(masks) and not isinstance(masks[0], PhraseMask)
    if per_prompt and len(masks) != len(prompts):
        raise PaintError(f"{len(masks)} mask sets for {len(prompts)} prompts")
    return np.stack([token_masks(masks[i] if per_prompt else masks, encoder.token_streams(p),
                                 encoder.phrase_tokens, context_length, p, scale)
                     for i, p in enumerate(prompts)])


def paint_conditioning(conditioner, model, prompts: Sequence[str], masks, scale: float = 1.0
                       ) -> np.ndarray:
    """Conditioning.paint for a batch of prompts: [B, H, W, L] with L = t5_length +
    clip_length + 2 (the image and null tokens get no mask)."""
    return batch_token_masks(conditioner, prompts, masks,
                             model.t5_length + model.clip_length + 2, scale)
