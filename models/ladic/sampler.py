"""The reference sampler: what the Rust service must compute (docs/bundle.md).

It runs over a `Backend` (PyTorch model or the exported ONNX graphs) so the same loop
checks the export, and the noise comes from a `NoiseSource` so a run can be replayed
exactly in another language.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Protocol

import numpy as np
import torch

from .config import BackRefineConfig, LadicConfig, SamplerConfig, ScheduleConfig
from .diffusion import alpha_bar, stride_for


class Backend(Protocol):
    def encode(self, pixels: np.ndarray) -> np.ndarray: ...
    def denoise(
        self, x_t: np.ndarray, self_cond: np.ndarray, t: np.ndarray, image_kv: np.ndarray
    ) -> np.ndarray: ...
    def decode(self, x0: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class TorchBackend:
    """The PyTorch model behind the Backend interface (float32 numpy in and out)."""

    def __init__(self, model: torch.nn.Module, device: str = "cpu") -> None:
        self.model = model.eval()
        self.device = device

    def _t(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    @torch.no_grad()
    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.model.encode_image(self._t(pixels)).cpu().numpy()

    @torch.no_grad()
    def denoise(self, x_t, self_cond, t, image_kv) -> np.ndarray:  # type: ignore[no-untyped-def]
        out = self.model.denoise(self._t(x_t), self._t(self_cond), self._t(t), self._t(image_kv))
        return out.cpu().numpy()

    @torch.no_grad()
    def decode(self, x0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, conf = self.model.decode(self._t(x0))
        return ids.cpu().numpy(), conf.cpu().numpy()


class NoiseSource(Protocol):
    def draw(self) -> np.ndarray: ...


class SeededNoise:
    """Standard normal draws of shape [L, D] from a seeded generator."""

    def __init__(self, seed: int, shape: tuple[int, int]) -> None:
        self.rng = np.random.default_rng(seed)
        self.shape = shape

    def draw(self) -> np.ndarray:
        return self.rng.standard_normal(self.shape).astype(np.float32)


class RecordingNoise:
    """Wraps a source and keeps every draw, for parity fixtures."""

    def __init__(self, inner: NoiseSource) -> None:
        self.inner = inner
        self.draws: list[np.ndarray] = []

    def draw(self) -> np.ndarray:
        d = self.inner.draw()
        self.draws.append(d)
        return d


@dataclass
class SampleParams:
    steps: int
    guidance: float
    time_shift: int
    renoise_scale: float
    self_conditioning: bool
    back_refine: BackRefineConfig
    candidates: int = 1

    @staticmethod
    def defaults(cfg: LadicConfig) -> SampleParams:
        s: SamplerConfig = cfg.sampler
        return SampleParams(
            steps=s.steps,
            guidance=s.guidance,
            time_shift=s.time_shift,
            renoise_scale=s.renoise_scale,
            self_conditioning=s.self_conditioning,
            back_refine=BackRefineConfig(**vars(cfg.back_refine)),
        )


@dataclass
class TraceStep:
    t: int
    t_in: int
    x0: np.ndarray
    refined: bool


@dataclass
class RowResult:
    ids: np.ndarray
    confidence: np.ndarray
    trace: list[TraceStep] = field(default_factory=list)


def run_rows(
    backend: Backend,
    image_kv: np.ndarray,
    null_kv: np.ndarray,
    noises: list[NoiseSource],
    params: SampleParams,
    schedule: ScheduleConfig,
    latent_shape: tuple[int, int],
    trace: bool = False,
) -> list[RowResult]:
    """Denoise R rows in lockstep (every row follows the same timesteps, so a batched
    run equals R separate runs of the per-row algorithm in docs/bundle.md), on the
    model's noise `schedule`."""
    rows = image_kv.shape[0]
    num_timesteps = schedule.num_timesteps
    ab = alpha_bar_cache(schedule)
    stride = stride_for(params.steps, num_timesteps)
    w = params.guidance
    br = params.back_refine
    rounds_left = br.rounds if br.enabled else 0
    keep = math.ceil(br.keep_fraction * latent_shape[0])
    x = np.stack([n.draw() for n in noises])
    sc = np.zeros_like(x)
    t = num_timesteps - 1
    traces: list[list[TraceStep]] = [[] for _ in range(rows)]
    null_rows = np.broadcast_to(null_kv, (rows, *null_kv.shape[1:]))
    while True:
        t_in = min(num_timesteps - 1, t + params.time_shift)
        t_vec = np.full(rows, t_in, dtype=np.int64)
        if w == 0:
            x0 = backend.denoise(x, sc, t_vec, image_kv)
        else:
            both = backend.denoise(
                np.concatenate([x, x]),
                np.concatenate([sc, sc]),
                np.concatenate([t_vec, t_vec]),
                np.concatenate([image_kv, null_rows]),
            )
            x0 = ((1 + w) * both[:rows] - w * both[rows:]).astype(np.float32)
        sc = x0 if params.self_conditioning else np.zeros_like(x0)
        refine = rounds_left > 0 and t <= br.trigger_t and t > stride
        if trace:
            for r in range(rows):
                traces[r].append(TraceStep(t, t_in, x0[r].copy(), refine))
        if refine:
            _, conf = backend.decode(x0)
            # Stable sort on -confidence: ties keep the lower position.
            order = np.argsort(-conf, axis=1, kind="stable")[:, :keep]
            mask = np.zeros(conf.shape, dtype=bool)
            np.put_along_axis(mask, order, True, axis=1)
            eps = np.stack([n.draw() for n in noises])
            n = t - stride
            renoised = renoise(x0, eps, ab[n], params.renoise_scale)
            x = np.where(mask[..., None], renoised, eps).astype(np.float32)
            t = num_timesteps - 1
            rounds_left -= 1
            continue
        if t <= stride:
            break
        eps = np.stack([n.draw() for n in noises])
        t = t - stride
        x = renoise(x0, eps, ab[t], params.renoise_scale)
    ids, conf = backend.decode(x0)
    return [RowResult(ids[r], conf[r], traces[r]) for r in range(rows)]


def renoise(x0: np.ndarray, eps: np.ndarray, ab: float, scale: float) -> np.ndarray:
    return (math.sqrt(ab) * x0 + scale * math.sqrt(1.0 - ab) * eps).astype(np.float32)


_AB_CACHE: dict[tuple, np.ndarray] = {}


def alpha_bar_cache(schedule: ScheduleConfig) -> np.ndarray:
    """`alpha_bar(schedule)`, computed once per schedule."""
    key = (schedule.kind, schedule.beta_start, schedule.beta_end, schedule.num_timesteps)
    if key not in _AB_CACHE:
        _AB_CACHE[key] = alpha_bar(schedule)
    return _AB_CACHE[key]


# --------------------------------------------------------------------- ids and MBR


@dataclass(frozen=True)
class TextIds:
    special_ids: frozenset[int]
    period_id: int


def clean_ids(ids: list[int] | np.ndarray, text: TextIds) -> list[int]:
    """Drop specials and every ".", then collapse consecutive repeats."""
    out: list[int] = []
    for i in (int(v) for v in ids):
        if i in text.special_ids or i == text.period_id:
            continue
        if out and out[-1] == i:
            continue
        out.append(i)
    return out


def caption_confidence(ids: np.ndarray, conf: np.ndarray, text: TextIds) -> float:
    kept = [
        float(c) for i, c in zip(ids, conf)
        if int(i) not in text.special_ids and int(i) != text.period_id
    ]
    return float(np.mean(kept)) if kept else 0.0


def ngram_f1(a: list[int], b: list[int]) -> Fraction:
    """F1 of the multisets of unigrams and bigrams together, as an exact fraction:
    2 * overlap / (grams of a + grams of b)."""
    if not a and not b:
        return Fraction(1)
    if not a or not b:
        return Fraction(0)
    ca = Counter([(x,) for x in a] + list(zip(a, a[1:])))
    cb = Counter([(x,) for x in b] + list(zip(b, b[1:])))
    overlap = sum((ca & cb).values())
    return Fraction(2 * overlap, sum(ca.values()) + sum(cb.values()))


def mbr_choose(candidates: list[list[int]]) -> int:
    """The candidate with the highest mean similarity to the others (ties: lowest).

    Exact fractions, so that equal scores tie whatever the order of the additions (a
    float sum depends on it, and on the Python version's `sum`)."""
    k = len(candidates)
    if k == 1:
        return 0
    best, best_score = 0, Fraction(-1)
    for i in range(k):
        others = (ngram_f1(candidates[i], candidates[j]) for j in range(k) if j != i)
        score = sum(others, Fraction(0))
        if score > best_score:
            best, best_score = i, score
    return best


@dataclass
class Caption:
    ids: list[int]
    confidence: float
    candidates: list[list[int]]
    candidate_confidence: list[float]
    chosen: int
    rows: list[RowResult]


def caption_images(
    backend: Backend,
    pixels: np.ndarray,
    params: SampleParams,
    cfg: LadicConfig,
    noise_for: callable,  # type: ignore[valid-type]
    null_kv: np.ndarray | None = None,
    trace: bool = False,
) -> list[Caption]:
    """Caption a batch of images; noise_for(image_index, candidate) gives each row's noise."""
    text = TextIds(
        frozenset({cfg.text.pad_id, cfg.text.cls_id, cfg.text.sep_id, cfg.text.unk_id,
                   cfg.text.mask_id}),
        cfg.text.period_id,
    )
    c = cfg.image
    if null_kv is None:
        null_kv = backend.encode(np.zeros((1, 3, c.image_size, c.image_size), np.float32))
    kv = backend.encode(pixels)
    k = params.candidates
    kv_rows = np.repeat(kv, k, axis=0)
    noises = [noise_for(i, j) for i in range(pixels.shape[0]) for j in range(k)]
    rows = run_rows(
        backend, kv_rows, null_kv, noises, params, cfg.schedule,
        (cfg.text.max_len, cfg.latent_dim), trace=trace,
    )
    out: list[Caption] = []
    for i in range(pixels.shape[0]):
        mine = rows[i * k : (i + 1) * k]
        cands = [clean_ids(r.ids, text) for r in mine]
        confs = [caption_confidence(r.ids, r.confidence, text) for r in mine]
        chosen = mbr_choose(cands)
        out.append(Caption(cands[chosen], confs[chosen], cands, confs, chosen, mine))
    return out


def ids_to_text(tokenizer, ids: list[int]) -> str:  # type: ignore[no-untyped-def]
    """Cleaned ids -> caption text ending in a single ".": repeated words collapsed (a
    word of several tokens repeats as a word, not as a token), no space before
    punctuation."""
    words: list[str] = []
    for word in tokenizer.decode(ids, skip_special_tokens=True).split():
        if not words or words[-1] != word:
            words.append(word)
    text = " ".join(words)
    for p in (",", ".", ":", ";", "?", "!"):
        text = text.replace(" " + p, p)
    return text.strip().rstrip(".").strip() + "."


def refuse_unconditional_half(manifest: dict, bundle: object) -> None:  # type: ignore[type-arg]
    """This sampler sends each row's K/V in its own order; a denoiser exported with
    --unconditional-half would read the second half of them as the null K/V."""
    from .export import is_unconditional_half

    if is_unconditional_half(manifest):
        raise ValueError(
            f"{bundle}: the denoiser is exported with --unconditional-half (for the "
            "service's call layout); export the bundle without it for this sampler"
        )


class OnnxBackend:
    """The exported bundle's three graphs in ONNX Runtime, behind the Backend interface."""

    def __init__(self, bundle: str, threads: int = 0) -> None:
        import json
        from pathlib import Path

        import onnxruntime as ort

        root = Path(bundle)
        self.manifest = json.loads((root / "manifest.json").read_text())
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        graphs = self.manifest["graphs"]

        def session(name: str) -> ort.InferenceSession:
            path = str(root / graphs[name]["file"])
            return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

        self.encoder, self.denoiser, self.decoder = (
            session("encoder"), session("denoiser"), session("decoder"))
        refuse_unconditional_half(self.manifest, bundle)

    @property
    def gathers_kv(self) -> bool:
        """Bundles since `kv_index` take a K/V pool plus an index per row (docs/bundle.md);
        this sampler passes one K/V row per row, so the index is the identity."""
        return any(i.name == "kv_index" for i in self.denoiser.get_inputs())

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.encoder.run(None, {"pixels": pixels.astype(np.float32)})[0]

    def denoise(self, x_t, self_cond, t, image_kv) -> np.ndarray:  # type: ignore[no-untyped-def]
        feed = {"x_t": x_t, "self_cond": self_cond, "t": t.astype(np.int64),
                "image_kv": np.ascontiguousarray(image_kv)}
        if self.gathers_kv:
            feed["kv_index"] = np.arange(len(image_kv), dtype=np.int64)
        return self.denoiser.run(None, feed)[0]

    def decode(self, x0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, conf = self.decoder.run(None, {"x0": x0})
        return ids, conf
