"""Train a LaDiC model on Scenes: first the text latent, then the diffusion.

    python -m ladic.train --out runs/scenes-tiny            # CPU, resumable
    python -m ladic.train --out runs/scenes-tiny --device cuda

Re-running the same command resumes from the last checkpoint in --out, with the
model, optimizer and random-number generator states, so a resumed run trains exactly as
an uninterrupted one. On resume only the training length, the learning-rate schedule
and the bookkeeping may change (RESUMABLE: --steps, --lr, --warmup, --checkpoint-every,
--eval-every, --eval-images, --device, --threads, --data-dir); the model, the objective
and the data must stay the run's (config.json and train_args.json in --out), or the
command refuses.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from . import data, scenes
from .config import tiny_config
from .diffusion import alpha_bar, training_loss
from .metrics import exact_match
from .model import Ladic, TextLatent, count_parameters
from .rundir import config_differences
from .sampler import SampleParams, SeededNoise, TorchBackend, caption_images, ids_to_text
from .tokenizer import build_word_tokenizer, load_tokenizer, special_ids


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/scenes-tiny"))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--text-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=6000, help="diffusion training steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps")
    p.add_argument(
        "--captions",
        choices=["canonical", "all"],
        default="canonical",
        help="train the diffusion on the canonical reference only, or on all five",
    )
    p.add_argument(
        "--train-noise-scale",
        type=float,
        default=4.0,
        help="noise scale of the forward process in training (LaDiC: 4)",
    )
    p.add_argument(
        "--token-weight",
        type=float,
        default=1.0,
        help="weight of the token cross-entropy (0.2 trained the first scenes-tiny; 1 learns\n"
        "several times faster, models/README.md)",
    )
    p.add_argument(
        "--scale-input",
        choices=["on", "off"],
        default="on",
        help="divide x_t by its training std before the diffuser's embeddings (off: as LaDiC)",
    )
    p.add_argument("--train-images", type=int, default=None, help="first N train images")
    p.add_argument("--checkpoint-every", type=int, default=250,
                   help="steps between checkpoints (0: only at the end)")
    p.add_argument("--eval-every", type=int, default=1000,
                   help="steps between validation runs (0: only at the end)")
    p.add_argument("--eval-images", type=int, default=200,
                   help="validation images (0: no validation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=data.DATA_DIR, help="image cache")
    args = p.parse_args(argv)
    for name in ("checkpoint_every", "eval_every", "eval_images", "text_steps", "steps"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must not be negative")
    if args.batch < 1:
        p.error("--batch must be at least 1")
    if args.train_images is not None and args.train_images < 1:
        p.error("--train-images must be at least 1")
    return args


# Flags that may differ when a run is resumed: its length and learning-rate schedule
# (which follows --steps anyway; the AR baseline's runs were extended with a lower
# --lr, models/README.md) and the bookkeeping. Every other flag shapes the model, the
# objective or the data, and a resumed run must keep the run's.
RESUMABLE = frozenset(
    {"out", "device", "threads", "steps", "lr", "warmup", "checkpoint_every", "eval_every",
     "eval_images", "data_dir"}
)
# Compares two model config dicts: (dotted key, value in the first, in the second).
Differences = Callable[[dict[str, Any], dict[str, Any]], list[tuple[str, Any, Any]]]
# Model config fields that come from flags, for the resume check's message.
CONFIG_FLAGS = {
    "schedule.train_noise_scale": "--train-noise-scale",
    "diffuser.scale_input": "--scale-input",
}


def train_args(args: argparse.Namespace) -> dict[str, object]:
    """The flags as train_args.json records them."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items())}


def resume_conflicts(
    out: Path, cfg: dict[str, object], args: argparse.Namespace,
    resumable: frozenset[str] = RESUMABLE, differences: Differences = config_differences,
) -> list[str]:
    """What differs between the run already in `out` (its config.json and
    train_args.json, where present) and the model config and flags given now, outside
    `resumable`; empty when there is nothing trained to resume. `differences` compares
    two model configs (`config_differences`: LaDiC's)."""
    trained = ("text_latent.pt", "checkpoint.pt", "final.pt")
    if not any((out / name).exists() for name in trained):
        return []
    conflicts = []
    if (out / "config.json").exists():
        saved = json.loads((out / "config.json").read_text())
        for key, was, new in differences(saved, cfg):
            flag = f" ({CONFIG_FLAGS[key]})" if key in CONFIG_FLAGS else ""
            conflicts.append(f"{key}{flag}: {was!r} in the run, {new!r} now")
    if (out / "train_args.json").exists():
        saved_args = json.loads((out / "train_args.json").read_text())
        now_args = train_args(args)
        for key in sorted(saved_args.keys() & now_args.keys() - resumable):
            if saved_args[key] != now_args[key]:
                conflicts.append(
                    f"--{key.replace('_', '-')}: {saved_args[key]!r} in the run, "
                    f"{now_args[key]!r} now"
                )
    return conflicts


def refuse_other_settings(
    out: Path, cfg: dict[str, object], args: argparse.Namespace,
    resumable: frozenset[str] = RESUMABLE, differences: Differences = config_differences,
) -> None:
    """Exits with the differences when `out` holds a run trained with other settings
    than `cfg` and `args` (see `resume_conflicts`)."""
    conflicts = resume_conflicts(out, cfg, args, resumable, differences)
    if conflicts:
        raise SystemExit(
            f"error: {out} holds a run trained with other settings; resume it with its own "
            "flags (only "
            + ", ".join(f"--{k.replace('_', '-')}" for k in sorted(resumable - {"out"}))
            + " may change) or train into a new --out. Differences: " + "; ".join(conflicts)
        )


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    w = max(1, int(total * warmup))
    if step < w:
        return peak * (step + 1) / w
    progress = min(1.0, (step - w) / max(1, total - w))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def open_log(path: Path, header: list[str], step: int):  # type: ignore[no-untyped-def]
    """The CSV training log, open for appending rows from `step` on. A run that starts
    at step 0 gets a new log with `header`. A resumed run first drops the rows after
    `step`: they were written after the checkpoint it resumes from, and those steps are
    about to be trained again (a log without them shows each step once)."""
    if step == 0 or not path.exists():
        f = open(path, "w", newline="")
        csv.writer(f).writerow(header)
        return f
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= step]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    os.replace(tmp, path)
    return open(path, "a", newline="")


def every(done: int, interval: int) -> bool:
    """Whether step `done` is a multiple of `interval` (0: never)."""
    return interval > 0 and done % interval == 0


def rng_state(rng: np.random.Generator) -> dict[str, object]:
    """The states of every random-number generator training draws from: the numpy
    Generator (batches), torch's CPU generator and, when this process uses CUDA, CUDA's."""
    return {"numpy": rng.bit_generator.state, **torch_rng_state()}


def torch_rng_state() -> dict[str, object]:
    """Torch's CPU generator and, when this process uses CUDA, CUDA's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def torch_rng_restore(state: dict) -> None:
    """Restores what `torch_rng_state` saved (CUDA's where there are as many devices)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def resumed_rng(ckpt: dict, seed: int) -> np.random.Generator:
    """The numpy Generator a checkpoint resumes with, torch's generators restored too
    (what `rng_state` saved; CUDA's where there are as many devices). A checkpoint from
    before the states were saved reseeds from the seed and its step instead."""
    step, state = ckpt["step"], ckpt.get("rng")
    if state is None:
        torch.manual_seed(seed + step)
        return np.random.default_rng([seed, step])
    rng = np.random.default_rng(seed)
    rng.bit_generator.state = state["numpy"]
    torch_rng_restore(state)
    return rng


def save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------- stage 1: text latent


def train_text_latent(
    text: TextLatent, ids: Tensor, steps: int, batch: int, device: str, log: Path
) -> None:
    """Train the split BERT as a denoising auto-encoder of captions.

    Masked input tokens (as in BERT's MLM) and noise on the latent make the latent
    space smooth and the decoder tolerant of the diffusion's small errors.
    """
    c = text.cfg
    opt = torch.optim.AdamW(text.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    text.train()
    with open(log, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "accuracy"])
        bar = tqdm(range(steps), desc="text latent")
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, 1e-3, 0.05)
            idx = torch.randint(0, ids.shape[0], (batch,), generator=gen)
            x = ids[idx].to(device)
            masked = x.clone()
            maskable = ~text.special_mask(x)
            m = (torch.rand(x.shape, device=device) < 0.15) & maskable
            masked[m] = c.mask_id
            h = text.encode_raw(masked)
            period = period_latent(text, device).detach()
            h = torch.where(text.special_mask(x)[..., None], period, h)
            h = h + 0.1 * h.std() * torch.randn_like(h)
            logits = text.head(run_layers(text.decoder_layers, h))
            targets = text.decoder_targets(x)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0:
                acc = (logits.argmax(-1) == targets).float().mean().item()
                writer.writerow([step, f"{loss.item():.5f}", f"{acc:.5f}"])
                bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{acc:.4f}")
    text.eval()


def run_layers(layers: torch.nn.ModuleList, h: Tensor) -> Tensor:
    for layer in layers:
        h = layer(h)
    return h


def period_latent(text: TextLatent, device: str) -> Tensor:
    """The fixed latent of ".": its latent in the sequence [CLS] . [SEP]."""
    c = text.cfg
    ids = torch.tensor([[c.cls_id, c.period_id, c.sep_id]], device=device)
    return text.encode_raw(ids)[0, 1]


@torch.no_grad()
def fit_latent_statistics(text: TextLatent, ids: Tensor, device: str) -> None:
    """Per-channel mean/std over real token positions; store the "." latent."""
    text.period_latent.copy_(period_latent(text, device))
    total = torch.zeros(text.cfg.hidden, dtype=torch.float64, device=device)
    total_sq = torch.zeros_like(total)
    count = 0
    for chunk in ids.split(1024):
        chunk = chunk.to(device)
        h = text.encode_raw(chunk)
        real = h[~text.special_mask(chunk)].double()
        total += real.sum(0)
        total_sq += (real**2).sum(0)
        count += real.shape[0]
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(1e-8).sqrt()
    text.mean.copy_(mean.float())
    text.std.copy_(std.float())


@torch.no_grad()
def latent_roundtrip_accuracy(text: TextLatent, ids: Tensor, device: str) -> float:
    chunk = ids[:2048].to(device)
    pred = text.decode_logits(text.encode(chunk)).argmax(-1)
    return (pred == text.decoder_targets(chunk)).float().mean().item()


# ------------------------------------------------------------------ stage 2: diffusion


@torch.no_grad()
def evaluate_exact_match(
    model: Ladic,
    images: np.ndarray,
    scene_list: list,
    tokenizer,
    device: str,
    params: SampleParams,
    seed: int = 0,
) -> tuple[float, list[str]]:
    """Exact-match accuracy of sampled captions (uint8 `images`, 100 per sampler call);
    candidate k of image i gets the noise of seed `seed + 10000 * k + i`."""
    was_training = model.training
    model.eval()
    backend = TorchBackend(model, device)
    caps: list[str] = []
    for start in range(0, len(images), 100):
        pix = data.normalize(images[start : start + 100], model.cfg.image).numpy()
        out = caption_images(
            backend,
            pix,
            params,
            model.cfg,
            lambda i, k, s=start: SeededNoise(seed + 10000 * k + s + i, shape(model)),
        )
        caps += [ids_to_text(tokenizer, c.ids) for c in out]
    model.train(was_training)
    hits = [exact_match(c, s) for c, s in zip(caps, scene_list)]
    return float(np.mean(hits)), caps


def shape(model: Ladic) -> tuple[int, int]:
    return (model.cfg.text.max_len, model.cfg.latent_dim)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = args.device
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    tok_path = out / "tokenizer.json"
    if not tok_path.exists():
        build_word_tokenizer(scenes.VOCABULARY, 40).save(str(tok_path))
    tokenizer = load_tokenizer(tok_path, 40)
    cfg = tiny_config(tokenizer.get_vocab_size(), special_ids(tokenizer))
    cfg.schedule.train_noise_scale = args.train_noise_scale
    cfg.diffuser.scale_input = args.scale_input == "on"
    refuse_other_settings(out, cfg.to_dict(), args)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    (out / "train_args.json").write_text(json.dumps(train_args(args), indent=2))
    model = Ladic(cfg).to(device)
    print(
        f"parameters: image {count_parameters(model.image_encoder):,} "
        f"text {count_parameters(model.text):,} diffuser {count_parameters(model.diffuser):,}"
    )

    train_refs = data.split_captions("train", args.train_images)
    text_path = out / "text_latent.pt"
    # Torch's generators as stage 1 left them: a run that stops before its first stage-2
    # checkpoint resumes stage 2 with the draws an uninterrupted run makes.
    stage2_rng_path = out / "stage2_rng.pt"
    if text_path.exists():
        model.text.load_state_dict(torch.load(text_path, map_location=device))
        if (out / "checkpoint.pt").exists():
            pass  # stage 2 resumes from its checkpoint, generators included
        elif stage2_rng_path.exists():
            torch_rng_restore(torch.load(stage2_rng_path, weights_only=False))
        else:
            print(
                f"note: {stage2_rng_path.name} is missing (a run from an older version): "
                "stage 2 starts from other random draws than an uninterrupted run"
            )
    else:
        corpus = [r for refs in train_refs for r in refs]
        corpus_ids = torch.tensor([e.ids for e in tokenizer.encode_batch(corpus)])
        t0 = time.time()
        train_text_latent(
            model.text, corpus_ids, args.text_steps, 128, device, out / "text_log.csv"
        )
        fit_latent_statistics(model.text, corpus_ids, device)
        acc = latent_roundtrip_accuracy(model.text, corpus_ids, device)
        print(f"text latent: round-trip token accuracy {acc:.4f} in {time.time() - t0:.0f}s")
        save_atomic(torch_rng_state(), stage2_rng_path)
        save_atomic(model.text.state_dict(), text_path)

    # The text encoder is frozen from here on (as in LaDiC), so its latents are fixed.
    captions = [[refs[0]] if args.captions == "canonical" else refs for refs in train_refs]
    owner = np.array([i for i, refs in enumerate(captions) for _ in refs])
    flat = [r for refs in captions for r in refs]
    cap_ids = torch.tensor([e.ids for e in tokenizer.encode_batch(flat)])
    with torch.no_grad():
        latents = torch.cat([model.text.encode(c.to(device)).cpu() for c in cap_ids.split(2048)])
    targets = model.text.decoder_targets(cap_ids)
    images = data.split_images("train", cfg.image, args.train_images, cache_dir=args.data_dir)
    n_val = args.eval_images
    val_scenes = scenes.generate_split("val", n_val) if n_val else []
    val_images = (
        data.split_images("val", cfg.image, n_val, cache_dir=args.data_dir) if n_val else None
    )

    for p in model.text.parameters():
        p.requires_grad_(False)
    for p in list(model.text.decoder_layers.parameters()) + list(model.text.head.parameters()):
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ab = torch.tensor(alpha_bar(cfg.schedule), dtype=torch.float32, device=device)

    ckpt_path = out / "checkpoint.pt"
    step = 0
    rng = np.random.default_rng(args.seed)
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        rng = resumed_rng(ckpt, args.seed)
        print(f"resumed at step {step}")

    header = ["step", "loss", "latent", "token", "lr", "seconds", "val_exact"]
    log_file = open_log(out / "train_log.csv", header, step)
    writer = csv.writer(log_file)
    model.train()
    bar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="diffusion")
    t_last = time.time()
    done = step
    for step in bar:
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.integers(0, len(flat), args.batch)
        pixels = data.normalize(images[owner[idx]], cfg.image).to(device)
        loss, parts = training_loss(
            model, pixels, latents[idx].to(device), targets[idx].to(device), ab,
            token_weight=args.token_weight,
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        done = step + 1
        val = ""
        if n_val and (every(done, args.eval_every) or done == args.steps):
            acc, caps = evaluate_exact_match(
                model, val_images, val_scenes, tokenizer, device, SampleParams.defaults(cfg)
            )
            val = f"{acc:.4f}"
            tqdm.write(f"step {done}: val exact match {acc:.3f}; e.g. {caps[0]!r}")
        if done % 25 == 0 or val or done == args.steps:
            now = time.time()
            writer.writerow(
                [done, f"{loss.item():.5f}", f"{parts['latent']:.5f}", f"{parts['token']:.5f}",
                 f"{lr:.6f}", f"{now - t_last:.2f}", val]
            )
            log_file.flush()
            t_last = now
            bar.set_postfix(loss=f"{loss.item():.4f}", tok=f"{parts['token']:.3f}")
        if every(done, args.checkpoint_every) or done == args.steps:
            save_atomic(
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done,
                 "rng": rng_state(rng)},
                ckpt_path,
            )
    log_file.close()
    save_atomic(
        {"config": cfg.to_dict(), "model": model.state_dict(), "step": done}, out / "final.pt"
    )
    print(f"saved {out / 'final.pt'}")


if __name__ == "__main__":
    main()
