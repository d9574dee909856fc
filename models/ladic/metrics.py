"""Caption metrics for Scenes (spec: docs/scenes.md, "Metrics").

Two views of quality: exact semantic accuracy, which the generator's known ground
truth makes possible, and the standard COCO n-gram metrics (pycocoevalcap), so
numbers read like those in captioning papers. The n-gram code shells out to Java;
a missing or broken Java degrades to a warning and None, never a crash, so a quick
evaluation still gives the semantic numbers.
"""

from __future__ import annotations

import re
import shutil
import threading
import warnings
from collections.abc import Sequence
from typing import Any

from .scenes import Scene, parse_caption, parse_mentions, references

METEOR_TIMEOUT_S = 600.0
NGRAM_KEYS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


# ---------------------------------------------------------------------------
# Semantic metrics
# ---------------------------------------------------------------------------


def exact_match(caption: str, scene: Scene) -> bool:
    """Right when the caption names every object and nothing else: its (colour, shape,
    place) set equals the truth, every size it states is the true one, and it holds no
    object phrase that fails to parse (garbage must not pass as an omission)."""
    mentions = parse_mentions(caption)
    if not mentions or any(m.triple is None for m in mentions):
        return False
    truth = {o.triple: o.size for o in scene.objects}
    if {m.triple for m in mentions} != set(truth):
        return False
    return all(m.size is None or m.size == truth[m.triple] for m in mentions)


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def object_prf(captions: Sequence[str], scenes: Sequence[Scene]) -> dict[str, float]:
    """Precision, recall and F1 over (colour, shape, place) triples, micro-averaged
    over all images (so images with more objects weigh more)."""
    _check_lengths(captions, scenes)
    hits = predicted = actual = 0
    for caption, scene in zip(captions, scenes):
        named, _sizes = parse_caption(caption)
        truth = scene.triples()
        hits += len(named & truth)
        predicted += len(named)
        actual += len(truth)
    precision, recall = _ratio(hits, predicted), _ratio(hits, actual)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _check_lengths(captions: Sequence[Any], other: Sequence[Any]) -> None:
    if len(captions) != len(other):
        raise ValueError(f"{len(captions)} captions for {len(other)} images")


# ---------------------------------------------------------------------------
# n-gram metrics (pycocoevalcap)
# ---------------------------------------------------------------------------

Tokenized = dict[int, list[str]]


def _clean(text: str) -> str:
    """One line per caption: the Java tokenizer is line-based, so a stray newline or
    carriage return would shift every later caption onto the wrong image."""
    return re.sub(r"\s+", " ", str(text)).strip()


def _python_tokenize(captions: dict[int, list[dict[str, str]]]) -> Tokenized:
    """What PTBTokenizer yields for the Scenes vocabulary (lower case, punctuation
    removed); used only when Java is unavailable."""
    return {
        key: [" ".join(re.findall(r"[a-z0-9]+", c["caption"].lower())) for c in items]
        for key, items in captions.items()
    }


def _tokenize(captions: dict[int, list[dict[str, str]]]) -> Tokenized:
    if shutil.which("java") is None:
        warnings.warn("java not found; using the Python tokenizer", stacklevel=3)
        return _python_tokenize(captions)
    try:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenized = PTBTokenizer().tokenize(captions)
        if tokenized.keys() == captions.keys():
            return tokenized
        warnings.warn("PTBTokenizer lost captions; using the Python tokenizer", stacklevel=3)
    except Exception as error:  # noqa: BLE001 - Java missing or failing must not crash
        warnings.warn(f"PTBTokenizer failed ({error!r}); using the Python tokenizer", stacklevel=3)
    return _python_tokenize(captions)


def _tokenize_pair(captions: list[str], references: list[list[str]]) -> tuple[Tokenized, Tokenized]:
    """References and captions in one tokenizer run: each run starts a JVM."""
    n = len(captions)
    both = {i: [{"caption": _clean(r)} for r in refs] for i, refs in enumerate(references)}
    both.update({n + i: [{"caption": _clean(c)}] for i, c in enumerate(captions)})
    tokenized = _tokenize(both)
    return {i: tokenized[i] for i in range(n)}, {i: tokenized[n + i] for i in range(n)}


# One METEOR Java process serves every report of a run: starting one loads its
# paraphrase tables and takes about 10 s, which made METEOR most of an evaluation's time.
_METEOR: Any = None


def _discard_meteor(meteor: Any, worker: threading.Thread) -> None:
    global _METEOR
    meteor.meteor_p.kill()
    worker.join(5.0)
    meteor.lock = threading.Lock()  # a failed run leaves the lock held; __del__ takes it
    if _METEOR is meteor:
        _METEOR = None


def _meteor(gts: Tokenized, res: Tokenized) -> float | None:
    """METEOR in a watched thread: the pycocoevalcap wrapper blocks forever if its Java
    process dies, and deadlocks at garbage collection if scoring raised. A process that
    fails or times out is killed and the next call starts a new one."""
    global _METEOR
    if shutil.which("java") is None:
        warnings.warn("java not found; reporting METEOR as None", stacklevel=3)
        return None
    try:
        from pycocoevalcap.meteor.meteor import Meteor

        if _METEOR is None or _METEOR.meteor_p.poll() is not None:
            _METEOR = Meteor()
        meteor = _METEOR
    except Exception as error:  # noqa: BLE001
        warnings.warn(f"METEOR unavailable ({error!r}); reporting None", stacklevel=3)
        return None
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["score"] = float(meteor.compute_score(gts, res)[0])
        except Exception as error:  # noqa: BLE001
            result["error"] = error

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(METEOR_TIMEOUT_S)
    if "score" in result:
        return result["score"]
    _discard_meteor(meteor, thread)
    reason = result.get("error", f"timed out after {METEOR_TIMEOUT_S:.0f} s")
    warnings.warn(f"METEOR failed ({reason!r}); reporting None", stacklevel=3)
    return None


def ngram_metrics(captions: list[str], references: list[list[str]]) -> dict[str, float | None]:
    """BLEU-1/4, METEOR, ROUGE-L and CIDEr-D over the references, with the standard
    COCO evaluation code (its Cider class is CIDEr-D: clipped counts and a length
    penalty). METEOR is None when Java or the METEOR jar fails."""
    _check_lengths(captions, references)
    if not captions:
        return dict.fromkeys(NGRAM_KEYS)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _tokenize_pair(captions, references)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {
        "BLEU-1": float(bleu[0]),
        "BLEU-4": float(bleu[3]),
        "METEOR": _meteor(gts, res),
        "ROUGE-L": float(rouge),
        "CIDEr-D": float(cider),
    }


# ---------------------------------------------------------------------------
# Everything together
# ---------------------------------------------------------------------------


def caption_report(
    captions: Sequence[str], scenes: Sequence[Scene], ngrams: bool = True
) -> dict[str, float | None]:
    """Every Scenes metric for one set of captions: exact match (a fraction), object
    precision/recall/F1 and, unless `ngrams` is False (it needs Java and takes a few
    seconds), the n-gram metrics against each scene's five references."""
    _check_lengths(captions, scenes)
    exact = sum(exact_match(c, s) for c, s in zip(captions, scenes))
    prf = object_prf(captions, scenes)
    report: dict[str, float | None] = {
        "count": len(captions),
        "exact_match": _ratio(exact, len(captions)),
        "object_precision": prf["precision"],
        "object_recall": prf["recall"],
        "object_f1": prf["f1"],
    }
    if ngrams:
        refs = [references(s) for s in scenes]
        report.update(ngram_metrics(list(captions), refs))
    return report
