"""The exported graphs and the ONNX sampler agree with PyTorch."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ladic.config import BackRefineConfig
from ladic.diffusion import alpha_bar, stride_for
from ladic.export import (
    example_inputs,
    max_graph_difference,
    placeholder_tokenizer,
    random_model,
    write_bundle,
)
from ladic.model import Ladic
from ladic.sampler import (
    OnnxBackend,
    SampleParams,
    SeededNoise,
    TorchBackend,
    caption_images,
)


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("bundle")
    model = random_model("micro", seed=3)
    write_bundle(model, placeholder_tokenizer(model.cfg, out / "tokenizer.json"), out, "m", "m")
    return model, out


def test_bundle_files_and_manifest(micro) -> None:  # type: ignore[no-untyped-def]
    model, out = micro
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "ladic-bundle" and manifest["format_version"] == 1
    for graph in manifest["graphs"].values():
        assert (out / graph["file"]).exists()
        for io in graph["inputs"] + graph["outputs"]:
            # The denoiser's K/V pool is indexed by kv_index; everything else is per row.
            pooled = graph["file"] == "denoiser.onnx" and io["name"] == "image_kv"
            assert io["shape"][0] == ("kv_slots" if pooled else "batch")
    names = [io["name"] for io in manifest["graphs"]["denoiser"]["inputs"]]
    assert names == ["x_t", "self_cond", "t", "image_kv", "kv_index"]
    assert manifest["text"]["max_len"] == model.cfg.text.max_len
    assert manifest["diffuser"]["hidden"] == 2 * manifest["text"]["latent_dim"]


def test_denoiser_gathers_each_rows_kv_from_the_pool(micro) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    model, out = micro
    inputs = example_inputs(model.cfg, batch=4, seed=5)["denoiser"]
    inputs["kv_index"] = torch.tensor([2, 0, 2, 4])  # repeats and an unused slot
    sess = ort.InferenceSession(str(out / "denoiser.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        per_row = model.denoise(
            inputs["x_t"], inputs["self_cond"], inputs["t"], inputs["image_kv"][[2, 0, 2, 4]]
        )
    assert np.abs(got - per_row.numpy()).max() <= 1e-4


def test_denoiser_copies_each_layers_kv_once(micro) -> None:  # type: ignore[no-untyped-def]
    """The pool is only reshaped (no copy); each layer's K and each layer's V is gathered
    from it directly, rather than whole slots first and each layer's part out of those."""
    import onnx

    model, out = micro
    graph = onnx.load(str(out / "denoiser.onnx")).graph
    readers = [n for n in graph.node if "image_kv" in n.input]
    assert [n.op_type for n in readers] == ["Reshape"]
    flat = readers[0].output[0]
    gathers = [n for n in graph.node if flat in n.input]
    assert [n.op_type for n in gathers] == ["Gather"] * 2 * model.cfg.diffuser.layers
    assert all(n.input[0] == flat for n in gathers)


def test_denoiser_computes_no_shapes(micro) -> None:  # type: ignore[no-untyped-def]
    """Every shape in the denoiser is a constant (only the batch axis varies, as -1), so
    on a GPU no node of it falls back to the host (which would block CUDA graphs)."""
    import onnx

    _, out = micro
    ops = {n.op_type for n in onnx.load(str(out / "denoiser.onnx")).graph.node}
    assert not ops & {"Shape", "Size", "Range", "ConstantOfShape"}


@pytest.mark.parametrize("batch", [1, 3])
def test_graphs_match_pytorch(micro, batch: int) -> None:  # type: ignore[no-untyped-def]
    model, out = micro
    diffs = max_graph_difference(model, out, batch)
    assert diffs["decoder.token_ids"] == 0.0
    assert max(v for k, v in diffs.items() if k != "decoder.token_ids") <= 1e-4


def test_differences_are_relative_to_large_outputs() -> None:
    from ladic.export import output_difference

    small = np.array([0.5, -0.25], dtype=np.float32)
    assert output_difference(small + np.float32(2e-5), small) == pytest.approx(2e-5, rel=1e-2)
    large = np.array([100.0, -400.0], dtype=np.float32)
    assert output_difference(large + np.float32(0.004), large) == pytest.approx(1e-5, rel=1e-2)
    assert output_difference(np.zeros(0), np.zeros(0)) == 0.0


def test_scaled_input_divides_x_t_by_its_training_std(tmp_path: Path) -> None:
    plain = random_model("micro", seed=4)
    cfg = copy.deepcopy(plain.cfg)
    cfg.diffuser.scale_input = True
    scaled = Ladic(cfg).eval()
    scaled.load_state_dict(plain.state_dict(), strict=False)  # the table is the only new buffer
    inputs = example_inputs(cfg, batch=3, seed=6)["denoiser"]
    kv = inputs["image_kv"][inputs["kv_index"]]
    t = torch.tensor([1, 500, 999])
    ab = torch.tensor(alpha_bar(cfg.schedule), dtype=torch.float32)[t]
    s = cfg.schedule.train_noise_scale
    std = (ab + s * s * (1 - ab)).sqrt()[:, None, None]
    with torch.no_grad():
        want = plain.denoise(inputs["x_t"] / std, inputs["self_cond"], t, kv)
        got = scaled.denoise(inputs["x_t"], inputs["self_cond"], t, kv)
    assert torch.allclose(got, want, atol=1e-5)
    # The table travels inside the exported graph; the bundle contract is unchanged.
    tokenizer = placeholder_tokenizer(cfg, tmp_path / "tokenizer.json")
    write_bundle(scaled, tokenizer, tmp_path, "s", "s")
    diffs = max_graph_difference(scaled, tmp_path, 3)
    assert max(v for k, v in diffs.items() if k != "decoder.token_ids") <= 1e-4


def test_fused_attention_export_matches_pytorch(tmp_path: Path) -> None:
    import onnx

    model = random_model("micro", seed=3)
    tokenizer = placeholder_tokenizer(model.cfg, tmp_path / "tokenizer.json")
    write_bundle(model, tokenizer, tmp_path, "f", "f", fused_attention=True)
    ops = {
        name: [n.op_type for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node]
        for name in ("encoder", "denoiser", "decoder")
    }
    # One node per attention: encoder 1 layer; denoiser self + cross per layer; decoder 1.
    assert ops["encoder"].count("MultiHeadAttention") == model.cfg.image.layers
    assert ops["denoiser"].count("MultiHeadAttention") == 2 * model.cfg.diffuser.layers
    assert "MultiHeadAttention" in ops["decoder"]
    assert all("Softmax" not in o for o in (ops["encoder"], ops["denoiser"]))
    for batch in (1, 3):
        diffs = max_graph_difference(model, tmp_path, batch)
        assert diffs["decoder.token_ids"] == 0.0
        assert max(v for k, v in diffs.items() if k != "decoder.token_ids") <= 1e-4


def test_bench_graphs_times_two_bundles(micro, capsys) -> None:  # type: ignore[no-untyped-def]
    from ladic import bench_graphs

    _, out = micro
    bench_graphs.main([str(out), str(out), "--batch", "1,2", "--seconds", "0.05"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[1:]] == ["batch    1", "batch    2"]
    assert all("max |A-B| of the first output 0.0e+00" in line for line in lines[1:])
    bench_graphs.main([str(out), str(out), "--nodes"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert all("denoiser" in line and "after optimization" in line for line in lines)
    bench_graphs.main([str(out), str(out), "--batch", "2", "--ops", "--runs", "2"])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert "MatMul" in rows and "Gather" in rows and "all" in rows
    assert all(float(a) > 0 and float(b) > 0 for a, b in [rows["MatMul"], rows["all"][1:]])


PARAMS = {
    "plain": dict(steps=5),
    "guidance_off": dict(steps=8, guidance=0.0),
    "back_refine": dict(steps=6, back_refine=BackRefineConfig(True, 0.5, 599, 2)),
    "mbr": dict(steps=4, candidates=3),
}


@pytest.mark.parametrize("case", sorted(PARAMS))
def test_onnx_sampler_matches_pytorch_sampler(micro, case: str) -> None:  # type: ignore[no-untyped-def]
    model, out = micro
    params = SampleParams.defaults(model.cfg)
    for k, v in PARAMS[case].items():
        setattr(params, k, v)
    s = model.cfg.image.image_size
    pixels = np.random.default_rng(0).standard_normal((2, 3, s, s)).astype(np.float32)
    shape = (model.cfg.text.max_len, model.cfg.latent_dim)
    results = []
    for backend in (TorchBackend(model), OnnxBackend(str(out))):
        caps = caption_images(
            backend, pixels, params, model.cfg, lambda i, j: SeededNoise(10 * i + j, shape)
        )
        results.append(caps)
    for a, b in zip(*results):
        assert a.ids == b.ids
        assert a.chosen == b.chosen
        for ra, rb in zip(a.rows, b.rows):
            assert np.array_equal(ra.ids, rb.ids)


def test_schedule_and_strides() -> None:
    from ladic.config import ScheduleConfig

    ab = alpha_bar(ScheduleConfig())
    assert ab.shape == (1000,) and ab[0] == 1.0 and np.all(np.diff(ab) < 0)
    assert stride_for(34, 1000) == 30 and stride_for(5, 1000) == 200
    for steps in (1, 5, 10, 34, 100):
        stride = stride_for(steps, 1000)
        assert -(-999 // stride) == steps


@pytest.mark.parametrize("attention", ["unfused", "fused"])
def test_unconditional_half_export(tmp_path: Path, attention: str) -> None:
    """`--unconditional-half`: the second half of the rows attends to slot 0 whatever
    kv_index says, its K/V taken by constant slices (one per layer's K and V, not a
    gather per row), and the manifest says so."""
    import onnx
    import onnxruntime as ort

    model = random_model("micro", seed=3)
    tokenizer = placeholder_tokenizer(model.cfg, tmp_path / "tokenizer.json")
    diffs = write_bundle(
        model, tokenizer, tmp_path, "u", "u",
        fused_attention=attention == "fused", unconditional_half=True,
    )  # fmt: skip
    assert max(v for k, v in diffs.items() if k != "decoder.token_ids") <= 1e-4
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["graphs"]["denoiser"]["unconditional_half"] is True
    assert "unconditional_half" not in manifest["graphs"]["encoder"]
    assert manifest["format_version"] == 2  # version-1 readers must refuse it

    inputs = example_inputs(model.cfg, batch=6, seed=8)["denoiser"]
    inputs["kv_index"] = torch.tensor([3, 1, 3, 5, 2, 4])  # the last three are ignored
    sess = ort.InferenceSession(str(tmp_path / "denoiser.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        want = model.denoise(
            inputs["x_t"], inputs["self_cond"], inputs["t"], inputs["image_kv"][[3, 1, 3, 0, 0, 0]]
        )
    assert np.abs(got - want.numpy()).max() <= 1e-4

    graph = onnx.load(str(tmp_path / "denoiser.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert not set(ops) & {"Shape", "Size", "Range", "ConstantOfShape"}
    flat = next(n for n in graph.node if "image_kv" in n.input).output[0]
    readers = [n.op_type for n in graph.node if flat in n.input]
    layers = model.cfg.diffuser.layers
    assert sorted(readers) == sorted(["Gather"] * 2 * layers + ["Slice"] * 2 * layers)
    from ladic.precision import PROVIDERS, ProviderBackend

    for backend in (lambda: OnnxBackend(str(tmp_path)),
                    lambda: ProviderBackend(tmp_path, PROVIDERS["cpu"])):  # fmt: skip
        with pytest.raises(ValueError, match="unconditional-half"):
            backend()


def test_committed_unconditional_half_fixture_ignores_the_second_halfs_kv_index() -> None:
    """tests/fixtures/parity/unconditional-half-denoiser.onnx (the service's tests rely on
    it) is such a denoiser: the second half's kv_index changes nothing, and the first
    half's K/V and slot 0 give what the plain parity denoiser gives."""
    import onnxruntime as ort

    from ladic.fixtures import DEFAULT_OUT

    def session(path: Path) -> ort.InferenceSession:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    half = session(DEFAULT_OUT / "unconditional-half-denoiser.onnx")
    plain = session(DEFAULT_OUT / "bundle" / "denoiser.onnx")
    model = random_model("micro", seed=7)  # the fixtures' weights
    feed = {k: v.numpy() for k, v in example_inputs(model.cfg, batch=4, seed=9)["denoiser"].items()}
    feed["kv_index"] = np.array([1, 3, 2, 4], dtype=np.int64)
    got = half.run(None, feed)[0]
    other = half.run(None, {**feed, "kv_index": np.array([1, 3, 0, 0], dtype=np.int64)})[0]
    want = plain.run(None, {**feed, "kv_index": np.array([1, 3, 0, 0], dtype=np.int64)})[0]
    assert np.array_equal(got, other)
    assert np.abs(got - want).max() <= 1e-5


def test_unconditional_half_fp16_conversion(tmp_path: Path) -> None:
    """The fp16 conversion checks such a bundle at even batches and keeps its flag."""
    from ladic.precision import convert_bundle

    model = random_model("micro", seed=3)
    tokenizer = placeholder_tokenizer(model.cfg, tmp_path / "tokenizer.json")
    write_bundle(model, tokenizer, tmp_path, "u", "u", check=False, unconditional_half=True)
    report = convert_bundle(tmp_path, precision="fp16")
    assert report["diffs"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["precision"] == "fp16"
    assert manifest["graphs"]["denoiser"]["unconditional_half"] is True
    # The pool is cast after what selects from it (each row's K/V, slot 0's), never
    # whole: its reshaped form feeds only Gather and Slice nodes, which stay fp32.
    import onnx

    graph = onnx.load(str(tmp_path / "denoiser.onnx")).graph
    flat = next(n for n in graph.node if "image_kv" in n.input)
    assert flat.op_type == "Reshape"
    readers = [n for n in graph.node if flat.output[0] in n.input]
    assert {n.op_type for n in readers} == {"Gather", "Slice"}
    cast_inputs = {n.input[0] for n in graph.node if n.op_type == "Cast"}
    assert not {"image_kv", flat.output[0]} & cast_inputs


def test_committed_parity_fixtures_are_current(tmp_path: Path) -> None:
    """`python -m ladic.fixtures` reproduces what tests/fixtures/parity holds."""
    from ladic.fixtures import DEFAULT_OUT, main

    main(["--out", str(tmp_path)])
    fresh = json.loads((tmp_path / "cases.json").read_text())
    committed = json.loads((DEFAULT_OUT / "cases.json").read_text())
    assert [c["name"] for c in fresh] == [c["name"] for c in committed]
    for f, c in zip(fresh, committed):
        assert f["ids"] == c["ids"] and f["caption"] == c["caption"] and f["chosen"] == c["chosen"]
        np.testing.assert_allclose(f["noise"][0][0], c["noise"][0][0], atol=0)
        np.testing.assert_allclose(f["trace"][0][-1]["x0"], c["trace"][0][-1]["x0"], atol=1e-4)


# ------------------------------------------------------------ runs, checks, CLI errors


def test_graphs_declare_the_manifests_fixed_sizes(micro) -> None:  # type: ignore[no-untyped-def]
    """Every axis the manifest gives a size has that size in the graph too (the exporter
    left some output axes symbolic), and the named axes stay named."""
    import onnx

    _, out = micro
    manifest = json.loads((out / "manifest.json").read_text())
    for spec in manifest["graphs"].values():
        graph = onnx.load(str(out / spec["file"])).graph
        declared = {
            v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]
        }
        for io in spec["inputs"] + spec["outputs"]:
            assert declared[io["name"]] == io["shape"], (spec["file"], io["name"])


def micro_run(root: Path, steps: dict[str, int | None]) -> dict[str, Ladic]:
    """A ladic.train-like run folder with a different micro model in each of final.pt
    and checkpoint.pt (`steps`: file -> its step; None writes no step, absent no file)."""
    root.mkdir(parents=True, exist_ok=True)
    models = {}
    for seed, name in enumerate(("final.pt", "checkpoint.pt")):
        model = random_model("micro", seed=10 + seed)
        models[name] = model
        if name not in steps:
            continue
        blob: dict[str, object] = {"model": model.state_dict()}
        if steps[name] is not None:
            blob["step"] = steps[name]
        torch.save(blob, root / name)
    (root / "config.json").write_text(json.dumps(models["final.pt"].cfg.to_dict()))
    placeholder_tokenizer(models["final.pt"].cfg, root / "tokenizer.json")
    return models


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize(
    "steps, newest",
    [
        ({"final.pt": 4, "checkpoint.pt": 6}, "checkpoint.pt"),  # resumed, stopped later
        ({"final.pt": 6, "checkpoint.pt": 6}, "final.pt"),
        ({"final.pt": None, "checkpoint.pt": 6}, "checkpoint.pt"),  # final.pt without step
        ({"final.pt": 4}, "final.pt"),
        ({"checkpoint.pt": 6}, "checkpoint.pt"),
    ],
)
def test_load_run_takes_the_newer_weights(tmp_path: Path, steps, newest: str) -> None:  # type: ignore[no-untyped-def]
    from ladic.export import load_run, load_run_weights

    models = micro_run(tmp_path / "run", steps)
    model, _ = load_run(tmp_path / "run")
    assert same_weights(model, models[newest])
    assert load_run_weights(tmp_path / "run")[2] == tmp_path / "run" / newest


def test_export_checkpoint_flag(tmp_path: Path) -> None:
    from ladic.export import main

    models = micro_run(tmp_path / "run", {"final.pt": 4, "checkpoint.pt": 6})
    other = tmp_path / "older.pt"
    torch.save({"model": models["final.pt"].state_dict(), "step": 4}, other)
    main(["--run", str(tmp_path / "run"), "--checkpoint", str(other), "--out",
          str(tmp_path / "b"), "--no-check"])
    diffs = max_graph_difference(models["final.pt"], tmp_path / "b", 1)
    assert max(v for k, v in diffs.items() if k != "decoder.token_ids") <= 1e-4
    with pytest.raises(SystemExit):
        main(["--random-init", "micro", "--checkpoint", str(other), "--out", str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()
    # Files that are not weights of this run's model: one line, no traceback.
    text_only = tmp_path / "text_latent.pt"
    torch.save(models["final.pt"].text.state_dict(), text_only)
    tiny = tmp_path / "tiny.pt"
    torch.save({"model": random_model("tiny", seed=1).state_dict()}, tiny)
    for wrong, says in [(text_only, "holds no model weights"), (tiny, "does not fit")]:
        with pytest.raises(SystemExit) as err:
            main(["--run", str(tmp_path / "run"), "--checkpoint", str(wrong), "--out",
                  str(tmp_path / "d"), "--no-check"])
        msg = str(err.value.code)
        assert msg.startswith("error: ") and says in msg and "\n" not in msg, msg


def test_a_failed_export_leaves_no_manifest(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from ladic import export

    model = random_model("micro", seed=3)
    tokenizer = placeholder_tokenizer(model.cfg, tmp_path / "tokenizer.json")
    write_bundle(model, tokenizer, tmp_path, "m", "m", check=False)
    assert (tmp_path / "manifest.json").exists()
    monkeypatch.setattr(export, "max_graph_difference", lambda *a, **k: {"encoder.x": 1.0})
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        write_bundle(random_model("micro", seed=4), tokenizer, tmp_path, "m", "m")
    assert not (tmp_path / "manifest.json").exists()


def test_a_failed_fp16_step_leaves_no_manifest(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import onnx

    from ladic import export, precision

    out = tmp_path / "b"
    real_save = onnx.save

    def failing_save(model, path, *a, **k):  # type: ignore[no-untyped-def]
        if str(path).endswith("denoiser.onnx"):
            raise OSError("disk full")
        return real_save(model, path, *a, **k)

    # In ladic.precision: the conversion writes the encoder, then fails on the denoiser.
    monkeypatch.setattr(precision.onnx, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export.main(["--random-init", "micro", "--out", str(out), "--no-check",
                     "--precision", "fp16"])
    assert (out / "encoder.onnx").exists() and not (out / "manifest.json").exists()
    # A conversion that fails its check writes no graph, and the export, which asked for
    # fp16, leaves no fp32 manifest either.
    monkeypatch.setattr(precision.onnx, "save", real_save)
    monkeypatch.setattr(precision, "_worse", lambda diffs: {"denoiser.x0": 1.0})
    with pytest.raises(RuntimeError, match="beyond tolerance"):
        export.main(["--random-init", "micro", "--out", str(out), "--precision", "fp16"])
    assert not (out / "manifest.json").exists()


def export_error(argv: list[str], capsys) -> str:  # type: ignore[no-untyped-def]
    """The one-line error of an export that must refuse (argparse's or main's)."""
    from ladic.export import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    message = str(exit_info.value.code) if exit_info.value.code not in (None, 2) else err[-1]
    assert "Traceback" not in message
    return message


@pytest.mark.parametrize(
    "flags, expected",
    [(["--steps", "0"], "--steps must be at least 1"),
     (["--guidance", "-1"], "--guidance must be at least 0")],
)
def test_export_rejects_bad_sampler_defaults(tmp_path: Path, capsys, flags, expected) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    assert expected in export_error(["--random-init", "micro", "--out", str(out), *flags], capsys)
    assert not out.exists()


def test_export_refuses_a_folder_that_is_not_a_run(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    for run in (tmp_path / "empty", tmp_path / "missing"):
        msg = export_error(["--run", str(run), "--out", str(out)], capsys)
        assert "not a ladic.train run" in msg and str(run) in msg
    assert not out.exists()


def test_export_official_arguments_are_checked_first(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    ckpt = tmp_path / "ckpt.bin"
    ckpt.write_text("not a checkpoint\n")
    out = tmp_path / "out"
    msg = export_error(["--official", str(ckpt), "--out", str(out)], capsys)
    assert "--bert" in msg and "--mean" in msg and "--std" in msg
    flags = ["--official", str(ckpt), "--bert", str(tmp_path), "--mean", str(tmp_path / "m"),
             "--std", str(ckpt), "--out", str(out)]
    assert "--mean" in export_error(flags, capsys) and "no such file" in export_error(flags, capsys)
    assert not out.exists()


def test_export_official_errors_are_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    ckpt = tmp_path / "ckpt.bin"
    ckpt.write_text("not a checkpoint\n")
    out = tmp_path / "out"
    msg = export_error(["--official", str(ckpt), "--bert", str(tmp_path), "--mean", str(ckpt),
                        "--std", str(ckpt), "--out", str(out)], capsys)
    assert msg.startswith("error: ") and "not a PyTorch or safetensors checkpoint" in msg
    assert "allow" not in msg and "\n" not in msg
    assert not out.exists()
