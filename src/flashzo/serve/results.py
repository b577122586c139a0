"""A finished job's result files: the metrics CSV (OpenAI's columns, then flashzo's) and the adapter archives.

Each is written under a temporary name in DATA_DIR/files; Store.succeed_job renames them into place
in the transaction that marks the job succeeded, and `ResultFiles` removes what a failed attempt (a
full disk) left behind.
"""

from __future__ import annotations

import contextlib
import csv
import os
import tarfile

from .store import Store, new_id

CSV_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy", "lr",
               "loss_plus", "loss_minus", "projected_grad", "skipped", "tokens")


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in CSV_COLUMNS])


def write_tar(path: str, directory: str, arcname: str) -> None:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(directory, arcname=arcname)


class ResultFiles:
    """`with ResultFiles(store) as files:` files.new(name) -> a temporary path for each result file;
    `files.made` is what Store.succeed_job registers. What is still at a temporary path at the end
    (the job did not succeed) is removed."""

    def __init__(self, store: Store):
        self.store = store
        self.made: list[tuple[str, str, str]] = []  # (file id, temporary path, name)

    def new(self, name: str) -> str:
        fid = new_id("file")
        self.made.append((fid, self.store.new_file_path(fid), name))
        return self.made[-1][1]

    def __enter__(self) -> ResultFiles:
        return self

    def __exit__(self, *exc) -> None:
        for _, tmp, _ in self.made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
