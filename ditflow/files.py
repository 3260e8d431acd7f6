# SPDX-License-Identifier: Apache-2.0
"""Atomic file writes: a failed or cancelled job leaves no half-finished file, and an existing one stays intact.

Every file the CLI, the nodes and the evaluation write goes through :func:`atomic_path`. Files get the mode any
program's new file gets, ``0o666`` less the process umask (``0644`` under the usual umask ``022``), not the
``0600`` of :func:`tempfile.mkstemp`: the temporary file is created with ``0o666``, the kernel applies the umask,
and that mode is set again just before the rename (some writers, safetensors among them, replace the file they
are given by one of their own with mode ``0600``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path


def _create_temp_beside(path: Path) -> Path:
    """Creates an empty ``.<name>.<random>.part`` in ``path``'s folder, mode ``0o666`` & ~umask, and returns it."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; it replaces ``path`` when the ``with`` succeeds, else is removed.

    The temporary file lives in the same folder (``.<name>.<random>.part``), so the final ``os.replace`` is atomic.
    It already exists, empty; writers may open it by name or replace it. The file at ``path`` gets the normal mode
    (``0o666`` less the umask) whatever the writer did. Missing parent folders are created (``0o777`` less the
    umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp_beside(path)
    normal_mode = stat.S_IMODE(tmp.stat().st_mode)  # 0o666 & ~umask, as the kernel applied it
    try:
        yield tmp
        os.chmod(tmp, normal_mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Writes ``data`` as indented JSON to ``path`` atomically; non-JSON values are written as ``str``.

    Raises:
        ValueError: if ``data`` holds NaN or ±Inf, which strict JSON has no word for (``NaN`` is not JSON).
    """
    write_text(path, json.dumps(data, indent=2, default=str, allow_nan=False))
