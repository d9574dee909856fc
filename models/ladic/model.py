"""LaDiC in PyTorch: image encoder, split-BERT text latent, and the diffuser.

The module layout follows the bundle contract (docs/bundle.md): the image encoder also
projects the image tokens into every diffuser layer's cross-attention keys and values,
so the service computes them once per image instead of once per denoising step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import (
    DiffuserConfig,
    ImageEncoderConfig,
    LadicConfig,
    ScheduleConfig,
    TextLatentConfig,
)

# Every sequence length in the bundle's graphs is fixed (latent length, image tokens), so
# the reshapes below take it as a Python int and leave the batch axis as -1: the exported
# graph then holds constant shapes and computes none on the host.


def split_heads(x: Tensor, heads: int) -> Tensor:
    _, n, d = x.shape
    return x.reshape(-1, int(n), heads, int(d) // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    _, h, n, d = x.shape
    return x.transpose(1, 2).reshape(-1, int(n), int(h) * int(d))


def attend(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Unmasked multi-head attention over [B, N, D] tensors (LaDiC uses no masks)."""
    if _export_fused_attention and torch.onnx.is_in_onnx_export():
        return _FusedAttention.apply(q, k, v, heads)
    return _attend(q, k, v, heads)


def attend_second_half_shared(
    q: Tensor, kv: tuple[Tensor, Tensor], shared_kv: tuple[Tensor, Tensor], heads: int
) -> Tensor:
    """Cross-attention of `q [2P, N, D]` where the first P rows attend to their own K/V
    (`kv`, `[P, M, D]` each) and the last P all attend to one K/V (`shared_kv`,
    `[1, M, D]` each). The shared half runs as one query of P*N tokens: no per-row copy
    of the shared K/V, one larger matmul. Reshapes by constants only (see above)."""
    _, n, d = q.shape
    halves = q.reshape(2, -1, int(n), int(d))
    own = attend(halves[0], kv[0], kv[1], heads)
    shared = attend(halves[1].reshape(1, -1, int(d)), shared_kv[0], shared_kv[1], heads)
    return torch.cat([own, shared.reshape(-1, int(n), int(d))], dim=0)


def _attend(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    q, k, v = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    scale = 1.0 / math.sqrt(int(q.shape[-1]))
    scores = (q @ k.transpose(-1, -2)) * scale
    return merge_heads(scores.softmax(dim=-1) @ v)


# Set by `fused_attention_export()`: export every `attend` as one ONNX Runtime
# MultiHeadAttention node instead of about ten MatMul/Softmax/Reshape/Transpose nodes.
_export_fused_attention = False


@contextlib.contextmanager
def fused_attention_export() -> Iterator[None]:
    """Within this context, ONNX export writes attention as com.microsoft.MultiHeadAttention
    (same result; one kernel, and flash/memory-efficient attention on CUDA)."""
    global _export_fused_attention
    before, _export_fused_attention = _export_fused_attention, True
    try:
        yield
    finally:
        _export_fused_attention = before


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:  # type: ignore[override]
        return _attend(q, k, v, heads)

    @staticmethod
    def symbolic(g, q, k, v, heads):  # type: ignore[no-untyped-def]
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads)
        out.setType(q.type())
        return out


# ---------------------------------------------------------------------------- image


class VitBlock(nn.Module):
    """Pre-LayerNorm transformer block, as in ViT/BLIP (fused qkv projection)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        hidden = int(width * mlp_ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj(attend(q, k, v, self.heads))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ImageEncoder(nn.Module):
    """Pixels [B,3,H,W] -> image tokens [B,N,W]."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        if cfg.stem == "patch":
            self.stem = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        elif cfg.stem == "conv":
            stages = int(math.log2(cfg.patch_size))
            if 2**stages != cfg.patch_size:
                raise ValueError("the conv stem needs a power-of-two patch size")
            # Channels double per stage from 16 up to the width: cheap enough for CPU.
            chans = [3] + [min(16 * 2**i, w) for i in range(stages - 1)] + [w]
            layers: list[nn.Module] = []
            for i in range(stages):
                layers.append(nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1))
                if i < stages - 1:
                    layers.append(nn.GELU())
            self.stem = nn.Sequential(*layers)
        else:
            raise ValueError(f"unknown image stem {cfg.stem!r}")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w)) if cfg.cls_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.tokens, w) * 0.02)
        self.blocks = nn.ModuleList(
            VitBlock(w, cfg.heads, cfg.mlp_ratio, cfg.layer_norm_eps) for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(w, eps=cfg.layer_norm_eps)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.stem(pixels).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ----------------------------------------------------------------------------- text


class BertLayer(nn.Module):
    """Post-LayerNorm BERT layer; with `cross_width` it also cross-attends (BLIP's MED)."""

    def __init__(
        self, hidden: int, heads: int, ffn: int, eps: float, cross_width: int | None = None
    ) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.has_cross = cross_width is not None
        if cross_width is not None:
            self.cross_query = nn.Linear(hidden, hidden)
            self.cross_key = nn.Linear(cross_width, hidden)
            self.cross_value = nn.Linear(cross_width, hidden)
            self.cross_out = nn.Linear(hidden, hidden)
            self.cross_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn_in = nn.Linear(hidden, ffn)
        self.ffn_out = nn.Linear(ffn, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)

    def image_kv(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.cross_key(image), self.cross_value(image)

    def forward(
        self,
        h: Tensor,
        kv: tuple[Tensor, Tensor] | None = None,
        second_half_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """`kv`: each row's cross-attention K and V. With `second_half_kv`, `kv` covers
        the first half of the rows only and the second half attends to that one K/V."""
        a = attend(self.query(h), self.key(h), self.value(h), self.heads)
        h = self.attn_norm(h + self.attn_out(a))
        if self.has_cross:
            assert kv is not None
            q = self.cross_query(h)
            if second_half_kv is None:
                c = attend(q, kv[0], kv[1], self.heads)
            else:
                c = attend_second_half_shared(q, kv, second_half_kv, self.heads)
            h = self.cross_norm(h + self.cross_out(c))
        return self.ffn_norm(h + self.ffn_out(F.gelu(self.ffn_in(h))))


class MlmHead(nn.Module):
    def __init__(self, hidden: int, vocab: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(h))))


class TextLatent(nn.Module):
    """A BERT split in two: the lower layers map tokens to the latent the diffusion runs
    in, the upper layers plus the MLM head map a latent back to tokens.

    The latent is normalized per channel with fixed statistics, and every [CLS], [SEP]
    and [PAD] position holds the latent of "." so that padding decodes to "." and the
    caption length needs no predictor.
    """

    def __init__(self, cfg: TextLatentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden
        self.word_embeddings = nn.Embedding(cfg.vocab_size, d)
        self.position_embeddings = nn.Embedding(cfg.max_positions, d)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, d)
        self.embed_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.encoder_layers = nn.ModuleList(
            BertLayer(d, cfg.heads, cfg.ffn, cfg.layer_norm_eps) for _ in range(cfg.encoder_layers)
        )
        self.decoder_layers = nn.ModuleList(
            BertLayer(d, cfg.heads, cfg.ffn, cfg.layer_norm_eps) for _ in range(cfg.decoder_layers)
        )
        self.head = MlmHead(d, cfg.vocab_size, cfg.layer_norm_eps)
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("std", torch.ones(d))
        self.register_buffer("period_latent", torch.zeros(d))

    def encode_raw(self, ids: Tensor) -> Tensor:
        """Token ids [B,L] -> unnormalized latent [B,L,D] (no special-token reassignment)."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings(
            torch.zeros_like(ids)
        )
        h = self.embed_norm(h)
        for layer in self.encoder_layers:
            h = layer(h)
        return h

    def special_mask(self, ids: Tensor) -> Tensor:
        c = self.cfg
        return (ids == c.pad_id) | (ids == c.cls_id) | (ids == c.sep_id)

    def encode(self, ids: Tensor) -> Tensor:
        """Token ids -> normalized latent, special positions set to the latent of "."."""
        h = self.encode_raw(ids)
        h = torch.where(self.special_mask(ids)[..., None], self.period_latent, h)
        return (h - self.mean) / self.std

    def decoder_targets(self, ids: Tensor) -> Tensor:
        """What the decoder should read back: specials become "."."""
        return torch.where(self.special_mask(ids), self.cfg.period_id, ids)

    def decode_logits(self, x0: Tensor) -> Tensor:
        """Normalized latent [B,L,D] -> logits [B,L,V] (de-normalization folded in)."""
        h = x0 * self.std + self.mean
        for layer in self.decoder_layers:
            h = layer(h)
        return self.head(h)


# ------------------------------------------------------------------------- diffuser


def timestep_table(dim: int, steps: int) -> Tensor:
    """Sinusoidal embeddings of integer timesteps, sin and cos interleaved (as released)."""
    pe = torch.zeros(steps, dim)
    position = torch.arange(steps, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe


def input_scale_table(schedule: ScheduleConfig) -> Tensor:
    """1 / std(x_t) per timestep under the training forward process (unit-variance x0)."""
    from .diffusion import alpha_bar  # diffusion imports this module

    ab = torch.tensor(alpha_bar(schedule), dtype=torch.float64)
    s = schedule.train_noise_scale
    return (ab + s * s * (1 - ab)).rsqrt().float()


def pooled_layer_kv(pool: Tensor, kv_index: Tensor, layers: int) -> Callable[[int], Tensor]:
    """`j -> [B, N, H]`: entry j (K of layer j/2 when j is even, V when odd) of each row's
    slot of `pool [S, 2*layers, N, H]`.

    Each entry is gathered straight from the pool seen as `[S*2*layers, N, H]` (a
    reshape, no copy), so the rows' K/V are copied once, right where each layer needs
    them. Gathering whole slots first (`pool.index_select(0, kv_index)`) and then taking
    each layer's entry copies them twice, and the K/V are the largest tensors a
    batched call moves (29 MB per row for the full-size model in fp32).
    """
    entries, tokens, width = 2 * layers, int(pool.shape[2]), int(pool.shape[3])
    flat = pool.reshape(-1, tokens, width)
    first = kv_index * entries
    return lambda j: flat.index_select(0, first + j)


def slot_zero_layer_kv(pool: Tensor) -> Callable[[int], Tensor]:
    """`j -> [1, N, H]`: entry j of slot 0 of `pool [S, 2*layers, N, H]`, which is row j
    of the pool seen flat (a slice by constants: no index, no copy per row)."""
    tokens, width = int(pool.shape[2]), int(pool.shape[3])
    flat = pool.reshape(-1, tokens, width)
    return lambda j: flat[j : j + 1]


class Diffuser(nn.Module):
    """The denoiser: a post-LN BERT over concat(x_t, self_cond) with cross-attention to
    the image; predicts x0 as the first D channels of its last hidden state."""

    def __init__(
        self, cfg: DiffuserConfig, latent_dim: int, image_width: int, schedule: ScheduleConfig
    ):
        super().__init__()
        self.cfg = cfg
        self.latent_dim = latent_dim
        h = 2 * latent_dim
        self.register_buffer("time_table", timestep_table(h, schedule.num_timesteps))
        if cfg.scale_input:
            self.register_buffer("input_scale", input_scale_table(schedule))
        self.time_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.position_embeddings = nn.Embedding(cfg.max_positions, h)
        self.embed_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            BertLayer(h, cfg.heads, cfg.ffn, cfg.layer_norm_eps, cross_width=image_width)
            for _ in range(cfg.layers)
        )

    def image_kv(self, image: Tensor) -> Tensor:
        """Image tokens [B,N,W] -> [B, 2*layers, N, H]: K then V for every layer."""
        kvs: list[Tensor] = []
        for layer in self.layers:
            k, v = layer.image_kv(image)
            kvs += [k, v]
        return torch.stack(kvs, dim=1)

    def forward(
        self,
        x_t: Tensor,
        self_cond: Tensor,
        t: Tensor,
        image_kv: Tensor,
        kv_index: Tensor | None = None,
        unconditional_half: bool = False,
    ) -> Tensor:
        """`image_kv [B, 2*layers, N, H]` holds each row's K/V; with `kv_index [B]` it is
        a pool `[S, 2*layers, N, H]` and row b attends to slot `kv_index[b]`.

        `unconditional_half` (with `kv_index`; B even): the last B/2 rows attend to slot 0
        whatever their `kv_index` says. The service keeps the null K/V of the
        unconditional pass there and puts those passes in the second half of each call,
        which then attends to it as one long query instead of copying it once per row."""
        if unconditional_half:
            assert kv_index is not None, "unconditional_half needs kv_index"
            own_index = kv_index.reshape(2, -1)[0]
            layer_kv = pooled_layer_kv(image_kv, own_index, len(self.layers))
            shared_kv: Callable[[int], Tensor] | None = slot_zero_layer_kv(image_kv)
        else:
            layer_kv = (
                pooled_layer_kv(image_kv, kv_index, len(self.layers))
                if kv_index is not None
                else lambda j: image_kv[:, j]
            )
            shared_kv = None
        if self.cfg.scale_input:
            x_t = x_t * self.input_scale[t][:, None, None]
        h = torch.cat([x_t, self_cond], dim=-1)
        h = h + self.time_norm(self.time_table[t])[:, None, :]
        # A slice of the table by a Python int: the exported graph holds the latent length
        # (fixed by the bundle) as a constant, so no shape computation runs on the host.
        pos = self.position_embeddings.weight[: int(h.shape[1])]
        h = self.dropout(self.embed_norm(h + pos))
        for i, layer in enumerate(self.layers):
            kv = (layer_kv(2 * i), layer_kv(2 * i + 1))
            second = None if shared_kv is None else (shared_kv(2 * i), shared_kv(2 * i + 1))
            h = layer(h, kv, second)
        return h[..., : self.latent_dim]


class Ladic(nn.Module):
    def __init__(self, cfg: LadicConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg.image)
        self.text = TextLatent(cfg.text)
        self.diffuser = Diffuser(
            cfg.diffuser, cfg.latent_dim, cfg.image.width, cfg.schedule
        )

    def encode_image(self, pixels: Tensor) -> Tensor:
        """Pixels -> the per-layer cross-attention K/V the denoiser reads."""
        return self.diffuser.image_kv(self.image_encoder(pixels))

    def denoise(
        self,
        x_t: Tensor,
        self_cond: Tensor,
        t: Tensor,
        image_kv: Tensor,
        kv_index: Tensor | None = None,
        unconditional_half: bool = False,
    ) -> Tensor:
        """x0 predictions; see `Diffuser.forward` for `image_kv`, `kv_index` and
        `unconditional_half`."""
        return self.diffuser(x_t, self_cond, t, image_kv, kv_index, unconditional_half)

    def decode(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """Latent -> (token ids, confidence = max softmax probability per position)."""
        probs = self.text.decode_logits(x0).softmax(dim=-1)
        confidence, ids = probs.max(dim=-1)
        return ids, confidence


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
