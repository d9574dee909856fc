"""Seconds per caption of the Python reference sampler at batch 1, the baseline of the
service's load benchmark (benches/load.rs).

    python -m ladic.bench_reference --bundle ../models/scenes-tiny --run runs/scenes-tiny

The model is PyTorch (`TorchBackend` on `load_run(--run)`) when that run has a
checkpoint, else the bundle's ONNX graphs (`OnnxBackend`); the output says which. The
sampler parameters are the bundle's defaults (steps, guidance, Back&Refine, MBR), as
the service uses them. One caption is `caption_images` on one image: image encoding,
the denoising loop and the final decode (the unconditional K/V is computed once, as
the service does at load). Prints one JSON object on stdout.

On a GPU, and for larger batches (scripts/bench-gpu.sh):

    python -m ladic.bench_reference --random-init base --device cuda --loop torch \
        --dtype fp32,bf16 --tf32 --cases 1x5,1x34

`--random-init SIZE` uses random weights of that size (ladic.export.random_model) and
the config's sampler defaults, so no run or bundle is needed. `--loop torch` runs the
same loop as `sampler.run_rows` in torch on the model's device (`torch_captions`: no
host copies between steps, torch noise); `--loop reference` is `caption_images` over
numpy, the default on the CPU in fp32. `--dtype bf16` runs the model calls under
bfloat16 autocast; `--tf32` lets fp32 matmuls use TF32 on CUDA. `--cases BxS[:R[:W]],...`
(or `--batch`/`--steps`) and a `--dtype` list give one JSON line per case and dtype;
`mean_s`, `p50_s`, ... are seconds per call of `--batch` images, `images_per_second`
is batch / mean_s. On CUDA each call is timed between `torch.cuda.synchronize()`s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import BackRefineConfig, LadicConfig
from .diffusion import stride_for
from .sampler import (
    Backend,
    OnnxBackend,
    SampleParams,
    SeededNoise,
    TextIds,
    TorchBackend,
    alpha_bar_cache,
    caption_confidence,
    caption_images,
    clean_ids,
)

DTYPES = ("fp32", "bf16")


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
        from .export import load_run_weights

        model, _, weights = load_run_weights(run)
        return TorchBackend(model), model.cfg, "pytorch", str(weights)
    manifest = json.loads((bundle / "manifest.json").read_text())
    cfg = LadicConfig.from_dict(manifest["model_config"])
    return OnnxBackend(str(bundle), threads=threads), cfg, "onnxruntime", str(bundle)


@torch.no_grad()
def torch_captions(
    model: torch.nn.Module,
    pixels: Tensor,
    null_kv: Tensor,
    params: SampleParams,
    cfg: LadicConfig,
    noise: Callable[[int], Tensor],
) -> tuple[Tensor, Tensor]:
    """`sampler.run_rows` after `encode`, in torch on the device of `pixels`.

    The same arithmetic (classifier-free guidance with the conditional and unconditional
    rows in one call, self-conditioning, time shift, Back&Refine, renoising), without
    host round trips between steps; the guidance K/V (image rows, then the
    unconditional rows) is built once per call instead of at every step. `noise(rows)`
    draws [rows, L, D]. Returns the final decode's (ids, confidence) [B*candidates, L];
    call it under autocast for reduced precision."""
    T = cfg.schedule.num_timesteps
    ab = alpha_bar_cache(cfg.schedule)
    stride = stride_for(params.steps, T)
    w = params.guidance
    br = params.back_refine
    rounds_left = br.rounds if br.enabled else 0
    keep = math.ceil(br.keep_fraction * cfg.text.max_len)
    kv = model.encode_image(pixels).repeat_interleave(params.candidates, dim=0)
    rows = kv.shape[0]
    if w != 0:
        kv = torch.cat([kv, null_kv.to(kv.dtype).expand(rows, *null_kv.shape[1:])])
    x = noise(rows)
    sc = torch.zeros_like(x)
    t = T - 1
    while True:
        t_in = min(T - 1, t + params.time_shift)
        t_vec = torch.full((rows,), t_in, dtype=torch.int64, device=x.device)
        if w == 0:
            x0 = model.denoise(x, sc, t_vec, kv).float()
        else:
            both = model.denoise(
                torch.cat([x, x]), torch.cat([sc, sc]), torch.cat([t_vec, t_vec]), kv
            ).float()
            x0 = (1 + w) * both[:rows] - w * both[rows:]
        sc = x0 if params.self_conditioning else torch.zeros_like(x0)
        if rounds_left > 0 and t <= br.trigger_t and t > stride:
            _, conf = model.decode(x0)
            order = torch.argsort(-conf.float(), dim=1, stable=True)[:, :keep]
            mask = torch.zeros(conf.shape, dtype=torch.bool, device=x.device)
            mask.scatter_(1, order, True)
            eps = noise(rows)
            a = float(ab[t - stride])
            renoised = math.sqrt(a) * x0 + params.renoise_scale * math.sqrt(1.0 - a) * eps
            x = torch.where(mask[..., None], renoised, eps)
            t = T - 1
            rounds_left -= 1
            continue
        if t <= stride:
            break
        eps = noise(rows)
        t = t - stride
        a = float(ab[t])
        x = math.sqrt(a) * x0 + params.renoise_scale * math.sqrt(1.0 - a) * eps
    return model.decode(x0)


def parse_cases(text: str) -> list[tuple[int, int | None, int | None, int | None]]:
    """BATCHxSTEPS[:REPEATS[:WARMUP]],... -> [(batch, steps, repeats, warmup)], None where
    not given; e.g. 1x5:30,256x34:3:1 -> [(1, 5, 30, None), (256, 34, 3, 1)]."""
    cases: list[tuple[int, int | None, int | None, int | None]] = []
    for part in text.split(","):
        case, *counts = part.strip().split(":")
        b, _, st = case.lower().partition("x")
        ok = b.isdigit() and st.isdigit() and int(b) > 0 and int(st) > 0 and len(counts) <= 2
        ok = ok and all(c.isdigit() for c in counts) and (not counts or int(counts[0]) > 0)
        if not ok:
            raise SystemExit(
                f"--cases: {part!r} is not BATCHxSTEPS[:REPEATS[:WARMUP]] (e.g. 256x34:3:1)"
            )
        reps = int(counts[0]) if counts else None
        warm = int(counts[1]) if len(counts) > 1 else None
        cases.append((int(b), int(st), reps, warm))
    return cases


def parse_dtypes(text: str) -> list[str]:
    dtypes = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise SystemExit(f"--dtype: {text!r}; use {', '.join(DTYPES)} or a comma list")
    return dtypes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path("scenes-tiny"))
    p.add_argument("--run", type=Path, default=Path("runs/scenes-tiny"))
    p.add_argument(
        "--random-init",
        choices=["base", "tiny", "micro"],
        help="random weights of this size and its config's sampler defaults\n"
        "(no run or bundle needed; speed tests only)",
    )
    p.add_argument("--seed", type=int, default=0, help="weights seed for --random-init")
    p.add_argument("--steps", type=int, default=None, help="default: the bundle's")
    p.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    p.add_argument(
        "--cases",
        help="BATCHxSTEPS[:REPEATS[:WARMUP]],... instead of --batch/\n"
        "--steps, e.g. 1x5,1x34,256x34:3:1 (counts instead of --repeats/--warmup)",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1")
    p.add_argument(
        "--dtype", default="fp32", help="fp32 (default) or bf16 (autocast), or a comma list"
    )
    p.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls (CUDA)")
    p.add_argument(
        "--loop",
        choices=["auto", "reference", "torch"],
        default="auto",
        help="reference: caption_images over numpy; torch: torch_captions on the\n"
        "device (auto: reference on the CPU in fp32, else torch)",
    )
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch / ONNX Runtime intra-op threads (0: the library's default)",
    )
    args = p.parse_args(argv)

    cases = parse_cases(args.cases) if args.cases else [(args.batch, args.steps, None, None)]
    dtypes = parse_dtypes(args.dtype)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    loop = args.loop
    if loop == "auto":
        loop = "reference" if device.type == "cpu" and dtypes == ["fp32"] else "torch"

    t0 = time.perf_counter()
    model = None
    if args.random_init:
        from .export import random_model

        model = random_model(args.random_init, args.seed)
        cfg = model.cfg
        backend: Backend = TorchBackend(model)
        runtime, source = "pytorch", f"random-init {args.random_init} (seed {args.seed})"
        base_params = SampleParams.defaults(cfg)
    else:
        manifest = json.loads((args.bundle / "manifest.json").read_text())
        backend, cfg, runtime, source = load_backend(args.bundle, args.run, args.threads)
        if isinstance(backend, TorchBackend):
            model = backend.model
        base_params = params_from_manifest(manifest, cfg, None)
    if loop == "torch" and model is None:
        raise SystemExit(
            "--loop torch needs a PyTorch model (--run with a checkpoint, "
            "or --random-init); this is the bundle's ONNX graphs"
        )
    if loop == "reference" and (device.type != "cpu" or dtypes != ["fp32"]):
        raise SystemExit("--loop reference runs on the CPU in fp32 only; use --loop torch")
    if model is not None:
        model.to(device).eval()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    load_s = time.perf_counter() - t0

    size = cfg.image.image_size
    shape = (cfg.text.max_len, cfg.latent_dim)
    text = TextIds(
        frozenset(
            {cfg.text.pad_id, cfg.text.cls_id, cfg.text.sep_id, cfg.text.unk_id, cfg.text.mask_id}
        ),
        cfg.text.period_id,
    )
    rng = np.random.default_rng(0)
    zeros = np.zeros((1, 3, size, size), np.float32)
    null_kv_np = backend.encode(zeros) if loop == "reference" else None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    gen = torch.Generator(device=device)

    def draw(rows: int) -> Tensor:
        return torch.randn((rows, *shape), generator=gen, device=device)

    def one(
        seed: int, pixels: np.ndarray, params: SampleParams, autocast: Any, null_kv: Tensor | None
    ) -> None:
        if loop == "reference":
            caption_images(
                backend,
                pixels,
                params,
                cfg,
                lambda i, j: SeededNoise(seed + 10_000 * j + i, shape),
                null_kv=null_kv_np,
            )
            return
        gen.manual_seed(seed)
        with autocast:
            ids, conf = torch_captions(
                model, torch.from_numpy(pixels).to(device), null_kv, params, cfg, draw
            )
        # The host side of caption_images: cleaned ids and confidence per row.
        ids_h, conf_h = ids.cpu().numpy(), conf.float().cpu().numpy()
        for r in range(ids_h.shape[0]):
            clean_ids(ids_h[r], text)
            caption_confidence(ids_h[r], conf_h[r], text)

    for dtype in dtypes:
        autocast = (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16)
            if dtype == "bf16"
            else contextlib.nullcontext()
        )
        null_kv = None
        if loop == "torch":
            assert model is not None
            with torch.no_grad(), autocast:
                null_kv = model.encode_image(torch.from_numpy(zeros).to(device))
        for batch, steps, case_repeats, case_warmup in cases:
            params = SampleParams(**vars(base_params))
            if steps is not None:
                params.steps = steps
            elif args.steps is not None:
                params.steps = args.steps
            pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
            times = []
            repeats = case_repeats or args.repeats
            try:
                for i in range(args.warmup if case_warmup is None else case_warmup):
                    one(i, pixels, params, autocast, null_kv)
                for i in range(repeats):
                    sync()
                    start = time.perf_counter()
                    one(1000 + i, pixels, params, autocast, null_kv)
                    sync()
                    times.append(time.perf_counter() - start)
            except torch.cuda.OutOfMemoryError as e:
                # One case too large for the device: say so and go on with the others.
                failed = {"dtype": dtype, "batch": batch, "steps": params.steps, "error": str(e)}
                print(json.dumps(failed), flush=True)
                torch.cuda.empty_cache()
                continue
            times.sort()
            mean = statistics.fmean(times)
            out = {
                "runtime": runtime,
                "source": source,
                "torch_threads": torch.get_num_threads(),
                "steps": params.steps,
                "guidance": params.guidance,
                "candidates": params.candidates,
                "back_refine": params.back_refine.enabled,
                "repeats": repeats,
                "load_seconds": load_s,
                "mean_s": mean,
                "p50_s": times[len(times) // 2],
                "p90_s": times[min(len(times) - 1, int(0.9 * len(times)))],
                "min_s": times[0],
                "batch": batch,
                "images_per_second": batch / mean,
                "device": str(device),
                "device_name": (
                    torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
                ),
                "dtype": dtype,
                "tf32": bool(args.tf32 and device.type == "cuda" and dtype == "fp32"),
                "loop": loop,
                "config": cfg.name,
                "python": sys.version.split()[0],
                "torch": torch.__version__,
            }
            print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
