"""The official-checkpoint mapping (ladic.official) on small configs shaped like base."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor

from ladic import official
from ladic.config import (
    DiffuserConfig,
    ImageEncoderConfig,
    LadicConfig,
    TextLatentConfig,
    base_config,
)
from ladic.model import Ladic
from ladic.official import (
    DERIVED_BUFFERS,
    DIFFUSER_POS,
    DIFFUSER_TOKEN_TYPE,
    OfficialCheckpointError,
    load_official,
    official_state_dict_to_ours,
    ours_to_official_state_dict,
)

IDS = dict(pad_id=0, cls_id=1, sep_id=2, unk_id=3, mask_id=4, period_id=5)


def small_config(decoder_layers: int = 2) -> LadicConfig:
    """Base-shaped (patch stem, CLS token, split BERT, 2x-wide diffuser), but tiny."""
    return LadicConfig(
        name="small",
        image=ImageEncoderConfig(image_size=32, patch_size=16, stem="patch", width=16, layers=2,
                                 heads=2, mlp_ratio=4.0, cls_token=True),
        text=TextLatentConfig(vocab_size=40, max_len=8, hidden=16, heads=2, ffn=32,
                              encoder_layers=2, decoder_layers=decoder_layers, max_positions=16,
                              **IDS),
        diffuser=DiffuserConfig(layers=2, heads=2, ffn=32, max_positions=16, dropout=0.0),
    )


def random_model(cfg: LadicConfig, seed: int = 0) -> Ladic:
    torch.manual_seed(seed)
    model = Ladic(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
        model.text.mean.normal_()
        model.text.std.uniform_(0.5, 1.5)
        model.text.period_latent.normal_()
    return model.eval()


def outputs(model: Ladic) -> list[Tensor]:
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, cfg.image.image_size, cfg.image.image_size, generator=g)
    shape = (2, cfg.text.max_len, cfg.latent_dim)
    x_t, sc, x0 = (torch.randn(shape, generator=g) for _ in range(3))
    with torch.no_grad():
        kv = model.encode_image(pixels)
        pred = model.denoise(x_t, sc, torch.tensor([0, 999]), kv)
        ids, conf = model.decode(x0)
    return [kv, pred, ids, conf]


def copy_derived(src: Ladic, dst: Ladic) -> None:
    with torch.no_grad():
        for name in ("mean", "std", "period_latent"):
            getattr(dst.text, name).copy_(getattr(src.text, name))


@pytest.mark.parametrize("decoder_layers", [0, 2])
def test_round_trip_gives_identical_outputs(decoder_layers: int) -> None:
    cfg = small_config(decoder_layers)
    model = random_model(cfg)
    off = ours_to_official_state_dict(model.state_dict(), cfg)
    assert "time_layer_norm.weight" in off and "visual_encoder.blocks.1.attn.qkv.weight" in off
    if decoder_layers:  # upper layers sit after the split in the official upper model
        assert "space_decoder.encoder.layer.2.attention.self.query.weight" in off
    else:
        assert not any(k.startswith("space_decoder.") for k in off)
    fresh = Ladic(cfg).eval()
    result = fresh.load_state_dict(official_state_dict_to_ours(off, cfg), strict=False)
    assert set(result.missing_keys) == DERIVED_BUFFERS
    assert not result.unexpected_keys
    copy_derived(model, fresh)
    for a, b in zip(outputs(model), outputs(fresh), strict=True):
        assert torch.equal(a, b)


def test_module_prefix_and_old_layernorm_names_are_accepted() -> None:
    cfg = small_config()
    model = random_model(cfg)
    off = ours_to_official_state_dict(model.state_dict(), cfg)
    renamed = {}
    for k, v in off.items():
        if "LayerNorm.weight" in k:
            k = k.replace("LayerNorm.weight", "LayerNorm.gamma")
        elif "LayerNorm.bias" in k:
            k = k.replace("LayerNorm.bias", "LayerNorm.beta")
        renamed["module." + k] = v
    del renamed["module." + official.HEAD_BIAS]  # the tied alias alone must do
    ours = official_state_dict_to_ours(renamed, cfg)
    for k, v in model.state_dict().items():
        if k not in DERIVED_BUFFERS:
            assert torch.equal(ours[k], v), k


def test_missing_keys_raise_a_clear_error() -> None:
    cfg = small_config()
    off = ours_to_official_state_dict(random_model(cfg).state_dict(), cfg)
    del off["diffuser.encoder.layer.1.crossattention.self.key.weight"]
    del off["time_layer_norm.bias"]
    with pytest.raises(OfficialCheckpointError) as err:
        official_state_dict_to_ours(off, cfg)
    msg = str(err.value)
    assert "lacks 2 key(s)" in msg
    assert "diffuser.encoder.layer.1.crossattention.self.key.weight" in msg
    assert "time_layer_norm.bias" in msg


def test_token_type_row_is_folded_into_positions() -> None:
    cfg = small_config()
    model = random_model(cfg)
    off = ours_to_official_state_dict(model.state_dict(), cfg)
    plain = official_state_dict_to_ours(off, cfg)["diffuser.position_embeddings.weight"]
    assert torch.equal(plain, off[DIFFUSER_POS])  # MED has no token-type table: no change
    table = torch.zeros(2, cfg.diffuser_hidden)
    table[0] = torch.linspace(-1.0, 1.0, cfg.diffuser_hidden)
    table[1] = 100.0  # row 1 is never used
    off[DIFFUSER_TOKEN_TYPE] = table
    folded = official_state_dict_to_ours(off, cfg)["diffuser.position_embeddings.weight"]
    assert torch.allclose(folded, off[DIFFUSER_POS] + table[0])
    assert not torch.equal(folded, plain)


def test_base_mapping_covers_every_weight() -> None:
    for decoder_layers in (0, 6):
        cfg = base_config()
        cfg.text.decoder_layers = decoder_layers
        with torch.device("meta"):
            sd = Ladic(cfg).state_dict()
        off = ours_to_official_state_dict(sd, cfg)
        mapped = official_state_dict_to_ours(off, cfg)
        assert set(mapped) == set(sd) - DERIVED_BUFFERS
        assert all(mapped[k].shape == sd[k].shape for k in mapped)
        shapes = {k: tuple(v.shape) for k, v in off.items()}
        assert shapes["visual_encoder.patch_embed.proj.weight"] == (768, 3, 16, 16)
        assert shapes["visual_encoder.pos_embed"] == (1, 197, 768)
        assert shapes["visual_encoder.blocks.11.attn.qkv.weight"] == (2304, 768)
        assert shapes["space_encoder.encoder.layer.5.output.dense.weight"] == (768, 3072)
        assert shapes["lm_head.predictions.decoder.weight"] == (30522, 768)
        assert shapes["time_layer_norm.weight"] == (1536,)
        assert shapes[DIFFUSER_POS] == (512, 1536)
        assert shapes["diffuser.encoder.layer.11.crossattention.self.key.weight"] == (1536, 768)
        uppers = {k.split(".")[3] for k in off if k.startswith("space_decoder.")}
        assert uppers == {str(i) for i in range(6, 6 + decoder_layers)}


# ------------------------------------------------------------------ load_official, files


def write_official_files(tmp: Path, model: Ladic) -> dict[str, Path]:
    """A LaDiC checkpoint without the frozen ViT and lower BERT (accelerate-style names),
    a BLIP-like checkpoint, a bert-base-like file with old LayerNorm names, and pickles."""
    cfg = model.cfg
    off = ours_to_official_state_dict(model.state_dict(), cfg)
    ladic = {
        "module." + k: v.clone() for k, v in off.items()
        if not k.startswith(("visual_encoder.", "space_encoder.", "space_decoder."))
    }
    ladic["module.diffuser.embeddings.word_embeddings.weight"] = torch.zeros(3, 32)  # unused
    blip = {k: v.clone() for k, v in off.items() if k.startswith("visual_encoder.")}
    blip["text_encoder.embeddings.word_embeddings.weight"] = torch.zeros(3, 4)
    bert: dict[str, Tensor] = {}
    for k, v in off.items():
        if k.startswith(("space_encoder.", "space_decoder.")):
            name = "bert." + k.split(".", 1)[1]
            name = name.replace("LayerNorm.weight", "LayerNorm.gamma")
            bert[name.replace("LayerNorm.bias", "LayerNorm.beta")] = v.clone()
    paths = {
        "ckpt": tmp / "pytorch_model.bin",
        "vit": tmp / "model_base_capfilt_large.pth",
        "bert": tmp / "bert" / "pytorch_model.bin",
        "mean": tmp / "mean_emb_split.pickle",
        "std": tmp / "std_emb_split.pickle",
    }
    paths["bert"].parent.mkdir()
    torch.save(ladic, paths["ckpt"])
    torch.save({"model": blip, "epoch": 19, "config": {"image_size": 224}}, paths["vit"])
    torch.save(bert, paths["bert"])
    torch.save(model.text.mean.clone(), paths["mean"])
    torch.save(model.text.std.clone(), paths["std"])
    return paths


def test_load_official_fills_missing_parts_from_vit_and_bert(tmp_path: Path) -> None:
    cfg = small_config(decoder_layers=2)
    model = random_model(cfg)
    paths = write_official_files(tmp_path, model)
    loaded = load_official(paths["ckpt"], vit=paths["vit"], bert=paths["bert"].parent,
                           mean=paths["mean"], std=paths["std"], decoder_layers=2, config=cfg)
    assert not loaded.training
    assert torch.equal(loaded.text.mean, model.text.mean)
    # "." latent: the raw latent of "[CLS] . [SEP]" lands in the normalized latent as is.
    with torch.no_grad():
        raw = loaded.text.encode_raw(torch.tensor([[1, 5, 2]]))[0, 1]
        latent = loaded.text.encode(torch.tensor([[1, 7, 2, 0]]))
    assert torch.allclose(latent[0, 0], raw) and torch.allclose(latent[0, 3], raw)
    copy_derived(model, loaded)
    for a, b in zip(outputs(model), outputs(loaded), strict=True):
        assert torch.equal(a, b)


def test_load_official_takes_a_head_from_bert_with_a_warning(tmp_path: Path) -> None:
    cfg = small_config(decoder_layers=0)
    model = random_model(cfg)
    paths = write_official_files(tmp_path, model)
    ckpt = torch.load(paths["ckpt"], weights_only=True)
    head = {k: ckpt.pop(k) for k in list(ckpt) if k.startswith("module.lm_head.")}
    torch.save(ckpt, paths["ckpt"])
    bert = torch.load(paths["bert"], weights_only=True)
    for k, v in head.items():
        if "decoder.weight" not in k:  # bert-base ties the decoder to the word table
            bert[k.replace("module.lm_head.", "cls.")] = v
    torch.save(bert, paths["bert"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_official(paths["ckpt"], vit=paths["vit"], bert=paths["bert"],
                               mean=paths["mean"], std=paths["std"], config=cfg)
    assert any("MLM head came from bert" in str(w.message) for w in caught)
    assert torch.equal(loaded.text.head.decoder.weight, model.text.word_embeddings.weight)
    assert torch.equal(loaded.text.head.dense.weight, model.text.head.dense.weight)


def test_load_official_errors(tmp_path: Path) -> None:
    cfg = small_config()
    paths = write_official_files(tmp_path, random_model(cfg))
    with pytest.raises(OfficialCheckpointError, match="lacks .* ViT weight.*pass --vit "):
        load_official(paths["ckpt"], vit=None, bert=paths["bert"], mean=paths["mean"],
                      std=paths["std"], decoder_layers=2, config=cfg)
    with pytest.raises(OfficialCheckpointError, match="mean_emb_split.pickle.*--mean"):
        load_official(paths["ckpt"], vit=paths["vit"], bert=paths["bert"], mean=None,
                      std=paths["std"], config=cfg)
    with pytest.raises(ValueError, match="decoder_layers must be in 0..6"):
        load_official(paths["ckpt"], vit=None, bert=None, mean=None, std=None,
                      decoder_layers=7)
    torch.save({"model": {}, "args": object()}, tmp_path / "pickled.pth")
    with pytest.raises(OfficialCheckpointError, match="Python objects.*--allow-pickle"):
        official.read_state_dict(tmp_path / "pickled.pth")
    with pytest.raises(OfficialCheckpointError, match="needs --bert"):
        official.bert_tokenizer_json(None, 8, tmp_path / "t.json")


def test_shape_mismatch_names_the_official_key_and_both_shapes(tmp_path: Path) -> None:
    cfg = small_config()
    off = ours_to_official_state_dict(random_model(cfg).state_dict(), cfg)
    key = "diffuser.encoder.layer.1.crossattention.self.key.weight"
    off[key] = torch.zeros(5, 7)
    with pytest.raises(OfficialCheckpointError) as err:
        official_state_dict_to_ours(off, cfg)
    msg = str(err.value)
    want = tuple(Ladic(cfg).state_dict()["diffuser.layers.1.cross_key.weight"].shape)
    assert "1 official weight(s)" in msg and key in msg
    assert "(5, 7) in the checkpoint" in msg and f"{want} in the model" in msg
    # Through load_official: a checkpoint of another size gives the same error, not
    # torch's size mismatch from load_state_dict.
    paths = write_official_files(tmp_path, random_model(cfg))
    wide = small_config()
    wide.text.hidden = 32
    with pytest.raises(OfficialCheckpointError, match="another shape"):
        load_official(paths["ckpt"], vit=paths["vit"], bert=paths["bert"], mean=paths["mean"],
                      std=paths["std"], decoder_layers=2, config=wide)


@pytest.mark.parametrize("content", [b"", b"hello\n" * 20, bytes(range(256)) * 4, "zip"])
def test_files_that_are_not_checkpoints(tmp_path: Path, content) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "ckpt.bin"
    if content == "zip":  # a torch file cut short
        torch.save({"w": torch.zeros(100)}, path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    with pytest.raises(OfficialCheckpointError) as err:
        official.read_state_dict(path)
    assert "not a PyTorch or safetensors checkpoint" in str(err.value)
    assert "pickle" not in str(err.value)
    path.rename(tmp_path / "ckpt.safetensors")
    with pytest.raises(OfficialCheckpointError, match="not a PyTorch or safetensors"):
        official.read_state_dict(tmp_path / "ckpt.safetensors")


def test_unreadable_latent_statistics(tmp_path: Path) -> None:
    cfg = small_config()
    paths = write_official_files(tmp_path, random_model(cfg))
    kw = dict(vit=paths["vit"], bert=paths["bert"], decoder_layers=2, config=cfg)
    with pytest.raises(OfficialCheckpointError, match="cannot read the latent mean.*--mean"):
        load_official(paths["ckpt"], mean=tmp_path / "missing.pickle", std=paths["std"], **kw)
    (tmp_path / "std.txt").write_text("0.5\n")
    with pytest.raises(OfficialCheckpointError, match="std.txt: not a torch.save file"):
        load_official(paths["ckpt"], mean=paths["mean"], std=tmp_path / "std.txt", **kw)


def test_latent_statistics_pickled_with_numpy_need_allow_pickle(tmp_path: Path) -> None:
    cfg = small_config()
    model = random_model(cfg)
    paths = write_official_files(tmp_path, model)
    std = torch.load(paths["std"], weights_only=True).numpy()
    torch.save(std, tmp_path / "std-numpy.pickle")
    kw = dict(vit=paths["vit"], bert=paths["bert"], decoder_layers=2, config=cfg,
              mean=paths["mean"], std=tmp_path / "std-numpy.pickle")
    with pytest.raises(OfficialCheckpointError, match="latent std.*--allow-pickle"):
        load_official(paths["ckpt"], **kw)
    loaded = load_official(paths["ckpt"], allow_pickle=True, **kw)
    assert torch.equal(loaded.text.std, torch.from_numpy(std).reshape(-1))


def test_safetensors_reader(tmp_path: Path) -> None:
    tensors = {
        "bert.embeddings.LayerNorm.gamma": torch.randn(4),
        "cls.predictions.decoder.weight": torch.randn(3, 2),
        "ids": torch.arange(5, dtype=torch.int64),
    }
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, t in tensors.items():
        data = t.numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.int64: "I64"}[t.dtype],
                        "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))
    read = official.read_state_dict(tmp_path)  # a folder: finds model.safetensors
    assert set(read) == {
        "bert.embeddings.LayerNorm.weight", "cls.predictions.decoder.weight", "ids"
    }
    assert torch.equal(read["bert.embeddings.LayerNorm.weight"],
                       tensors["bert.embeddings.LayerNorm.gamma"])
    assert torch.equal(read["ids"], tensors["ids"])


def test_bert_tokenizer_json_from_vocab(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    vocab = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]", ".", "a", "red", "circ", "##le"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    out = official.bert_tokenizer_json(tmp_path / "pytorch_model.bin", 8, tmp_path / "t.json",
                                       ids=small_config().text)
    tok = Tokenizer.from_file(str(out))
    enc = tok.encode("A Red circle.")
    assert enc.ids == [1, 6, 7, 8, 9, 5, 2, 0]
    assert len(tok.encode("a " * 20).ids) == 8
    with pytest.raises(OfficialCheckpointError, match="ids differ"):
        official.bert_tokenizer_json(tmp_path, 8, tmp_path / "u.json")
