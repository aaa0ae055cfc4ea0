"""(seed, index) in; scenes of coloured shapes with exact captions out, as images or a JPEG corpus."""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

# Object colours, well separated from each other (>= 85 apart in RGB) and from every
# background colour (>= 90 apart), so an object never blends into its background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 80, 230),
    "yellow": (250, 215, 30),
    "purple": (140, 50, 190),
    "orange": (250, 130, 20),
    "cyan": (40, 210, 230),
    "pink": (245, 110, 185),
    "brown": (140, 80, 25),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}

BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "light grey": (185, 185, 185),
    "dark grey": (52, 52, 58),
    "beige": (222, 206, 170),
    "slate": (96, 112, 140),
    "lavender": (196, 186, 226),
}

# Pairs with enough contrast that a gradient or stripes between them is visible.
BACKGROUND_PAIRS: tuple[tuple[str, str], ...] = (
    ("light grey", "dark grey"),
    ("beige", "slate"),
    ("lavender", "grey"),
    ("light grey", "slate"),
    ("beige", "dark grey"),
)

PATTERNS = ("plain", "gradient", "stripes", "noise")
PATTERN_WEIGHTS = (0.4, 0.2, 0.2, 0.2)
NOISE_VARIANTS = 4

SHAPES = ("circle", "square", "rectangle", "triangle", "diamond", "star", "cross", "hexagon")

# Diameter of an object's bounding circle as a fraction of the image side, per size class.
SIZE_CLASSES: dict[str, tuple[float, float]] = {
    "small": (0.14, 0.18),
    "medium": (0.22, 0.28),
    "large": (0.32, 0.40),
}
SIZE_ORDER = ("small", "medium", "large")
SIZE_WORDS = {"small": "small", "medium": "medium-sized", "large": "large"}

MAX_OBJECTS = 5
GAP = 0.02  # clearance between bounding circles and from the image edge, fraction of side
PLACE_TRIES = 64  # candidate centres drawn at once per object
LAYOUT_TRIES = 16  # whole-layout restarts before giving up

DETAILS = ("short", "list", "count", "sized", "placed")
TWINS = ("none", "colour")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")

MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.string()),  # relative to the corpus root
        ("caption", pa.list_(pa.string())),
        ("n_objects", pa.int64()),
        ("shapes", pa.list_(pa.string())),
        ("colours", pa.list_(pa.string())),
        ("sizes", pa.list_(pa.string())),  # size classes
        ("diameters", pa.list_(pa.float64())),  # fraction of the image side
        ("xs", pa.list_(pa.float64())),  # centres, fraction of the width, 0 = left
        ("ys", pa.list_(pa.float64())),  # centres, fraction of the height, 0 = top
        ("background", pa.string()),
        ("twin", pa.string()),  # group id shared by colour twins, null without twins
    ]
)


@dataclass(frozen=True)
class Obj:
    """One shape: ``x``, ``y`` are its centre in [0, 1] (y down), ``diameter`` the
    diameter of its bounding circle as a fraction of the image side (``diameter * size`` px)."""

    shape: str
    colour: str
    size: str  # size class: small, medium or large
    x: float
    y: float
    diameter: float

    @property
    def rgb(self) -> tuple[int, int, int]:
        return PALETTE[self.colour]


@dataclass(frozen=True)
class Background:
    """A plain colour, a two-colour gradient or stripes, or a mottled noise texture.

    ``rgb`` is the first (or only) colour, ``rgb2`` the second for gradients and stripes;
    ``variant`` picks the direction (0: changes top to bottom, 1: left to right) or,
    for noise, one of NOISE_VARIANTS fixed textures.
    """

    name: str
    pattern: str
    rgb: tuple[int, int, int]
    rgb2: tuple[int, int, int] | None = None
    variant: int = 0

    @property
    def phrase(self) -> str:
        return f"on {_article(self.name)} {self.name} background"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # in caption order: the first caption names them in this order
    background: Background
    captions: tuple[str, ...]  # 3 to 5 distinct captions, each true of the rendered image


def make_scene(
    seed: int,
    index: int,
    n_objects: int | None = None,
    distinct_sizes: bool = False,
    twin: bool = False,
    max_objects: int = MAX_OBJECTS,
) -> Scene:
    """Scene number ``index`` of the stream ``seed``; a pure function of its arguments.

    ``n_objects`` fixes the count (1 to 5, default random in 1..``max_objects``). ``distinct_sizes`` gives every
    object its own size class, so at most 3 objects. ``twin`` returns the colour twin of the
    scene: the same shapes, sizes, positions, background and caption wording, with one
    object's colour changed.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"make_scene: seed and index must be >= 0, got seed={seed} index={index}")
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"make_scene: max_objects must be in 1..{MAX_OBJECTS}, got {max_objects}")
    top = min(3, max_objects) if distinct_sizes else max_objects
    if n_objects is not None and not 1 <= n_objects <= top:
        raise ValueError(
            f"make_scene: n_objects must be in 1..{top} (distinct_sizes={distinct_sizes}), got {n_objects}"
        )
    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(1, top + 1)) if n_objects is None else n_objects
    kinds = _draw_kinds(rng, n)
    classes = _draw_classes(rng, n, distinct_sizes)
    objects = _place(rng, kinds, classes, distinct_sizes, where=f"seed={seed} index={index}")
    background = _draw_background(rng)
    if twin:
        objects = _recolour(np.random.default_rng([seed, index, 1]), objects)
    # Captions are drawn last, and their draws depend only on the object count, so a twin
    # gets the same orders and details as its original and differs only in a colour word.
    return Scene(objects, background, _captions(rng, objects, background))


def caption_for(
    objects: Sequence[Obj], detail: str = "short", background: Background | None = None
) -> str:
    """A caption naming ``objects`` in the given order, true of any image that shows them.

    ``detail``: "short" (a red circle and a blue square), "list" (a red circle, a blue
    square), "count" (two objects: a red circle and a blue square), "sized" (adds size
    classes), "placed" (adds sizes and positions). ``background`` appends "on a ... background".
    """
    if detail not in DETAILS:
        raise ValueError(f"caption_for: unknown detail {detail!r}; expected one of {DETAILS}")
    if not objects:
        raise ValueError("caption_for: needs at least one object")
    sized = detail in ("sized", "placed")
    phrases = [_noun_phrase(o, sized) for o in objects]
    if detail == "placed":
        phrases = [f"{p} {_where(o)}" for p, o in zip(phrases, objects, strict=True)]
    if detail == "list":
        text = ", ".join(phrases)
    else:
        text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if detail == "count":
        noun = "object" if len(objects) == 1 else "objects"
        text = f"{NUMBER_WORDS[len(objects)]} {noun}: {text}"
    if background is not None:
        text += ("," if detail == "placed" else "") + " " + background.phrase
    return text


def render(scene: Scene, size: int = 224) -> Image.Image:
    """The scene as a (size, size) RGB image; shapes are drawn without anti-aliasing, so
    the pixel at an object's centre is exactly its palette colour."""
    image = _background_image(scene.background, size).copy()
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r = obj.x * size, obj.y * size, obj.diameter * size / 2
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=obj.rgb)
        else:
            points = _UNIT_POLYGONS[obj.shape] * r + (cx, cy)
            draw.polygon([tuple(p) for p in points.tolist()], fill=obj.rgb)
    return image


def write_corpus(
    out: str,
    n: int,
    seed: int = 0,
    size: int = 224,
    workers: int = 1,
    twins: str | None = None,
    quality: int = 90,
    max_objects: int = MAX_OBJECTS,
) -> str:
    """Write ``n`` scenes as ``out/images/scene-000042.jpg`` and ``out/manifest.parquet``.

    Byte-identical for the same arguments whatever ``workers`` is. With ``twins="colour"``
    scenes 2i and 2i+1 are colour twins sharing the ``twin`` id ``twin-00000i``; ``n`` must
    be even. ``max_objects`` caps the objects per scene (1 to 5). The manifest is written last, atomically, so one that exists names only images
    that exist. Returns the manifest path.
    """
    twins = "none" if twins is None else twins
    if twins not in TWINS:
        raise ValueError(f"write_corpus: unknown twins {twins!r}; expected one of {TWINS} or None")
    if n < 0 or (twins == "colour" and n % 2):
        raise ValueError(f"write_corpus: n must be >= 0 and even with twins='colour', got n={n}")
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"write_corpus: max_objects must be in 1..{MAX_OBJECTS}, got {max_objects}")
    jobs = [(out, seed, i, size, twins, quality, max_objects) for i in range(n)]
    if workers > 1:
        # spawn, not fork: callers may hold threads (Ray, BLAS) that fork would copy broken.
        with mp.get_context("spawn").Pool(workers) as pool:
            rows = pool.map(_write_one, jobs, chunksize=max(1, min(256, n // (4 * workers))))
    else:
        rows = [_write_one(job) for job in jobs]
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    path = os.path.join(out, "manifest.parquet")
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def place_objects(
    key: Sequence[int], kinds: Sequence[tuple[str, str]], diameters: Sequence[float]
) -> tuple[Obj, ...]:
    """Objects of the given (shape, colour) kinds at exactly the given diameters, placed
    without overlap at positions drawn from ``numpy.random.default_rng(key)``.

    The kinds' order is kept; sizes never shrink (a layout that finds no room restarts),
    so a caller controls every object's size rank and learns its position from ``x``, ``y``.
    """
    if len(kinds) != len(diameters) or not kinds:
        raise ValueError(f"place_objects: {len(kinds)} kinds for {len(diameters)} diameters")
    rng = np.random.default_rng(list(key))
    sizes = [float(d) for d in diameters]
    for _ in range(LAYOUT_TRIES * 4):
        centres: dict[int, tuple[float, float]] = {}
        for i in sorted(range(len(kinds)), key=lambda j: -sizes[j]):
            found = _find_spot(rng, sizes[i], centres, sizes)
            if found is None:
                break
            centres[i] = found
        if len(centres) == len(kinds):
            return tuple(
                Obj(shape, colour, size_class(sizes[i]), centres[i][0], centres[i][1], sizes[i])
                for i, (shape, colour) in enumerate(kinds)
            )
    raise RuntimeError(
        f"place_objects: no non-overlapping layout for diameters {sizes} after {LAYOUT_TRIES * 4} tries (key={list(key)})"
    )


def shape_area(shape: str) -> float:
    """Area of ``shape`` drawn in a bounding circle of diameter 1 (a circle: pi / 4)."""
    if shape == "circle":
        return float(np.pi / 4)
    if shape not in _UNIT_POLYGONS:
        raise ValueError(f"shape_area: unknown shape {shape!r}; expected one of {SHAPES}")
    x, y = _UNIT_POLYGONS[shape].T / 2
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def diameter_for_area(shape: str, area: float) -> float:
    """The bounding-circle diameter (fraction of the side) at which ``shape`` covers ``area`` of the image."""
    return float(np.sqrt(area / shape_area(shape)))


def size_class(diameter: float) -> str:
    """The size class (small, medium, large) whose diameter range is nearest ``diameter``."""
    return min(SIZE_ORDER, key=lambda c: abs(diameter - sum(SIZE_CLASSES[c]) / 2))


def plain_background(name: str) -> Background:
    """A plain background of one of BACKGROUND_COLOURS."""
    if name not in BACKGROUND_COLOURS:
        raise ValueError(f"plain_background: unknown colour {name!r}; expected one of {sorted(BACKGROUND_COLOURS)}")
    return Background(name, "plain", BACKGROUND_COLOURS[name])


def render_objects(objects: Sequence[Obj], background: Background, size: int = 224) -> Image.Image:
    """``objects`` drawn on ``background`` as a (size, size) RGB image (see ``render``)."""
    return render(Scene(tuple(objects), background, ()), size)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clipscan.data.scenes", description="Write a synthetic scene corpus."
    )
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=224, help="image side in px")
    parser.add_argument("--workers", type=int, default=1, help="processes")
    parser.add_argument("--twins", choices=TWINS, default="none")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--max-objects", type=int, default=MAX_OBJECTS, help="objects per scene at most")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = write_corpus(
        args.out, args.n, args.seed, args.size, args.workers, args.twins, args.quality,
        args.max_objects,
    )
    elapsed = time.perf_counter() - start
    print(path)
    print(f"{args.n} images in {elapsed:.2f} s: {args.n / elapsed:.0f} images/s")
    return 0


# --- internals -------------------------------------------------------------------------


def _regular(k: int, start_deg: float, radius: float = 1.0) -> np.ndarray:
    angles = np.deg2rad(start_deg + 360.0 * np.arange(k) / k)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    outer, inner = _regular(5, -90), _regular(5, -54, 0.45)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


def _cross(arm: float = 0.7, half_width: float = 0.7 / 3) -> np.ndarray:
    a, w = arm, half_width
    quarter = [(-w, -a), (w, -a), (w, -w)]  # one arm's outline; the others are rotations
    points = []
    for k in range(4):
        c, s = np.cos(k * np.pi / 2), np.sin(k * np.pi / 2)
        points += [(c * x - s * y, s * x + c * y) for x, y in quarter]
    return np.array(points)


# Vertices within the unit circle (y down), scaled by the radius and shifted at draw time.
_UNIT_POLYGONS: dict[str, np.ndarray] = {
    "square": _regular(4, 45),
    "rectangle": np.array([[-0.9, -0.45], [0.9, -0.45], [0.9, 0.45], [-0.9, 0.45]]),
    "triangle": _regular(3, -90),
    "diamond": _regular(4, 0),
    "star": _star(),
    "cross": _cross(),
    "hexagon": _regular(6, 0),
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(obj: Obj, sized: bool) -> str:
    words = (
        f"{SIZE_WORDS[obj.size]} {obj.colour} {obj.shape}" if sized else f"{obj.colour} {obj.shape}"
    )
    return f"{_article(words)} {words}"


def _where(obj: Obj) -> str:
    """Position of the object's centre by thirds of the image."""
    across = "left" if obj.x < 1 / 3 else "right" if obj.x > 2 / 3 else ""
    down = "top" if obj.y < 1 / 3 else "bottom" if obj.y > 2 / 3 else ""
    if across and down:
        return f"at the {down} {across}"
    if across:
        return f"on the {across}"
    if down:
        return f"at the {down}"
    return "in the centre"


def _draw_kinds(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """n distinct (shape, colour) pairs, so every caption names each object unambiguously."""
    colours = list(PALETTE)
    kinds: list[tuple[str, str]] = []
    while len(kinds) < n:
        kind = (SHAPES[rng.integers(len(SHAPES))], colours[rng.integers(len(colours))])
        if kind not in kinds:
            kinds.append(kind)
    return kinds


def _draw_classes(rng: np.random.Generator, n: int, distinct: bool) -> list[str]:
    if distinct:
        return [SIZE_ORDER[i] for i in rng.permutation(3)[:n]]
    return [SIZE_ORDER[i] for i in rng.integers(0, 3, size=n)]


def _place(
    rng: np.random.Generator,
    kinds: list[tuple[str, str]],
    classes: list[str],
    distinct: bool,
    where: str,
) -> tuple[Obj, ...]:
    """Non-overlapping centres by rejection sampling, largest objects first.

    Bounding circles keep GAP apart and GAP from the edges. When an object finds no room
    it shrinks one size class (unless sizes must stay distinct), then the layout restarts.
    """
    for _ in range(LAYOUT_TRIES):
        classes_now = list(classes)
        diameters = [float(rng.uniform(*SIZE_CLASSES[c])) for c in classes_now]
        centres: dict[int, tuple[float, float]] = {}
        for i in sorted(range(len(kinds)), key=lambda j: -diameters[j]):
            while True:
                found = _find_spot(rng, diameters[i], centres, diameters)
                if found is not None:
                    centres[i] = found
                    break
                level = SIZE_ORDER.index(classes_now[i])
                if distinct or level == 0:
                    break
                classes_now[i] = SIZE_ORDER[level - 1]
                diameters[i] = float(rng.uniform(*SIZE_CLASSES[classes_now[i]]))
            if i not in centres:
                break
        if len(centres) == len(kinds):
            return tuple(
                Obj(shape, colour, classes_now[i], centres[i][0], centres[i][1], diameters[i])
                for i, (shape, colour) in enumerate(kinds)
            )
    raise RuntimeError(
        f"make_scene: no non-overlapping layout for {len(kinds)} objects of sizes {classes} "
        f"after {LAYOUT_TRIES} tries ({where})"
    )


def _find_spot(
    rng: np.random.Generator,
    diameter: float,
    centres: dict[int, tuple[float, float]],
    diameters: list[float],
) -> tuple[float, float] | None:
    lo = diameter / 2 + GAP
    candidates = rng.uniform(lo, 1 - lo, size=(PLACE_TRIES, 2))
    ok = np.ones(PLACE_TRIES, dtype=bool)
    for j, (x, y) in centres.items():
        need = (diameter + diameters[j]) / 2 + GAP
        ok &= np.hypot(candidates[:, 0] - x, candidates[:, 1] - y) >= need
    hits = np.flatnonzero(ok)
    if hits.size == 0:
        return None
    x, y = candidates[hits[0]]
    return float(x), float(y)


def _draw_background(rng: np.random.Generator) -> Background:
    pattern = PATTERNS[rng.choice(len(PATTERNS), p=PATTERN_WEIGHTS)]
    names = list(BACKGROUND_COLOURS)
    if pattern in ("plain", "noise"):
        name = names[rng.integers(len(names))]
        rgb = BACKGROUND_COLOURS[name]
        if pattern == "plain":
            return Background(name, pattern, rgb)
        return Background(f"noisy {name}", pattern, rgb, None, int(rng.integers(NOISE_VARIANTS)))
    a, b = BACKGROUND_PAIRS[rng.integers(len(BACKGROUND_PAIRS))]
    if rng.integers(2):
        a, b = b, a
    variant = int(rng.integers(2))
    label = f"{a} to {b} gradient" if pattern == "gradient" else f"{a} and {b} striped"
    return Background(label, pattern, BACKGROUND_COLOURS[a], BACKGROUND_COLOURS[b], variant)


def _recolour(rng: np.random.Generator, objects: tuple[Obj, ...]) -> tuple[Obj, ...]:
    """Change one object's colour to one not already used in the scene."""
    k = int(rng.integers(len(objects)))
    used = {o.colour for o in objects}
    free = [c for c in PALETTE if c not in used]
    colour = free[rng.integers(len(free))]
    return tuple(replace(o, colour=colour) if i == k else o for i, o in enumerate(objects))


def _captions(
    rng: np.random.Generator, objects: tuple[Obj, ...], background: Background
) -> tuple[str, ...]:
    """3 to 5 distinct captions: the full one in scene order, then others in shuffled orders."""
    n = len(objects)

    def shuffled() -> list[Obj]:
        return [objects[i] for i in rng.permutation(n)]

    candidates = [
        caption_for(objects, "sized", background),
        caption_for(shuffled(), "placed", background),
        caption_for(shuffled(), "list"),
        caption_for(shuffled(), "count"),
        caption_for(shuffled(), "short", background if rng.integers(2) else None),
    ]
    unique = list(dict.fromkeys(candidates))
    keep = int(rng.integers(3, 6))
    return tuple(unique[:keep])


@lru_cache(maxsize=512)
def _background_image(background: Background, size: int) -> Image.Image:
    """Rendered once per (background, size) and copied per scene: building a gradient or
    noise texture costs more than drawing the shapes and encoding the JPEG together."""
    rgb = np.asarray(background.rgb, dtype=np.float32)
    if background.pattern == "plain":
        return Image.new("RGB", (size, size), background.rgb)
    if background.pattern == "noise":
        # Mottled texture: coarse noise upsampled, +-16 levels, seeded by colour and variant.
        noise_rng = np.random.default_rng([*background.rgb, background.variant])
        coarse = noise_rng.uniform(-16, 16, size=(28, 28, 1)).astype(np.float32)
        pixels = np.clip(rgb + coarse, 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, "RGB").resize((size, size), Image.Resampling.BILINEAR)
    assert background.rgb2 is not None
    rgb2 = np.asarray(background.rgb2, dtype=np.float32)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    if background.pattern == "stripes":
        t = ((np.arange(size) * 8 // size) % 2).astype(np.float32)
    line = (1 - t)[:, None] * rgb + t[:, None] * rgb2  # (size, 3) along the varying axis
    pixels = np.broadcast_to(line[:, None, :], (size, size, 3))  # varies down the rows
    if background.variant == 1:
        pixels = pixels.transpose(1, 0, 2)  # varies across the columns
    return Image.fromarray(np.ascontiguousarray(np.rint(pixels).astype(np.uint8)), "RGB")


def _write_one(job: tuple[str, int, int, int, str, int, int]) -> dict[str, object]:
    out, seed, i, size, twins, quality, max_objects = job
    if twins == "colour":
        scene, twin_id = make_scene(seed, i - i % 2, twin=bool(i % 2), max_objects=max_objects), f"twin-{i // 2:06d}"
    else:
        scene, twin_id = make_scene(seed, i, max_objects=max_objects), None
    buffer = io.BytesIO()
    render(scene, size).save(buffer, "JPEG", quality=quality)
    scene_id = f"scene-{i:06d}"
    relative = f"images/{scene_id}.jpg"
    with open(os.path.join(out, relative), "wb") as f:
        f.write(buffer.getbuffer())
    objects = scene.objects
    return {
        "id": scene_id,
        "image": relative,
        "caption": list(scene.captions),
        "n_objects": len(objects),
        "shapes": [o.shape for o in objects],
        "colours": [o.colour for o in objects],
        "sizes": [o.size for o in objects],
        "diameters": [o.diameter for o in objects],
        "xs": [o.x for o in objects],
        "ys": [o.y for o in objects],
        "background": scene.background.name,
        "twin": twin_id,
    }


if __name__ == "__main__":
    raise SystemExit(main())
