"""Training helpers that need no model."""

from __future__ import annotations

import csv
from pathlib import Path

from ladic.train import open_log


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
