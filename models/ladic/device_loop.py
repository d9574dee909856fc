"""The two small graphs of the service's device-resident denoising loop (`--device-loop`).

    python -m ladic.device_loop --out ../src/graphs      # rewrites the committed files

With the loop on the device, a caption candidate's x_t and self_cond live in a *state
pool* on the GPU (one slot per candidate, slot 0 a scratch slot for padding rows) and
never come back to the host between steps. Around each denoiser call the service runs:

- `state_gather.onnx`: the denoiser's inputs for the call: x_t and self_cond gathered
  from the pools by slot (`x_t = x_pool[state_row]`, the same for self_cond), and t and
  kv_index, taken from the step's packed indices;
- `state_update.onnx`: what the host sampler does after a denoiser call (see
  `Row::apply_denoised` in the service), for every candidate of the call at once:
  the guided pair combined, self_cond kept or zeroed, x re-noised, both scattered into
  the pools' next copy (ONNX has no in-place update, so the service keeps two copies
  of each pool and alternates).

Everything per row comes in two small tensors, so that a step sends three buffers
(these two and the noise) before its three runs and nothing between them:
- `indices [N, 7]` (int64), by column: for denoiser row n, its state slot, timestep and
  K/V slot; for candidate n, its conditional and unconditional rows of the denoiser's
  output, whether self_cond keeps x0 (1) or is zeroed (0), and its state slot;
- `coefficients [N, 4]` (float32), for candidate n: (1+w), w, sqrt(ab), r sqrt(1-ab).
N is the call's row count with padding; padding rows are all zeros (slot 0 is a
scratch slot). Columns are taken with constant indices and reshaped by constant shapes,
so no node computes a shape (a captured CUDA graph needs none on the host).

Both graphs are independent of the model (the latent's L and D are dynamic) and are
embedded in the service's binary, so a bundle needs nothing new. The arithmetic is the
host's, operation for operation and in float32, so a seed gives the same caption either
way: `x0 = (1+w) cond - w uncond` (just `cond` where w = 0) and
`x = sqrt(ab) x0 + r sqrt(1-ab) eps`, with the coefficients computed on the host.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import onnx
from onnx import TensorProto, helper

# What these graphs use of each op has not changed since opset 13 (ScatterND without
# the `reduction` of 16), where ONNX Runtime's CUDA provider has had kernels for all of
# them the longest.
OPSET = 13
GATHER_FILE = "state_gather.onnx"
UPDATE_FILE = "state_update.onnx"

F32 = TensorProto.FLOAT
I64 = TensorProto.INT64


# Columns of `indices`.
STATE_ROW, T, KV_INDEX, COND_ROW, UNCOND_ROW, KEEP_SELF_COND, STATE_SLOT = range(7)
INDEX_COLUMNS = 7
# Columns of `coefficients`.
GUIDE_COND, GUIDE_UNCOND, RENOISE_X0, RENOISE_NOISE = range(4)
COEFFICIENT_COLUMNS = 4


def _latent(name: str, rows: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F32, [rows, "tokens", "dims"])


def _int64(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node(
        "Constant",
        [],
        [name],
        value=helper.make_tensor(f"{name}_value", I64, [len(values)], values),
    )


def _column(
    table: str, column: int, out: str, shape: list[int] | None = None
) -> list[onnx.NodeProto]:
    """`out = table[:, column]`, reshaped to `shape` (a constant, -1 for the rows)."""
    nodes = [
        helper.make_node(
            "Constant",
            [],
            [f"{out}_column"],
            value=helper.make_tensor(f"{out}_column_value", I64, [], [column]),
        ),
        helper.make_node(
            "Gather", [table, f"{out}_column"], [out if shape is None else f"{out}_flat"], axis=1
        ),
    ]
    if shape is not None:
        nodes += [
            _int64(f"{out}_shape", shape),
            helper.make_node("Reshape", [f"{out}_flat", f"{out}_shape"], [out]),
        ]
    return nodes


def _indices(rows: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("indices", I64, [rows, INDEX_COLUMNS])


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="ladic.device_loop",
    )
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def gather_graph() -> onnx.ModelProto:
    """x_pool, self_cond_pool [slots, L, D] and indices [N, 7] -> the denoiser's
    x_t, self_cond [N, L, D], t and kv_index [N]."""
    nodes = [
        *_column("indices", STATE_ROW, "state_row"),
        *_column("indices", T, "t"),
        *_column("indices", KV_INDEX, "kv_index"),
        helper.make_node("Gather", ["x_pool", "state_row"], ["x_t"], axis=0),
        helper.make_node("Gather", ["self_cond_pool", "state_row"], ["self_cond"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "state_gather",
        [_latent("x_pool", "slots"), _latent("self_cond_pool", "slots"), _indices("rows")],
        [
            _latent("x_t", "rows"),
            _latent("self_cond", "rows"),
            helper.make_tensor_value_info("t", I64, ["rows"]),
            helper.make_tensor_value_info("kv_index", I64, ["rows"]),
        ],
    )
    return _model(graph)


def update_graph() -> onnx.ModelProto:
    """One step's update of every candidate of a denoiser call.

    Inputs: the pools, the denoiser's output `denoised [N, L, D]` (cond and uncond
    rows), `indices [N, 7]` and `coefficients [N, 4]` (see the module docs), and
    `noise [N, L, D]` (always read, and multiplied by r sqrt(1-ab): it matters only where
    that is not zero). A candidate
    with w = 0 is unguided: x0 = cond. Outputs: the pools' next copy and x0 [N, L, D]
    (read back only for the candidates the host needs it for: Back&Refine, the final
    decode, streaming).
    """
    per_row = [-1, 1, 1]
    nodes = [
        *_column("indices", COND_ROW, "cond_row"),
        *_column("indices", UNCOND_ROW, "uncond_row"),
        *_column("indices", KEEP_SELF_COND, "keep_self_cond", per_row),
        *_column("indices", STATE_SLOT, "state_slot", [-1, 1]),
        *_column("coefficients", GUIDE_COND, "guide_cond", per_row),
        *_column("coefficients", GUIDE_UNCOND, "guide_uncond", per_row),
        *_column("coefficients", RENOISE_X0, "renoise_x0", per_row),
        *_column("coefficients", RENOISE_NOISE, "renoise_noise", per_row),
        helper.make_node("Gather", ["denoised", "cond_row"], ["cond"], axis=0),
        helper.make_node("Gather", ["denoised", "uncond_row"], ["uncond"], axis=0),
        helper.make_node("Mul", ["guide_cond", "cond"], ["cond_scaled"]),
        helper.make_node("Mul", ["guide_uncond", "uncond"], ["uncond_scaled"]),
        helper.make_node("Sub", ["cond_scaled", "uncond_scaled"], ["guided"]),
        helper.make_node(
            "Constant",
            [],
            ["zero"],
            value=helper.make_tensor("zero_value", F32, [], [0.0]),
        ),
        helper.make_node("Equal", ["guide_uncond", "zero"], ["unguided"]),
        helper.make_node("Where", ["unguided", "cond", "guided"], ["x0"]),
        helper.make_node("Cast", ["keep_self_cond"], ["keep"], to=TensorProto.BOOL),
        helper.make_node("Where", ["keep", "x0", "zero"], ["self_cond_next"]),
        helper.make_node("Mul", ["renoise_x0", "x0"], ["x0_scaled"]),
        helper.make_node("Mul", ["renoise_noise", "noise"], ["noise_scaled"]),
        helper.make_node("Add", ["x0_scaled", "noise_scaled"], ["x_next"]),
        helper.make_node("ScatterND", ["x_pool", "state_slot", "x_next"], ["x_pool_next"]),
        helper.make_node(
            "ScatterND",
            ["self_cond_pool", "state_slot", "self_cond_next"],
            ["self_cond_pool_next"],
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "state_update",
        [
            _latent("x_pool", "slots"),
            _latent("self_cond_pool", "slots"),
            _latent("denoised", "rows"),
            _indices("rows"),
            helper.make_tensor_value_info("coefficients", F32, ["rows", COEFFICIENT_COLUMNS]),
            _latent("noise", "rows"),
        ],
        [
            _latent("x_pool_next", "slots"),
            _latent("self_cond_pool_next", "slots"),
            _latent("x0", "rows"),
        ],
    )
    return _model(graph)


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, model in [(GATHER_FILE, gather_graph()), (UPDATE_FILE, update_graph())]:
        path = out / name
        path.write_bytes(model.SerializeToString(deterministic=True))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write to")
    args = parser.parse_args(argv)
    for path in write(args.out):
        print(path)


if __name__ == "__main__":
    main()
