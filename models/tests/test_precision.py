"""fp16 and mixed bundles (ladic/precision.py): same inputs and outputs, fp16 weights,
outputs and captions close to the fp32 bundle's, on the micro model in ONNX Runtime CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ladic import export, precision
from ladic.config import LadicConfig
from ladic.precision import (
    MAX_ID_MISMATCH,
    agreement,
    convert_bundle,
    convert_model,
    graph_differences,
)
from ladic.sampler import OnnxBackend, SampleParams

CONVERTED = ("fp16", "mixed")
ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("precision")
    fp32 = root / "fp32"
    model = export.random_model("micro", seed=3)
    tok = export.placeholder_tokenizer(model.cfg, root / "tokenizer.json")
    export.write_bundle(model, tok, fp32, "m", "m", check=False)  # test_export checks it
    out = {"fp32": fp32}
    for p in CONVERTED:  # the check runs in test_export_cli_writes_an_fp16_bundle
        convert_bundle(fp32, root / p, precision=p, check=False)
        out[p] = root / p
    return out


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def sessions(bundle: Path) -> dict[str, ort.InferenceSession]:
    graphs = manifest(bundle)["graphs"]
    return {
        name: ort.InferenceSession(str(bundle / g["file"]), providers=["CPUExecutionProvider"])
        for name, g in graphs.items()
    }


def io(sess: ort.InferenceSession) -> list[tuple[str, str, list]]:
    return [(a.name, a.type, list(a.shape)) for a in sess.get_inputs() + sess.get_outputs()]


def test_manifest_says_precision_and_nothing_else_changes(bundles) -> None:  # type: ignore[no-untyped-def]
    base = manifest(bundles["fp32"])
    assert base["precision"] == "fp32"
    for p in CONVERTED:
        m = manifest(bundles[p])
        assert m.pop("precision") == p
        assert m == {k: v for k, v in base.items() if k != "precision"}
        assert (bundles[p] / "tokenizer.json").read_bytes() == (
            bundles["fp32"] / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("p", CONVERTED)
def test_graphs_load_on_cpu_with_the_fp32_inputs_and_outputs(bundles, p: str) -> None:  # type: ignore[no-untyped-def]
    want, got = sessions(bundles["fp32"]), sessions(bundles[p])
    graphs = manifest(bundles[p])["graphs"]
    for name, g in graphs.items():
        assert io(got[name]) == io(want[name])
        spec = [(a["name"], ORT_TYPES[a["dtype"]]) for a in g["inputs"] + g["outputs"]]
        assert [x[:2] for x in io(got[name])] == spec


def initializers(path: Path) -> list[TensorProto]:
    return list(onnx.load(str(path)).graph.initializer)


def test_fp16_weights_take_half_the_bytes(bundles) -> None:  # type: ignore[no-untyped-def]
    for g in manifest(bundles["fp32"])["graphs"].values():
        a, b = initializers(bundles["fp32"] / g["file"]), initializers(bundles["fp16"] / g["file"])
        assert {t.data_type for t in a} == {TensorProto.FLOAT}
        assert {t.data_type for t in b} == {TensorProto.FLOAT16}
        size_a = sum(numpy_helper.to_array(t).nbytes for t in a)
        size_b = sum(numpy_helper.to_array(t).nbytes for t in b)
        assert size_b == size_a // 2
        # The micro graphs are mostly node metadata; the files still shrink.
        assert (bundles["fp16"] / g["file"]).stat().st_size < (
            bundles["fp32"] / g["file"]).stat().st_size


def test_mixed_keeps_matmul_weights_fp16_and_the_rest_fp32(bundles) -> None:  # type: ignore[no-untyped-def]
    model = onnx.load(str(bundles["mixed"] / "denoiser.onnx"))
    types = {t.name: t.data_type for t in model.graph.initializer}
    ops = {n.op_type for n in model.graph.node}
    assert "LayerNormalization" in ops
    for n in model.graph.node:
        for name in n.input:
            if name in types and n.op_type == "MatMul":
                assert types[name] == TensorProto.FLOAT16, name
            if name in types and n.op_type == "LayerNormalization":
                assert types[name] == TensorProto.FLOAT, name
    assert types["model.diffuser.time_table"] == TensorProto.FLOAT


@pytest.mark.parametrize("p", CONVERTED)
@pytest.mark.parametrize("batch", [1, 3])
def test_outputs_close_to_fp32(bundles, p: str, batch: int) -> None:  # type: ignore[no-untyped-def]
    m = manifest(bundles["fp32"])
    load = {
        b: {n: onnx.load(str(bundles[b] / g["file"])) for n, g in m["graphs"].items()}
        for b in ("fp32", p)
    }
    diffs = graph_differences(load["fp32"], load[p], m, batch, seed=11)
    assert set(diffs) == {"encoder.image_kv", "denoiser.x0", "decoder.token_ids",
                          "decoder.confidence"}
    for k, v in diffs.items():
        if "id_mismatch" in v:
            assert v["id_mismatch"] <= MAX_ID_MISMATCH
        else:
            # fp16 rounding is ~5e-4 relative; observed <= 1e-3 on this model.
            assert v["rel"] <= 1e-2, (k, v)


@pytest.mark.parametrize("p", CONVERTED)
def test_captions_agree_with_fp32(bundles, p: str) -> None:  # type: ignore[no-untyped-def]
    cfg = LadicConfig.from_dict(manifest(bundles["fp32"])["model_config"])
    s = cfg.image.image_size
    pixels = np.random.default_rng(0).standard_normal((8, 3, s, s)).astype(np.float32)
    a, b = OnnxBackend(str(bundles["fp32"])), OnnxBackend(str(bundles[p]))
    r = agreement(a, b, pixels, cfg, SampleParams.defaults(cfg), batch=5)
    assert r.images == 8
    # Deterministic: 64 of 64 such images agree for both precisions on this model.
    assert r.ids_fraction == 1.0 and r.captions_fraction == 1.0
    assert r.positions_differ == 0 and not r.disagreements
    # The same backend twice agrees with itself, whatever the noise seed.
    assert agreement(b, b, pixels[:2], cfg, SampleParams.defaults(cfg), seed=5).ids_agree == 2


def test_compare_cli_exit_code(bundles, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    def fake_split_images(split, cfg, count=None, cache_dir=None):  # type: ignore[no-untyped-def]
        assert split == "test-seen" and count == 3
        rng = np.random.default_rng(1)
        return rng.integers(0, 256, (count, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)

    monkeypatch.setattr("ladic.data.split_images", fake_split_images)
    args = ["compare", "--fp32", str(bundles["fp32"]), "--fp16", str(bundles["fp16"]),
            "--split", "test-seen", "--limit", "3"]
    assert precision.main(args) == 0
    assert "token ids agree on 3/3 captions" in capsys.readouterr().out
    assert precision.main(args + ["--min-agreement", "1.01"]) == 1


def test_convert_refuses_a_converted_bundle(bundles, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="not an fp32 bundle"):
        convert_bundle(bundles["fp16"], tmp_path / "again")


def test_export_cli_writes_an_fp16_bundle(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    export.main(["--random-init", "micro", "--seed", "3", "--out", str(tmp_path),
                 "--precision", "fp16"])
    out = capsys.readouterr().out
    assert "denoiser.x0: fp16 vs fp32" in out and "(precision fp16)" in out
    m = manifest(tmp_path)
    assert m["precision"] == "fp16"
    for g in m["graphs"].values():
        assert {t.data_type for t in initializers(tmp_path / g["file"])} == {TensorProto.FLOAT16}


def test_convert_model_casts_at_the_boundary_and_keeps_selections_fp32() -> None:
    """A hand-made graph: an output that is also read inside, a value_float Constant,
    and the Softmax -> ArgMax/ReduceMax tail."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 7, "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("Constant", [], ["two"], value_float=2.0),
        helper.make_node("Mul", ["y", "two"], ["z"]),
        helper.make_node("Softmax", ["z"], ["p"], axis=-1),
        helper.make_node("ArgMax", ["p"], ["ids"], axis=-1, keepdims=0),
        helper.make_node("ReduceMax", ["p"], ["conf"], axes=[-1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"]),
         helper.make_tensor_value_info("conf", TensorProto.FLOAT, ["n"])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    half, summary = convert_model(model)
    assert summary["fp32_nodes"] == {"ArgMax": 1, "ReduceMax": 1, "Softmax": 1}
    assert [i.type.tensor_type.elem_type for i in half.graph.output] == [
        TensorProto.FLOAT, TensorProto.INT64, TensorProto.FLOAT]
    assert half.graph.initializer[0].data_type == TensorProto.FLOAT16
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
           .run(None, {"x": x}) for m in (model, half)]
    for want, got in zip(*run):
        assert got.dtype == want.dtype and got.shape == want.shape
        if want.dtype == np.int64:
            assert np.array_equal(got, want)
        else:
            assert np.allclose(got, want, rtol=5e-3, atol=5e-3)


def test_the_kv_pool_is_cast_after_each_layers_gather(bundles) -> None:  # type: ignore[no-untyped-def]
    """Cast first, the whole pool would be converted at every call; after the per-layer
    gathers only the rows' K/V are."""
    for p in CONVERTED:
        graph = onnx.load(str(bundles[p] / "denoiser.onnx")).graph
        readers = [n for n in graph.node if "image_kv" in n.input]
        assert [n.op_type for n in readers] == ["Reshape"], p
        gathers = [n for n in graph.node if readers[0].output[0] in n.input]
        assert gathers and all(n.op_type == "Gather" for n in gathers), p
        pool = {"image_kv", readers[0].output[0]}
        assert not [n for n in graph.node if n.op_type == "Cast" and n.input[0] in pool], p


def test_fp16_kv_computes_what_the_fp16_bundle_computes(bundles, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`kv_precision="fp16"`: the K/V crosses from encoder to denoiser in float16 (the
    manifest says so), with exactly the values the fp16 bundle's graphs compute and read
    (its encoder makes them in fp16; a cast commutes with the gather), and the pool is
    gathered in fp16, never cast whole."""
    kv16 = tmp_path / "kv16"
    convert_bundle(bundles["fp32"], kv16, precision="fp16", kv_precision="fp16")
    graphs = manifest(kv16)["graphs"]
    assert [o["dtype"] for o in graphs["encoder"]["outputs"]] == ["float16"]
    dtypes = {i["name"]: i["dtype"] for i in graphs["denoiser"]["inputs"]}
    assert dtypes == {"x_t": "float32", "self_cond": "float32", "t": "int64",
                      "image_kv": "float16", "kv_index": "int64"}  # fmt: skip
    a, b = sessions(bundles["fp16"]), sessions(kv16)
    cfg = LadicConfig.from_dict(manifest(kv16)["model_config"])
    ex = export.example_inputs(cfg, batch=3, seed=4)
    pixels = ex["encoder"]["pixels"].numpy()
    kv_a = a["encoder"].run(None, {"pixels": pixels})[0]
    kv_b = b["encoder"].run(None, {"pixels": pixels})[0]
    assert kv_a.dtype == np.float32 and kv_b.dtype == np.float16
    assert np.array_equal(kv_a, kv_b.astype(np.float32))
    feed = {k: v.numpy() for k, v in ex["denoiser"].items() if k != "image_kv"}
    feed["kv_index"] = np.array([2, 0, 2], dtype=np.int64)
    pool = np.concatenate([kv_a, kv_a[:1]])
    x0_a = a["denoiser"].run(None, {**feed, "image_kv": pool})[0]
    x0_b = b["denoiser"].run(None, {**feed, "image_kv": pool.astype(np.float16)})[0]
    assert np.array_equal(x0_a, x0_b)
    graph = onnx.load(str(kv16 / "denoiser.onnx")).graph
    flat = next(n for n in graph.node if "image_kv" in n.input)
    assert flat.op_type == "Reshape"
    assert {n.op_type for n in graph.node if flat.output[0] in n.input} == {"Gather"}
    # Only an fp16 bundle whose denoiser takes kv_index.
    with pytest.raises(ValueError, match="kv_precision fp16"):
        convert_bundle(bundles["fp32"], tmp_path / "m", precision="mixed", kv_precision="fp16")


def test_fp16_kv_bundle_captions_as_the_fp16_bundle(bundles, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The Python sampler runs such a bundle (its K/V stays float16 end to end) to the
    same captions as the fp16 bundle."""
    kv16 = tmp_path / "kv16"
    convert_bundle(bundles["fp32"], kv16, precision="fp16", kv_precision="fp16", check=False)
    cfg = LadicConfig.from_dict(manifest(kv16)["model_config"])
    pixels = export.example_inputs(cfg, batch=3, seed=5)["encoder"]["pixels"].numpy()
    params = SampleParams.defaults(cfg)
    params.steps, params.guidance = 4, 1.0
    got = agreement(OnnxBackend(str(bundles["fp16"])), OnnxBackend(str(kv16)), pixels, cfg, params)
    assert got.ids_agree == got.images == 3


def test_bench_graphs_times_fp16_kv_beside_fp16(bundles, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Each bundle gets the same random inputs in the types its manifest says."""
    from ladic import bench_graphs

    kv16 = tmp_path / "kv16"
    convert_bundle(bundles["fp32"], kv16, precision="fp16", kv_precision="fp16", check=False)
    fp16 = str(bundles["fp16"])
    bench_graphs.main([fp16, str(kv16), "--graph", "denoiser", "--batch", "2", "--seconds", "0.05"])
    lines = capsys.readouterr().out.splitlines()
    assert "max |A-B| of the first output 0.0e+00" in lines[1]
    bench_graphs.main([fp16, str(kv16), "--graph", "denoiser", "--batch", "2", "--ops",
                       "--runs", "1"])  # fmt: skip
    assert "Gather" in capsys.readouterr().out


def test_a_bundle_from_before_kv_index_converts(tmp_path: Path) -> None:
    """A denoiser that takes one K/V row per input row (docs/bundle.md): the parity
    fixtures' legacy denoiser in a copy of their bundle."""
    import shutil

    fixtures = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "parity"
    legacy = tmp_path / "legacy"
    shutil.copytree(fixtures / "bundle", legacy)
    shutil.copyfile(fixtures / "legacy-denoiser.onnx", legacy / "denoiser.onnx")
    m = manifest(legacy)
    inputs = m["graphs"]["denoiser"]["inputs"]
    inputs[:] = [i for i in inputs if i["name"] != "kv_index"]
    for i in inputs:
        if i["name"] == "image_kv":
            i["shape"][0] = "batch"
    (legacy / "manifest.json").write_text(json.dumps(m))

    convert_bundle(legacy, tmp_path / "fp16", precision="fp16", check=True)
    assert manifest(tmp_path / "fp16")["precision"] == "fp16"
