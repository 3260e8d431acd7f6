# SPDX-License-Identifier: Apache-2.0
"""Atomic file writes: a failed or cancelled job leaves no half-finished file, and an existing one stays intact."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; it replaces ``path`` when the ``with`` succeeds, else is removed.

    The temporary file lives in the same folder (``.<name>.<random>.part``), so the final ``os.replace`` is atomic.
    Missing parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Writes ``data`` as indented JSON to ``path`` atomically; non-JSON values are written as ``str``."""
    write_text(path, json.dumps(data, indent=2, default=str))
