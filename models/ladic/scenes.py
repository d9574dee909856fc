"""The procedural "Scenes" captioning data set (spec: docs/scenes.md).

No captioned photo data and no pretrained captioner can be installed here, so the
default model learns from generated scenes whose content is known exactly. Everything
is a pure function of a fixed seed: no images are committed, and the same split is
rebuilt bit for bit on any machine. Captions are tied to a small fixed vocabulary so
that any caption (a reference or a model's output) can be parsed back into
(colour, shape, place) triples and scored for exact semantic accuracy.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------
# Vocabulary and constants (fixed by SCENES.md; changing them breaks comparability)
# ---------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

SIZES: tuple[str, ...] = ("small", "large")

# Object extent as a fraction of the canvas side, per size.
SIZE_EXTENTS: dict[str, tuple[float, float]] = {"small": (0.11, 0.15), "large": (0.22, 0.30)}

# Canonical place phrase per grid cell (row-major, 0 = top left).
PLACES: dict[int, str] = {
    0: "in the top left",
    1: "at the top",
    2: "in the top right",
    3: "on the left",
    4: "in the center",
    5: "on the right",
    6: "in the bottom left",
    7: "at the bottom",
    8: "in the bottom right",
}

# The place as it appears in a (colour, shape, place) triple: the phrase without
# its preposition and article, so paraphrases map to the same value.
PLACE_NAMES: dict[int, str] = {cell: " ".join(p.split()[2:]) for cell, p in PLACES.items()}
CELL_OF_PLACE: dict[str, int] = {name: cell for cell, name in PLACE_NAMES.items()}
CORNER_CELLS: frozenset[int] = frozenset({0, 2, 6, 8})

# Colour-shape pairs that never occur in train/val/test-seen (compositional test).
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "star"),
    ("blue", "triangle"),
    ("yellow", "cross"),
    ("purple", "circle"),
    ("green", "diamond"),
    ("orange", "square"),
)

SPLIT_SIZES: dict[str, int] = {"train": 20000, "val": 1000, "test-seen": 1000, "test-novel": 1000}

# One seed per split, so val and test never replay the train stream.
SPLIT_SEEDS: dict[str, int] = {
    "train": 20_250_101,
    "val": 20_250_202,
    "test-seen": 20_250_303,
    "test-novel": 20_250_404,
}

# Muted backgrounds, never captioned. Chosen so white and black objects still
# contrast with the lightest and darkest of them.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "light grey": (180, 180, 180),
    "beige": (205, 192, 165),
    "dark grey": (80, 80, 80),
    "pale blue": (165, 188, 212),
}

# Bump when generation or rendering changes, so stale caches are not reused.
DATA_VERSION = 1

MAX_REFERENCE_TOKENS = 33
COLOUR_JITTER = 15
# Keep a little air between an object and its cell border so anti-aliasing never
# bleeds into the neighbouring cell.
CELL_MARGIN = 0.005
NOISE_STD = 3.0
SUPERSAMPLE = 4

_SIZE_SYNONYMS = {"large": "big", "small": "tiny"}
_LEADS = {
    1: ("there", "is"),
    2: ("there", "are", "two", "shapes", ":"),
    3: ("there", "are", "three", "shapes", ":"),
}

# Every token any reference can contain; punctuation is its own token.
VOCABULARY: list[str] = sorted(
    {
        "a",
        "and",
        "there",
        "is",
        "are",
        "two",
        "three",
        "shapes",
        "in",
        "the",
        "at",
        "on",
        "corner",
        "top",
        "bottom",
        "left",
        "right",
        "center",
        "upper",
        "lower",
        "middle",
        ",",
        ".",
        ":",
    }
    | set(SIZES)
    | set(_SIZE_SYNONYMS.values())
    | set(COLOURS)
    | set(SHAPES)
)

_HELD_OUT = frozenset(HELD_OUT_PAIRS)
_ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
_SEEN_PAIRS = tuple(p for p in _ALL_PAIRS if p not in _HELD_OUT)


# ---------------------------------------------------------------------------
# Scene types
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One shape; geometry is stored so rendering needs no randomness of its own."""

    shape: str
    colour: str
    size: str
    cell: int
    rgb: tuple[int, int, int]
    extent: float  # bounding box side, fraction of the canvas side
    dx: float  # jitter of the centre from the cell centre, fraction of the side
    dy: float

    @property
    def place(self) -> str:
        """Place name as used in triples (e.g. "top left")."""
        return PLACE_NAMES[self.cell]

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.place)


@dataclass(frozen=True)
class Scene:
    """A full image description; objects are in reading order (by cell)."""

    background: str
    background_rgb: tuple[int, int, int]
    noise_seed: int
    objects: tuple[SceneObject, ...]

    def triples(self) -> set[tuple[str, str, str]]:
        """The ground truth that captions are scored against."""
        return {o.triple for o in self.objects}


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------


def _max_jitter(extent: float) -> float:
    """Largest centre offset that keeps the object's box inside its cell."""
    return max(0.0, (1.0 / 3.0 - extent) / 2.0 - CELL_MARGIN)


def _make_object(rng: np.random.Generator, cell: int, pair: tuple[str, str]) -> SceneObject:
    colour, shape = pair
    size = SIZES[int(rng.integers(len(SIZES)))]
    low, high = SIZE_EXTENTS[size]
    extent = float(rng.uniform(low, high))
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    r, g, b = (int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))
    limit = _max_jitter(extent)
    dx, dy = (float(v) for v in rng.uniform(-limit, limit, size=2))
    return SceneObject(shape, colour, size, cell, (r, g, b), extent, dx, dy)


def _draw_pairs(rng: np.random.Generator, count: int, novel: bool) -> list[tuple[str, str]]:
    """Seen splits draw from the 42 allowed pairs; test-novel forces one held-out pair
    at a random position and leaves the others unrestricted."""
    if not novel:
        return [_SEEN_PAIRS[int(i)] for i in rng.integers(len(_SEEN_PAIRS), size=count)]
    pairs = [_ALL_PAIRS[int(i)] for i in rng.integers(len(_ALL_PAIRS), size=count)]
    pairs[int(rng.integers(count))] = HELD_OUT_PAIRS[int(rng.integers(len(HELD_OUT_PAIRS)))]
    return pairs


def _make_scene(rng: np.random.Generator, novel: bool) -> Scene:
    names = list(BACKGROUNDS)
    background = names[int(rng.integers(len(names)))]
    noise_seed = int(rng.integers(0, 2**31 - 1))
    count = int(rng.integers(1, 4))
    cells = sorted(int(c) for c in rng.choice(9, size=count, replace=False))
    pairs = _draw_pairs(rng, count, novel)
    objects = tuple(_make_object(rng, cell, pair) for cell, pair in zip(cells, pairs))
    return Scene(background, BACKGROUNDS[background], noise_seed, objects)


def split_count(split: str, count: int | None) -> int:
    """How many images of `split` a `count` asks for: the whole split for None, and no
    more than the whole split (a split is a defined set; drawing on would make a larger
    one that no result should be reported on)."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SIZES)}")
    full = SPLIT_SIZES[split]
    if count is None:
        return full
    if count < 0:
        raise ValueError(f"a count of images must be >= 0, got {count}")
    return min(count, full)


def generate_split(split: str, count: int | None = None) -> list[Scene]:
    """The scenes of a split, or its first `count` (at most the whole split). Scenes are
    drawn one after another from one stream, so a smaller `count` gives a prefix of the
    full split."""
    n = split_count(split, count)
    rng = np.random.default_rng(SPLIT_SEEDS[split])
    novel = split == "test-novel"
    return [_make_scene(rng, novel) for _ in range(n)]


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def _star_points(cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    """Five-point star; shifted down so its bounding box is centred like the others."""
    inner = 0.42 * half
    shift = half * (1.0 - np.cos(np.pi / 5)) / 2.0
    points = []
    for k in range(10):
        radius = half if k % 2 == 0 else inner
        angle = -np.pi / 2 + k * np.pi / 5
        points.append((cx + radius * np.cos(angle), cy + shift + radius * np.sin(angle)))
    return points


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int) -> None:
    cx = ((obj.cell % 3) + 0.5) / 3.0 + obj.dx
    cy = ((obj.cell // 3) + 0.5) / 3.0 + obj.dy
    cx, cy, h = cx * side, cy * side, obj.extent * side / 2.0
    fill = obj.rgb
    box = [cx - h, cy - h, cx + h, cy + h]
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(box, fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif obj.shape == "star":
        draw.polygon(_star_points(cx, cy, h), fill=fill)
    elif obj.shape == "diamond":
        # Narrower than tall, so it never reads as a square turned slightly.
        w = 0.72 * h
        draw.polygon([(cx, cy - h), (cx + w, cy), (cx, cy + h), (cx - w, cy)], fill=fill)
    elif obj.shape == "cross":
        a = 0.36 * h  # half arm thickness: thick arms survive downsampling
        draw.rectangle([cx - h, cy - a, cx + h, cy + a], fill=fill)
        draw.rectangle([cx - a, cy - h, cx + a, cy + h], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, size: int = 128, noise: bool = True) -> np.ndarray:
    """Render a scene to uint8 [size, size, 3]. Drawn at 4x and box-downsampled for
    anti-aliasing; the faint noise is seeded by the scene, so pixels are deterministic."""
    side = size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), scene.background_rgb)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, side)
    pixels = np.asarray(image.reduce(SUPERSAMPLE), dtype=np.uint8)
    if not noise:
        return pixels.copy()
    rng = np.random.default_rng(scene.noise_seed)
    grain = rng.normal(0.0, NOISE_STD, size=pixels.shape).astype(np.float32)
    return np.clip(pixels.astype(np.float32) + grain, 0, 255).round().astype(np.uint8)


def default_cache_dir() -> Path:
    """models/data/: git-ignored, next to the ladic package."""
    return Path(__file__).resolve().parent.parent / "data"


def _cache_path(cache_dir: Path, split: str, count: int, size: int) -> Path:
    return cache_dir / f"scenes-v{DATA_VERSION}-{split}-{count}-{size}px.npy"


def _render_to_file(scenes: list[Scene], size: int, path: Path) -> None:
    """Render straight into a .npy memmap (the train split is ~1 GB at 128 px) and
    move it into place only when complete, so an interrupted run leaves no bad cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
    out = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.uint8, shape=(len(scenes), size, size, 3)
    )
    for i, scene in enumerate(scenes):
        out[i] = render(scene, size)
    out.flush()
    del out
    os.replace(tmp, path)


def render_split(
    split: str,
    size: int = 128,
    count: int | None = None,
    cache_dir: Path | None = None,
    *,
    mmap: bool = False,
) -> np.ndarray:
    """All images of a split as uint8 [N, size, size, 3], cached as .npy.

    A prefix (`count` smaller than the split) is sliced from the full split's cache
    when that exists. `mmap=True` returns a read-only memory map instead of loading.
    """
    n = split_count(split, count)
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    full = SPLIT_SIZES[split]
    mode = "r" if mmap else None
    full_path = _cache_path(cache_dir, split, full, size)
    if n < full and full_path.exists():
        return np.load(full_path, mmap_mode=mode)[:n]
    path = _cache_path(cache_dir, split, n, size)
    if not path.exists():
        _render_to_file(generate_split(split, n), size, path)
    return np.load(path, mmap_mode=mode)


# ---------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Style:
    """One paraphrase: which of the allowed transformations SCENES.md permits apply."""

    size_word: str = "keep"  # keep | synonym | omit
    upper_lower: bool = False  # upper/lower for top/bottom (corner places only)
    middle: bool = False  # "in the middle" for "in the center"
    corners: tuple[bool, ...] = (False, False, False)  # "corner" after corner places
    reverse: bool = False
    lead: bool = False


def tokenize(text: str) -> list[str]:
    """Lower-case words and `,` `.` `:` as separate tokens; anything else is dropped."""
    return re.findall(r"[a-z]+|[,.:]", text.lower())


def _place_words(cell: int, style: _Style, corner: bool) -> list[str]:
    words = PLACES[cell].split()
    if cell == 4 and style.middle:
        words = ["in", "the", "middle"]
    if cell in CORNER_CELLS:
        if style.upper_lower:
            words = [{"top": "upper", "bottom": "lower"}.get(w, w) for w in words]
        if corner:
            words.append("corner")
    return words


def _object_words(obj: SceneObject, style: _Style, corner: bool) -> list[str]:
    words = ["a"]
    if style.size_word == "keep":
        words.append(obj.size)
    elif style.size_word == "synonym":
        words.append(_SIZE_SYNONYMS[obj.size])
    return words + [obj.colour, obj.shape] + _place_words(obj.cell, style, corner)


def _join(phrases: list[str]) -> str:
    """`A`, `A and B`, `A, B and C`."""
    if len(phrases) < 3:
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _caption(scene: Scene, style: _Style) -> str:
    objects = list(scene.objects)
    corners = list(style.corners[: len(objects)])
    if style.reverse:
        objects.reverse()
        corners.reverse()
    phrases = [" ".join(_object_words(o, style, c)) for o, c in zip(objects, corners)]
    body = _join(phrases) + "."
    if not style.lead:
        return body
    lead = " ".join(_LEADS[len(objects)]).replace(" :", ":")
    return f"{lead} {body}"


def canonical_caption(scene: Scene) -> str:
    """Reference 1: sizes stated, canonical places, reading order, no lead."""
    return _caption(scene, _Style())


def _random_style(rng: np.random.Generator) -> _Style:
    u = rng.random(8)
    size_word = "omit" if u[0] < 0.3 else ("synonym" if u[0] < 0.6 else "keep")
    corners = tuple(bool(v < 0.4) for v in rng.random(3))
    return _Style(
        size_word=size_word,
        upper_lower=bool(u[1] < 0.35),
        middle=bool(u[2] < 0.5),
        corners=corners,
        reverse=bool(u[3] < 0.35),
        lead=bool(u[4] < 0.35),
    )


def _fit_length(scene: Scene, style: _Style) -> str:
    """Drop `corner` words (last first) until the caption fits MAX_REFERENCE_TOKENS:
    three corner objects with sizes, corners and a lead would reach 35 tokens."""
    corners = list(style.corners)
    while True:
        fitted = _Style(
            style.size_word,
            style.upper_lower,
            style.middle,
            tuple(corners),
            style.reverse,
            style.lead,
        )
        text = _caption(scene, fitted)
        if len(tokenize(text)) <= MAX_REFERENCE_TOKENS or not any(corners):
            return text
        last = max(i for i, c in enumerate(corners) if c)
        corners[last] = False


def scene_rng(scene: Scene) -> np.random.Generator:
    """A generator derived from the scene's content, so references are reproducible
    without storing them."""
    digest = hashlib.sha256(repr(scene).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def references(scene: Scene, rng: np.random.Generator | None = None) -> list[str]:
    """Five references: the canonical caption, then four paraphrases that differ from
    it and (where the scene allows that many) from each other."""
    rng = scene_rng(scene) if rng is None else rng
    refs = [canonical_caption(scene)]
    for _ in range(4):
        candidate = refs[0]
        for _attempt in range(30):
            candidate = _fit_length(scene, _random_style(rng))
            if candidate not in refs:
                break
        refs.append(candidate)
    return refs


# ---------------------------------------------------------------------------
# Parsing captions back into triples
# ---------------------------------------------------------------------------

_SYNONYMS = {"big": "large", "tiny": "small", "upper": "top", "lower": "bottom", "middle": "center"}
_BOUNDARIES = frozenset({"a", "and", ",", ".", ":"})
_CONTENT = frozenset(
    set(SIZES) | set(COLOURS) | set(SHAPES) | {"top", "bottom", "left", "right", "center"}
)
_COLOUR_RE = "|".join(COLOURS)
_SHAPE_RE = "|".join(SHAPES)
_PLACE_RE = "|".join(sorted(CELL_OF_PLACE, key=len, reverse=True))
# One object phrase after synonyms: [lead] [size] colour shape preposition the place
# [corner]. Word order is enforced so that scrambled output is not read as correct.
_MENTION_RE = re.compile(
    r"^(?:there (?:is|are)(?: two| three)?(?: shapes)? )?"
    rf"(?:(?P<size>small|large) )?(?P<colour>{_COLOUR_RE}) (?P<shape>{_SHAPE_RE})"
    rf" (?:in|at|on) the (?P<place>{_PLACE_RE})(?P<corner> corner)?$"
)


@dataclass(frozen=True)
class Mention:
    """One object phrase found in a caption; `triple` is None when it did not parse."""

    triple: tuple[str, str, str] | None
    size: str | None
    text: str


def _segments(tokens: list[str]) -> list[list[str]]:
    """Split at articles, conjunctions and punctuation: every object phrase starts
    after one of them, and none occurs inside a phrase."""
    segments: list[list[str]] = [[]]
    for token in tokens:
        if token in _BOUNDARIES:
            segments.append([])
        else:
            segments[-1].append(_SYNONYMS.get(token, token))
    return [s for s in segments if any(t in _CONTENT for t in s)]


def _mention(words: list[str]) -> Mention:
    text = " ".join(words)
    match = _MENTION_RE.match(text)
    if match is None:
        return Mention(None, None, text)
    place = match["place"]
    if match["corner"] and CELL_OF_PLACE[place] not in CORNER_CELLS:
        return Mention(None, None, text)
    return Mention((match["colour"], match["shape"], place), match["size"], text)


def parse_mentions(text: object) -> list[Mention]:
    """Every object phrase in a caption, parsed or not. Never raises: non-strings and
    garbage simply yield no or unparsed mentions."""
    if not isinstance(text, str):
        return []
    return [_mention(words) for words in _segments(tokenize(text))]


def parse_caption(
    text: object,
) -> tuple[set[tuple[str, str, str]], dict[tuple[str, str, str], str | None]]:
    """The (colour, shape, place) triples a caption names, and the size it states for
    each (None when omitted; the first stated size when a triple repeats). Unparseable
    pieces are ignored; use `parse_mentions` to see them."""
    triples: set[tuple[str, str, str]] = set()
    sizes: dict[tuple[str, str, str], str | None] = {}
    for mention in parse_mentions(text):
        if mention.triple is None:
            continue
        triples.add(mention.triple)
        if sizes.get(mention.triple) is None:
            sizes[mention.triple] = mention.size
    return triples, sizes
