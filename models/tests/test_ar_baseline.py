"""The autoregressive baseline: shapes, causality, decoding, training and resuming."""

from __future__ import annotations

import json

import pytest
import torch

from ladic import scenes
from ladic.ar_baseline import (
    ArCaptioner,
    ArConfig,
    beam_decode,
    greedy_decode,
    load_ar_run,
    micro_ar_config,
    parse_args,
    teacher_forcing_loss,
    tiny_ar_config,
    train,
)
from ladic.config import tiny_config
from ladic.model import Ladic, count_parameters
from ladic.tokenizer import build_word_tokenizer, special_ids

torch.set_num_threads(1)

TOK = build_word_tokenizer(scenes.VOCABULARY, 40)
IDS = special_ids(TOK)
V = TOK.get_vocab_size()


def micro(seed: int = 0) -> ArCaptioner:
    torch.manual_seed(seed)
    return ArCaptioner(micro_ar_config(V, IDS)).eval()


def batch(model: ArCaptioner, b: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = model.cfg.image.image_size
    pixels = torch.randn(b, 3, s, s, generator=g)
    ids = torch.randint(5, V, (b, model.cfg.max_len), generator=g)
    ids[:, 0] = IDS["cls_id"]
    return pixels, ids


def test_forward_shapes() -> None:
    model = micro()
    pixels, ids = batch(model)
    assert model(pixels, ids).shape == (3, model.cfg.max_len, V)
    kv = model.encode_image(pixels)
    assert len(kv) == model.cfg.layers
    assert kv[0][0].shape == (3, model.cfg.image.tokens, model.cfg.hidden)


def test_self_attention_is_causal() -> None:
    model = micro()
    pixels, ids = batch(model)
    with torch.no_grad():
        before = model(pixels, ids)
        changed = ids.clone()
        changed[:, 6:] = (changed[:, 6:] + 7) % V
        after = model(pixels, changed)
    assert torch.allclose(before[:, :6], after[:, :6], atol=1e-6)
    assert not torch.allclose(before[:, 6:], after[:, 6:], atol=1e-3)


def test_cached_decoding_matches_full_forward() -> None:
    model = micro()
    pixels, ids = batch(model)
    with torch.no_grad():
        full = model(pixels, ids)
        kv = model.encode_image(pixels)
        cache = None
        steps = []
        for i in range(ids.shape[1]):
            logits, cache = model.decode(ids[:, i : i + 1], kv, cache)
            steps.append(logits)
    assert torch.allclose(full, torch.cat(steps, dim=1), atol=1e-5)


def test_greedy_equals_beam_width_one() -> None:
    model = micro(seed=2)
    pixels, _ = batch(model, b=4)
    assert greedy_decode(model, pixels) == beam_decode(model, pixels, width=1)


def test_beam_search_is_batched_and_clean() -> None:
    model = micro(seed=3)
    pixels, _ = batch(model, b=3)
    together = beam_decode(model, pixels, width=3)
    alone = [beam_decode(model, pixels[i : i + 1], width=3)[0] for i in range(3)]
    assert together == alone
    specials = {IDS["pad_id"], IDS["cls_id"], IDS["sep_id"], IDS["unk_id"], IDS["mask_id"]}
    for ids in together:
        assert len(ids) <= model.cfg.max_len - 1
        assert not specials & set(ids)


def test_training_reduces_the_loss_on_a_fixed_batch() -> None:
    model = micro(seed=4).train()
    pixels, _ = batch(model, b=8)
    caps = [scenes.canonical_caption(s) for s in scenes.generate_split("val", 8)]
    ids = torch.tensor([e.ids for e in TOK.encode_batch(caps)])[:, : model.cfg.max_len]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = teacher_forcing_loss(model, pixels, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_tiny_size_matches_ladic_tiny() -> None:
    ar = ArCaptioner(tiny_ar_config(V, IDS))
    ladic = Ladic(tiny_config(V, IDS))
    ladic_total = (count_parameters(ladic.image_encoder) + count_parameters(ladic.diffuser)
                   + count_parameters(ladic.text.decoder_layers)
                   + count_parameters(ladic.text.head))
    assert ar.cfg.image == ladic.cfg.image
    assert abs(count_parameters(ar) / ladic_total - 1) < 0.2


def test_config_round_trip() -> None:
    cfg = tiny_ar_config(V, IDS)
    assert ArConfig.from_dict(cfg.to_dict()) == cfg


def test_train_checkpoints_and_resumes(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    common = ["train", "--out", str(out), "--size", "micro", "--threads", "1", "--batch", "4",
              "--train-images", "16", "--checkpoint-every", "2", "--eval-every", "2",
              "--eval-images", "4", "--log-every", "1", "--data-dir", str(tmp_path / "data")]
    train(parse_args(common + ["--steps", "4"]))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 4 and "rng" in ckpt
    assert torch.load(out / "final.pt", weights_only=False)["step"] == 4
    assert (out / "final.pt").exists() and (out / "tokenizer.json").exists()
    # Re-running with the same step count resumes at the end: no new step, same weights.
    train(parse_args(common + ["--steps", "4"]))
    assert "resumed at step 4" in capsys.readouterr().out
    final = torch.load(out / "final.pt", weights_only=False)
    for k, v in ckpt["model"].items():
        assert torch.equal(final["model"][k], v)
    # More steps continue from the checkpoint and append to the log.
    train(parse_args(common + ["--steps", "6"]))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 6
    lines = (out / "train_log.csv").read_text().splitlines()
    assert lines[0].startswith("step,loss")
    assert [int(line.split(",")[0]) for line in lines[1:]] == [1, 2, 3, 4, 5, 6]
    model, tok = load_ar_run(out)
    assert model.cfg.name == "ar-micro" and tok.exists()
    # Settings that shape the model or the training are the run's own on resume.
    before = {f: (out / f).read_bytes() for f in ("config.json", "train_args.json")}
    for flags, named in [
        (["--batch", "8", "--dropout", "0.5"], ["--batch: 4 in the run, 8 now", "dropout"]),
        (["--size", "tiny"], ["--size: 'micro' in the run, 'tiny' now"]),
    ]:
        with pytest.raises(SystemExit) as err:
            train(parse_args(common + ["--steps", "6", *flags]))
        msg = str(err.value.code)
        assert msg.startswith("error: ") and all(n in msg for n in named), msg
        assert {f: (out / f).read_bytes() for f in before} == before
    # Its length and its bookkeeping may change; a config from before a field existed
    # reads it as its default.
    saved = json.loads((out / "config.json").read_text())
    del saved["period_id"]
    (out / "config.json").write_text(json.dumps(saved))
    train(parse_args(common + ["--steps", "6", "--log-every", "3"]))


def test_load_ar_run_takes_the_newer_weights(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A finished run resumed with more steps and stopped: its checkpoint is newer."""
    old, new = micro(seed=5), micro(seed=6)
    torch.save({"config": old.cfg.to_dict(), "model": old.state_dict(), "step": 4},
               tmp_path / "final.pt")
    torch.save({"model": new.state_dict(), "step": 6}, tmp_path / "checkpoint.pt")
    (tmp_path / "config.json").write_text(json.dumps(new.cfg.to_dict()))
    model, _ = load_ar_run(tmp_path)
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(SystemExit):
        parse_args(["caption", "--run", str(tmp_path / "missing")])
    assert "not a ladic.ar_baseline run" in capsys.readouterr().err
