#!/usr/bin/env python3
"""Writes tests/fixtures/faulty/denoiser.onnx: a stand-in for the parity bundle's
denoiser (tests/fixtures/parity/bundle) with the same inputs and outputs, which fails
at run time whenever a call has more than 2 rows.

    python3 scripts/make-faulty-bundle.py

x0 = 0.5 * x_t, plus 0 * sum(Expand(t, [2])). The Expand only broadcasts a batch of 1
or 2 rows to 2; any larger batch is an ONNX Runtime error in the middle of a run, the
kind of fault tests/faults.rs needs: one guided candidate (2 rows) works, a batch of
more rows fails, and the next small batch works again. Needs the `onnx` package.
"""

from pathlib import Path

import onnx
from onnx import TensorProto, helper

OUT = Path(__file__).resolve().parent.parent / "tests/fixtures/faulty/denoiser.onnx"
L, D = 12, 8  # text.max_len, text.latent_dim of the parity bundle
KV = (4, 5, 16)  # 2 * diffuser.layers, image_tokens, hidden


def main():
    inputs = [
        helper.make_tensor_value_info("x_t", TensorProto.FLOAT, ["batch", L, D]),
        helper.make_tensor_value_info("self_cond", TensorProto.FLOAT, ["batch", L, D]),
        helper.make_tensor_value_info("t", TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info("image_kv", TensorProto.FLOAT, ["kv_slots", *KV]),
        helper.make_tensor_value_info("kv_index", TensorProto.INT64, ["batch"]),
    ]
    outputs = [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["batch", L, D])]
    inits = [
        helper.make_tensor("two_rows", TensorProto.INT64, [1], [2]),
        helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
    ]
    nodes = [
        # Fails unless the batch is 1 or 2 rows.
        helper.make_node("Expand", ["t", "two_rows"], ["guard"], name="fail_above_2_rows"),
        helper.make_node("Cast", ["guard"], ["guard_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["guard_f"], ["guard_sum"], keepdims=0),
        helper.make_node("Mul", ["guard_sum", "zero"], ["nothing"]),
        helper.make_node("Mul", ["x_t", "half"], ["scaled"]),
        helper.make_node("Add", ["scaled", "nothing"], ["x0"]),
    ]
    graph = helper.make_graph(nodes, "faulty_denoiser", inputs, outputs, inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="scripts/make-faulty-bundle.py",
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
