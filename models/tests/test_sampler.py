"""Sampler pieces that the Rust side mirrors: cleaning, similarity, MBR."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from ladic.config import BackRefineConfig, ScheduleConfig
from ladic.diffusion import alpha_bar, stride_for
from ladic.sampler import (
    RecordingNoise,
    SampleParams,
    SeededNoise,
    TextIds,
    caption_confidence,
    clean_ids,
    mbr_choose,
    ngram_f1,
    run_rows,
)

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


def test_mbr_ties_are_exact_and_go_to_the_lowest_index() -> None:
    # Candidates 0 and 1 both score 28/15 in all; summed as floats, one after the other,
    # 0's came out one unit in the last place below 1's (the Rust test has the same case).
    cands = [
        [1, 2, 3, 5, 4],
        [2, 3, 4, 1, 2],
        [4, 4, 4, 4, 5, 3],
        [2, 2, 3, 1, 5, 1],
        [1, 3, 4, 1, 4, 5],
    ]
    assert sum(ngram_f1(cands[0], c) for c in cands[1:]) == Fraction(28, 15)
    assert mbr_choose(cands) == 0


def test_mbr_picks_the_consensus_candidate() -> None:
    cands = [[9, 9, 9], [1, 2, 3], [1, 2, 4], [1, 2, 3]]
    assert mbr_choose(cands) == 1  # ties with index 3: lowest index wins
    assert mbr_choose([[5]]) == 0


class ConstantBackend:
    """x0 is always `value`; records the x_t of every denoiser call."""

    def __init__(self, value: np.ndarray) -> None:
        self.value = value
        self.x_ts: list[np.ndarray] = []

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        raise AssertionError("not called")

    def denoise(self, x_t, self_cond, t, image_kv) -> np.ndarray:  # type: ignore[no-untyped-def]
        self.x_ts.append(x_t.copy())
        return np.broadcast_to(self.value, x_t.shape).astype(np.float32)

    def decode(self, x0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(x0.shape[:2], np.int64), np.ones(x0.shape[:2], np.float32)


def test_run_rows_renoises_on_the_models_own_schedule() -> None:
    """A schedule other than the defaults is the one the re-noise uses (it once always
    used the default betas, unlike training and the service)."""
    schedule = ScheduleConfig(beta_start=2e-4, beta_end=0.03, num_timesteps=1000)
    x0 = np.full((4, 3), 0.5, np.float32)
    backend = ConstantBackend(x0)
    noise = RecordingNoise(SeededNoise(7, (4, 3)))
    params = SampleParams(
        steps=2, guidance=0.0, time_shift=0, renoise_scale=0.8, self_conditioning=False,
        back_refine=BackRefineConfig(enabled=False),
    )
    run_rows(backend, np.zeros((1, 2, 2), np.float32), np.zeros((1, 2, 2), np.float32),
             [noise], params, schedule, (4, 3))
    assert len(backend.x_ts) == 2
    t = 999 - stride_for(2, 1000)
    ab = alpha_bar(schedule)[t]
    assert abs(ab - alpha_bar(ScheduleConfig())[t]) > 1e-3, "the schedules differ here"
    expected = math.sqrt(ab) * x0 + 0.8 * math.sqrt(1 - ab) * noise.draws[1]
    np.testing.assert_allclose(backend.x_ts[1][0], expected, rtol=1e-6, atol=1e-6)


def test_ids_to_text_matches_the_services_cases() -> None:
    """The cases of the service's text tests (src/text.rs), on the same tokenizer."""
    from pathlib import Path

    from tokenizers import Tokenizer

    from ladic.sampler import ids_to_text

    path = Path(__file__).resolve().parents[2] / "tests/fixtures/tokenizer/words.json"
    tok = Tokenizer.from_file(str(path))
    text = TextIds(frozenset({0, 1, 2, 3, 4}), period_id=12)
    cases = [
        (
            [1, 5, 6, 6, 7, 13, 8, 9, 15, 10, 11, 12, 2, 0, 0],
            "a red circle, left of the blue square.",
        ),
        ([1, 2, 0], "."),
        ([12, 12, 13, 5], ", a."),
        ([5, 13, 13, 6, 12, 6], "a, red."),
        # "skate ##board" twice: no id repeats, the word does.
        ([1, 5, 16, 17, 16, 17, 12, 2], "a skateboard."),
    ]
    for ids, want in cases:
        assert ids_to_text(tok, clean_ids(ids, text)) == want
