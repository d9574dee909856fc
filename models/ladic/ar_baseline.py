"""An autoregressive captioner: the baseline the diffusion model is compared with.

    python -m ladic.ar_baseline train --out runs/ar-tiny --threads 1 --steps 22000 --batch 64
    python -m ladic.ar_baseline train --out runs/ar-tiny --device cuda --steps 22000 --batch 64
    python -m ladic.ar_baseline caption --run runs/ar-tiny --split test-seen --limit 5

Re-running the same train command resumes from the last checkpoint in --out.

Fairness (SCENES.md: "an autoregressive baseline of similar size trained on the same
data and budget"):
- Same image encoder: `ladic.model.ImageEncoder` with the tiny LaDiC's config (112 px,
  conv stem, 2 ViT layers of width 128), trained from scratch like LaDiC's.
- Decoder shaped like the tiny LaDiC's diffuser: 3 layers of width 128, 4 heads, FFN
  384, each with (causal) self-attention, cross-attention to the image tokens and an
  FFN; plus token/position embeddings and an output projection. In total about 1.09M
  parameters against 1.13M for LaDiC tiny's image encoder + diffuser + text decoder
  (the frozen text encoder, 0.10M more, is not counted: it only makes training targets).
- Same tokenizer (the Scenes word-level one, 47 tokens with the special ones), same data
  (the train split, by default only the canonical reference, as the diffusion run), same
  optimizer and schedule (AdamW, lr 5e-4, weight decay 0.01, 5% linear warm-up then
  cosine to 10%, gradient clipping at 1), and the SAME BUDGET: the same number of
  steps x batch size as the diffusion run (22000 x 64, the first `runs/scenes-tiny`'s;
  the current one stopped at 20000, so the AR model now has 10% more). An AR
  step (one teacher-forced pass) is cheaper than a diffusion step (which also runs a
  self-conditioning pass half of the time), so the AR model gets less compute for the
  same number of examples seen, but not fewer examples.

Decoding: greedy and beam search (length-normalized log-probability), both batched,
with a key/value cache so each new token costs one row pass. Captions are the ids
between [CLS] and [SEP], turned into text with `ladic.sampler.ids_to_text` exactly as
the diffusion's.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from . import data, scenes
from .config import ImageEncoderConfig, micro_config, tiny_config
from .metrics import exact_match
from .model import ImageEncoder, attend, count_parameters, merge_heads, split_heads
from .rundir import dict_differences, newest_weights, run_problem
from .sampler import ids_to_text
from .tokenizer import build_word_tokenizer, load_tokenizer, special_ids
from .train import (
    RESUMABLE,
    every,
    lr_at,
    open_log,
    refuse_other_settings,
    resumed_rng,
    rng_state,
    save_atomic,
    train_args,
)

# ---------------------------------------------------------------------------- config


@dataclass
class ArConfig:
    name: str = "ar-tiny"
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    vocab_size: int = 47
    max_len: int = 40
    hidden: int = 128
    layers: int = 3
    heads: int = 4
    ffn: int = 384
    dropout: float = 0.1
    layer_norm_eps: float = 1e-6
    pad_id: int = 0
    cls_id: int = 1
    sep_id: int = 2
    unk_id: int = 3
    mask_id: int = 4
    period_id: int = 6

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ArConfig:
        d = dict(d)
        image = dict(d.pop("image"))
        image["mean"] = tuple(image["mean"])
        image["std"] = tuple(image["std"])
        return ArConfig(image=ImageEncoderConfig(**image), **d)


def ar_config_differences(
    a: dict[str, Any], b: dict[str, Any]
) -> list[tuple[str, Any, Any]]:
    """`rundir.config_differences` for AR baseline configs: a field missing from an
    older config counts as its default, as `ArConfig.from_dict` reads it."""
    return dict_differences(ArConfig.from_dict(a).to_dict(), ArConfig.from_dict(b).to_dict())


def tiny_ar_config(vocab_size: int, ids: dict[str, int]) -> ArConfig:
    """The baseline for LaDiC tiny: its image encoder, a decoder shaped like its diffuser."""
    image = tiny_config(vocab_size, ids).image
    return ArConfig(name="ar-tiny", image=image, vocab_size=vocab_size, max_len=40,
                    hidden=128, layers=3, heads=4, ffn=384, **ids)


def micro_ar_config(vocab_size: int, ids: dict[str, int]) -> ArConfig:
    """A few-kilobyte model for tests."""
    image = micro_config(vocab_size, ids).image
    return ArConfig(name="ar-micro", image=image, vocab_size=vocab_size, max_len=12,
                    hidden=16, layers=1, heads=2, ffn=32, dropout=0.0, **ids)


# ----------------------------------------------------------------------------- model


def causal_attend(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Multi-head attention where query i (the last Lq of Lk positions) sees keys 0..its
    own position. q [B,Lq,D], k/v [B,Lk,D] with Lk >= Lq (earlier keys from a cache)."""
    lq, lk = q.shape[1], k.shape[1]
    q, k, v = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(int(q.shape[-1])))
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return merge_heads(scores.softmax(dim=-1) @ v)


LayerCache = tuple[Tensor, Tensor]


class DecoderLayer(nn.Module):
    """Pre-LayerNorm transformer decoder layer: causal self-attention, cross-attention
    to the image tokens, FFN."""

    def __init__(self, cfg: ArConfig) -> None:
        super().__init__()
        d, w = cfg.hidden, cfg.image.width
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.cross_query = nn.Linear(d, d)
        self.cross_key = nn.Linear(w, d)
        self.cross_value = nn.Linear(w, d)
        self.cross_out = nn.Linear(d, d)
        self.norm3 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(d, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, d)
        self.dropout = nn.Dropout(cfg.dropout)

    def image_kv(self, image: Tensor) -> LayerCache:
        return self.cross_key(image), self.cross_value(image)

    def forward(
        self, h: Tensor, image_kv: LayerCache, cache: LayerCache | None = None
    ) -> tuple[Tensor, LayerCache]:
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=1), torch.cat([cache[1], v], dim=1)
        h = h + self.dropout(self.proj(causal_attend(q, k, v, self.heads)))
        c = attend(self.cross_query(self.norm2(h)), image_kv[0], image_kv[1], self.heads)
        h = h + self.dropout(self.cross_out(c))
        h = h + self.dropout(self.fc2(F.gelu(self.fc1(self.norm3(h)))))
        return h, (k, v)


class ArCaptioner(nn.Module):
    def __init__(self, cfg: ArConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg.image)
        self.token_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position_embeddings = nn.Embedding(cfg.max_len, cfg.hidden)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size)
        nn.init.normal_(self.token_embeddings.weight, std=0.02)
        nn.init.normal_(self.position_embeddings.weight, std=0.02)

    def decoder_parameters(self) -> int:
        return count_parameters(self) - count_parameters(self.image_encoder)

    def encode_image(self, pixels: Tensor) -> list[LayerCache]:
        """Pixels -> every layer's cross-attention keys and values (computed once)."""
        image = self.image_encoder(pixels)
        return [layer.image_kv(image) for layer in self.layers]

    def decode(
        self,
        ids: Tensor,
        image_kv: list[LayerCache],
        cache: list[LayerCache] | None = None,
    ) -> tuple[Tensor, list[LayerCache]]:
        """Logits [B,L,V] for tokens `ids` [B,L] that follow the cached positions."""
        offset = 0 if cache is None else cache[0][0].shape[1]
        pos = torch.arange(offset, offset + ids.shape[1], device=ids.device)
        h = self.embed_dropout(self.token_embeddings(ids) + self.position_embeddings(pos))
        new_cache: list[LayerCache] = []
        for i, layer in enumerate(self.layers):
            h, c = layer(h, image_kv[i], None if cache is None else cache[i])
            new_cache.append(c)
        return self.head(self.norm(h)), new_cache

    def forward(self, pixels: Tensor, ids: Tensor) -> Tensor:
        """Teacher forcing: logits for every next token of `ids` [B,L]."""
        return self.decode(ids, self.encode_image(pixels))[0]


def ar_model(cfg: ArConfig) -> ArCaptioner:
    return ArCaptioner(cfg)


# -------------------------------------------------------------------------- decoding


def _banned(cfg: ArConfig, device: torch.device) -> Tensor:
    """Tokens a caption never contains: every special but [SEP], which ends it."""
    mask = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=device)
    for i in (cfg.pad_id, cfg.cls_id, cfg.unk_id, cfg.mask_id):
        mask[i] = True
    return mask


def _strip(rows: Tensor, cfg: ArConfig) -> list[list[int]]:
    """Generated ids (after [CLS]) up to, not including, the first [SEP]."""
    out: list[list[int]] = []
    for row in rows.tolist():
        row = row[1:]
        if cfg.sep_id in row:
            row = row[: row.index(cfg.sep_id)]
        out.append([i for i in row if i != cfg.pad_id])
    return out


@torch.no_grad()
def greedy_decode(
    model: ArCaptioner, pixels: Tensor, max_len: int | None = None
) -> list[list[int]]:
    """Batched greedy decoding; returns the caption ids without specials."""
    cfg = model.cfg
    model.eval()
    device = next(model.parameters()).device
    pixels = pixels.to(device)
    max_len = min(max_len or cfg.max_len, cfg.max_len)
    banned = _banned(cfg, device)
    image_kv = model.encode_image(pixels)
    b = pixels.shape[0]
    tokens = torch.full((b, 1), cfg.cls_id, dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    cache = None
    for _ in range(max_len - 1):
        logits, cache = model.decode(tokens[:, -1:], image_kv, cache)
        nxt = logits[:, -1].masked_fill(banned, float("-inf")).argmax(dim=-1)
        nxt = torch.where(finished, torch.full_like(nxt, cfg.pad_id), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        finished |= nxt == cfg.sep_id
        if bool(finished.all()):
            break
    return _strip(tokens, cfg)


@torch.no_grad()
def beam_decode(
    model: ArCaptioner,
    pixels: Tensor,
    width: int = 3,
    max_len: int | None = None,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Batched beam search ranked by length-normalized log-probability,
    sum(log p) / length**length_penalty (length counts the generated tokens with [SEP]).

    Every step keeps the `width` best of all continuations of unfinished beams and the
    finished beams themselves (which carry their final score). Width 1 is greedy."""
    cfg = model.cfg
    model.eval()
    device = next(model.parameters()).device
    pixels = pixels.to(device)
    max_len = min(max_len or cfg.max_len, cfg.max_len)
    banned = _banned(cfg, device)
    b, w, v = pixels.shape[0], width, cfg.vocab_size
    image_kv = [
        (k.repeat_interleave(w, dim=0), vv.repeat_interleave(w, dim=0))
        for k, vv in model.encode_image(pixels)
    ]
    tokens = torch.full((b * w, 1), cfg.cls_id, dtype=torch.long, device=device)
    total = torch.zeros(b, w, device=device)
    total[:, 1:] = float("-inf")  # all beams start equal: keep only the first
    length = torch.zeros(b, w, device=device)
    finished = torch.zeros(b, w, dtype=torch.bool, device=device)
    base = (torch.arange(b, device=device) * w)[:, None]
    cache: list[LayerCache] | None = None
    neg_inf = torch.tensor(float("-inf"), device=device)
    for _ in range(max_len - 1):
        logits, cache = model.decode(tokens[:, -1:], image_kv, cache)
        logp = logits[:, -1].masked_fill(banned, float("-inf")).log_softmax(dim=-1).view(b, w, v)
        cand_total = total[..., None] + logp
        cand_len = (length + 1)[..., None].expand(b, w, v).clone()
        # A finished beam has exactly one continuation, [PAD], which keeps its score.
        fin = finished[..., None]
        cand_total = torch.where(fin, neg_inf, cand_total)
        cand_total[..., cfg.pad_id] = torch.where(finished, total, cand_total[..., cfg.pad_id])
        cand_len[..., cfg.pad_id] = torch.where(finished, length, cand_len[..., cfg.pad_id])
        score = cand_total / cand_len.clamp_min(1.0) ** length_penalty
        top = score.view(b, w * v).topk(w, dim=-1).indices
        beam, tok = top // v, top % v
        total = cand_total.view(b, w * v).gather(1, top)
        length = cand_len.view(b, w * v).gather(1, top)
        finished = finished.gather(1, beam) | (tok == cfg.sep_id)
        rows = (base + beam).view(-1)
        tokens = torch.cat([tokens[rows], tok.view(-1, 1)], dim=1)
        cache = [(k[rows], vv[rows]) for k, vv in cache]
        if bool(finished.all()):
            break
    # topk sorts by score, so beam 0 is the best of each image.
    return _strip(tokens.view(b, w, -1)[:, 0], cfg)


def decode_captions(
    model: ArCaptioner, pixels: Tensor, tokenizer, beam: int = 1, batch: int = 100
) -> list[str]:  # type: ignore[no-untyped-def]
    """Caption texts for normalized pixels, in chunks of `batch` images."""
    out: list[str] = []
    for chunk in pixels.split(batch):
        ids = greedy_decode(model, chunk) if beam <= 1 else beam_decode(model, chunk, beam)
        out += [ids_to_text(tokenizer, i) for i in ids]
    return out


# -------------------------------------------------------------------------- training


def teacher_forcing_loss(model: ArCaptioner, pixels: Tensor, ids: Tensor) -> Tensor:
    """Next-token cross-entropy over the caption and its [SEP] (padding ignored)."""
    pad = model.cfg.pad_id
    width = int((ids != pad).sum(dim=1).max())  # no batch row needs the padding tail
    ids = ids[:, :width]
    logits = model(pixels, ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), ignore_index=pad)


def load_ar_run(run: Path, device: str = "cpu") -> tuple[ArCaptioner, Path]:
    """The AR model of a training run directory: the newer of final.pt and the last
    checkpoint (`rundir.newest_weights`)."""
    problem = run_problem(run, "ladic.ar_baseline")
    if problem:
        raise FileNotFoundError(problem)
    _, blob = newest_weights(run, device)
    if "config" in blob:
        cfg = ArConfig.from_dict(blob["config"])
    else:
        cfg = ArConfig.from_dict(json.loads((run / "config.json").read_text()))
    model = ArCaptioner(cfg).to(device)
    model.load_state_dict(blob["model"])
    return model.eval(), run / "tokenizer.json"


@torch.no_grad()
def evaluate_exact_match(
    model: ArCaptioner, images: np.ndarray, scene_list: list, tokenizer
) -> tuple[float, list[str]]:  # type: ignore[type-arg]
    caps = decode_captions(model, data.normalize(images, model.cfg.image), tokenizer)
    model.train()
    return float(np.mean([exact_match(c, s) for c, s in zip(caps, scene_list)])), caps


# As ladic.train's, and the logging interval.
AR_RESUMABLE = RESUMABLE | {"log_every"}


def train(args: argparse.Namespace) -> Path:
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
    make = micro_ar_config if args.size == "micro" else tiny_ar_config
    cfg = make(tokenizer.get_vocab_size(), special_ids(tokenizer))
    if args.dropout is not None:
        cfg.dropout = args.dropout
    refuse_other_settings(out, cfg.to_dict(), args, AR_RESUMABLE, ar_config_differences)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    (out / "train_args.json").write_text(json.dumps(train_args(args), indent=2))
    model = ArCaptioner(cfg).to(device)
    print(
        f"parameters: image {count_parameters(model.image_encoder):,} "
        f"decoder {model.decoder_parameters():,} total {count_parameters(model):,}"
    )

    count = args.train_images
    train_refs = data.split_captions("train", count)
    captions = [[refs[0]] if args.captions == "canonical" else refs for refs in train_refs]
    owner = np.array([i for i, refs in enumerate(captions) for _ in refs])
    flat = [r for refs in captions for r in refs]
    cap_ids = torch.tensor([e.ids for e in tokenizer.encode_batch(flat)])
    if cfg.max_len < cap_ids.shape[1]:
        cap_ids = cap_ids[:, : cfg.max_len]
    images = data.split_images("train", cfg.image, count, cache_dir=args.data_dir)
    n_val = args.eval_images
    val_scenes = scenes.generate_split("val", n_val) if n_val else []
    val_images = (
        data.split_images("val", cfg.image, n_val, cache_dir=args.data_dir) if n_val else None
    )

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
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

    log_file = open_log(out / "train_log.csv", ["step", "loss", "lr", "seconds", "val_exact"], step)
    writer = csv.writer(log_file)
    model.train()
    bar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="ar baseline")
    t_last = time.time()
    done = step
    for step in bar:
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.integers(0, len(flat), args.batch)
        pixels = data.normalize(images[owner[idx]], cfg.image).to(device)
        loss = teacher_forcing_loss(model, pixels, cap_ids[idx].to(device))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step + 1
        val = ""
        if n_val and (every(done, args.eval_every) or done == args.steps):
            acc, caps = evaluate_exact_match(model, val_images, val_scenes, tokenizer)
            val = f"{acc:.4f}"
            tqdm.write(f"step {done}: val exact match {acc:.3f}; e.g. {caps[0]!r}")
        if every(done, args.log_every) or val or done == args.steps:
            now = time.time()
            writer.writerow([done, f"{loss.item():.5f}", f"{lr:.6f}", f"{now - t_last:.2f}", val])
            log_file.flush()
            t_last = now
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if every(done, args.checkpoint_every) or done == args.steps:
            save_atomic(
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done,
                 "rng": rng_state(rng)},
                ckpt_path,
            )
    log_file.close()
    final = out / "final.pt"
    save_atomic({"config": cfg.to_dict(), "model": model.state_dict(), "step": done}, final)
    print(f"saved {final}")
    return final


def caption_cli(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok_path = load_ar_run(args.run, args.device)
    tokenizer = load_tokenizer(tok_path, model.cfg.max_len)
    images = data.split_images(args.split, model.cfg.image, args.limit)
    scene_list = scenes.generate_split(args.split, args.limit)
    caps = decode_captions(model, data.normalize(images, model.cfg.image), tokenizer, args.beam)
    for cap, scene in zip(caps, scene_list):
        mark = "ok " if exact_match(cap, scene) else "BAD"
        print(f"{mark} {cap}  |  {scenes.canonical_caption(scene)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume training) the AR baseline")
    t.add_argument("--out", type=Path, default=Path("runs/ar-tiny"))
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    t.add_argument("--steps", type=int, default=8000, help="the diffusion run's steps")
    t.add_argument("--batch", type=int, default=64, help="the diffusion run's batch")
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--warmup", type=float, default=0.05, help="fraction of steps")
    t.add_argument("--dropout", type=float, default=None, help="override the config's 0.1")
    t.add_argument(
        "--captions",
        choices=["canonical", "all"],
        default="canonical",
        help="train on the canonical reference only, or on all five",
    )
    t.add_argument("--size", choices=["tiny", "micro"], default="tiny")
    t.add_argument("--train-images", type=int, default=None, help="first N train images")
    t.add_argument("--checkpoint-every", type=int, default=250,
                   help="steps between checkpoints (0: only at the end)")
    t.add_argument("--eval-every", type=int, default=1000,
                   help="steps between validation runs (0: only at the end)")
    t.add_argument("--eval-images", type=int, default=200,
                   help="validation images (0: no validation)")
    t.add_argument("--log-every", type=int, default=25,
                   help="steps between log rows (0: only at the end)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--data-dir", type=Path, default=data.DATA_DIR, help="image cache")
    c = sub.add_parser("caption", help="print captions of a split next to the truth")
    c.add_argument("--run", type=Path, default=Path("runs/ar-tiny"))
    c.add_argument("--split", default="test-seen")
    c.add_argument("--limit", type=int, default=10)
    c.add_argument("--beam", type=int, default=1, help="beam width (1: greedy)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.command == "train":
        for name in ("checkpoint_every", "eval_every", "eval_images", "log_every", "steps"):
            if getattr(args, name) < 0:
                p.error(f"--{name.replace('_', '-')} must not be negative")
    else:
        problem = run_problem(args.run, "ladic.ar_baseline")
        if problem:
            p.error(problem)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "train":
        train(args)
    else:
        caption_cli(args)


if __name__ == "__main__":
    main()
