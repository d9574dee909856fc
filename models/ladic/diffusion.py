"""The noise schedule and the LaDiC training objective."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ScheduleConfig
from .model import Ladic


def alpha_bar(cfg: ScheduleConfig) -> np.ndarray:
    """alpha_bar[t] for t = 0..T-1, float64; alpha_bar[0] = 1 means t = 0 is clean.

    As the released code: betas are linspace(beta_start, beta_end, T) and alpha_bar[t]
    is the product of (1 - beta) over the first t of them.
    """
    if cfg.kind != "linear":
        raise ValueError(f"unsupported schedule {cfg.kind!r}")
    betas = np.linspace(cfg.beta_start, cfg.beta_end, cfg.num_timesteps, dtype=np.float64)
    return np.concatenate([[1.0], np.cumprod(1.0 - betas)[:-1]])


def stride_for(steps: int, num_timesteps: int) -> int:
    """The timestep stride that gives `steps` iterations (34 -> 30, 5 -> 200)."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    return max(1, -(-(num_timesteps - 1) // steps))


def q_sample(x0: Tensor, t: Tensor, eps: Tensor, ab: Tensor, noise_scale: float) -> Tensor:
    """Forward process with LaDiC's noise scale: sqrt(ab) x0 + s sqrt(1-ab) eps."""
    a = ab[t].to(x0.dtype)[:, None, None]
    return a.sqrt() * x0 + noise_scale * (1 - a).sqrt() * eps


def training_loss(
    model: Ladic,
    pixels: Tensor,
    latents: Tensor,
    targets: Tensor,
    ab: Tensor,
    uncond_prob: float = 0.1,
    self_cond_prob: float = 0.5,
    token_weight: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """One LaDiC training step's loss.

    latents: normalized x0 [B,L,D] from the frozen text encoder; targets: the token ids
    the decoder must read back (specials mapped to ".").
    """
    b = pixels.shape[0]
    cfg = model.cfg.schedule
    drop = torch.rand(b, device=pixels.device) < uncond_prob
    pixels = torch.where(drop[:, None, None, None], torch.zeros_like(pixels), pixels)
    kv = model.encode_image(pixels)
    t = torch.randint(1, cfg.num_timesteps, (b,), device=pixels.device)
    x_t = q_sample(latents, t, torch.randn_like(latents), ab, cfg.train_noise_scale)
    self_cond = torch.zeros_like(latents)
    if torch.rand(()) < self_cond_prob:
        with torch.no_grad():
            self_cond = model.denoise(x_t, self_cond, t, kv).detach()
    x0 = model.denoise(x_t, self_cond, t, kv)
    latent_loss = (x0 - latents).norm(dim=-1).mean()
    logits = model.text.decode_logits(x0)
    token_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss = latent_loss + token_weight * token_loss
    return loss, {"latent": latent_loss.item(), "token": token_loss.item()}
