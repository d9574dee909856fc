"""Rendered Scenes images with their reference captions, for the Rust service's tests:
`python -m ladic.scene_fixtures` writes tests/fixtures/scenes/ (PNG files + captions.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from . import scenes

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "scenes")
    p.add_argument("--split", default="test-seen")
    p.add_argument("--count", type=int, default=8)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, scene in enumerate(scenes.generate_split(args.split, args.count)):
        name = f"{args.split}-{i:03d}.png"
        Image.fromarray(scenes.render(scene)).save(args.out / name, optimize=True)
        entries.append({
            "file": name,
            "canonical": scenes.canonical_caption(scene),
            "references": scenes.references(scene),
            "objects": [list(o.triple) for o in scene.objects],
        })
    (args.out / "captions.json").write_text(json.dumps(entries, indent=2) + "\n")
    print(f"wrote {len(entries)} images to {args.out}")


if __name__ == "__main__":
    main()
