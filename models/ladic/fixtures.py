"""Parity fixtures for the Rust sampler: `python -m ladic.fixtures` (from models/).

Writes `tests/fixtures/parity/bundle/` (a few-kilobyte random-weight bundle),
`tests/fixtures/parity/legacy-denoiser.onnx` (the same denoiser without `kv_index`, as
bundles were written before it, for the service's compatibility test),
`tests/fixtures/parity/fused/` (the same three graphs exported with `--attention fused`,
which the service must run to the same results),
`tests/fixtures/parity/unconditional-half-denoiser.onnx` (the same denoiser exported with
`--unconditional-half`, which the service must lay its calls out for),
`tests/fixtures/parity/fp16/` and `tests/fixtures/parity/fp16-kv/` (the bundle's graphs
converted to fp16, the second with `--kv-precision fp16`: the service must give the same
results with both) and
`tests/fixtures/parity/cases.json`: for plain sampling, Back&Refine and MBR, the input
pixels, every noise draw, the x0 after every iteration, and the expected ids and text,
all computed through ONNX Runtime so the Rust service must reproduce them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from .config import BackRefineConfig
from .export import export_graphs, placeholder_tokenizer, random_model, write_bundle
from .precision import convert_bundle
from .sampler import (
    OnnxBackend,
    RecordingNoise,
    SampleParams,
    SeededNoise,
    caption_images,
    ids_to_text,
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "parity"


def cases() -> list[tuple[str, SampleParams]]:
    def params(**kw: Any) -> SampleParams:
        base = dict(steps=5, guidance=1.0, time_shift=5, renoise_scale=1.0,
                    self_conditioning=True, back_refine=BackRefineConfig(), candidates=1)
        base.update(kw)
        return SampleParams(**base)

    return [
        ("plain", params()),
        ("plain_34_steps_no_guidance", params(steps=34, guidance=0.0)),
        ("back_refine", params(steps=6, back_refine=BackRefineConfig(
            enabled=True, keep_fraction=0.5, trigger_t=599, rounds=2))),
        ("mbr", params(steps=4, guidance=2.0, candidates=4)),
    ]


def flat(a: np.ndarray) -> list[float]:
    return [float(v) for v in a.astype(np.float32).ravel()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    bundle = args.out / "bundle"
    bundle.mkdir(parents=True, exist_ok=True)
    model = random_model("micro", seed=7)
    tok_path = placeholder_tokenizer(model.cfg, bundle / "tokenizer.json")
    write_bundle(model, tok_path, bundle, "parity-micro", "random weights for parity tests")
    with tempfile.TemporaryDirectory() as tmp:
        export_graphs(model, Path(tmp), gather_kv=False)
        shutil.copyfile(Path(tmp) / "denoiser.onnx", args.out / "legacy-denoiser.onnx")
        export_graphs(model, Path(tmp), unconditional_half=True)
        shutil.copyfile(
            Path(tmp) / "denoiser.onnx", args.out / "unconditional-half-denoiser.onnx"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for name, kv in (("fp16", "fp32"), ("fp16-kv", "fp16")):
            converted = Path(tmp) / name
            convert_bundle(bundle, converted, precision="fp16", kv_precision=kv)
            (args.out / name).mkdir(exist_ok=True)
            for graph in ("encoder.onnx", "denoiser.onnx", "decoder.onnx"):
                shutil.copyfile(converted / graph, args.out / name / graph)
    (args.out / "fused").mkdir(exist_ok=True)
    export_graphs(model, args.out / "fused", fused_attention=True)
    backend = OnnxBackend(str(bundle))
    tokenizer = Tokenizer.from_file(str(tok_path))
    cfg = model.cfg
    shape = (cfg.text.max_len, cfg.latent_dim)
    rng = np.random.default_rng(11)
    out: list[dict[str, Any]] = []
    for i, (name, params) in enumerate(cases()):
        s = cfg.image.image_size
        pixels = rng.standard_normal((1, 3, s, s)).astype(np.float32)
        recorders: list[RecordingNoise] = []

        def noise_for(
            img: int, cand: int, base: int = i, sink: list[RecordingNoise] = recorders
        ) -> RecordingNoise:
            r = RecordingNoise(SeededNoise(1000 * base + cand, shape))
            sink.append(r)
            return r

        [cap] = caption_images(backend, pixels, params, cfg, noise_for, trace=True)
        out.append({
            "name": name,
            "params": {
                "steps": params.steps, "guidance": params.guidance,
                "time_shift": params.time_shift, "renoise_scale": params.renoise_scale,
                "self_conditioning": params.self_conditioning,
                "back_refine": vars(params.back_refine), "candidates": params.candidates,
            },
            "pixels": flat(pixels),
            "noise": [[flat(d) for d in r.draws] for r in recorders],
            "trace": [
                [{"t": s.t, "t_in": s.t_in, "x0": flat(s.x0), "refined": s.refined}
                 for s in row.trace]
                for row in cap.rows
            ],
            "ids": [[int(v) for v in row.ids] for row in cap.rows],
            "chosen": cap.chosen,
            "caption": ids_to_text(tokenizer, cap.ids),
            "confidence": cap.confidence,
        })
    (args.out / "cases.json").write_text(json.dumps(out))
    print(f"wrote {len(out)} cases to {args.out}")


if __name__ == "__main__":
    main()
