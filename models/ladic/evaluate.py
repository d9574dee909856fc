"""Diffusion (LaDiC through its exported bundle) vs the autoregressive baseline on Scenes.

    python -m ladic.evaluate --bundle scenes-tiny --ar runs/ar-tiny --run runs/scenes-tiny \\
        --limit 300 --out eval/

Quality, on test-seen and test-novel (the first --limit images of each):
- The diffusion model runs THROUGH THE EXPORTED BUNDLE, with ONNX Runtime and the
  reference sampler (`ladic.sampler`), i.e. what the service runs, with the bundle's
  model config. Grid: sampling iterations 5, 34 and the bundle default, Back&Refine off
  and on (the manifest's settings, enabled), MBR over k=1 and k=4 candidates. Noise is
  seeded per image and candidate (seed + 10000 * candidate + image index), so every
  setting sees the same noise, and the k=1 caption is candidate 0 of the k=4 run
  (rows are sampled independently, so this is exactly a k=1 run with the same seed);
  in general MBR over k is computed on the first k of the largest k's candidates.
- The AR baseline (`ladic.ar_baseline`, from its run directory): greedy and beam search.
- Metrics: `ladic.metrics.caption_report` against the 5 references of each scene.

Latency per image in PyTorch, on this machine in this run, with --threads CPU threads:
the diffusion model from its training run (`ladic.export.load_run`, --run; skipped,
with a message, when the run is missing or its model config is not the bundle's)
through `TorchBackend` at the bundle's default iterations and at 34, and the AR
baseline with greedy decoding, each at batch 1 and 32; the median of --repeats timed
runs after one warm-up. The image encoder's output for the empty image (classifier-free
guidance) is computed once per model, as the service does. ONNX Runtime rows for the
diffusion model are added for reference.

Writes results.json, results.md (tables), captions.json (every caption) and the plots
quality_vs_iterations.png and latency_vs_batch.png (`ladic.plots`); the quality results
are written before the latency phase starts, and again with the latency at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import data, scenes
from .ar_baseline import ArCaptioner, beam_decode, greedy_decode, load_ar_run
from .config import BackRefineConfig, LadicConfig
from .metrics import NGRAM_KEYS, caption_report
from .model import Ladic, count_parameters
from .rundir import bundle_problem, config_differences, run_problem
from .sampler import (
    Backend,
    OnnxBackend,
    SampleParams,
    SeededNoise,
    TorchBackend,
    caption_images,
    ids_to_text,
    mbr_choose,
)
from .tokenizer import load_tokenizer

SPLITS = ("test-seen", "test-novel")
METRIC_COLUMNS = (
    ("BLEU-1", "BLEU-1"),
    ("BLEU-4", "BLEU-4"),
    ("METEOR", "METEOR"),
    ("ROUGE-L", "ROUGE-L"),
    ("CIDEr-D", "CIDEr-D"),
    ("exact_match", "Exact"),
    ("object_precision", "Obj P"),
    ("object_recall", "Obj R"),
    ("object_f1", "Obj F1"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path("scenes-tiny"))
    p.add_argument("--ar", type=Path, help="the AR baseline's run directory (runs/ar-tiny)")
    p.add_argument("--run", type=Path, default=Path("runs/scenes-tiny"),
                   help="the diffusion training run, for PyTorch latency")
    p.add_argument("--limit", type=int, help="first N images of each split (default: all)")
    p.add_argument("--out", type=Path, default=Path("eval"))
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch and ONNX)")
    p.add_argument("--iterations", default="5,34",
                   help="sampling iterations besides the bundle default (comma-separated)")
    p.add_argument("--mbr", default="1,4", help="MBR candidate counts")
    p.add_argument("--beam", type=int, default=3, help="the AR beam width")
    p.add_argument("--splits", default=",".join(SPLITS))
    p.add_argument("--chunk", type=int, default=16,
                   help="images per sampler call (x candidates x 2 rows with guidance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-batches", default="1,32")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per latency setting")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--no-ngrams", action="store_true", help="skip the n-gram metrics (Java)")
    p.add_argument("--data-dir", type=Path, default=data.DATA_DIR, help="image cache")
    args = p.parse_args(argv)
    problem = bundle_problem(args.bundle)
    if problem is None and args.ar is not None:
        problem = run_problem(args.ar, "ladic.ar_baseline")
    if problem:
        p.error(problem)
    return args


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def machine_info(threads: int) -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return {
        "processor": platform.processor(),
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "threads": threads,
    }


# ----------------------------------------------------------------------- diffusion


class Bundle:
    """An exported bundle: its manifest, model config, tokenizer and ONNX backend."""

    def __init__(self, path: Path, threads: int) -> None:
        self.path = path
        self.manifest = json.loads((path / "manifest.json").read_text())
        self.cfg = LadicConfig.from_dict(self.manifest["model_config"])
        self.tokenizer = load_tokenizer(path / "tokenizer.json", self.cfg.text.max_len)
        self.backend = OnnxBackend(str(path), threads=threads)
        self.default_steps = int(self.manifest["sampler"]["steps"])
        self.default_back_refine = bool(self.manifest["back_refine"]["enabled"])
        self.default_mbr = int(self.manifest.get("mbr", {}).get("candidates", 1))

    def params(self, steps: int, back_refine: bool, candidates: int) -> SampleParams:
        params = SampleParams.defaults(self.cfg)
        s = self.manifest["sampler"]
        params.guidance = float(s["guidance"])
        params.time_shift = int(s["time_shift"])
        params.renoise_scale = float(s["renoise_scale"])
        params.self_conditioning = bool(s["self_conditioning"])
        params.steps = steps
        params.back_refine = BackRefineConfig(**{**self.manifest["back_refine"],
                                                 "enabled": back_refine})
        params.candidates = candidates
        return params

    def parameters(self) -> dict[str, int]:
        model = Ladic(self.cfg)
        decoder = count_parameters(model.text.decoder_layers) + count_parameters(model.text.head)
        out = {
            "image_encoder": count_parameters(model.image_encoder),
            "diffuser": count_parameters(model.diffuser),
            "text_decoder": decoder,
            "text_encoder": count_parameters(model.text) - decoder,
        }
        out["inference_total"] = out["image_encoder"] + out["diffuser"] + out["text_decoder"]
        return out


def noise_seed(base: int, image: int, candidate: int) -> int:
    return base + 10_000 * candidate + image


def null_kv(backend: Backend, cfg: LadicConfig) -> np.ndarray:
    s = cfg.image.image_size
    return backend.encode(np.zeros((1, 3, s, s), np.float32))


def sample_captions(
    backend: Backend,
    cfg: LadicConfig,
    tokenizer,  # type: ignore[no-untyped-def]
    pixels: np.ndarray,
    params: SampleParams,
    mbr: Sequence[int],
    seed: int,
    chunk: int,
    desc: str = "",
) -> dict[int, list[str]]:
    """Captions of every image for each MBR k, from one run with max(mbr) candidates."""
    shape = (cfg.text.max_len, cfg.latent_dim)
    empty = null_kv(backend, cfg)
    out: dict[int, list[str]] = {k: [] for k in mbr}
    starts = range(0, pixels.shape[0], chunk)
    for start in tqdm(starts, desc=desc, leave=False):
        caps = caption_images(
            backend, pixels[start : start + chunk], params, cfg,
            lambda i, j, s=start: SeededNoise(noise_seed(seed, s + i, j), shape),
            null_kv=empty,
        )
        for cap in caps:
            for k in mbr:
                ids = cap.candidates[mbr_choose(cap.candidates[:k])]
                out[k].append(ids_to_text(tokenizer, ids))
    return out


def diffusion_grid(default_steps: int, iterations: Sequence[int]) -> list[tuple[int, bool]]:
    steps = sorted(set(iterations) | {default_steps})
    return [(s, br) for s in steps for br in (False, True)]


# ------------------------------------------------------------------------------ AR


def ar_captions(model: ArCaptioner, tokenizer, pixels: np.ndarray, beam: int, chunk: int,
                desc: str = "") -> list[str]:  # type: ignore[no-untyped-def]
    out: list[str] = []
    for start in tqdm(range(0, pixels.shape[0], chunk), desc=desc, leave=False):
        x = torch.from_numpy(pixels[start : start + chunk])
        ids = greedy_decode(model, x) if beam <= 1 else beam_decode(model, x, beam)
        out += [ids_to_text(tokenizer, i) for i in ids]
    return out


# ------------------------------------------------------------------------- latency


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def batch_of(pixels: np.ndarray, batch: int) -> np.ndarray:
    reps = -(-batch // pixels.shape[0])
    return np.ascontiguousarray(np.concatenate([pixels] * reps)[:batch])


def diffusion_latency(
    backend: Backend, cfg: LadicConfig, params: SampleParams, pixels: np.ndarray,
    batch: int, repeats: int,
) -> float:
    """Seconds per image to caption a batch (image encoding included)."""
    shape = (cfg.text.max_len, cfg.latent_dim)
    empty = null_kv(backend, cfg)
    x = batch_of(pixels, batch)

    def run() -> None:
        caption_images(backend, x, params, cfg, lambda i, j: SeededNoise(i + 10_000 * j, shape),
                       null_kv=empty)

    return median_seconds(run, repeats) / batch


def ar_latency(model: ArCaptioner, pixels: np.ndarray, batch: int, repeats: int) -> float:
    x = torch.from_numpy(batch_of(pixels, batch))
    return median_seconds(lambda: greedy_decode(model, x), repeats) / batch


# Model config fields an export may set differently from the training run's (the
# sampler and Back&Refine defaults in the manifest): not compared with the run.
SAMPLING_FIELDS = ("sampler.", "back_refine.")


def run_model(run: Path, bundle: Bundle) -> tuple[Ladic | None, dict[str, Any]]:
    """The diffusion run's model for the PyTorch latency rows, if it is the bundle's
    model: a run that is missing or whose model config differs from the manifest's
    `model_config` (sampling defaults aside) gives None and the reason, printed."""
    info: dict[str, Any] = {"path": str(run), "weights": None, "skipped": None}
    problem = run_problem(run)
    if problem is None:
        saved = json.loads((run / "config.json").read_text())
        differ = config_differences(saved, bundle.manifest["model_config"], SAMPLING_FIELDS)
        if differ:
            shown = ", ".join(f"{k} ({a!r} in the run, {b!r} in the bundle)"
                              for k, a, b in differ[:5])
            more = f" and {len(differ) - 5} more" if len(differ) > 5 else ""
            problem = f"{run} is not the bundle's model: {shown}{more}"
    if problem:
        info["skipped"] = problem
        print(f"{problem}: PyTorch diffusion latency skipped")
        return None, info
    from .export import load_run_weights

    model, _, weights = load_run_weights(run)
    info["weights"] = str(weights)
    return model, info


def measure_latency(
    args: argparse.Namespace,
    bundle: Bundle,
    ar: ArCaptioner | None,
    pixels: np.ndarray,
    ar_pixels: np.ndarray | None,
    torch_model: Ladic | None = None,
) -> list[dict[str, Any]]:
    """Latency rows; PyTorch diffusion rows only with `torch_model` (`run_model`)."""
    rows: list[dict[str, Any]] = []
    batches = ints(args.latency_batches)
    steps = sorted({bundle.default_steps, 34})
    torch_backend: Backend | None = TorchBackend(torch_model) if torch_model else None
    jobs: list[tuple[str, str, int | None, int, Callable[[], float]]] = []
    for b in batches:
        for s in steps:
            params = bundle.params(s, bundle.default_back_refine, bundle.default_mbr)
            if torch_backend is not None:
                jobs.append(("diffusion", "PyTorch", s, b, lambda p=params, b=b, tb=torch_backend:
                             diffusion_latency(tb, bundle.cfg, p, pixels, b, args.repeats)))
            jobs.append(("diffusion", "ONNX Runtime", s, b, lambda p=params, b=b:
                         diffusion_latency(bundle.backend, bundle.cfg, p, pixels, b,
                                           args.repeats)))
        if ar is not None and ar_pixels is not None:
            jobs.append(("ar", "PyTorch", None, b,
                         lambda b=b: ar_latency(ar, ar_pixels, b, args.repeats)))
    for model_name, runtime, s, b, fn in tqdm(jobs, desc="latency"):
        rows.append({
            "model": model_name,
            "runtime": runtime,
            "setting": f"{s} iterations" if s is not None else "greedy",
            "steps": s,
            "batch": b,
            "ms_per_image": 1000.0 * fn(),
            "repeats": args.repeats,
        })
    return rows


# -------------------------------------------------------------------------- report


def quality_row(model: str, report: dict[str, Any], **setting: Any) -> dict[str, Any]:
    return {"model": model, **setting, **report}


def setting_label(row: dict[str, Any]) -> tuple[str, str, str, str]:
    """(model, iterations, B&R, MBR / beam) as table cells."""
    if row["model"] == "ar":
        decoding = "greedy" if row["beam"] <= 1 else f"beam {row['beam']}"
        return ("AR", "-", "-", decoding)
    mark = " (default)" if row.get("default") else ""
    return ("LaDiC" + mark, str(row["steps"]), "on" if row["back_refine"] else "off",
            f"k={row['mbr']}")


def fmt(value: Any, key: str) -> str:
    if value is None:
        return "n/a"
    if key in ("exact_match", "object_precision", "object_recall", "object_f1"):
        return f"{100 * value:.1f}"
    if key in NGRAM_KEYS:
        return f"{value:.3f}" if key == "CIDEr-D" else f"{100 * value:.1f}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def quality_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ["Model", "Iterations", "B&R", "MBR / decoding"] + [c for _, c in METRIC_COLUMNS]
    body = [list(setting_label(r)) + [fmt(r.get(k), k) for k, _ in METRIC_COLUMNS] for r in rows]
    return table(header, body)


def latency_table(rows: Sequence[dict[str, Any]]) -> str:
    batches = sorted({r["batch"] for r in rows})
    keys: list[tuple[str, str, str]] = []
    for r in rows:
        key = (r["model"], r["runtime"], r["setting"])
        if key not in keys:
            keys.append(key)
    header = ["Model", "Runtime", "Setting"] + [f"batch {b} (ms/image)" for b in batches]
    body = []
    for model, runtime, setting in keys:
        cells = []
        for b in batches:
            hit = [r for r in rows if (r["model"], r["runtime"], r["setting"], r["batch"])
                   == (model, runtime, setting, b)]
            cells.append(f"{hit[0]['ms_per_image']:.1f}" if hit else "-")
        body.append(["LaDiC" if model == "diffusion" else "AR", runtime, setting] + cells)
    return table(header, body)


def markdown_report(results: dict[str, Any]) -> str:
    m = results["machine"]
    params = results.get("parameters", {})
    lines = [
        "# Scenes: LaDiC (diffusion) vs the autoregressive baseline",
        "",
        f"- Command: `{results['command']}`",
        f"- Date: {results['date']}",
        f"- Machine: {m.get('cpu_model') or 'unknown CPU'} (platform.processor(): "
        f"{m.get('processor')!r}), {m['cores']} cores, {m['threads']} thread(s) used; "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}",
        f"- Images: N = {results['limit'] if results['limit'] is not None else 'all'} "
        "(first N of each split; " + ", ".join(
            f"{s}: {n}" for s, n in results["images"].items()) + ")",
        f"- Bundle: `{results['bundle']['path']}` ({results['bundle']['description']}); "
        f"default {results['bundle']['default_steps']} iterations, Back&Refine "
        f"{'on' if results['bundle']['default_back_refine'] else 'off'}, MBR "
        f"k={results['bundle']['default_mbr']}",
    ]
    if "ladic" in params:
        p = params["ladic"]
        lines.append(
            f"- Parameters: LaDiC {p['inference_total']:,} (image encoder {p['image_encoder']:,}, "
            f"diffuser {p['diffuser']:,}, text decoder {p['text_decoder']:,}; frozen text "
            f"encoder {p['text_encoder']:,} not counted)"
            + (f"; AR {params['ar']['total']:,} (image encoder {params['ar']['image_encoder']:,}, "
               f"decoder {params['ar']['decoder']:,})" if "ar" in params else "")
        )
    run = results.get("run")
    if run:
        lines.append(
            f"- PyTorch latency: skipped ({run['skipped']})" if run["skipped"]
            else f"- PyTorch latency: `{run['weights']}` (run `{run['path']}`)"
        )
    if results.get("seconds"):
        lines.append(f"- Evaluation time: {results['seconds'] / 60:.1f} min")
    lines += [
        "",
        "Quality: the diffusion model through the exported bundle (ONNX Runtime), noise "
        "seeded per image; the AR baseline in PyTorch. BLEU, METEOR, ROUGE-L, exact match "
        "and object P/R/F1 in %, CIDEr-D as is.",
    ]
    for split, rows in results["quality"].items():
        lines += ["", f"## {split} (N = {results['images'][split]})", "", quality_table(rows)]
    if results.get("latency"):
        lines += [
            "",
            f"## Latency per image (median of {results['latency'][0]['repeats']} runs, "
            f"{m['threads']} thread(s))",
            "",
            latency_table(results["latency"]),
        ]
    if results.get("examples"):
        lines += ["", "## Examples", ""]
        for split, items in results["examples"].items():
            for item in items:
                lines.append(f"- {split}: truth `{item['truth']}`")
                for name, cap in item["captions"].items():
                    lines.append(f"  - {name}: `{cap}`")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main


def evaluate(args: argparse.Namespace, command: str = "") -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    t_start = time.time()
    bundle = Bundle(args.bundle, args.threads)
    ar: ArCaptioner | None = None
    ar_tok = None
    if args.ar is not None:
        ar, ar_tok_path = load_ar_run(args.ar)
        ar_tok = load_tokenizer(ar_tok_path, ar.cfg.max_len)
    mbr = sorted(set(ints(args.mbr)))
    grid = diffusion_grid(bundle.default_steps, ints(args.iterations))
    splits = [s for s in args.splits.split(",") if s]
    torch_model, run_info = None, None
    if not args.no_latency:  # checked now, not after the quality phase
        torch_model, run_info = run_model(args.run, bundle)
    parameters: dict[str, Any] = {"ladic": bundle.parameters()}
    if ar is not None:
        parameters["ar"] = {
            "image_encoder": count_parameters(ar.image_encoder),
            "decoder": ar.decoder_parameters(),
            "total": count_parameters(ar),
        }
    results: dict[str, Any] = {
        "command": command or "python -m ladic.evaluate",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(args.threads),
        "limit": args.limit,
        "images": {},
        "bundle": {
            "path": str(args.bundle),
            "name": bundle.manifest.get("name"),
            "description": bundle.manifest.get("description", ""),
            "default_steps": bundle.default_steps,
            "default_back_refine": bundle.default_back_refine,
            "default_mbr": bundle.default_mbr,
        },
        "ar": {"path": str(args.ar), "beam": args.beam} if ar is not None else None,
        "run": run_info,
        "noise_seed": args.seed,
        "parameters": parameters,
        "quality": {},
        "sampling_seconds": {},
        "latency": [],
        "examples": {},
    }
    all_captions: dict[str, dict[str, list[str]]] = {}
    latency_pixels: np.ndarray | None = None
    ar_latency_pixels: np.ndarray | None = None
    for split in splits:
        scene_list = scenes.generate_split(split, args.limit)
        n = len(scene_list)
        results["images"][split] = n
        images = data.split_images(split, bundle.cfg.image, n, cache_dir=args.data_dir)
        pixels = data.normalize(images, bundle.cfg.image).numpy()
        rows: list[dict[str, Any]] = []
        caps_by: dict[str, list[str]] = {}
        for steps, br in tqdm(grid, desc=f"{split} diffusion"):
            params = bundle.params(steps, br, max(mbr))
            t0 = time.time()
            caps = sample_captions(
                bundle.backend, bundle.cfg, bundle.tokenizer, pixels, params, mbr, args.seed,
                args.chunk, desc=f"{steps} it, B&R {'on' if br else 'off'}",
            )
            results["sampling_seconds"].setdefault(split, {})[
                f"{steps} it, B&R {'on' if br else 'off'}, {max(mbr)} candidates"
            ] = time.time() - t0
            for k in mbr:
                default = (steps == bundle.default_steps and br == bundle.default_back_refine
                           and k == bundle.default_mbr)
                report = caption_report(caps[k], scene_list, ngrams=not args.no_ngrams)
                rows.append(quality_row("diffusion", report, steps=steps, back_refine=br,
                                        mbr=k, default=default))
                caps_by[f"diffusion {steps} it, B&R {'on' if br else 'off'}, k={k}"] = caps[k]
        if ar is not None:
            ar_pixels = data.normalize(
                data.split_images(split, ar.cfg.image, n, cache_dir=args.data_dir), ar.cfg.image
            ).numpy()
            for beam in sorted({1, args.beam}):
                name = "greedy" if beam <= 1 else f"beam {beam}"
                caps_ar = ar_captions(ar, ar_tok, ar_pixels, beam, 100, desc=f"{split} AR {name}")
                report = caption_report(caps_ar, scene_list, ngrams=not args.no_ngrams)
                rows.append(quality_row("ar", report, beam=beam))
                caps_by[f"ar {name}"] = caps_ar
            if ar_latency_pixels is None:
                ar_latency_pixels = ar_pixels[:32]
        results["quality"][split] = rows
        all_captions[split] = caps_by
        default_key = (f"diffusion {bundle.default_steps} it, B&R "
                       f"{'on' if bundle.default_back_refine else 'off'}, "
                       f"k={bundle.default_mbr}")
        shown = [k for k in (default_key, "ar greedy", f"ar beam {args.beam}") if k in caps_by]
        results["examples"][split] = [
            {"truth": scenes.canonical_caption(scene_list[i]),
             "captions": {k: caps_by[k][i] for k in shown}}
            for i in range(min(3, n))
        ]
        if latency_pixels is None:
            latency_pixels = pixels[:32]
    if not args.no_latency and latency_pixels is not None:
        results["seconds"] = time.time() - t_start
        write_outputs(results, all_captions, args.out)  # the quality, in case latency fails
        results["latency"] = measure_latency(
            args, bundle, ar, latency_pixels, ar_latency_pixels, torch_model
        )
    results["seconds"] = time.time() - t_start
    write_outputs(results, all_captions, args.out)
    return results


def write_outputs(
    results: dict[str, Any], captions: dict[str, dict[str, list[str]]], out: Path
) -> None:
    from . import plots

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "captions.json").write_text(json.dumps(captions, indent=1))
    (out / "results.md").write_text(markdown_report(results))
    plots.plot_quality(results, out / "quality_vs_iterations.png")
    if results.get("latency"):
        plots.plot_latency(results, out / "latency_vs_batch.png")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m ladic.evaluate"] + [shlex.quote(a) for a in given])
    results = evaluate(args, command)
    print(markdown_report(results))
    print(f"wrote {args.out} in {results['seconds']:.0f}s")


if __name__ == "__main__":
    main()
