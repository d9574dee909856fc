"""Scenes images and captions as training tensors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import scenes
from .config import ImageEncoderConfig

DATA_DIR = Path(__file__).resolve().parent.parent / "data"

PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos3": Image.Resampling.LANCZOS,
}


def resize(image: np.ndarray, size: int, resize_filter: str) -> np.ndarray:
    """Square resize without cropping, as the service does."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    pil = Image.fromarray(image).resize((size, size), PIL_FILTERS[resize_filter])
    return np.asarray(pil)


def split_images(
    split: str, cfg: ImageEncoderConfig, count: int | None = None, cache_dir: Path = DATA_DIR
) -> np.ndarray:
    """uint8 [N, S, S, 3] images of a split (its first `count`, at most all) at the
    encoder's input size, cached. The cache is named with the data version, so images of
    another version of the generator are never paired with this one's captions, and is
    moved into place only when complete, so an interrupted run leaves no bad cache."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    n = scenes.split_count(split, count)
    name = f"scenes-v{scenes.DATA_VERSION}-{split}-{n}-{cfg.image_size}-{cfg.resize_filter}"
    path = cache_dir / f"{name}.npy"
    if path.exists():
        return np.load(path)
    full = scenes.render_split(split, size=128, count=n, cache_dir=cache_dir)
    out = np.stack([resize(img, cfg.image_size, cfg.resize_filter) for img in full])
    tmp = cache_dir / f"{name}.tmp{os.getpid()}.npy"
    np.save(tmp, out)
    os.replace(tmp, path)
    return out


def normalize(images: np.ndarray, cfg: ImageEncoderConfig) -> torch.Tensor:
    """uint8 [B,S,S,3] -> float32 [B,3,S,S], scaled to [0,1] then mean/std normalized."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (x - mean) / std


def split_captions(split: str, count: int | None = None) -> list[list[str]]:
    """The 5 references of every scene of a split (reference 0 is canonical)."""
    return [scenes.references(s) for s in scenes.generate_split(split, count)]
