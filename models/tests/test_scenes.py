"""The Scenes generator keeps the promises SCENES.md makes (splits, geometry, captions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ladic import scenes
from ladic.metrics import exact_match
from ladic.scenes import (
    COLOURS,
    HELD_OUT_PAIRS,
    SHAPES,
    Scene,
    SceneObject,
    canonical_caption,
    generate_split,
    parse_caption,
    parse_mentions,
    references,
    render,
    render_split,
    tokenize,
)

HELD_OUT = set(HELD_OUT_PAIRS)


def _obj(shape: str, colour: str, size: str, cell: int) -> SceneObject:
    extent = 0.12 if size == "small" else 0.25
    return SceneObject(shape, colour, size, cell, COLOURS[colour], extent, 0.0, 0.0)


def _scene(*objects: SceneObject) -> Scene:
    return Scene("light grey", (180, 180, 180), 7, tuple(sorted(objects, key=lambda o: o.cell)))


TWO = _scene(_obj("circle", "red", "large", 0), _obj("star", "blue", "small", 7))
THREE = _scene(
    _obj("circle", "red", "large", 0),
    _obj("star", "blue", "small", 7),
    _obj("cross", "white", "small", 4),
)


@pytest.fixture(scope="module")
def train() -> list[Scene]:
    return generate_split("train", 3000)


def _pairs(scene: Scene) -> set[tuple[str, str]]:
    return {(o.colour, o.shape) for o in scene.objects}


def test_constants_match_spec() -> None:
    assert len(SHAPES) == 6 and len(COLOURS) == 8 and len(HELD_OUT_PAIRS) == 6
    assert scenes.SPLIT_SIZES == {
        "train": 20000,
        "val": 1000,
        "test-seen": 1000,
        "test-novel": 1000,
    }
    assert len(set(scenes.SPLIT_SEEDS.values())) == 4
    assert scenes.PLACES[0] == "in the top left" and scenes.PLACES[7] == "at the bottom"


@pytest.mark.parametrize("split", ["val", "test-seen"])
def test_seen_splits_have_no_held_out_pair(train: list[Scene], split: str) -> None:
    for scene in train + generate_split(split):
        assert not _pairs(scene) & HELD_OUT


def test_every_novel_scene_has_a_held_out_pair() -> None:
    novel = generate_split("test-novel")
    assert len(novel) == 1000
    assert all(_pairs(scene) & HELD_OUT for scene in novel)
    seen_in_novel = {p for scene in novel for p in _pairs(scene) & HELD_OUT}
    assert seen_in_novel == HELD_OUT


def test_splits_use_different_streams(train: list[Scene]) -> None:
    val, test = generate_split("val", 200), generate_split("test-seen", 200)
    assert not set(train[:200]) & set(val) and not set(val) & set(test)


def test_objects_inside_distinct_cells(train: list[Scene]) -> None:
    counts = set()
    for scene in train:
        cells = [o.cell for o in scene.objects]
        assert cells == sorted(set(cells)) and 1 <= len(cells) <= 3
        counts.add(len(cells))
        for o in scene.objects:
            low, high = scenes.SIZE_EXTENTS[o.size]
            assert low <= o.extent <= high
            # Box inside its cell; distinct cells then means no overlap.
            assert abs(o.dx) + o.extent / 2 <= 1 / 6 and abs(o.dy) + o.extent / 2 <= 1 / 6
            assert all(abs(c - b) <= 15 for c, b in zip(o.rgb, COLOURS[o.colour]))
    assert counts == {1, 2, 3}


def test_generation_is_deterministic_and_prefix_stable() -> None:
    assert generate_split("val", 300) == generate_split("val", 300)
    assert generate_split("val", 100) == generate_split("val", 300)[:100]


def test_render_is_deterministic_uint8() -> None:
    scene = generate_split("test-seen", 1)[0]
    first, second = render(scene), render(scene)
    assert first.shape == (128, 128, 3) and first.dtype == np.uint8
    assert np.array_equal(first, second)
    assert render(scene, size=64).shape == (64, 64, 3)


def test_render_puts_colour_in_the_object_cell() -> None:
    image = render(_scene(_obj("square", "red", "large", 4)), noise=False)
    assert tuple(image[64, 64]) == COLOURS["red"]
    assert tuple(image[5, 5]) == (180, 180, 180)


def test_shapes_differ_in_pixels() -> None:
    masks = []
    for shape in SHAPES:
        image = render(_scene(_obj(shape, "black", "large", 4)), noise=False)
        masks.append(image[..., 0] < 100)
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert (masks[i] ^ masks[j]).sum() > 60, (SHAPES[i], SHAPES[j])


def test_render_split_caches(tmp_path: Path) -> None:
    images = render_split("val", size=32, count=5, cache_dir=tmp_path)
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    assert len(list(tmp_path.glob("*.npy"))) == 1
    again = render_split("val", size=32, count=5, cache_dir=tmp_path)
    assert np.array_equal(images, again)
    assert np.array_equal(images[2], render(generate_split("val", 5)[2], size=32))


def test_a_count_never_goes_past_its_split() -> None:
    assert scenes.split_count("val", None) == 1000
    assert scenes.split_count("val", 5000) == 1000
    assert scenes.split_count("val", 7) == 7
    assert len(generate_split("test-seen", 1500)) == 1000
    with pytest.raises(ValueError, match=">= 0"):
        scenes.split_count("val", -1)
    with pytest.raises(ValueError, match="unknown split"):
        generate_split("validation", 3)


def test_resized_images_are_cached_by_data_version(tmp_path: Path) -> None:
    from ladic import data
    from ladic.config import ImageEncoderConfig

    cfg = ImageEncoderConfig(image_size=16)
    images = data.split_images("val", cfg, 3, cache_dir=tmp_path)
    assert images.shape == (3, 16, 16, 3)
    cached = sorted(p.name for p in tmp_path.glob("*.npy"))
    resized = [n for n in cached if n.endswith(f"-16-{cfg.resize_filter}.npy")]
    assert resized == [f"scenes-v{scenes.DATA_VERSION}-val-3-16-{cfg.resize_filter}.npy"]
    assert not [n for n in cached if ".tmp" in n]
    assert np.array_equal(data.split_images("val", cfg, 3, cache_dir=tmp_path), images)


def test_canonical_caption_format() -> None:
    assert canonical_caption(TWO) == (
        "a large red circle in the top left and a small blue star at the bottom."
    )
    assert canonical_caption(THREE) == (
        "a large red circle in the top left, a small white cross in the center"
        " and a small blue star at the bottom."
    )
    assert canonical_caption(_scene(_obj("diamond", "green", "small", 5))) == (
        "a small green diamond on the right."
    )


def test_references_are_five_deterministic_and_in_vocabulary(train: list[Scene]) -> None:
    vocabulary = set(scenes.VOCABULARY)
    for scene in train[:500]:
        refs = references(scene)
        assert len(refs) == 5 and refs == references(scene)
        assert refs[0] == canonical_caption(scene)
        assert refs[0] not in refs[1:]
        for ref in refs:
            tokens = tokenize(ref)
            assert set(tokens) <= vocabulary
            assert " ".join(tokens).replace(" ,", ",").replace(" .", ".").replace(" :", ":") == ref


def test_max_reference_length(train: list[Scene]) -> None:
    worst = _scene(
        _obj("triangle", "yellow", "large", 0),
        _obj("square", "white", "small", 2),
        _obj("circle", "black", "large", 8),
    )
    rng = np.random.default_rng(0)
    lengths = [len(tokenize(r)) for _ in range(300) for r in references(worst, rng)]
    lengths += [len(tokenize(r)) for s in train[:1000] for r in references(s)]
    assert max(lengths) <= scenes.MAX_REFERENCE_TOKENS == 33
    assert max(lengths) >= 31  # the lead and corners do occur


def test_every_reference_parses_back(train: list[Scene]) -> None:
    for scene in train[:400] + generate_split("test-novel", 100):
        for ref in references(scene):
            triples, _sizes = parse_caption(ref)
            assert triples == scene.triples(), ref
            assert exact_match(ref, scene), ref


def test_parse_maps_synonyms_and_leads() -> None:
    text = (
        "there are two shapes: a tiny blue star at the bottom and a big red circle in the"
        " upper left corner."
    )
    triples, sizes = parse_caption(text)
    assert triples == {("blue", "star", "bottom"), ("red", "circle", "top left")}
    assert sizes == {("blue", "star", "bottom"): "small", ("red", "circle", "top left"): "large"}
    triples, sizes = parse_caption("a white cross in the middle.")
    assert triples == {("white", "cross", "center")} and sizes[("white", "cross", "center")] is None


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "....",
        "a a a and and ,",
        "red circle",
        "circle red in the top left",
        "a red blue circle in the top",
        "a large small red circle in the top left",
        "a red circle in the top bottom",
        "a red circle at the top corner",
        "xyz!!  \n 12",
        "a red circle in the top left" * 50,
    ],
)
def test_parser_never_raises_on_garbage(garbage: str) -> None:
    triples, _ = parse_caption(garbage)
    assert isinstance(triples, set)
    assert not exact_match(garbage, _scene(_obj("circle", "red", "large", 0)))


def test_parser_accepts_non_strings() -> None:
    assert parse_caption(None) == (set(), {})  # type: ignore[arg-type]
    assert parse_mentions(3) == []


def test_repeated_words_do_not_parse() -> None:
    mentions = parse_mentions("a red red circle in the top left and a blue star at the bottom.")
    assert [m.triple for m in mentions] == [None, ("blue", "star", "bottom")]
