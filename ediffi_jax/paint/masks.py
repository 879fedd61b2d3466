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

A Layout is one prompt's phrase masks: over its prompt's tokens, and over its negative
prompt's (a region painted with a negative phrase is pushed away from it: the masks bias the
negative, i.e. unconditional, branch of classifier-free guidance). A paint layout file gives
one Layout per prompt (read_layouts), so prompts of different layouts sample in one batch:
a JSON list, one object per prompt, with any of

    "paint": a colour map PNG, "words": its colour -> "phrase,strength" (an object or a JSON file),
    "masks": {phrase: "mask.png[:strength]"},
    "negative_words": colour -> "negative phrase,strength" over the same colour map (colours it
    does not name get no negative phrase), "negative_masks": {phrase: "mask.png[:strength]"},

e.g. [{"paint": "left.png", "words": "words.json"}, {"masks": {"blue square": "right.png:2"},
"negative_masks": {"red": "right.png"}}]; paths are relative to the file. An entry painting
nothing leaves its prompt unpainted (zero masks). Negative phrases must be in the negative
prompt.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
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
class Layout:
    """One prompt's painted phrases: `masks` on its prompt's tokens, `negative` on its negative
    prompt's."""

    masks: tuple[PhraseMask, ...] = ()
    negative: tuple[PhraseMask, ...] = ()


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


def from_color_map(image, mapping: Mapping[str, str], height: int, width: int,
                   partial: bool = False) -> list[PhraseMask]:
    """Masks from a colour-map image (path or uint8 [H, W, 3]) and colour -> "phrase,strength".
    `partial`: colours the mapping does not name are left unpainted instead of an error (a
    negative mapping names only the regions it steers away)."""
    what = f"the colour map {image}" if isinstance(image, str) else "the colour map"
    if isinstance(image, str):
        pixels = np.asarray(_open_image(image, "the colour map").convert("RGB"))
    else:
        pixels = np.asarray(image)[..., :3]
    colours = {parse_colour(k): parse_phrase(v, f"colour {k}") for k, v in mapping.items()}
    present, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    unmapped = [(tuple(int(c) for c in rgb), int(n)) for rgb, n in zip(present, counts)
                if tuple(int(c) for c in rgb) not in colours]
    if unmapped and not partial:
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


def parse_mask_spec(spec: str, flag: str = "--paint-mask") -> tuple[str, str, float]:
    """'phrase=mask.png[:strength]' -> (phrase, path, strength)."""
    phrase, sep, rest = spec.partition("=")
    if not sep or not phrase.strip() or not rest:
        raise PaintError(f"{flag} {spec!r}: write it as 'phrase=mask.png[:strength]'")
    return (phrase.strip(),) + parse_mask_source(rest, f"{flag} {spec!r}")


def parse_mask_source(source: str, where: str, base: str = "") -> tuple[str, float]:
    """'mask.png[:strength]' -> (path, strength), the path joined to `base`. A ':' in the path
    itself is read as part of it only when the whole text names an existing file."""
    rest = os.path.join(base, source.strip())
    path, colon, tail = rest.rpartition(":")
    if not colon or os.path.isfile(rest):
        return rest, 1.0
    try:
        strength = float(tail)
    except ValueError:
        raise PaintError(f"{where}: the strength {tail!r} (after the last ':') is not a number "
                         f"(nor is {rest!r} a file)") from None
    if not math.isfinite(strength):
        raise PaintError(f"{where}: the strength must be finite, got {tail!r}")
    return path, strength


def from_mask_specs(specs: Sequence[str], height: int, width: int,
                    flag: str = "--paint-mask") -> list[PhraseMask]:
    """'phrase=mask.png' or 'phrase=mask.png:strength' -> masks."""
    out = []
    for spec in specs:
        phrase, path, strength = parse_mask_spec(spec, flag)
        out.append(PhraseMask(phrase, read_mask(path, height, width), strength))
    return out


LAYOUT_KEYS = ("paint", "words", "masks", "negative_words", "negative_masks")


def read_layouts(path: str, height: int, width: int) -> list[Layout]:
    """A paint layout file (the module's docstring) -> one Layout per entry, at the output
    size; every entry checked (known keys, files that exist, strengths that are numbers)."""
    entries = read_json(path, "the paint layout file")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise PaintError(f'{path}: expected a JSON list of one object per prompt, e.g. '
                         '[{"paint": "colors.png", "words": "words.json"}, '
                         '{"masks": {"blue square": "right.png:1.0"}}]')
    base = os.path.dirname(os.path.abspath(path))
    return [_layout_entry(e, height, width, f"{path}: layout {i}", base)
            for i, e in enumerate(entries)]


def _layout_entry(entry: dict, height: int, width: int, where: str, base: str) -> Layout:
    unknown = sorted(set(entry) - set(LAYOUT_KEYS))
    if unknown:
        raise PaintError(f"{where} has unknown keys {unknown} (allowed: {', '.join(LAYOUT_KEYS)})")
    if bool(entry.get("paint")) != bool(entry.get("words") or entry.get("negative_words")):
        raise PaintError(f'{where}: "paint" (a colour map) goes with "words" and/or '
                         '"negative_words" (its colours\' phrases)')

    def words(key):
        value = entry[key]
        if isinstance(value, str):
            return read_words(os.path.join(base, value))
        if not isinstance(value, dict):
            raise PaintError(f'{where}: "{key}" must be a JSON file or an object of colour -> '
                             "'phrase,strength'")
        return value

    def phrase_masks(key):
        given = entry.get(key, {})
        if not isinstance(given, dict) or not all(isinstance(v, str) for v in given.values()):
            raise PaintError(f'{where}: "{key}" must be an object of phrase -> '
                             "'mask.png[:strength]'")
        out = []
        for phrase, source in given.items():
            if not phrase.strip():
                raise PaintError(f'{where}: "{key}" has an empty phrase')
            mask, strength = parse_mask_source(source, f'{where} "{key}" {phrase!r}', base)
            out.append(PhraseMask(phrase.strip(), read_mask(mask, height, width), strength))
        return out

    colour_map = entry.get("paint")
    if colour_map is not None and not isinstance(colour_map, str):
        raise PaintError(f'{where}: "paint" must be a colour map PNG\'s path')
    colour_map = os.path.join(base, colour_map) if colour_map else None
    masks = from_color_map(colour_map, words("words"), height, width) if entry.get("words") else []
    negative = (from_color_map(colour_map, words("negative_words"), height, width, partial=True)
                if entry.get("negative_words") else [])
    return Layout(tuple(masks + phrase_masks("masks")),
                  tuple(negative + phrase_masks("negative_masks")))


def _occurrences(seq: Sequence, sub: Sequence) -> list[int]:
    n = len(sub)
    return [i for i in range(len(seq) - n + 1) if n and tuple(seq[i:i + n]) == tuple(sub)]


def token_masks(masks: Sequence[PhraseMask], streams: Sequence[TokenStream], phrase_tokens,
                context_length: int, prompt: str, scale: float = 1.0,
                what: str = "prompt") -> np.ndarray:
    """[H, W, context_length] float32: each phrase's mask x strength x scale in the columns of
    its tokens, every occurrence, every stream. `phrase_tokens(stream name, phrase)` gives the
    TokenStream of a phrase as that stream's tokenizer reads it inside a prompt; `what` names
    the prompt in errors (e.g. "negative prompt")."""
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
                    f"phrase {m.phrase!r} is not in the {what} {prompt!r} as the "
                    f"{stream.name} tokenizer reads it: {what} tokens {list(stream.tokens)}, "
                    f"phrase tokens {list(phrase.tokens)}")
            for start in starts:
                for j in range(len(phrase.ids)):
                    out[:, :, stream.offset + start + j] += scale * m.strength * m.mask
    return out


def batch_token_masks(encoder, prompts: Sequence[str], masks, context_length: int,
                      scale: float = 1.0, what: str = "prompt") -> np.ndarray:
    """token_masks for each prompt, [B, H, W, context_length], from an encoder's
    token_streams(prompt) and phrase_tokens(stream, phrase). `masks`: PhraseMasks shared by
    every prompt, or one sequence of PhraseMasks per prompt (an empty one: zeros, that prompt
    unpainted in a batch of painted ones)."""
    per_prompt = bool(masks) and not isinstance(masks[0], PhraseMask)
    if per_prompt and len(masks) != len(prompts):
        raise PaintError(f"{len(masks)} mask sets for {len(prompts)} prompts")
    sets = masks if per_prompt else [masks] * len(prompts)
    shape = next((s[0].mask.shape for s in sets if s), None)
    if shape is None:
        raise PaintError("paint-with-words needs at least one phrase mask")
    return np.stack([token_masks(s, encoder.token_streams(p), encoder.phrase_tokens,
                                 context_length, p, scale, what)
                     if s else np.zeros(shape + (context_length,), np.float32)
                     for s, p in zip(sets, prompts)])


def paint_conditioning(conditioner, model, prompts: Sequence[str], masks, scale: float = 1.0
                       ) -> np.ndarray:
    """Conditioning.paint for a batch of prompts: [B, H, W, L] with L = t5_length +
    clip_length + 2 (the image and null tokens get no mask)."""
    return batch_token_masks(conditioner, prompts, masks,
                             model.t5_length + model.clip_length + 2, scale)
