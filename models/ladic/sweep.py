"""Exact match of sampler settings on the validation split, to choose a bundle's defaults
without looking at the test splits.

    python -m ladic.sweep --run runs/scenes-tiny guidance=1 guidance=0 \\
        guidance=0,self_conditioning=0 steps=5

Each positional argument is one setting: comma-separated `field=value` overrides of the
run's sampler defaults (`SampleParams`: steps, guidance, time_shift, renoise_scale,
self_conditioning, candidates). The model is the newer of the run's `final.pt` and
`checkpoint.pt` (or `--checkpoint`), in PyTorch; noise is seeded per image and
candidate, the same for every setting. Prints one line per setting and, with --json,
writes them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from . import data, scenes
from .export import load_run
from .rundir import run_problem
from .sampler import SampleParams
from .tokenizer import load_tokenizer
from .train import evaluate_exact_match

FIELDS = {"steps", "guidance", "time_shift", "renoise_scale", "self_conditioning", "candidates"}


def parse_setting(text: str, base: SampleParams) -> SampleParams:
    """`guidance=0,steps=5` -> a copy of `base` with those fields changed."""
    changes: dict[str, object] = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in FIELDS:
            raise SystemExit(
                f"bad setting {part!r}: use field=value with field in {sorted(FIELDS)}"
            )
        kind = type(getattr(base, key))
        changes[key] = value.lower() in ("1", "true", "on") if kind is bool else kind(float(value))
    return dataclasses.replace(base, **changes)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("settings", nargs="+", help="field=value[,field=value...] per setting")
    p.add_argument("--run", type=Path, default=Path("runs/scenes-tiny"))
    p.add_argument("--checkpoint", type=Path,
                   help="these weights (default: the newer of final.pt and checkpoint.pt)")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    problem = run_problem(args.run, weights=args.checkpoint is None)
    if problem is None and args.checkpoint is not None and not args.checkpoint.is_file():
        problem = f"--checkpoint {args.checkpoint}: no such file"
    if problem:
        p.error(problem)
    torch.set_num_threads(args.threads)

    model, tokenizer_path = load_run(args.run, args.checkpoint)
    cfg = model.cfg
    tokenizer = load_tokenizer(tokenizer_path, cfg.text.max_len)
    scene_list = scenes.generate_split(args.split, args.limit)
    images = data.split_images(args.split, cfg.image, len(scene_list))
    base = SampleParams.defaults(cfg)
    results = []
    for text in args.settings:
        params = parse_setting(text, base)
        start = time.time()
        exact, _ = evaluate_exact_match(
            model, images, scene_list, tokenizer, "cpu", params, args.seed
        )
        seconds = time.time() - start
        results.append({"setting": text, "exact_match": exact, "seconds": seconds})
        print(
            f"{text:40s} exact match {exact:.3f} on {len(scene_list)} {args.split} images "
            f"({seconds:.0f} s)",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
