"""Sampler pieces that the Rust side mirrors: cleaning, similarity, MBR."""

from __future__ import annotations

import numpy as np

from ladic.sampler import TextIds, caption_confidence, clean_ids, mbr_choose, ngram_f1

TEXT = TextIds(frozenset({0, 1, 2, 3, 4}), period_id=5)


def test_clean_ids_drops_specials_periods_and_repeats() -> None:
    assert clean_ids([1, 7, 7, 5, 8, 5, 8, 2, 0, 0], TEXT) == [7, 8]
    assert clean_ids([1, 2, 0, 5], TEXT) == []


def test_caption_confidence_ignores_padding() -> None:
    ids = np.array([1, 7, 8, 5, 2])
    conf = np.array([0.1, 0.8, 0.6, 0.2, 0.1])
    assert abs(caption_confidence(ids, conf, TEXT) - 0.7) < 1e-9
    assert caption_confidence(np.array([0, 5]), np.array([0.5, 0.5]), TEXT) == 0.0


def test_ngram_f1() -> None:
    assert ngram_f1([], []) == 1.0
    assert ngram_f1([1], []) == 0.0
    assert ngram_f1([1, 2, 3], [1, 2, 3]) == 1.0
    # unigrams {1,2} vs {1,3}: overlap 1 of 3 grams each side (2 unigrams + 1 bigram).
    assert abs(ngram_f1([1, 2], [1, 3]) - 1 / 3) < 1e-9


def test_mbr_picks_the_consensus_candidate() -> None:
    cands = [[9, 9, 9], [1, 2, 3], [1, 2, 4], [1, 2, 3]]
    assert mbr_choose(cands) == 1  # ties with index 3: lowest index wins
    assert mbr_choose([[5]]) == 0
