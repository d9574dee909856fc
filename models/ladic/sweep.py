"""Exact match of sampler settings on the validation split, to choose a bundle's defaults
without looking at the test splits.

    python -m ladic.sweep --run runs/scenes-tiny guidance=1 guidance=0 \\
        guidance=0,self_conditioning=0 steps=5

Each positional argument is one setting: comma-separated `field=value` overrides of the
run's sampler defaults (`SampleParams`: steps, guidance, time_shift, renoise_scale,
self_conditioning, candidates). The model is the run's `final.pt` (or `--checkpoint`),
in PyTorch; noise is seeded per image and candidate, the same for every setting.
Prints one line per setting and, with --json, writes them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import data, scenes
from .config import LadicConfig
from .metrics import exact_match
from .model import Ladic
from .sampler import SampleParams, SeededNoise, TorchBackend, caption_images, ids_to_text
from .tokenizer import load_tokenizer

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


def load_model(run: Path, checkpoint: Path | None) -> Ladic:
    cfg = LadicConfig.from_dict(json.loads((run / "config.json").read_text()))
    model = Ladic(cfg)
    path = checkpoint or (
        run / "final.pt" if (run / "final.pt").exists() else run / "checkpoint.pt"
    )
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["model"])
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("settings", nargs="+", help="field=value[,field=value...] per setting")
    p.add_argument("--run", type=Path, default=Path("runs/scenes-tiny"))
    p.add_argument("--checkpoint", type=Path, help="a checkpoint other than the run's final.pt")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = load_model(args.run, args.checkpoint)
    cfg = model.cfg
    tokenizer = load_tokenizer(args.run / "tokenizer.json", cfg.text.max_len)
    scene_list = scenes.generate_split(args.split, args.limit)
    pixels = data.normalize(
        data.split_images(args.split, cfg.image, len(scene_list)), cfg.image
    ).numpy()
    backend = TorchBackend(model, "cpu")
    shape = (cfg.text.max_len, cfg.latent_dim)
    base = SampleParams.defaults(cfg)
    results = []
    for text in args.settings:
        params = parse_setting(text, base)
        start = time.time()
        captions: list[str] = []
        for first in range(0, len(pixels), 100):
            out = caption_images(
                backend,
                pixels[first : first + 100],
                params,
                cfg,
                lambda i, k, f=first: SeededNoise(args.seed + 10000 * k + f + i, shape),
            )
            captions += [ids_to_text(tokenizer, c.ids) for c in out]
        exact = float(np.mean([exact_match(c, s) for c, s in zip(captions, scene_list)]))
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
