"""Training-run and bundle folders: which weights a run's folder holds, and why a path
given on the command line is not the folder a command expects (one line each)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import LadicConfig


def newest_weights(run: Path, device: str = "cpu") -> tuple[Path, dict[str, Any]]:
    """The newer of a run's `final.pt` and `checkpoint.pt` by the training step each
    holds, with its contents: a run that finished and was then resumed with a larger
    --steps and stopped has a newer `checkpoint.pt`. `final.pt` wins a tie (the same
    weights). A `final.pt` from before it recorded its step counts as older: a run
    writes a checkpoint at the step it writes `final.pt` at, so `checkpoint.pt` holds
    the same weights or newer ones."""
    found = {
        path: torch.load(path, map_location=device, weights_only=False)
        for path in (run / "final.pt", run / "checkpoint.pt")
        if path.is_file()
    }
    if not found:
        raise FileNotFoundError(f"{run}: no final.pt or checkpoint.pt")
    if len(found) == 1:
        return next(iter(found.items()))
    (final, f), (ckpt, c) = found.items()
    if "step" in f and f["step"] >= c["step"]:
        return final, f
    return ckpt, c


def run_problem(run: Path, kind: str = "ladic.train", weights: bool = True) -> str | None:
    """Why `run` is not a training run folder (with weights, unless `weights` is false:
    they come from elsewhere), or None; `kind` names the command that writes it. A
    `ladic.train` run needs config.json; an AR baseline run (`kind="ladic.ar_baseline"`)
    needs it only beside a bare checkpoint.pt."""
    if not run.is_dir():
        return f"{run}: no such directory (not a {kind} run)"
    final, ckpt = (run / "final.pt").is_file(), (run / "checkpoint.pt").is_file()
    needs_config = kind == "ladic.train" or not final
    if needs_config and not (run / "config.json").is_file():
        return f"{run}: not a {kind} run (no config.json)"
    if weights and not (final or ckpt):
        return f"{run}: not a {kind} run with weights (no final.pt or checkpoint.pt)"
    return None


def bundle_problem(path: Path) -> str | None:
    """Why `path` is not a bundle folder (docs/bundle.md), or None."""
    if not path.is_dir():
        return f"{path}: no such directory (not a bundle)"
    if not (path / "manifest.json").is_file():
        return f"{path}: not a bundle (no manifest.json)"
    return None


def flat_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys ({"a": {"b": 1}} -> {"a.b": 1})."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(flat_dict(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def config_differences(
    a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...] = ()
) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) for every field of two model configs
    (`LadicConfig` dicts) that differs, except keys starting with one of `ignore`. A
    field missing from an older config counts as its default, as `from_dict` reads it."""

    return dict_differences(
        LadicConfig.from_dict(a).to_dict(), LadicConfig.from_dict(b).to_dict(), ignore
    )


def dict_differences(
    a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...] = ()
) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) for every field of two nested dicts of JSON
    values that differs (tuples and lists alike), except keys starting with `ignore`."""

    def normal(d: dict[str, Any]) -> dict[str, Any]:
        return flat_dict(json.loads(json.dumps(d)))

    fa, fb = normal(a), normal(b)
    return [
        (k, fa.get(k), fb.get(k))
        for k in sorted(fa.keys() | fb.keys())
        if not k.startswith(ignore) and fa.get(k) != fb.get(k)
    ]
