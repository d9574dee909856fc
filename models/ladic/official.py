"""Load the official LaDiC release (GitHub wangyuchi369/LaDiC) into `ladic.model.Ladic`.

Files a user needs
------------------
1. The LaDiC checkpoint. The official README ("Pretrained models" section) links "a
   version of our pre-trained weights" on Google Drive (file id
   1oJptCY4oGkMP-LSTIgfx0mFJfMDpH0uG). The training script saves checkpoints with
   `accelerator.save_state`, and the evaluation script loads `acc_epoch_N/pytorch_model.bin`
   strictly into `Diffuser_with_LN`, so the file is that module's whole state dict:
   `visual_encoder.*` (frozen BLIP ViT), `space_encoder.*` (BERT embeddings + layers 0-5),
   `space_decoder.*` (a 12-layer BERT encoder copy plus an unused `cls` head),
   `lm_head.predictions.*` (the MLM head, fine-tuned), `diffuser.*` (the MED transformer)
   and `time_layer_norm.*`. A flat dict, a dict wrapping one under "model"/"state_dict"/
   "module", `module.`-prefixed keys, a `.safetensors` file and an accelerate state folder
   are all accepted.
2. `model_base_capfilt_large.pth`, BLIP's ViT-B/16 checkpoint
   (https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/
   model_base_capfilt_large.pth, key "model", prefix "visual_encoder."). Only read if the
   LaDiC checkpoint lacks the ViT; the official code initialises the ViT from it.
3. `bert-base-uncased` from Hugging Face (https://huggingface.co/bert-base-uncased): a
   folder with `vocab.txt` (or `tokenizer.json`) for the tokenizer, which is always needed,
   and `pytorch_model.bin` or `model.safetensors` (keys `bert.*`, `cls.predictions.*`),
   only read if the LaDiC checkpoint lacks text-side weights.
4. `datasets/mean_emb_split.pickle` and `datasets/std_emb_split.pickle` from the official
   repository: each a 768-d float32 tensor written by `torch.save` (the per-channel mean and
   standard deviation of the lower-BERT latent). Not part of the checkpoint; required.

What the official code does that the mapping relies on
------------------------------------------------------
* The diffuser is BLIP's MED `BertModel`: its embeddings are word + absolute position
  followed by LayerNorm, with no token-type table (the word table, 30524 x 1536, is never
  used since the input is `inputs_embeds`). The optional `fold` below only matters for a
  checkpoint whose diffuser embeddings do carry a token-type table.
* The upper-BERT "decoder" loop in the vendored `modeling_bert.py` skips every layer, so
  the released decoder is the MLM head alone: `decoder_layers=0` reproduces it.
* The padding latent: the official training puts the *unnormalized* latent of "." (its
  lower-BERT output in "[CLS] . [SEP]") into the *normalized* latent at [CLS]/[SEP]/[PAD]
  positions. `TextLatent.encode` normalizes after substituting `period_latent`, so the
  equivalent buffer is `raw_period * std + mean`.
"""

from __future__ import annotations

import json
import logging
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import LadicConfig, TextLatentConfig, base_config
from .model import Ladic

log = logging.getLogger(__name__)

# Buffers of `Ladic` that no official weight provides: computed, or filled from the pickles.
DERIVED_BUFFERS = frozenset(
    {"diffuser.time_table", "text.mean", "text.std", "text.period_latent"}
)

# Our BertLayer submodule -> the official (Hugging Face / MED) submodule.
_BERT_LAYER = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
    "ffn_norm": "output.LayerNorm",
}
_CROSS = {
    "cross_query": "crossattention.self.query",
    "cross_key": "crossattention.self.key",
    "cross_value": "crossattention.self.value",
    "cross_out": "crossattention.output.dense",
    "cross_norm": "crossattention.output.LayerNorm",
}
# Our VitBlock submodule -> BLIP's timm-style Block submodule.
_VIT_BLOCK = {
    "norm1": "norm1",
    "qkv": "attn.qkv",
    "proj": "attn.proj",
    "norm2": "norm2",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}

HEAD_BIAS = "lm_head.predictions.bias"
HEAD_BIAS_ALIAS = "lm_head.predictions.decoder.bias"  # the same tensor, tied in the official head
DIFFUSER_POS = "diffuser.embeddings.position_embeddings.weight"
DIFFUSER_TOKEN_TYPE = "diffuser.embeddings.token_type_embeddings.weight"


class OfficialCheckpointError(ValueError):
    """An official file is missing weights or holds something unexpected."""


# ---------------------------------------------------------------------------- key map


def _wb(ours: str, official: str) -> list[tuple[str, str]]:
    return [(f"{ours}.weight", f"{official}.weight"), (f"{ours}.bias", f"{official}.bias")]


def key_pairs(cfg: LadicConfig) -> list[tuple[str, str]]:
    """(our key, official key) for every weight of `Ladic(cfg)` that the release holds."""
    if cfg.image.stem != "patch":
        raise ValueError("the official ViT needs the 'patch' stem")
    pairs: list[tuple[str, str]] = []
    # Image encoder <- BLIP ViT.
    pairs += _wb("image_encoder.stem", "visual_encoder.patch_embed.proj")
    if cfg.image.cls_token:
        pairs.append(("image_encoder.cls_token", "visual_encoder.cls_token"))
    pairs.append(("image_encoder.pos_embed", "visual_encoder.pos_embed"))
    for i in range(cfg.image.layers):
        for ours, off in _VIT_BLOCK.items():
            pairs += _wb(f"image_encoder.blocks.{i}.{ours}", f"visual_encoder.blocks.{i}.{off}")
    pairs += _wb("image_encoder.norm", "visual_encoder.norm")
    # Text latent <- lower BERT (space_encoder), upper BERT (space_decoder), MLM head.
    emb = "space_encoder.embeddings"
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        pairs.append((f"text.{name}.weight", f"{emb}.{name}.weight"))
    pairs += _wb("text.embed_norm", f"{emb}.LayerNorm")
    for i in range(cfg.text.encoder_layers):
        for ours, off in _BERT_LAYER.items():
            pairs += _wb(f"text.encoder_layers.{i}.{ours}",
                         f"space_encoder.encoder.layer.{i}.{off}")
    # The upper model holds all twelve BERT layers; the paper's decoder is the ones after
    # the split, so our decoder layer i is its layer encoder_layers + i.
    for i in range(cfg.text.decoder_layers):
        j = cfg.text.encoder_layers + i
        for ours, off in _BERT_LAYER.items():
            pairs += _wb(f"text.decoder_layers.{i}.{ours}",
                         f"space_decoder.encoder.layer.{j}.{off}")
    pairs += _wb("text.head.dense", "lm_head.predictions.transform.dense")
    pairs += _wb("text.head.norm", "lm_head.predictions.transform.LayerNorm")
    pairs.append(("text.head.decoder.weight", "lm_head.predictions.decoder.weight"))
    pairs.append(("text.head.decoder.bias", HEAD_BIAS))
    # Diffuser <- MED BertModel + the time LayerNorm of Diffuser_with_LN.
    pairs += _wb("diffuser.time_norm", "time_layer_norm")
    pairs.append(("diffuser.position_embeddings.weight", DIFFUSER_POS))
    pairs += _wb("diffuser.embed_norm", "diffuser.embeddings.LayerNorm")
    for i in range(cfg.diffuser.layers):
        for ours, off in (_BERT_LAYER | _CROSS).items():
            pairs += _wb(f"diffuser.layers.{i}.{ours}", f"diffuser.encoder.layer.{i}.{off}")
    return pairs


def _canonical_key(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    # Old BERT checkpoints (bert-base-uncased's own files) name LayerNorm gamma/beta.
    if key.endswith("LayerNorm.gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith("LayerNorm.beta"):
        key = key[: -len("beta")] + "bias"
    return key


def canonical(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip `module.` (DDP / accelerate) and rename LayerNorm gamma/beta."""
    return {_canonical_key(k): v for k, v in sd.items()}


def official_state_dict_to_ours(sd: dict[str, Tensor], cfg: LadicConfig) -> dict[str, Tensor]:
    """Official `Diffuser_with_LN` weights -> a state dict for `Ladic(cfg)`.

    Holds every key of `Ladic(cfg).state_dict()` except `DERIVED_BUFFERS`. Keys the
    mapping does not use (the diffuser's word table, `position_ids` buffers, the unused
    upper layers, ...) are ignored. A token-type table in the diffuser embeddings, if any,
    is folded into our position embeddings (BERT adds row 0 at every position). A weight
    of another shape than `Ladic(cfg)` has raises `OfficialCheckpointError`.
    """
    sd = canonical(sd)
    if HEAD_BIAS not in sd and HEAD_BIAS_ALIAS in sd:
        sd[HEAD_BIAS] = sd[HEAD_BIAS_ALIAS]
    pairs = key_pairs(cfg)
    missing = [off for _, off in pairs if off not in sd]
    if missing:
        shown = "\n  ".join(missing[:40])
        more = f"\n  ... and {len(missing) - 40} more" if len(missing) > 40 else ""
        raise OfficialCheckpointError(
            f"the official state dict lacks {len(missing)} key(s) the model needs:\n"
            f"  {shown}{more}"
        )
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in Ladic(cfg).state_dict().items()}
    wrong = [(off, tuple(sd[off].shape), want[o]) for o, off in pairs
             if tuple(sd[off].shape) != want[o]]
    if DIFFUSER_TOKEN_TYPE in sd:  # any number of rows, each as wide as a position's
        got = tuple(sd[DIFFUSER_TOKEN_TYPE].shape)
        width = want["diffuser.position_embeddings.weight"][1]
        if len(got) != 2 or got[1] != width:
            wrong.append((DIFFUSER_TOKEN_TYPE, got, ("rows", width)))
    if wrong:
        shown = "\n  ".join(f"{off}: {got} in the checkpoint, {need} in the model"
                            for off, got, need in wrong[:20])
        more = f"\n  ... and {len(wrong) - 20} more" if len(wrong) > 20 else ""
        raise OfficialCheckpointError(
            f"{len(wrong)} official weight(s) have another shape than the model "
            f"({cfg.name} config) needs:\n  {shown}{more}"
        )
    ours = {o: sd[off] for o, off in pairs}
    if DIFFUSER_TOKEN_TYPE in sd:
        row0 = sd[DIFFUSER_TOKEN_TYPE][0]
        ours["diffuser.position_embeddings.weight"] = sd[DIFFUSER_POS] + row0
    return ours


def ours_to_official_state_dict(sd: dict[str, Tensor], cfg: LadicConfig) -> dict[str, Tensor]:
    """The inverse mapping (no token-type table: MED has none). For tests and tooling."""
    out = {off: sd[o] for o, off in key_pairs(cfg)}
    out[HEAD_BIAS_ALIAS] = out[HEAD_BIAS]
    return out


# ---------------------------------------------------------------------------- files


# What torch.load raises for a file that is not a checkpoint it can read (a text file,
# random bytes, a truncated or foreign zip archive, an empty file).
_NOT_A_CHECKPOINT = (pickle.UnpicklingError, RuntimeError, KeyError, EOFError, ValueError,
                     IndexError, TypeError, AttributeError)


def _first_line(err: BaseException) -> str:
    """A short reason from a load error, in parentheses (none from a KeyError: its text is
    just the key the reader looked up)."""
    text = str(err).strip().splitlines()
    return f" ({text[0][:120]})" if text and not isinstance(err, KeyError) else ""


def _not_a_checkpoint(path: Path, err: BaseException) -> OfficialCheckpointError:
    return OfficialCheckpointError(
        f"{path}: not a PyTorch or safetensors checkpoint{_first_line(err)}"
    )


def _is_weights_only_refusal(err: BaseException) -> bool:
    """Whether torch.load(weights_only=True) refused a real pickle for naming a Python
    class or function (an object besides tensors), rather than failing to parse it."""
    text = str(err)
    return isinstance(err, pickle.UnpicklingError) and (
        "Unsupported global" in text or "Unsupported class" in text  # torch >= 2.4, older
    )


def _torch_load(
    path: Path,
    allow_pickle: bool,
    not_loadable: Callable[[Path, BaseException], OfficialCheckpointError] = _not_a_checkpoint,
) -> object:
    """`torch.load` of `path`, tensors only unless `allow_pickle`; `not_loadable` makes
    the error for a file torch cannot read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except _NOT_A_CHECKPOINT as err:
        if not _is_weights_only_refusal(err):
            raise not_loadable(path, err) from err
        if not allow_pickle:
            raise OfficialCheckpointError(
                f"{path} holds Python objects besides tensors; rerun with --allow-pickle "
                "only if you trust the file: loading it runs code from it"
            ) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ImportError as err:
        raise OfficialCheckpointError(
            f"{path} holds objects of a module that is not installed ({err})"
        ) from err
    except _NOT_A_CHECKPOINT as err:
        raise not_loadable(path, err) from err


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """A `.safetensors` file as tensors (uses the `safetensors` package when installed)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        pass
    else:
        return load_file(str(path), device="cpu")
    raw = bytearray(Path(path).read_bytes())
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    base = 8 + size
    out: dict[str, Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES[info["dtype"]]
        shape = list(info["shape"])
        begin, end = info["data_offsets"]
        numel = 1
        for s in shape:
            numel *= s
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(raw, dtype=dtype, count=numel, offset=base + begin)
        if (end - begin) != t.numel() * t.element_size():
            raise OfficialCheckpointError(f"{path}: bad byte range for {name}")
        out[name] = t.reshape(shape)
    return out


def _tensor_dict(obj: object, path: Path) -> dict[str, Tensor]:
    """A state dict out of whatever a checkpoint file holds."""
    if isinstance(obj, dict):
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
        for key in ("model", "state_dict", "module", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner:
                return _tensor_dict(inner, path)
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        if tensors:
            return tensors
    raise OfficialCheckpointError(f"{path} holds no state dict (found {type(obj).__name__})")


def read_state_dict(path: Path, allow_pickle: bool = False) -> dict[str, Tensor]:
    """A checkpoint as a flat, canonical state dict. A folder is searched for the usual
    weight file names (an accelerate `save_state` folder, a Hugging Face model folder)."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "model.bin", "model.pth"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise OfficialCheckpointError(f"no weight file in {path}")
    if path.suffix == ".safetensors":
        try:
            return canonical(read_safetensors(path))
        except (OfficialCheckpointError, OSError):
            raise
        except Exception as err:  # the safetensors package has its own error type
            raise _not_a_checkpoint(path, err) from err
    return canonical(_tensor_dict(_torch_load(path, allow_pickle), path))


def _from_bert(bert: dict[str, Tensor], official_key: str) -> Tensor | None:
    """Where a bert-base-uncased file keeps the weight the release names `official_key`."""
    if official_key.startswith("lm_head."):
        key = "cls." + official_key[len("lm_head."):]
        if key in bert:
            return bert[key]
        if key == "cls.predictions.decoder.weight":  # tied to the word embeddings
            return _from_bert(bert, "space_encoder.embeddings.word_embeddings.weight")
        return None
    for prefix in ("space_encoder.", "space_decoder."):
        if official_key.startswith(prefix):
            rest = official_key[len(prefix):]
            return bert.get("bert." + rest, bert.get(rest))
    return None


def _fill(
    sd: dict[str, Tensor], needed: list[str], prefixes: tuple[str, ...], source: str,
    lookup: dict[str, Tensor] | None,
    get: Callable[[dict[str, Tensor], str], Tensor | None], what: str,
) -> list[str]:
    """Fill the keys in `needed` under `prefixes` from `lookup`; return the ones filled."""
    wanted = [k for k in needed if k not in sd and k.startswith(prefixes)]
    if not wanted:
        return []
    if lookup is None:
        raise OfficialCheckpointError(
            f"the LaDiC checkpoint lacks {len(wanted)} {what} weight(s) (e.g. {wanted[0]}); "
            f"pass {source}"
        )
    filled = []
    for k in wanted:
        v = get(lookup, k)
        if v is not None:
            sd[k] = v
            filled.append(k)
    return filled


def _load_vector(path: Path, dim: int, what: str, allow_pickle: bool = False) -> Tensor:
    hint = f"--{what} takes the official repository's datasets/{what}_emb_split.pickle"

    def not_a_vector(path: Path, err: BaseException) -> OfficialCheckpointError:
        return OfficialCheckpointError(f"{path}: not a torch.save file{_first_line(err)}; {hint}")

    try:
        t = _torch_load(path, allow_pickle, not_a_vector)
    except OSError as err:
        raise OfficialCheckpointError(
            f"cannot read the latent {what} from {path} ({err.strerror or err}); {hint}"
        ) from err
    except OfficialCheckpointError as err:
        raise OfficialCheckpointError(f"the latent {what}: {err}") from err
    if isinstance(t, np.ndarray):  # loaded with --allow-pickle
        t = torch.from_numpy(np.ascontiguousarray(t))
    if not isinstance(t, Tensor) or t.numel() != dim:
        raise OfficialCheckpointError(f"{path}: expected a {dim}-d tensor for the latent {what}")
    return t.detach().reshape(dim).float()


def load_official(
    ckpt: Path,
    *,
    vit: Path | None,
    bert: Path | None,
    mean: Path | None,
    std: Path | None,
    decoder_layers: int = 0,
    allow_pickle: bool = False,
    config: LadicConfig | None = None,
) -> Ladic:
    """The released LaDiC as a `Ladic` in eval mode.

    `ckpt`: the LaDiC checkpoint (file or accelerate folder). `vit`: BLIP's
    `model_base_capfilt_large.pth`, read only for ViT weights the checkpoint lacks.
    `bert`: a bert-base-uncased folder or weight file, read only for text weights the
    checkpoint lacks. `mean`/`std`: the repository's latent statistics pickles.
    `decoder_layers`: 0 reproduces the release (its decoder is the MLM head alone); 6 runs
    BERT layers 6-11 first, as the paper describes (the head was not trained that way).
    `allow_pickle`: permit non-tensor pickles in checkpoints (runs code from the file).
    `config`: the architecture (default `base_config()`; tests pass small ones).
    """
    cfg = base_config() if config is None else LadicConfig.from_dict(config.to_dict())
    # The release holds the twelve BERT layers: the ones after the split can decode.
    upper = 12 - cfg.text.encoder_layers if config is None else decoder_layers
    if not 0 <= decoder_layers <= upper:
        raise ValueError(f"decoder_layers must be in 0..{upper}, got {decoder_layers}")
    cfg.text.decoder_layers = decoder_layers
    if mean is None or std is None:
        raise OfficialCheckpointError(
            "the latent mean/std are not in the checkpoint: pass the official repository's "
            "datasets/mean_emb_split.pickle and datasets/std_emb_split.pickle as --mean and "
            "--std"
        )

    sd = read_state_dict(Path(ckpt), allow_pickle)
    if HEAD_BIAS not in sd and HEAD_BIAS_ALIAS in sd:
        sd[HEAD_BIAS] = sd[HEAD_BIAS_ALIAS]
    needed = [off for _, off in key_pairs(cfg)]

    need_vit = any(k not in sd and k.startswith("visual_encoder.") for k in needed)
    blip = read_state_dict(Path(vit), allow_pickle) if (need_vit and vit is not None) else None
    from_vit = _fill(sd, needed, ("visual_encoder.",), "--vit model_base_capfilt_large.pth",
                     blip, lambda d, k: d.get(k), "ViT")

    text_prefixes = ("space_encoder.", "space_decoder.", "lm_head.")
    need_bert = any(k not in sd and k.startswith(text_prefixes) for k in needed)
    bert_sd = None
    if need_bert and bert is not None:
        bert_sd = read_state_dict(Path(bert), allow_pickle)
    from_bert = _fill(sd, needed, text_prefixes, "--bert <bert-base-uncased folder>", bert_sd,
                      _from_bert, "text")
    if from_vit:
        log.info("filled %d ViT weights from %s", len(from_vit), vit)
    if from_bert:
        log.info("filled %d text weights from %s", len(from_bert), bert)
    if any(k.startswith("lm_head.") for k in from_bert):
        warnings.warn(
            "the MLM head came from bert-base-uncased, not the LaDiC checkpoint; the released "
            "head was fine-tuned, so captions will be poor",
            stacklevel=2,
        )

    model = Ladic(cfg)
    result = model.load_state_dict(official_state_dict_to_ours(sd, cfg), strict=False)
    left = set(result.missing_keys) - DERIVED_BUFFERS
    if left or result.unexpected_keys:
        raise OfficialCheckpointError(
            f"mapping incomplete: missing {sorted(left)}, unexpected {result.unexpected_keys}"
        )

    text = model.text
    d = cfg.text.hidden
    with torch.no_grad():
        text.mean.copy_(_load_vector(Path(mean), d, "mean", allow_pickle))
        text.std.copy_(_load_vector(Path(std), d, "std", allow_pickle))
        text.period_latent.copy_(official_period_latent(model))
    return model.eval()


@torch.no_grad()
def official_period_latent(model: Ladic) -> Tensor:
    """`period_latent` such that `TextLatent.encode` reproduces the official special-token
    reassignment: the raw lower-BERT latent of "." (in "[CLS] . [SEP]") put straight into
    the normalized latent, i.e. the unnormalized buffer is raw * std + mean."""
    text = model.text
    c = text.cfg
    was_training = text.training
    text.eval()
    ids = torch.tensor([[c.cls_id, c.period_id, c.sep_id]], device=text.mean.device)
    raw = text.encode_raw(ids)[0, 1]
    text.train(was_training)
    return raw * text.std + text.mean


# ---------------------------------------------------------------------------- tokenizer


def bert_tokenizer_json(
    bert: Path | None, max_len: int, out: Path, ids: TextLatentConfig | None = None
) -> Path:
    """Write the bert-base-uncased WordPiece tokenizer (padding/truncation to `max_len`) as
    a `tokenizers` JSON file at `out`. `bert` is the model folder (or a file inside it)
    holding `tokenizer.json` or `vocab.txt`. The special ids are checked against `ids`
    (default: the base config's)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    if bert is None:
        raise OfficialCheckpointError("the tokenizer needs --bert <bert-base-uncased folder>")
    folder = Path(bert) if Path(bert).is_dir() else Path(bert).parent
    if (folder / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.txt").is_file():
        tok = Tokenizer(WordPiece.from_file(str(folder / "vocab.txt"), unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        tok.decoder = decoders.WordPiece(prefix="##")
        tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    else:
        raise OfficialCheckpointError(f"no tokenizer.json or vocab.txt in {folder}")
    c = ids if ids is not None else TextLatentConfig()
    expect = {"[PAD]": c.pad_id, "[CLS]": c.cls_id, "[SEP]": c.sep_id, "[UNK]": c.unk_id,
              "[MASK]": c.mask_id, ".": c.period_id}
    wrong = {t: (tok.token_to_id(t), i) for t, i in expect.items() if tok.token_to_id(t) != i}
    if wrong:
        raise OfficialCheckpointError(f"tokenizer ids differ from the config (got, want): {wrong}")
    tok.enable_padding(pad_id=c.pad_id, pad_token="[PAD]", length=max_len)
    tok.enable_truncation(max_length=max_len)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out
