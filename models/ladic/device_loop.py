"""The two small graphs of the service's device-resident denoising loop (`--device-loop`).

    python -m ladic.device_loop --out ../src/graphs      # rewrites the committed files

With the loop on the device, a caption candidate's x_t and self_cond live in a *state
pool* on the GPU (one slot per candidate, slot 0 a scratch slot for padding rows) and
never come back to the host between steps. Around each denoiser call the service runs:

- `state_gather.onnx`: the denoiser's x_t and self_cond rows, gathered from the pools
  by slot (`x_t = x_pool[state_row]`, the same for self_cond);
- `state_update.onnx`: what the host sampler does after a denoiser call (see
  `Row::apply_denoised` in the service), for every candidate of the call at once:
  the guided pair combined, self_cond kept or zeroed, x re-noised, both scattered into
  the pools' next copy (ONNX has no in-place update, so the service keeps two copies
  of each pool and alternates).

Both graphs are independent of the model (the latent's L and D are dynamic) and are
embedded in the service's binary, so a bundle needs nothing new. The arithmetic is the
host's, operation for operation and in float32, so a seed gives the same caption either
way: `x0 = (1+w) cond - w uncond` (just `cond` where w = 0) and
`x = sqrt(ab) x0 + r sqrt(1-ab) eps`, with the coefficients computed on the host.
Per candidate the coefficients come as `[N, 1, 1]` tensors and the slot as `[N, 1]`,
so that no node computes a shape (a captured CUDA graph needs none on the host).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import onnx
from onnx import TensorProto, helper

# Every op used here is in its current form at opset 13 (ScatterND without the
# `reduction` of 16), where ONNX Runtime's CUDA provider has had kernels for all of them
# the longest.
OPSET = 13
GATHER_FILE = "state_gather.onnx"
UPDATE_FILE = "state_update.onnx"

F32 = TensorProto.FLOAT
I64 = TensorProto.INT64


def _latent(name: str, rows: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F32, [rows, "tokens", "dims"])


def _per_row(name: str, dtype: int = F32) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, ["rows", 1, 1])


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="ladic.device_loop",
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def gather_graph() -> onnx.ModelProto:
    """x_pool, sc_pool [slots, L, D] and state_row [N] -> x_t, self_cond [N, L, D]."""
    nodes = [
        helper.make_node("Gather", ["x_pool", "state_row"], ["x_t"], axis=0),
        helper.make_node("Gather", ["self_cond_pool", "state_row"], ["self_cond"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "state_gather",
        [
            _latent("x_pool", "slots"),
            _latent("self_cond_pool", "slots"),
            helper.make_tensor_value_info("state_row", I64, ["rows"]),
        ],
        [_latent("x_t", "rows"), _latent("self_cond", "rows")],
    )
    return _model(graph)


def update_graph() -> onnx.ModelProto:
    """One step's update of every candidate of a denoiser call.

    Inputs, per candidate n of the call (padding candidates read row 0 with zero
    coefficients and write the scratch slot 0):
    - denoised [N', L, D]: the denoiser's output, cond and uncond rows;
    - cond_row, uncond_row [N]: which rows of it are the candidate's pair;
    - guide_cond, guide_uncond [N,1,1]: (1+w, w); guide_uncond = 0 means unguided;
    - keep_self_cond [N,1,1] (int64, 0 or 1): self_cond becomes x0, else zeros;
    - renoise_x0, renoise_noise [N,1,1] and noise [N, L, D]: the re-noise;
    - state_slot [N, 1]: where the new x and self_cond go.
    Outputs: the pools' next copy and x0 [N, L, D] (read back only for the candidates
    the host needs it for: Back&Refine, the final decode, streaming).
    """
    nodes = [
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
            _latent("denoised", "denoiser_rows"),
            helper.make_tensor_value_info("cond_row", I64, ["rows"]),
            helper.make_tensor_value_info("uncond_row", I64, ["rows"]),
            _per_row("guide_cond"),
            _per_row("guide_uncond"),
            _per_row("keep_self_cond", I64),
            _per_row("renoise_x0"),
            _per_row("renoise_noise"),
            _latent("noise", "rows"),
            helper.make_tensor_value_info("state_slot", I64, ["rows", 1]),
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
