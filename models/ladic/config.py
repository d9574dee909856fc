"""Model sizes. `base` is the paper's LaDiC; `tiny` is the CPU-trained default bundle."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# CLIP normalization, as BLIP and LaDiC use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageEncoderConfig:
    image_size: int = 224
    patch_size: int = 16
    # "patch": one strided convolution (ViT); "conv": four stride-2 3x3 convolutions,
    # which learn small shapes from scratch far faster than a linear patch embedding.
    stem: str = "patch"
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    cls_token: bool = True
    layer_norm_eps: float = 1e-6
    resize_filter: str = "bicubic"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @property
    def tokens(self) -> int:
        grid = self.image_size // self.patch_size
        return grid * grid + (1 if self.cls_token else 0)


@dataclass
class TextLatentConfig:
    vocab_size: int = 30522
    max_len: int = 24
    hidden: int = 768
    heads: int = 12
    ffn: int = 3072
    encoder_layers: int = 6
    # Upper BERT layers in the decoder. 0 reproduces the released LaDiC checkpoint,
    # whose decoder is the MLM head alone.
    decoder_layers: int = 0
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_id: int = 0
    cls_id: int = 101
    sep_id: int = 102
    unk_id: int = 100
    mask_id: int = 103
    period_id: int = 1012


@dataclass
class DiffuserConfig:
    layers: int = 12
    heads: int = 16
    ffn: int = 3072
    max_positions: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    # Divide x_t by its standard deviation under the training forward process,
    # 1 / sqrt(ab_t + s^2 (1 - ab_t)), before the embeddings. Off in the released LaDiC,
    # where x_t (std up to the noise scale 4) swamps the position and time embeddings
    # (std 1) at most timesteps; on, a small model trained from scratch learns much faster.
    scale_input: bool = False


@dataclass
class ScheduleConfig:
    kind: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_timesteps: int = 1000
    train_noise_scale: float = 4.0


@dataclass
class SamplerConfig:
    steps: int = 34
    time_shift: int = 5
    guidance: float = 1.0
    renoise_scale: float = 1.0
    self_conditioning: bool = True


@dataclass
class BackRefineConfig:
    enabled: bool = False
    keep_fraction: float = 0.5
    trigger_t: int = 599
    rounds: int = 1


@dataclass
class LadicConfig:
    name: str = "base"
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextLatentConfig = field(default_factory=TextLatentConfig)
    diffuser: DiffuserConfig = field(default_factory=DiffuserConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    back_refine: BackRefineConfig = field(default_factory=BackRefineConfig)

    @property
    def latent_dim(self) -> int:
        return self.text.hidden

    @property
    def diffuser_hidden(self) -> int:
        # LaDiC feeds concat(x_t, self_cond) straight in: no input projection.
        return 2 * self.text.hidden

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> LadicConfig:
        image = dict(data["image"])
        image["mean"] = tuple(image["mean"])
        image["std"] = tuple(image["std"])
        return LadicConfig(
            name=data["name"],
            image=ImageEncoderConfig(**image),
            text=TextLatentConfig(**data["text"]),
            diffuser=DiffuserConfig(**data["diffuser"]),
            schedule=ScheduleConfig(**data["schedule"]),
            sampler=SamplerConfig(**data["sampler"]),
            back_refine=BackRefineConfig(**data["back_refine"]),
        )


def base_config() -> LadicConfig:
    """The paper's model: ViT-B/16 at 224, BERT-base split after layer 6, 1536-wide diffuser."""
    return LadicConfig(name="base")


def tiny_config(vocab_size: int, special_ids: dict[str, int]) -> LadicConfig:
    """The CPU-trainable default: 112 px images, 40-token latent of width 64."""
    return LadicConfig(
        name="tiny",
        image=ImageEncoderConfig(
            image_size=112,
            patch_size=16,
            stem="conv",
            width=128,
            layers=2,
            heads=4,
            mlp_ratio=2.0,
            cls_token=False,
        ),
        text=TextLatentConfig(
            vocab_size=vocab_size,
            max_len=40,
            hidden=64,
            heads=4,
            ffn=256,
            encoder_layers=2,
            decoder_layers=1,
            max_positions=40,
            **special_ids,
        ),
        diffuser=DiffuserConfig(
            layers=3, heads=4, ffn=384, max_positions=40, dropout=0.0, scale_input=True
        ),
        sampler=SamplerConfig(steps=10),
    )


def micro_config(vocab_size: int, special_ids: dict[str, int]) -> LadicConfig:
    """A few-kilobyte model for parity fixtures and fast tests."""
    return LadicConfig(
        name="micro",
        image=ImageEncoderConfig(
            image_size=32, patch_size=16, stem="patch", width=16, layers=1, heads=2,
            mlp_ratio=2.0, cls_token=True,
        ),
        text=TextLatentConfig(
            vocab_size=vocab_size, max_len=12, hidden=8, heads=2, ffn=16,
            encoder_layers=1, decoder_layers=1, max_positions=12, **special_ids,
        ),
        diffuser=DiffuserConfig(layers=2, heads=2, ffn=32, max_positions=12, dropout=0.0),
        sampler=SamplerConfig(steps=5),
    )
