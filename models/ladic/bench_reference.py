"""Seconds per caption of the Python reference sampler at batch 1, the baseline of the
service's load benchmark (benches/load.rs).

    python -m ladic.bench_reference --bundle ../models/scenes-tiny --run runs/scenes-tiny

The model is PyTorch (`TorchBackend` on `load_run(--run)`) when that run has a
checkpoint, else the bundle's ONNX graphs (`OnnxBackend`); the output says which. The
sampler parameters are the bundle's defaults (steps, guidance, Back&Refine, MBR), as
the service uses them. One caption is `caption_images` on one image: image encoding,
the denoising loop and the final decode (the unconditional K/V is computed once, as
the service does at load). Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .config import BackRefineConfig, LadicConfig
from .sampler import Backend, OnnxBackend, SampleParams, SeededNoise, TorchBackend, caption_images


def params_from_manifest(manifest: dict, cfg: LadicConfig, steps: int | None) -> SampleParams:
    s = manifest["sampler"]
    params = SampleParams.defaults(cfg)
    params.steps = int(steps if steps is not None else s["steps"])
    params.guidance = float(s["guidance"])
    params.time_shift = int(s["time_shift"])
    params.renoise_scale = float(s["renoise_scale"])
    params.self_conditioning = bool(s["self_conditioning"])
    params.back_refine = BackRefineConfig(**manifest["back_refine"])
    params.candidates = int(manifest.get("mbr", {}).get("candidates", 1))
    return params


def load_backend(bundle: Path, run: Path, threads: int) -> tuple[Backend, LadicConfig, str, str]:
    """(backend, config, "pytorch" | "onnxruntime", what was loaded)."""
    has_run = (run / "config.json").exists() and (
        (run / "final.pt").exists() or (run / "checkpoint.pt").exists()
    )
    if has_run:
        from .export import load_run

        model, _ = load_run(run)
        which = "final.pt" if (run / "final.pt").exists() else "checkpoint.pt"
        return TorchBackend(model), model.cfg, "pytorch", f"{run}/{which}"
    manifest = json.loads((bundle / "manifest.json").read_text())
    cfg = LadicConfig.from_dict(manifest["model_config"])
    return OnnxBackend(str(bundle), threads=threads), cfg, "onnxruntime", str(bundle)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path("scenes-tiny"))
    p.add_argument("--run", type=Path, default=Path("runs/scenes-tiny"))
    p.add_argument("--steps", type=int, default=None, help="default: the bundle's")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0,
                   help="torch / ONNX Runtime intra-op threads (0: the library's default)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    t0 = time.perf_counter()
    backend, cfg, runtime, source = load_backend(args.bundle, args.run, args.threads)
    load_s = time.perf_counter() - t0
    params = params_from_manifest(manifest, cfg, args.steps)
    size = cfg.image.image_size
    shape = (cfg.text.max_len, cfg.latent_dim)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((1, 3, size, size)).astype(np.float32)
    null_kv = backend.encode(np.zeros((1, 3, size, size), np.float32))

    def one(seed: int) -> None:
        caption_images(backend, pixels, params, cfg,
                       lambda i, j: SeededNoise(seed + 10_000 * j + i, shape), null_kv=null_kv)

    for i in range(args.warmup):
        one(i)
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        one(1000 + i)
        times.append(time.perf_counter() - start)
    times.sort()
    out = {
        "runtime": runtime,
        "source": source,
        "torch_threads": torch.get_num_threads(),
        "steps": params.steps,
        "guidance": params.guidance,
        "candidates": params.candidates,
        "back_refine": params.back_refine.enabled,
        "repeats": args.repeats,
        "load_seconds": load_s,
        "mean_s": statistics.fmean(times),
        "p50_s": times[len(times) // 2],
        "min_s": times[0],
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
