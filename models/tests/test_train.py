"""Training helpers that need no model."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from ladic import train
from ladic.train import open_log

torch.set_num_threads(1)


def test_a_resumed_log_drops_the_rows_after_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "train_log.csv"
    with open_log(path, ["step", "loss"], 0) as f:
        csv.writer(f).writerows([[s, 1.0 / s] for s in range(25, 201, 25)])
    # The run stopped at 200 with its last checkpoint at 150, and resumes there.
    with open_log(path, ["step", "loss"], 150) as f:
        csv.writer(f).writerows([[175, 0.5], [200, 0.25]])
    rows = list(csv.reader(open(path, newline="")))
    assert rows[0] == ["step", "loss"]
    assert [int(r[0]) for r in rows[1:]] == list(range(25, 201, 25))
    assert rows[-1] == ["200", "0.25"]
    # A run that starts over at step 0 starts a new log.
    with open_log(path, ["step", "loss"], 0) as f:
        pass
    assert list(csv.reader(open(path, newline=""))) == [["step", "loss"]]


# ------------------------------------------------------------- resuming (tiny, 20 steps)


class Interrupted(Exception):
    pass


def tiny_run(out: Path, data_dir: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--threads", "1", "--text-steps", "2", "--steps", "20",
            "--batch", "4", "--train-images", "12", "--checkpoint-every", "10",
            "--eval-every", "10", "--eval-images", "2", "--data-dir", str(data_dir), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 20-step run, and the same run stopped after step 10 and resumed."""
    root = tmp_path_factory.mktemp("train")
    data_dir = root / "data"
    train.main(tiny_run(root / "straight", data_dir))
    calls = 0
    real_loss = train.training_loss

    def loss_then_stop(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls > 10:
            raise Interrupted
        return real_loss(*args, **kwargs)

    train.training_loss = loss_then_stop
    try:
        with pytest.raises(Interrupted):
            train.main(tiny_run(root / "resumed", data_dir))
    finally:
        train.training_loss = real_loss
    assert torch.load(root / "resumed" / "checkpoint.pt", weights_only=False)["step"] == 10
    assert not (root / "resumed" / "final.pt").exists()
    train.main(tiny_run(root / "resumed", data_dir))
    return {"straight": root / "straight", "resumed": root / "resumed", "data": data_dir}


def test_a_resumed_run_trains_as_an_uninterrupted_one(runs: dict[str, Path]) -> None:
    straight = torch.load(runs["straight"] / "final.pt", weights_only=False)
    resumed = torch.load(runs["resumed"] / "final.pt", weights_only=False)
    assert straight["step"] == resumed["step"] == 20
    for k, v in straight["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    ckpt = torch.load(runs["resumed"] / "checkpoint.pt", weights_only=False)
    assert set(ckpt["rng"]) >= {"numpy", "torch"}
    def losses(run: Path) -> list[list[str]]:  # step, loss, latent, token
        return [r.split(",")[:4] for r in (run / "train_log.csv").read_text().splitlines()]

    assert losses(runs["straight"]) == losses(runs["resumed"])


def test_a_run_stopped_before_its_first_checkpoint_resumes_as_an_uninterrupted_one(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """Stopped in stage 2 before any checkpoint: only the text latent was saved, and the
    resumed stage 2 must draw what the uninterrupted run drew."""
    real_loss = train.training_loss

    def stop(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise Interrupted

    train.training_loss = stop
    try:
        with pytest.raises(Interrupted):
            train.main(tiny_run(tmp_path, runs["data"]))
    finally:
        train.training_loss = real_loss
    assert (tmp_path / "text_latent.pt").exists()
    assert not (tmp_path / "checkpoint.pt").exists()
    train.main(tiny_run(tmp_path, runs["data"]))
    straight = torch.load(runs["straight"] / "final.pt", weights_only=False)
    resumed = torch.load(tmp_path / "final.pt", weights_only=False)
    for k, v in straight["model"].items():
        assert torch.equal(resumed["model"][k], v), k


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--scale-input", "off"], ["diffuser.scale_input (--scale-input)"]),
        (["--train-noise-scale", "2"], ["schedule.train_noise_scale (--train-noise-scale)"]),
        (["--batch", "8", "--token-weight", "0.5", "--lr", "0.001"],
         ["--batch: 4 in the run, 8 now", "--token-weight: 1.0 in the run, 0.5 now"]),
    ],
)
def test_resume_refuses_other_training_flags(runs: dict[str, Path], flags, named) -> None:  # type: ignore[no-untyped-def]
    run = runs["resumed"]
    before = {f: (run / f).read_bytes() for f in ("config.json", "train_args.json")}
    with pytest.raises(SystemExit) as err:
        train.main(tiny_run(run, runs["data"], *flags))
    msg = str(err.value.code)
    assert msg.startswith("error: ") and str(run) in msg
    for name in named:
        assert name in msg
    assert {f: (run / f).read_bytes() for f in before} == before


def test_resume_accepts_a_longer_run(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["resumed"], run)
    train.main(tiny_run(run, runs["data"], "--steps", "22", "--lr", "0.0002", "--eval-every",
                        "0", "--checkpoint-every", "0", "--eval-images", "1"))
    assert torch.load(run / "final.pt", weights_only=False)["step"] == 22
    assert json.loads((run / "train_args.json").read_text())["steps"] == 22


def test_intervals_of_zero_mean_only_at_the_end() -> None:
    args = train.parse_args(["--eval-every", "0", "--checkpoint-every", "0"])
    assert args.eval_every == 0 and not train.every(10, 0) and train.every(10, 5)
    with pytest.raises(SystemExit):
        train.parse_args(["--eval-every", "-1"])


def test_the_log_has_the_last_step(runs: dict[str, Path], tmp_path: Path) -> None:
    """Rows every 25 steps and at each validation; a short run without validation still
    logs its last step."""
    train.main(tiny_run(tmp_path, runs["data"], "--steps", "3", "--eval-images", "0",
                        "--checkpoint-every", "0"))
    rows = (tmp_path / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "3"]
