"""The device-loop graphs: committed as generated, and computing the host sampler's update."""

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ladic import device_loop

COMMITTED = Path(__file__).resolve().parents[2] / "src" / "graphs"


def test_the_committed_graphs_are_what_the_generator_writes(tmp_path):
    for path in device_loop.write(tmp_path):
        committed = COMMITTED / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale: run python -m ladic.device_loop --out ../src/graphs"
        )


def per_row(values, dtype=np.float32):
    return np.array(values, dtype=dtype).reshape(-1, 1, 1)


def test_the_update_is_the_host_samplers_arithmetic_scattered_by_slot():
    slots, tokens, dims, rows = 5, 3, 4, 4
    rng = np.random.default_rng(0)
    x_pool = rng.standard_normal((slots, tokens, dims)).astype(np.float32)
    sc_pool = rng.standard_normal((slots, tokens, dims)).astype(np.float32)
    denoised = rng.standard_normal((2 * rows, tokens, dims)).astype(np.float32)
    noise = rng.standard_normal((rows, tokens, dims)).astype(np.float32)
    noise[2:] = 0
    session = ort.InferenceSession(str(COMMITTED / device_loop.UPDATE_FILE))
    # Row 0 guided (w = 1), re-noised, self-conditioned, into slot 3; row 1 unguided,
    # going to decode, without self-conditioning, into slot 1; rows 2-3 padding.
    x_next, sc_next, x0 = session.run(
        None,
        {
            "x_pool": x_pool,
            "self_cond_pool": sc_pool,
            "denoised": denoised,
            "cond_row": np.array([0, 2, 0, 0]),
            "uncond_row": np.array([1, 2, 0, 0]),
            "guide_cond": per_row([2, 1, 0, 0]),
            "guide_uncond": per_row([1, 0, 0, 0]),
            "keep_self_cond": per_row([1, 0, 0, 0], np.int64),
            "renoise_x0": per_row([0.5, 0, 0, 0]),
            "renoise_noise": per_row([0.3, 0, 0, 0]),
            "noise": noise,
            "state_slot": np.array([[3], [1], [0], [0]]),
        },
    )
    guided = np.float32(2) * denoised[0] - np.float32(1) * denoised[1]
    np.testing.assert_array_equal(x0[0], guided)
    np.testing.assert_array_equal(x0[1], denoised[2])
    np.testing.assert_array_equal(x_next[3], np.float32(0.5) * guided + np.float32(0.3) * noise[0])
    np.testing.assert_array_equal(sc_next[3], guided)
    np.testing.assert_array_equal(sc_next[1], np.zeros((tokens, dims), np.float32))
    # Slots no candidate names are copied over unchanged.
    for untouched in [2, 4]:
        np.testing.assert_array_equal(x_next[untouched], x_pool[untouched])
        np.testing.assert_array_equal(sc_next[untouched], sc_pool[untouched])


def test_the_gather_reads_rows_by_slot():
    rng = np.random.default_rng(1)
    x_pool = rng.standard_normal((4, 3, 2)).astype(np.float32)
    sc_pool = rng.standard_normal((4, 3, 2)).astype(np.float32)
    session = ort.InferenceSession(str(COMMITTED / device_loop.GATHER_FILE))
    x_t, self_cond = session.run(
        None, {"x_pool": x_pool, "self_cond_pool": sc_pool, "state_row": np.array([3, 3, 0])}
    )
    np.testing.assert_array_equal(x_t, x_pool[[3, 3, 0]])
    np.testing.assert_array_equal(self_cond, sc_pool[[3, 3, 0]])
