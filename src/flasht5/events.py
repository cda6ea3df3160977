"""TensorBoard event files, for every long-running command: one place that opens a writer.

:class:`flasht5.train.tracking.Tracker` mirrors the training loop's metrics rows through it; :class:`Scalars` serves
the commands without metrics rows (``flasht5 pretokenize --tensorboard DIR``, ``flasht5 generate --input FILE
--tensorboard DIR``). Without the ``tensorboard`` package nothing is written, and the command says so once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def open_writer(log_dir: str | Path, option: str, *, purge_step: int | None = None) -> Any:
    """A ``SummaryWriter`` for ``log_dir``, or None (with one message naming ``option``) without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print(f"[flasht5] {option}: the tensorboard package is not installed, no event files are written "
              "(pip install tensorboard)", flush=True)  # fmt: skip
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class Scalars:
    """``Scalars(log_dir)``: scalars written as they come (flushed at once); ``Scalars(None)`` writes nothing."""

    def __init__(self, log_dir: str | Path | None, option: str = "--tensorboard") -> None:
        self.writer = None if log_dir is None else open_writer(log_dir, option)

    def add(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if math.isfinite(value):
                self.writer.add_scalar(tag, value, int(step))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
