"""The built-in ``shapes`` dataset: procedural text-to-image pairs whose samples can be graded.

A tiny diffusion model learns this in minutes on a CPU, and every generated image can be
checked from its pixels alone (``check_image`` / ``caption_accuracy``), which is what the
training demo, the ScaleCrafter repetition count and the paint-with-words placement need.

The images
----------
* Background: black, ``BACKGROUND = (0, 0, 0)``. On black, anti-aliasing and blur only scale a
  colour's intensity, never its hue, so every edge pixel still names its object's colour.
* Palette (``COLOURS``): the six saturated corners of the RGB cube other than black and white:
  red, green, blue, yellow, magenta, cyan. Any two differ by 255 in at least one channel.
* Shapes (``SHAPES``): an axis-aligned ``circle``, ``square`` and an upright isosceles
  ``triangle`` (apex up). All three have the same ``s x s`` bounding box, so the fraction of it
  they fill (square 1, circle pi/4, triangle 1/2) tells them apart; the triangle is also
  bottom-heavy.
* Sizes (``SIZES``): ``small`` and ``large``: ``s = 0.2 R`` and ``0.3 R`` for resolution ``R``
  (6.4 and 9.6 px at 32 x 32).
* Positions (``REGIONS``): a 3 x 3 grid of named cells ("top left", "top", ..., "centre", ...,
  "bottom right"). An object's centroid (centre of mass) lies in its cell, within a quarter of a
  cell of the cell's centre (clipped so that the object stays 1/32 R away from the border), so
  the cell can be read back from the centroid.
* Count: ``min_objects`` (default 1) to ``max_objects`` (<= 4). All objects of one image share
  colour, shape and size (unless ``mixed``: then each object has its own colour, all different,
  and its own shape and size) and sit in distinct cells; their bounding boxes are at least
  ``0.07 R`` (2.2 px at 32) apart, so they never touch. Placements are rejection-sampled, and a
  set of cells in which they cannot fit (e.g. three large objects in one row) is redrawn.
* Drawn at 4 x 4 supersampling and box-filtered to the resolution: crisp, exactly anti-aliased.

Everything scales with the resolution: the dataset at 64 is the dataset at 32, drawn finer.

Captions
--------
``caption_style="full"`` (count, size, colour, shape, positions in reading order)::

    a small red circle at the top left
    two large blue squares on the left and in the centre
    three small cyan triangles at the top, on the right and at the bottom left

``caption_style="short"`` (count, colour, shape; the count word keeps the grammar)::

    a red circle
    two blue squares

``mixed=True`` (each object its own colour) joins one single-object caption per object with
"and", in random order so the words never say where an object is::

    a red circle and a blue square                                             (short)
    a small red circle on the right and a large blue square at the top left    (full)

``make_caption`` builds them and ``parse_caption`` inverts them (one object phrase at a time for
a mixed scene; the graders of one colour, ``truth_names`` / ``caption_accuracy``, refuse mixed
ground truths, whose objects ``object_centroids`` checks colour by colour).

Ground truth
------------
Example ``i`` is ``{"image": uint8 [R, R, 3], "caption": str, "objects": {...}}``, a pure
function of ``(seed, i)`` via ``np.random.default_rng([seed, i])``. ``objects`` holds
``count`` (int) and parallel arrays of length ``max_objects`` (fixed, so examples batch),
padded with -1 / NaN past ``count``: ``colour``, ``shape``, ``size``, ``region`` (int16 indices
into the module-level ``COLOUR_NAMES``, ``SHAPES``, ``SIZES``, ``REGIONS``) and ``x``, ``y``
(float32 centroid in pixels: x to the right, y down, pixel ``(row, col)`` covering
``[col, col + 1) x [row, row + 1)``).

The checker
-----------
A pixel is an object pixel if its brightest channel is at least half of 255 and, scaled so that
channel is 255, it lies within 127.5 (half the palette's spacing) of a palette colour, whose
label it takes; everything else is background. Objects are the 8-connected components of each
colour with at least ``min_area`` pixels (default ``max(4, 0.0025 * H * W)``: 4 px at 32, 10 at
64). For each object a soft coverage map (its colour's intensity relative to the object's own
brightness, over the component grown by one pixel) gives the area ``A``, the widest row ``w``
and tallest column ``h``, the fill ratio ``A / (w h)``, the vertical skewness of the mass and
the centroid. Shape: ``triangle`` if ``fill + 0.5 * skewness < 0.6`` (ideal values: triangle
0.5 - 0.5 * 0.566 = 0.22, circle pi/4, square 1; on clean 32 x 32 data the measured ranges are
triangle 0.26-0.47, circle 0.75-0.84, square 0.97-1.03); else ``square`` if the fill ratio is at
least 0.9; else ``circle``. Size: ``large`` if ``sqrt(w h) >= 0.25 R`` (between 0.2 and 0.3).
Region: the cell holding the centroid. The image's colour is the one with the most object
pixels; its shape, size and region are those of its largest object of that colour.

The checker is exact on clean data (tests: 500 images with up to 3 objects, 100% on colour,
shape, count, size and cells; centroids within 0.25 px) and holds up under a Gaussian blur of
0.5 px plus noise of std 8/255 (>= 95%, in practice ~100%). Small triangles blurred beyond
~0.7 px start to read as circles.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import re
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
REGIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)
REGION_PHRASES: dict[str, str] = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "centre": "in the centre",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
CAPTION_STYLES: tuple[str, ...] = ("full", "short")
COUNT_WORDS: tuple[str, ...] = ("a", "two", "three", "four")
MAX_OBJECTS = len(COUNT_WORDS)

# Geometry, as fractions of the resolution R (or of a grid cell, R / 3, for JITTER).
SIZE_FRACTION: dict[str, float] = {"small": 0.2, "large": 0.3}
MARGIN = 1 / 32  # least distance from an object's bounding box to the image border
GAP = 0.07  # least distance between two objects' bounding boxes
JITTER = 0.25  # centroid offset from its cell's centre, at most, per axis (fraction of a cell)
SUPERSAMPLE = 4
_MAX_PLACEMENT_TRIES = 100
_MAX_REGION_DRAWS = 200

# Checker thresholds.
FOREGROUND_LEVEL = 0.5  # brightest channel / 255 at or above which a pixel can be an object
COLOUR_TOLERANCE = 127.5  # RGB distance to the nearest palette colour after scaling to full
MIN_AREA_FRACTION = 0.0025  # default min_area = max(MIN_AREA_FLOOR, this * H * W)
MIN_AREA_FLOOR = 4
TRIANGLE_SKEW_WEIGHT = 0.5  # triangle if fill + this * vertical skewness < TRIANGLE_SCORE
TRIANGLE_SCORE = 0.6  # ideal: triangle 0.5 - 0.28, circle 0.785, square 1 (skewness 0)
SQUARE_FILL = 0.9  # fill ratio at or above which a non-triangle is a square
LARGE_SIZE = 0.25  # sqrt(w h) / R at or above which an object is large

_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], np.float32)
_REGION_PHRASE_TO_NAME = {v: k for k, v in REGION_PHRASES.items()}
_CAPTION_RE = re.compile(
    r"^(?P<count>{counts}) (?:(?P<size>{sizes}) )?(?P<colour>{colours}) "
    r"(?P<shape>{shapes})(?P<plural>s?)(?: (?P<where>.+))?$".format(
        counts="|".join(COUNT_WORDS),
        sizes="|".join(SIZES),
        colours="|".join(COLOUR_NAMES),
        shapes="|".join(SHAPES),
    )
)


def _check_subset(field: str, value: Any, allowed: Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise ValueError(
            f"ShapesConfig.{field} must be a tuple of names from {list(allowed)}, got {value!r}"
        )
    value = tuple(value)
    if not value:
        raise ValueError(f"ShapesConfig.{field} must not be empty; allowed: {list(allowed)}")
    for v in value:
        if v not in allowed:
            raise ValueError(
                f"ShapesConfig.{field}: unknown {field[:-1]} {v!r}; allowed: {list(allowed)}"
            )
    if len(set(value)) != len(value):
        raise ValueError(f"ShapesConfig.{field} has duplicates: {list(value)}")
    return value


def _check_int(field: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"ShapesConfig.{field} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"ShapesConfig.{field} must be {bound}, got {value}")


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """What the procedural dataset draws. Names index the module-level tuples."""

    resolution: int = 32
    max_objects: int = 1
    min_objects: int = 1  # min = max = 2: every scene has two objects
    colours: tuple[str, ...] = COLOUR_NAMES
    shapes: tuple[str, ...] = SHAPES
    sizes: tuple[str, ...] = SIZES
    seed: int = 0
    caption_style: str = "full"
    num_examples: int = 1_000_000
    mixed: bool = False  # objects of one image differ (colour always; shape and size may)

    def __post_init__(self):
        _check_int("resolution", self.resolution, 16)
        _check_int("max_objects", self.max_objects, 1, MAX_OBJECTS)
        _check_int("min_objects", self.min_objects, 1, self.max_objects)
        object.__setattr__(self, "colours", _check_subset("colours", self.colours, COLOUR_NAMES))
        object.__setattr__(self, "shapes", _check_subset("shapes", self.shapes, SHAPES))
        object.__setattr__(self, "sizes", _check_subset("sizes", self.sizes, SIZES))
        _check_int("seed", self.seed, 0)
        if self.caption_style not in CAPTION_STYLES:
            raise ValueError(
                f"ShapesConfig.caption_style: unknown style {self.caption_style!r}; "
                f"allowed: {list(CAPTION_STYLES)}"
            )
        _check_int("num_examples", self.num_examples, 1)
        if not isinstance(self.mixed, bool):
            raise ValueError(f"ShapesConfig.mixed must be a bool, got {self.mixed!r}")
        if self.mixed and self.max_objects > len(self.colours):
            raise ValueError(
                f"ShapesConfig: mixed scenes give each object its own colour, so max_objects "
                f"({self.max_objects}) must be at most the {len(self.colours)} colours"
            )


# ----------------------------------------------------------------------------- captions


def make_caption(
    colour: str, shape: str, size: str | None, regions: Sequence[str], style: str = "full"
) -> str:
    """The caption of ``len(regions)`` objects of one colour, shape and size (see module doc)."""
    count = len(regions)
    if not 1 <= count <= MAX_OBJECTS:
        raise ValueError(f"make_caption: need 1 to {MAX_OBJECTS} regions, got {count}")
    noun = shape if count == 1 else shape + "s"
    if style == "short":
        return f"{COUNT_WORDS[count - 1]} {colour} {noun}"
    if style != "full":
        raise ValueError(f"make_caption: unknown style {style!r}; allowed: {list(CAPTION_STYLES)}")
    phrases = [REGION_PHRASES[r] for r in sorted(regions, key=REGIONS.index)]
    where = phrases[0] if count == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{COUNT_WORDS[count - 1]} {size} {colour} {noun} {where}"


def parse_caption(caption: str) -> dict:
    """Inverse of ``make_caption``: ``{"count", "colour", "shape", "size", "regions"}``.

    ``size`` is None and ``regions`` empty for a short caption. Raises ValueError otherwise.
    """
    m = _CAPTION_RE.match(caption.strip())
    if m is None:
        raise ValueError(f"not a shapes caption: {caption!r}")
    count = COUNT_WORDS.index(m["count"]) + 1
    if (count > 1) != bool(m["plural"]):
        raise ValueError(f"count and plural disagree in {caption!r}")
    regions: list[str] = []
    if m["where"] is not None:
        for phrase in re.split(r", | and ", m["where"]):
            if phrase not in _REGION_PHRASE_TO_NAME:
                raise ValueError(f"unknown position {phrase!r} in {caption!r}")
            regions.append(_REGION_PHRASE_TO_NAME[phrase])
        if len(regions) != count:
            raise ValueError(f"{count} objects but {len(regions)} positions in {caption!r}")
    if (m["size"] is None) != (m["where"] is None):
        raise ValueError(f"a caption has both size and positions, or neither: {caption!r}")
    return {"count": count, "colour": m["colour"], "shape": m["shape"], "size": m["size"],
            "regions": regions}


# ----------------------------------------------------------------------------- geometry


def region_box(region: str | int, resolution: int) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` in pixels of a named (or indexed) cell of the 3 x 3 grid."""
    r = REGIONS.index(region) if isinstance(region, str) else int(region)
    row, col = divmod(r, 3)
    cell = resolution / 3
    return (col * cell, row * cell, (col + 1) * cell, (row + 1) * cell)


def cells_mask(regions: Sequence[str | int], resolution: int) -> np.ndarray:
    """A [R, R] float32 mask: 1 over the named (or indexed) cells of the grid, rounded to whole
    pixels, 0 elsewhere (a region to paint, or to grade a centroid against)."""
    mask = np.zeros((resolution, resolution), np.float32)
    for r in regions:
        x0, y0, x1, y1 = (int(round(v)) for v in region_box(r, resolution))
        mask[y0:y1, x0:x1] = 1.0
    return mask


def region_of(x: float, y: float, resolution: int) -> str:
    """The name of the cell containing the point ``(x, y)`` (pixels, x right, y down)."""
    col = min(max(int(math.floor(3 * x / resolution)), 0), 2)
    row = min(max(int(math.floor(3 * y / resolution)), 0), 2)
    return REGIONS[3 * row + col]


def _extents(shape: str, s: float) -> tuple[float, float, float, float]:
    """Distances from the centroid to the bounding box: (left, right, up, down)."""
    if shape == "triangle":
        return (s / 2, s / 2, 2 * s / 3, s / 3)
    return (s / 2, s / 2, s / 2, s / 2)


def _centre_range(region: int, shape: str, s: float, res: int) -> tuple[float, float, float, float]:
    left, right, up, down = _extents(shape, s)
    row, col = divmod(region, 3)
    cell = res / 3
    cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
    margin = MARGIN * res
    x_lo = max(cx - JITTER * cell, margin + left)
    x_hi = min(cx + JITTER * cell, res - margin - right)
    y_lo = max(cy - JITTER * cell, margin + up)
    y_hi = min(cy + JITTER * cell, res - margin - down)
    assert x_lo <= x_hi and y_lo <= y_hi, (region, shape, s, res)
    return x_lo, x_hi, y_lo, y_hi


def _coverage(shape: str, s: float, x: float, y: float, res: int) -> np.ndarray:
    """Fraction of each pixel covered by the object, from SUPERSAMPLE^2 points per pixel."""
    n = res * SUPERSAMPLE
    t = (np.arange(n, dtype=np.float64) + 0.5) / SUPERSAMPLE
    xs, ys = t[None, :], t[:, None]
    if shape == "circle":
        inside = (xs - x) ** 2 + (ys - y) ** 2 <= (s / 2) ** 2
    elif shape == "square":
        inside = (np.abs(xs - x) <= s / 2) & (np.abs(ys - y) <= s / 2)
    elif shape == "triangle":
        apex = y - 2 * s / 3
        inside = (ys <= y + s / 3) & (np.abs(xs - x) <= (ys - apex) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; allowed: {list(SHAPES)}")
    return inside.reshape(res, SUPERSAMPLE, res, SUPERSAMPLE).mean(axis=(1, 3))


def render(
    colour: str, shape: str, size: str, centres: Sequence[tuple[float, float]], resolution: int
) -> np.ndarray:
    """Draw objects of one colour, shape and size with centroids ``centres`` (pixels)."""
    s = SIZE_FRACTION[size] * resolution
    cov = np.zeros((resolution, resolution), np.float64)
    for x, y in centres:
        cov += _coverage(shape, s, float(x), float(y), resolution)
    rgb = np.asarray(BACKGROUND, np.float64) + np.minimum(cov, 1.0)[..., None] * (
        np.asarray(COLOURS[colour], np.float64) - np.asarray(BACKGROUND, np.float64)
    )
    return np.rint(rgb).astype(np.uint8)


def _apart(boxes: list[tuple[float, float, float, float]], gap: float) -> bool:
    for i in range(len(boxes)):
        for j in range(i):
            a, b = boxes[i], boxes[j]
            gx = max(b[0] - a[1], a[0] - b[1])
            gy = max(b[2] - a[3], a[2] - b[3])
            if gx < gap and gy < gap:
                return False
    return True


def _place(rng: np.random.Generator, shapes: Sequence[str], sides: Sequence[float], res: int):
    """Distinct sorted cells and centroids for objects ``shapes[k]`` of side ``sides[k]``."""
    count = len(shapes)
    extents = [_extents(shape, s) for shape, s in zip(shapes, sides)]
    for _ in range(_MAX_REGION_DRAWS):
        regions = np.sort(rng.choice(len(REGIONS), size=count, replace=False))
        ranges = [_centre_range(int(r), shape, s, res)
                  for r, shape, s in zip(regions, shapes, sides)]
        for _ in range(_MAX_PLACEMENT_TRIES if count > 1 else 1):
            centres = [(rng.uniform(x0, x1), rng.uniform(y0, y1)) for x0, x1, y0, y1 in ranges]
            boxes = [(x - left, x + right, y - up, y + down)
                     for (x, y), (left, right, up, down) in zip(centres, extents)]
            if _apart(boxes, GAP * res):
                return regions, centres
    raise RuntimeError(  # pragma: no cover
        f"could not place {list(shapes)} of sides {list(sides)} at {res}")


# ----------------------------------------------------------------------------- the source


class ShapesSource:
    """Random-access source of shapes examples (``len`` and ``[i]``; a grain MapDataset source).

    Example ``i`` depends only on ``(config.seed, i)``, so any index is produced identically in
    any order, on any host.
    """

    def __init__(self, config: ShapesConfig | None = None, **overrides):
        if config is None:
            config = ShapesConfig(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config

    def __len__(self) -> int:
        return self.config.num_examples

    def __repr__(self) -> str:
        return f"ShapesSource({self.config!r})"

    def __getitem__(self, index) -> dict:
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for ShapesSource of length {n}")
        return self.example(i)

    def example(self, i: int) -> dict:
        cfg = self.config
        res = cfg.resolution
        rng = np.random.default_rng([cfg.seed, i])
        if cfg.mixed:
            count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
            colours = [cfg.colours[k] for k in rng.choice(len(cfg.colours), count, replace=False)]
            shapes = [cfg.shapes[k] for k in rng.integers(len(cfg.shapes), size=count)]
            sizes = [cfg.sizes[k] for k in rng.integers(len(cfg.sizes), size=count)]
        else:
            colour = cfg.colours[rng.integers(len(cfg.colours))]
            shape = cfg.shapes[rng.integers(len(cfg.shapes))]
            size = cfg.sizes[rng.integers(len(cfg.sizes))]
            count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
            colours, shapes, sizes = [colour] * count, [shape] * count, [size] * count
        regions, centres = _place(rng, shapes, [SIZE_FRACTION[z] * res for z in sizes], res)
        names = [REGIONS[r] for r in regions]
        if cfg.mixed:  # objects never overlap, so their drawings combine by a maximum
            image = np.maximum.reduce([render(c, sh, z, [xy], res)
                                       for c, sh, z, xy in zip(colours, shapes, sizes, centres)])
            caption = " and ".join(  # in random order: the words must not say where
                make_caption(colours[k], shapes[k], sizes[k], [names[k]], cfg.caption_style)
                for k in rng.permutation(count))
        else:
            image = render(colour, shape, size, centres, res)
            caption = make_caption(colour, shape, size, names, cfg.caption_style)

        m = cfg.max_objects
        pad = lambda names_, values: np.array(  # noqa: E731
            [names_.index(v) for v in values] + [-1] * (m - count), np.int16)
        xy = np.full((2, m), np.nan, np.float32)
        xy[:, :count] = np.asarray(centres, np.float64).T
        objects = {
            "count": count,
            "colour": pad(COLOUR_NAMES, colours),
            "shape": pad(SHAPES, shapes),
            "size": pad(SIZES, sizes),
            "region": np.array(list(regions) + [-1] * (m - count), np.int16),
            "x": xy[0],
            "y": xy[1],
        }
        return {"image": image, "caption": caption, "objects": objects}


# ----------------------------------------------------------------------------- the checker


def _as_image(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(
            f"expected an RGB image [H, W, 3] on the 0..255 scale, got shape {img.shape}"
        )
    return img.astype(np.float32)


def pixel_labels(image) -> np.ndarray:
    """Per pixel, the index into ``COLOUR_NAMES`` of its palette colour, or -1 for background."""
    img = _as_image(image)
    bright = img.max(axis=-1)
    scaled = img * (255.0 / np.maximum(bright, 1.0))[..., None]
    d2 = ((scaled[..., None, :] - _PALETTE) ** 2).sum(-1)
    nearest = d2.argmin(-1)
    ok = (bright >= FOREGROUND_LEVEL * 255) & (d2.min(-1) <= COLOUR_TOLERANCE**2)
    return np.where(ok, nearest, -1)


def _default_min_area(h: int, w: int) -> int:
    return max(MIN_AREA_FLOOR, int(round(MIN_AREA_FRACTION * h * w)))


_EIGHT = np.ones((3, 3), bool)


def _components(labels: np.ndarray, colour: int, min_area: int) -> list[np.ndarray]:
    lab, n = ndimage.label(labels == colour, structure=_EIGHT)
    if n == 0:
        return []
    areas = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    keep = [k + 1 for k in np.argsort(-areas, kind="stable") if areas[k] >= min_area]
    return [lab == k for k in keep]


def _describe(img: np.ndarray, mask: np.ndarray, colour: int) -> dict:
    """Soft geometry of one component: centroid, shape and size (see module doc)."""
    h, w = mask.shape
    window = ndimage.binary_dilation(mask, structure=_EIGHT)
    c = _PALETTE[colour] - np.asarray(BACKGROUND, np.float32)
    proj = ((img - np.asarray(BACKGROUND, np.float32)) @ c) / float(c @ c)
    peak = float(np.percentile(proj[mask], 75))
    cov = np.where(window, np.maximum(proj / max(peak, 1e-3), 0.0), 0.0)
    area = float(cov.sum())
    rows, cols = cov.sum(axis=1), cov.sum(axis=0)
    wid, hei = float(rows.max()), float(cols.max())
    fill = area / max(wid * hei, 1e-6)
    yc = np.arange(h) + 0.5
    xc = np.arange(w) + 0.5
    my = float(rows @ yc) / area
    mx = float(cols @ xc) / area
    var = float(rows @ (yc - my) ** 2) / area
    skew = float(rows @ (yc - my) ** 3) / area / max(var, 1e-6) ** 1.5
    if fill + TRIANGLE_SKEW_WEIGHT * skew < TRIANGLE_SCORE:
        shape = "triangle"
    elif fill >= SQUARE_FILL:
        shape = "square"
    else:
        shape = "circle"
    size = "large" if math.sqrt(wid * hei) >= LARGE_SIZE * min(h, w) else "small"
    return {"centroid": (mx, my), "shape": shape, "size": size, "fill": fill, "skew": skew,
            "area": area}


def analyse(image, min_area: int | None = None) -> dict:
    """Everything the checker sees: the dominant colour and its objects, largest first.

    Returns ``{"colour": name | None, "pixels": {colour: object pixels}, "objects": [{"centroid",
    "shape", "size", "region", "fill", "skew", "area"}], "total_count": objects of any colour}``.
    """
    img = _as_image(image)
    h, w = img.shape[:2]
    min_area = _default_min_area(h, w) if min_area is None else int(min_area)
    labels = pixel_labels(img)
    comps = {c: _components(labels, c, min_area) for c in range(len(COLOUR_NAMES))}
    pixels = {COLOUR_NAMES[c]: int(sum(m.sum() for m in ms)) for c, ms in comps.items() if ms}
    total = sum(len(ms) for ms in comps.values())
    if not pixels:
        return {"colour": None, "pixels": {}, "objects": [], "total_count": 0}
    colour = max(pixels, key=pixels.get)
    ci = COLOUR_NAMES.index(colour)
    objects = []
    for m in comps[ci]:
        d = _describe(img, m, ci)
        d["region"] = _region_hw(*d["centroid"], h, w)
        objects.append(d)
    return {"colour": colour, "pixels": pixels, "objects": objects, "total_count": total}


def _region_hw(x: float, y: float, h: int, w: int) -> str:
    col = min(max(int(3 * x // w), 0), 2)
    row = min(max(int(3 * y // h), 0), 2)
    return REGIONS[3 * row + col]


def check_image(
    image, colour: str, shape: str, count: int | None = None, *, min_area: int | None = None
) -> dict:
    """Grade one image against a colour, a shape and optionally an object count.

    Returns a dict: ``colour``, ``shape``, ``size``, ``region`` (detected: the dominant colour
    and the shape, size and cell of its largest object; None on an empty image), ``count``
    (objects of the dominant colour), ``centroids`` / ``shapes`` / ``sizes`` / ``regions`` (per
    object, largest first), ``colour_ok``, ``shape_ok``, ``count_ok`` (None when ``count`` is
    None) and ``ok`` (all the requested checks pass).
    """
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; allowed: {list(COLOUR_NAMES)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; allowed: {list(SHAPES)}")
    a = analyse(image, min_area)
    objs = a["objects"]
    first = objs[0] if objs else {}
    out = {
        "colour": a["colour"],
        "shape": first.get("shape"),
        "size": first.get("size"),
        "region": first.get("region"),
        "count": len(objs),
        "centroids": [o["centroid"] for o in objs],
        "shapes": [o["shape"] for o in objs],
        "sizes": [o["size"] for o in objs],
        "regions": [o["region"] for o in objs],
    }
    out["colour_ok"] = a["colour"] == colour
    out["shape_ok"] = out["shape"] == shape
    out["count_ok"] = None if count is None else len(objs) == int(count)
    out["ok"] = out["colour_ok"] and out["shape_ok"] and out["count_ok"] is not False
    return out


def count_objects(image, min_area: int | None = None) -> int:
    """Objects of any palette colour (connected components of at least ``min_area`` pixels)."""
    img = _as_image(image)
    h, w = img.shape[:2]
    min_area = _default_min_area(h, w) if min_area is None else int(min_area)
    labels = pixel_labels(img)
    return sum(len(_components(labels, c, min_area)) for c in range(len(COLOUR_NAMES)))


def object_centroids(image, colour: str, min_area: int | None = None) -> list[tuple[float, float]]:
    """Centroids ``(x, y)`` in pixels of the objects of ``colour``, largest first."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; allowed: {list(COLOUR_NAMES)}")
    img = _as_image(image)
    h, w = img.shape[:2]
    min_area = _default_min_area(h, w) if min_area is None else int(min_area)
    ci = COLOUR_NAMES.index(colour)
    return [_describe(img, m, ci)["centroid"] for m in _components(pixel_labels(img), ci, min_area)]


def _name(value, names: Sequence[str]) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    v = np.asarray(value).reshape(-1)
    if v.size == 0 or int(v[0]) < 0:
        return None
    return names[int(v[0])]


def truth_names(truth: Mapping) -> dict:
    """Normalise a ground truth to names: an ``objects`` dict of a ShapesSource example (indices)
    or a ``parse_caption`` result (names). Returns ``{"count", "colour", "shape", "size",
    "regions"}`` with ``size`` None / ``regions`` empty where unknown."""
    count = int(np.asarray(truth["count"]))
    colours = np.asarray(truth["colour"]).reshape(-1)
    if colours.dtype.kind in "iu" and len(set(colours[:count].tolist())) > 1:
        raise ValueError("truth_names: a mixed scene (objects of different colours) has no single "
                         "colour to grade; check each object with object_centroids instead")
    regions = truth.get("regions", truth.get("region"))
    if regions is None:
        regions = []
    elif isinstance(regions, np.ndarray) or (len(regions) and not isinstance(regions[0], str)):
        regions = [REGIONS[int(r)] for r in np.asarray(regions).reshape(-1) if int(r) >= 0]
    return {
        "count": count,
        "colour": _name(truth["colour"], COLOUR_NAMES),
        "shape": _name(truth["shape"], SHAPES),
        "size": _name(truth.get("size"), SIZES),
        "regions": list(regions),
    }


def caption_accuracy(images, truths, *, min_area: int | None = None) -> dict:
    """Rates at which ``images`` match their ground truths.

    ``truths``: a sequence of ``objects`` dicts or ``parse_caption`` results (one per image), or
    a batched ``objects`` dict (arrays with a leading batch axis). Returns ``{"n", "colour",
    "shape", "colour_shape", "count", "size", "region", "all"}``: ``colour_shape`` is the rate
    of images right in both colour and shape; ``size`` and ``region`` are over the images whose
    truth states them (None if none does; region compares the multiset of object cells); ``all``
    requires every stated attribute.
    """
    images = list(images) if not isinstance(images, np.ndarray) else images
    if isinstance(truths, Mapping):
        n = len(np.asarray(truths["count"]).reshape(-1))
        truths = [{k: np.asarray(v)[i] for k, v in truths.items()} for i in range(n)]
    truths = list(truths)
    if len(images) != len(truths):
        raise ValueError(f"caption_accuracy: {len(images)} images but {len(truths)} truths")
    if not truths:
        raise ValueError("caption_accuracy: no images")
    hits = {k: [] for k in ("colour", "shape", "colour_shape", "count", "size", "region", "all")}
    for image, truth in zip(images, truths):
        t = truth_names(truth)
        r = check_image(image, t["colour"], t["shape"], t["count"], min_area=min_area)
        ok = r["colour_ok"] and r["shape_ok"] and r["count_ok"]
        hits["colour"].append(r["colour_ok"])
        hits["shape"].append(r["shape_ok"])
        hits["colour_shape"].append(r["colour_ok"] and r["shape_ok"])
        hits["count"].append(r["count_ok"])
        if t["size"] is not None:
            hits["size"].append(r["size"] == t["size"])
            ok = ok and r["size"] == t["size"]
        if t["regions"]:
            hits["region"].append(sorted(r["regions"]) == sorted(t["regions"]))
            ok = ok and hits["region"][-1]
        hits["all"].append(ok)
    out: dict[str, Any] = {"n": len(truths)}
    for k, v in hits.items():
        out[k] = float(np.mean(v)) if v else None
    return out
