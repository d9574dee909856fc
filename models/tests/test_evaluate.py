"""The evaluation on a random micro bundle, a micro AR run and tiny fake splits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ladic import evaluate, plots, scenes
from ladic.ar_baseline import ArCaptioner, micro_ar_config
from ladic.export import placeholder_tokenizer, random_model, write_bundle
from ladic.tokenizer import build_word_tokenizer, special_ids

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    model = random_model("micro", seed=5)
    bundle = root / "bundle"
    bundle.mkdir()
    write_bundle(model, placeholder_tokenizer(model.cfg, bundle / "tokenizer.json"), bundle,
                 "micro", "random micro", check=False)
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(model.cfg.to_dict()))
    torch.save({"config": model.cfg.to_dict(), "model": model.state_dict()}, run / "final.pt")
    (run / "tokenizer.json").write_bytes((bundle / "tokenizer.json").read_bytes())

    tok = build_word_tokenizer(scenes.VOCABULARY, 40)
    torch.manual_seed(0)
    ar = ArCaptioner(micro_ar_config(tok.get_vocab_size(), special_ids(tok)))
    ar_run = root / "ar"
    ar_run.mkdir()
    tok.save(str(ar_run / "tokenizer.json"))
    torch.save({"config": ar.cfg.to_dict(), "model": ar.state_dict()}, ar_run / "final.pt")
    return {"root": root, "bundle": bundle, "run": run, "ar": ar_run}


def tables(markdown: str) -> list[list[str]]:
    """Blocks of consecutive lines that start with '|'."""
    blocks: list[list[str]] = []
    current: list[str] = []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    return blocks


def assert_valid_table(block: list[str]) -> None:
    assert len(block) >= 3
    cells = block[0].count("|")
    assert re.fullmatch(r"\|(---\|)+", block[1]) and block[1].count("|") == cells
    for row in block[2:]:
        assert row.endswith("|") and row.count("|") == cells


def test_evaluate_end_to_end(setup: dict[str, Path]) -> None:
    out = setup["root"] / "out"
    argv = ["--bundle", str(setup["bundle"]), "--ar", str(setup["ar"]), "--run", str(setup["run"]),
            "--limit", "4", "--out", str(out), "--no-ngrams", "--repeats", "1",
            "--latency-batches", "1,2", "--chunk", "3",
            "--data-dir", str(setup["root"] / "data")]
    evaluate.main(argv)
    results = json.loads((out / "results.json").read_text())
    for key in ("command", "date", "machine", "limit", "images", "bundle", "quality",
                "latency", "parameters", "examples"):
        assert key in results
    assert results["limit"] == 4 and results["images"] == {"test-seen": 4, "test-novel": 4}
    assert results["machine"]["cores"] >= 1 and "processor" in results["machine"]
    for split in ("test-seen", "test-novel"):
        rows = results["quality"][split]
        diffusion = [r for r in rows if r["model"] == "diffusion"]
        # micro default = 5 iterations: {5, 34} x B&R off/on x MBR 1/4, then AR greedy/beam.
        assert {(r["steps"], r["back_refine"], r["mbr"]) for r in diffusion} == {
            (s, b, k) for s in (5, 34) for b in (False, True) for k in (1, 4)}
        assert sum(r["default"] for r in diffusion) == 1
        assert sorted(r["beam"] for r in rows if r["model"] == "ar") == [1, 3]
        for r in rows:
            assert r["count"] == 4
            for key in ("exact_match", "object_precision", "object_recall", "object_f1"):
                assert 0.0 <= r[key] <= 1.0
    latency = {(r["model"], r["runtime"], r["setting"], r["batch"]) for r in results["latency"]}
    for b in (1, 2):
        assert ("diffusion", "PyTorch", "5 iterations", b) in latency
        assert ("diffusion", "PyTorch", "34 iterations", b) in latency
        assert ("ar", "PyTorch", "greedy", b) in latency
    assert all(r["ms_per_image"] > 0 for r in results["latency"])

    md = (out / "results.md").read_text()
    assert "--limit 4" in md and "N = 4" in md
    blocks = tables(md)
    assert len(blocks) == 3  # test-seen, test-novel, latency
    for block in blocks:
        assert_valid_table(block)
    assert len(blocks[0]) == 2 + 10
    captions = json.loads((out / "captions.json").read_text())
    assert all(len(c) == 4 for c in captions["test-seen"].values())
    for png in ("quality_vs_iterations.png", "latency_vs_batch.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_mbr_subsets_reuse_candidates(setup: dict[str, Path]) -> None:
    """k=1 from a k=4 run equals a real k=1 run with the same seeds."""
    bundle = evaluate.Bundle(setup["bundle"], threads=1)
    pixels = torch.randn(3, 3, 32, 32).numpy()
    args = (bundle.backend, bundle.cfg, bundle.tokenizer, pixels)
    both = evaluate.sample_captions(*args, bundle.params(5, False, 4), [1, 4], seed=7, chunk=2)
    one = evaluate.sample_captions(*args, bundle.params(5, False, 1), [1], seed=7, chunk=3)
    assert both[1] == one[1]
    assert len(both[4]) == 3


def test_quality_table_formats_missing_ngrams() -> None:
    row = evaluate.quality_row("ar", {"exact_match": 0.5, "CIDEr-D": None}, beam=3)
    block = evaluate.quality_table([row]).splitlines()
    assert_valid_table(block)
    assert "beam 3" in block[2] and "n/a" in block[2] and "50.0" in block[2]


def test_loss_plot(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "train_log.csv").write_text(
        "step,loss,latent,token,lr,seconds,val_exact\n"
        "25,2.0,1.5,2.5,0.0001,3.0,\n50,1.0,0.8,1.2,0.0002,3.0,0.1000\n"
    )
    ar = tmp_path / "ar"
    ar.mkdir()
    (ar / "train_log.csv").write_text(
        "step,loss,lr,seconds,val_exact\n25,3.0,0.1,1,\n50,2,0.1,1,0.2\n"
    )
    plots.main(["--run", str(run), "--run", str(ar)])
    assert (run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def quick_eval(setup: dict[str, Path], out: Path, run: Path) -> list[str]:
    return ["--bundle", str(setup["bundle"]), "--run", str(run), "--splits", "test-seen",
            "--limit", "2", "--iterations", "5", "--mbr", "1", "--out", str(out),
            "--no-ngrams", "--repeats", "1", "--latency-batches", "1", "--chunk", "2",
            "--data-dir", str(setup["root"] / "data")]


def test_a_run_of_another_model_is_not_timed(setup: dict[str, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    """--run must hold the bundle's model (sampler defaults aside) for the PyTorch rows."""
    same, other = setup["root"] / "same", setup["root"] / "other"
    for run, change in ((same, ("sampler", "steps", 7)), (other, ("diffuser", "layers", 3))):
        run.mkdir()
        for f in ("final.pt", "tokenizer.json"):
            (run / f).write_bytes((setup["run"] / f).read_bytes())
        cfg = json.loads((setup["run"] / "config.json").read_text())
        cfg[change[0]][change[1]] = change[2]
        (run / "config.json").write_text(json.dumps(cfg))
    for run, timed in ((same, True), (other, False)):
        out = setup["root"] / f"out-{run.name}"
        results = evaluate.evaluate(evaluate.parse_args(quick_eval(setup, out, run)))
        runtimes = {(r["model"], r["runtime"]) for r in results["latency"]}
        assert ("diffusion", "ONNX Runtime") in runtimes
        assert (("diffusion", "PyTorch") in runtimes) == timed
        assert results["run"]["path"] == str(run)
        if timed:
            assert results["run"]["weights"] == str(run / "final.pt")
        else:
            assert "diffuser.layers (3 in the run, 2 in the bundle)" in results["run"]["skipped"]
            assert "not the bundle's model" in capsys.readouterr().out


def test_quality_is_written_before_the_latency_phase(setup: dict[str, Path], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def fail(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("latency failed")

    monkeypatch.setattr(evaluate, "measure_latency", fail)
    out = setup["root"] / "out-early"
    with pytest.raises(RuntimeError, match="latency failed"):
        evaluate.main(quick_eval(setup, out, setup["run"]))
    results = json.loads((out / "results.json").read_text())
    assert len(results["quality"]["test-seen"]) == 2 and results["latency"] == []


def test_paths_that_are_not_what_a_command_needs(setup: dict[str, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    from ladic import sweep

    missing = setup["root"] / "missing"
    cases = [
        (lambda: evaluate.parse_args(["--bundle", str(setup["run"])]),
         "not a bundle (no manifest.json)"),
        (lambda: evaluate.parse_args(["--bundle", str(setup["bundle"]), "--ar", str(missing)]),
         "not a ladic.ar_baseline run"),
        (lambda: sweep.main(["guidance=1", "--run", str(setup["bundle"])]),
         "not a ladic.train run (no config.json)"),
        (lambda: sweep.main(["guidance=1", "--run", str(missing)]), "no such directory"),
        (lambda: plots.main(["--run", str(missing)]), "not a training run (no train_log.csv)"),
    ]
    for call, message in cases:
        with pytest.raises(SystemExit):
            call()
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
