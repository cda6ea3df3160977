"""Durable writes shared by the token store and the training checkpoints."""

from __future__ import annotations

import os
from pathlib import Path


def fsync(path: str | Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder after a rename in it, so that the rename survives a
    power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
