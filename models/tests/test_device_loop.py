"""The device-loop graphs: committed as generated, and computing the host sampler's update."""

import re
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ladic import device_loop as dl

COMMITTED = Path(__file__).resolve().parents[2] / "src" / "graphs"


def test_the_committed_graphs_are_what_the_generator_writes(tmp_path):
    for path in dl.write(tmp_path):
        committed = COMMITTED / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale: run python -m ladic.device_loop --out ../src/graphs"
        )


def indices(**columns: list[int]) -> np.ndarray:
    rows = len(next(iter(columns.values())))
    table = np.zeros((rows, dl.INDEX_COLUMNS), np.int64)
    for name, values in columns.items():
        table[:, getattr(dl, name.upper())] = values
    return table


def test_the_update_is_the_host_samplers_arithmetic_scattered_by_slot():
    slots, tokens, dims, rows = 5, 3, 4, 4
    rng = np.random.default_rng(0)
    x_pool = rng.standard_normal((slots, tokens, dims)).astype(np.float32)
    sc_pool = rng.standard_normal((slots, tokens, dims)).astype(np.float32)
    denoised = rng.standard_normal((rows, tokens, dims)).astype(np.float32)
    noise = rng.standard_normal((rows, tokens, dims)).astype(np.float32)
    # Candidate 0 guided (w = 1), re-noised, self-conditioned, into slot 3 (denoiser
    # rows 0 and 1); candidate 1 unguided, going to decode, without self-conditioning,
    # into slot 1 (denoiser row 2); candidates 2-3 padding.
    coefficients = np.zeros((rows, dl.COEFFICIENT_COLUMNS), np.float32)
    coefficients[0] = [2, 1, 0.5, 0.3]
    coefficients[1] = [1, 0, 0, 0]
    session = ort.InferenceSession(str(COMMITTED / dl.UPDATE_FILE))
    x_next, sc_next, x0 = session.run(
        None,
        {
            "x_pool": x_pool,
            "self_cond_pool": sc_pool,
            "denoised": denoised,
            "indices": indices(
                cond_row=[0, 2, 0, 0],
                uncond_row=[1, 2, 0, 0],
                keep_self_cond=[1, 0, 0, 0],
                state_slot=[3, 1, 0, 0],
            ),
            "coefficients": coefficients,
            "noise": noise,
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


def test_the_gather_reads_rows_by_slot_and_passes_t_and_kv_index_on():
    rng = np.random.default_rng(1)
    x_pool = rng.standard_normal((4, 3, 2)).astype(np.float32)
    sc_pool = rng.standard_normal((4, 3, 2)).astype(np.float32)
    session = ort.InferenceSession(str(COMMITTED / dl.GATHER_FILE))
    table = indices(state_row=[3, 3, 0], t=[900, 900, 0], kv_index=[5, 0, 0], cond_row=[7, 8, 9])
    x_t, self_cond, t, kv_index = session.run(
        None, {"x_pool": x_pool, "self_cond_pool": sc_pool, "indices": table}
    )
    np.testing.assert_array_equal(x_t, x_pool[[3, 3, 0]])
    np.testing.assert_array_equal(self_cond, sc_pool[[3, 3, 0]])
    np.testing.assert_array_equal(t, [900, 900, 0])
    np.testing.assert_array_equal(kv_index, [5, 0, 0])


def test_the_service_reads_the_same_columns():
    """The column numbers in src/device_loop.rs are the generator's."""
    source = (COMMITTED.parent / "device_loop.rs").read_text()
    names = [
        "STATE_ROW",
        "T",
        "KV_INDEX",
        "COND_ROW",
        "UNCOND_ROW",
        "KEEP_SELF_COND",
        "STATE_SLOT",
        "INDEX_COLUMNS",
        "GUIDE_COND",
        "GUIDE_UNCOND",
        "RENOISE_X0",
        "RENOISE_NOISE",
        "COEFFICIENT_COLUMNS",
    ]
    for name in names:
        match = re.search(rf"^const {name}: usize = (\d+);$", source, re.MULTILINE)
        assert match, f"src/device_loop.rs has no const {name}"
        assert int(match.group(1)) == getattr(dl, name), name
