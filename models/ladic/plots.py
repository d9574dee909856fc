"""PNG plots: training loss curves, and the evaluation's quality and latency.

    python -m ladic.plots --run runs/scenes-tiny                  # runs/scenes-tiny/loss_curve.png
    python -m ladic.plots --run runs/scenes-tiny --run runs/ar-tiny --out eval/loss_curve.png
    python -m ladic.plots --results eval/results.json             # re-draw the eval plots
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

QUALITY_METRICS = (("CIDEr-D", "CIDEr-D"), ("exact_match", "exact match"))


def read_log(path: Path) -> dict[str, list[float | None]]:
    """A CSV log as columns of floats (None where a cell is empty)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns: dict[str, list[float | None]] = {}
    for row in rows:
        for key, value in row.items():
            if key is None:
                continue
            try:
                number: float | None = float(value) if value not in (None, "") else None
            except ValueError:
                number = None
            columns.setdefault(key, []).append(number)
    return columns


def _points(xs: Sequence[float | None], ys: Sequence[float | None]) -> tuple[list, list]:
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_loss(runs: Sequence[Path], path: Path) -> Path:
    """Training loss (and its parts) and validation exact match against the step, for
    every run's train_log.csv; the text-latent stage (text_log.csv) when present."""
    logs = {run: read_log(run / "train_log.csv") for run in runs}
    text_logs = {run: read_log(run / "text_log.csv") for run in runs
                 if (run / "text_log.csv").exists()}
    panels = 3 if text_logs else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    ax_loss, ax_val = axes[0], axes[1]
    for run, log in logs.items():
        name = run.name
        steps = log.get("step", [])
        x, y = _points(steps, log.get("loss", []))
        (line,) = ax_loss.plot(x, y, label=f"{name} loss", lw=1.2)
        for part, style in (("latent", "--"), ("token", ":")):
            if part in log:
                x, y = _points(steps, log[part])
                ax_loss.plot(x, y, style, color=line.get_color(), lw=1, label=f"{name} {part}")
        x, y = _points(steps, log.get("val_exact", []))
        if x:
            ax_val.plot(x, [100 * v for v in y], "o-", color=line.get_color(), label=name)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("training loss")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_val.set_xlabel("step")
    ax_val.set_ylabel("%")
    ax_val.set_ylim(0, 100)
    ax_val.set_title("validation exact match")
    ax_val.grid(alpha=0.3)
    if ax_val.lines:
        ax_val.legend(fontsize=8)
    if text_logs:
        ax_text = axes[2]
        for run, log in text_logs.items():
            x, y = _points(log.get("step", []), log.get("loss", []))
            ax_text.plot(x, y, label=f"{run.name} loss")
            x, acc = _points(log.get("step", []), log.get("accuracy", []))
            ax_text.plot(x, [1 - a for a in acc], "--", label=f"{run.name} 1 - accuracy")
        ax_text.set_yscale("log")
        ax_text.set_xlabel("step")
        ax_text.set_title("text latent (auto-encoder)")
        ax_text.legend(fontsize=8)
        ax_text.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_quality(results: dict[str, Any], path: Path) -> Path:
    """CIDEr-D and exact match vs sampling iterations for each Back&Refine / MBR setting
    of the diffusion model; the AR baseline's decodings as horizontal lines."""
    splits = list(results["quality"])
    fig, axes = plt.subplots(
        len(QUALITY_METRICS), max(1, len(splits)), figsize=(5.5 * max(1, len(splits)), 7.5),
        squeeze=False,
    )
    for col, split in enumerate(splits):
        rows = results["quality"][split]
        diffusion = [r for r in rows if r["model"] == "diffusion"]
        settings = sorted({(r["back_refine"], r["mbr"]) for r in diffusion})
        steps = sorted({r["steps"] for r in diffusion})
        for row_i, (key, label) in enumerate(QUALITY_METRICS):
            ax = axes[row_i][col]
            scale = 100.0 if key == "exact_match" else 1.0
            for br, k in settings:
                pts = sorted((r["steps"], r.get(key)) for r in diffusion
                             if (r["back_refine"], r["mbr"]) == (br, k) and r.get(key) is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [scale * p[1] for p in pts], "o-",
                            label=f"LaDiC B&R {'on' if br else 'off'}, MBR k={k}")
            for r in rows:
                if r["model"] == "ar" and r.get(key) is not None:
                    name = "greedy" if r["beam"] <= 1 else f"beam {r['beam']}"
                    style = "--" if r["beam"] <= 1 else ":"
                    ax.axhline(scale * r[key], color="black", ls=style, lw=1.2,
                               label=f"AR {name}")
            if steps:
                ax.set_xscale("log")
                ax.set_xticks(steps)
                ax.set_xticklabels([str(s) for s in steps])
                ax.minorticks_off()
            if key == "exact_match":
                values = [y for line in ax.lines for y in line.get_ydata()]
                low = min(values, default=0.0)
                ax.set_ylim(max(0.0, min(low - 5.0, 90.0)), 100.0)
            ax.set_xlabel("sampling iterations")
            ax.set_ylabel(label + (" (%)" if scale == 100.0 else ""))
            ax.set_title(f"{split}: {label}")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(results: dict[str, Any], path: Path) -> Path:
    """Milliseconds per image vs batch size, one line per model and setting."""
    rows = results["latency"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    keys: list[tuple[str, str, str]] = []
    for r in rows:
        key = (r["model"], r["runtime"], r["setting"])
        if key not in keys:
            keys.append(key)
    for model, runtime, setting in keys:
        pts = sorted((r["batch"], r["ms_per_image"]) for r in rows
                     if (r["model"], r["runtime"], r["setting"]) == (model, runtime, setting))
        name = "LaDiC" if model == "diffusion" else "AR"
        style = "o-" if runtime == "PyTorch" else "s--"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                label=f"{name} {setting} ({runtime})")
    batches = sorted({r["batch"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("ms per image")
    threads = results.get("machine", {}).get("threads")
    ax.set_title(f"latency per image ({threads} CPU thread(s))" if threads else "latency")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", type=Path, action="append", default=[],
                   help="a training run directory with train_log.csv (repeatable)")
    p.add_argument("--out", type=Path, help="loss plot path (default: RUN/loss_curve.png)")
    p.add_argument("--results", type=Path, help="an evaluate results.json to re-plot")
    args = p.parse_args(argv)
    if not args.run and not args.results:
        p.error("give --run and/or --results")
    for run in args.run:
        if not (run / "train_log.csv").is_file():
            p.error(f"--run {run}: not a training run (no train_log.csv)")
    if args.results and not args.results.is_file():
        p.error(f"--results {args.results}: no such file (an evaluate results.json)")
    if args.run:
        out = args.out or args.run[0] / "loss_curve.png"
        print(f"wrote {plot_loss(args.run, out)}")
    if args.results:
        results = json.loads(args.results.read_text())
        print(f"wrote {plot_quality(results, args.results.parent / 'quality_vs_iterations.png')}")
        if results.get("latency"):
            print(f"wrote {plot_latency(results, args.results.parent / 'latency_vs_batch.png')}")


if __name__ == "__main__":
    main()
