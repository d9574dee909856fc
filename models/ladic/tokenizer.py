"""Tokenizers: a word-level one for closed vocabularies (Scenes), BERT's for `base`."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")


def build_word_tokenizer(words: list[str], max_len: int) -> Tokenizer:
    """A BERT-shaped tokenizer over a fixed word list: [PAD]=0, [CLS]=1, [SEP]=2, ..."""
    vocab = list(SPECIAL_TOKENS) + [w for w in dict.fromkeys(words) if w not in SPECIAL_TOKENS]
    return tokenizer_from_vocab(vocab, max_len)


def tokenizer_from_vocab(vocab: list[str], max_len: int) -> Tokenizer:
    """A word-level tokenizer whose ids are the positions in `vocab` (which holds the
    five BERT special tokens somewhere)."""
    ids = {tok: i for i, tok in enumerate(vocab)}
    tok = Tokenizer(WordLevel(ids, unk_token="[UNK]"))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.enable_padding(pad_id=ids["[PAD]"], pad_token="[PAD]", length=max_len)
    tok.enable_truncation(max_length=max_len)
    return tok


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """The ids the model config and the bundle manifest need."""
    ids = {
        "pad_id": tok.token_to_id("[PAD]"),
        "cls_id": tok.token_to_id("[CLS]"),
        "sep_id": tok.token_to_id("[SEP]"),
        "unk_id": tok.token_to_id("[UNK]"),
        "mask_id": tok.token_to_id("[MASK]"),
        "period_id": tok.token_to_id("."),
    }
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"tokenizer lacks {missing}")
    return ids


def load_tokenizer(path: Path, max_len: int) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]", length=max_len)
    tok.enable_truncation(max_length=max_len)
    return tok


def encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts)]
