"""Scenes metrics: exact match and object F1 per SCENES.md, n-gram metrics via pycocoevalcap."""

from __future__ import annotations

import pytest

from ladic.metrics import NGRAM_KEYS, caption_report, exact_match, ngram_metrics, object_prf
from ladic.scenes import COLOURS, Scene, SceneObject, canonical_caption, references


def _obj(shape: str, colour: str, size: str, cell: int) -> SceneObject:
    return SceneObject(shape, colour, size, cell, COLOURS[colour], 0.12, 0.0, 0.0)


def _scene(*objects: SceneObject) -> Scene:
    return Scene("beige", (205, 192, 165), 1, tuple(objects))


TWO = _scene(_obj("circle", "red", "large", 0), _obj("star", "blue", "small", 7))
ONE = _scene(_obj("cross", "green", "small", 4))
THREE = _scene(
    _obj("square", "white", "large", 2),
    _obj("triangle", "black", "small", 3),
    _obj("diamond", "yellow", "large", 8),
)


def test_exact_match_accepts_paraphrases() -> None:
    assert exact_match(canonical_caption(TWO), TWO)
    assert exact_match(
        "a small blue star at the bottom and a red circle in the upper left corner.", TWO
    )
    assert exact_match("there is a tiny green cross in the middle.", ONE)
    assert exact_match("a green cross in the center", ONE)  # no final period


@pytest.mark.parametrize(
    "wrong",
    [
        "a large green circle in the top left and a small blue star at the bottom.",  # colour
        "a large red circle in the top left.",  # object dropped
        "a small red circle in the top left and a small blue star at the bottom.",  # size
        "a large red circle in the top left and a small blue star at the top.",  # place
        (
            "a large red circle in the top left, a small blue star at the bottom and a red"
            " square on the right."
        ),  # extra object
        (
            "a large red circle in the top left, a small red circle in the top left and a small"
            " blue star at the bottom."
        ),  # the same object again, with a wrong size
        "a large red circle in the top left and a small blue at the bottom.",  # broken phrase
        "",
    ],
)
def test_wrong_captions_are_not_exact(wrong: str) -> None:
    assert not exact_match(wrong, TWO)


def test_object_prf_known_example() -> None:
    captions = [
        "a large red circle in the top left.",  # 1 of 2 right, nothing wrong
        "a green cross in the center and a red star at the top.",  # 1 right, 1 wrong
        "garbage",  # 0 of 3
    ]
    prf = object_prf(captions, [TWO, ONE, THREE])
    assert prf["precision"] == pytest.approx(2 / 3)
    assert prf["recall"] == pytest.approx(2 / 6)
    assert prf["f1"] == pytest.approx(2 * (2 / 3) * (1 / 3) / (2 / 3 + 1 / 3))


def test_object_prf_ignores_size() -> None:
    prf = object_prf(
        ["a small red circle in the top left and a big blue star at the bottom."], [TWO]
    )
    assert prf == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_object_prf_empty_predictions() -> None:
    assert object_prf(["", ""], [ONE, TWO])["f1"] == 0.0


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        object_prf(["a"], [ONE, TWO])


@pytest.fixture(scope="module")
def ngram_scores() -> tuple[dict[str, float | None], dict[str, float | None]]:
    scenes = [TWO, ONE, THREE]
    refs = [references(s) for s in scenes]
    right = [canonical_caption(s) for s in scenes]
    wrong = [
        "a small purple cross on the left.",
        "a large black star in the top right.",
        "there is a red circle.",
    ]
    return ngram_metrics(right, refs), ngram_metrics(wrong, refs)


def test_ngram_metrics_keys_and_order(
    ngram_scores: tuple[dict[str, float | None], dict[str, float | None]],
) -> None:
    right, wrong = ngram_scores
    assert set(right) == set(NGRAM_KEYS) == set(wrong)
    assert right["CIDEr-D"] is not None and wrong["CIDEr-D"] is not None
    assert right["CIDEr-D"] > wrong["CIDEr-D"]
    assert right["BLEU-4"] > wrong["BLEU-4"]  # type: ignore[operator]
    assert right["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    if right["METEOR"] is not None:  # None only when Java fails (then a warning is raised)
        assert right["METEOR"] > wrong["METEOR"]  # type: ignore[operator]


def test_caption_report_without_ngrams() -> None:
    report = caption_report([canonical_caption(TWO), "nothing"], [TWO, ONE], ngrams=False)
    assert report["exact_match"] == 0.5
    assert report["object_precision"] == 1.0
    assert report["object_recall"] == pytest.approx(2 / 3)
    assert "CIDEr-D" not in report


def test_ngram_metrics_without_java(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ladic.metrics.shutil.which", lambda _name: None)
    scenes = [TWO, ONE, THREE]
    with pytest.warns(UserWarning, match="java"):
        scores = ngram_metrics(
            [canonical_caption(s) for s in scenes], [references(s) for s in scenes]
        )
    assert scores["METEOR"] is None
    assert scores["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert scores["CIDEr-D"] is not None and scores["CIDEr-D"] > 1.0


def test_meteor_process_is_reused_and_replaced_when_it_dies(
    ngram_scores: tuple[dict[str, float | None], dict[str, float | None]],
) -> None:
    from ladic import metrics

    if ngram_scores[0]["METEOR"] is None:
        pytest.skip("METEOR needs Java")
    scenes = [TWO, ONE, THREE]
    caps, refs = [canonical_caption(s) for s in scenes], [references(s) for s in scenes]
    first = metrics._METEOR
    assert first is not None and first.meteor_p.poll() is None
    again = ngram_metrics(caps, refs)
    assert metrics._METEOR is first, "a second report starts no new Java process"
    assert again["METEOR"] == pytest.approx(ngram_scores[0]["METEOR"])
    first.meteor_p.kill()
    first.meteor_p.wait()
    after = ngram_metrics(caps, refs)
    assert metrics._METEOR is not first, "a dead process is replaced"
    assert after["METEOR"] == pytest.approx(ngram_scores[0]["METEOR"])
