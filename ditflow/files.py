# SPDX-License-Identifier: Apache-2.0
"""Atomic file writes: a failed or cancelled job leaves no half-finished file, and an existing one stays intact.

Every file the CLI, the nodes and the evaluation write goes through :func:`atomic_path`. Files get the mode any
program's new file gets, ``0o666`` less the process umask (``0644`` under the usual umask ``022``), not the
``0600`` of :func:`tempfile.mkstemp`: the temporary file is created with ``0o666``, the kernel applies the umask,
and that mode is set again just before the rename (some writers, safetensors among them, replace the file they
are given by one of their own with mode ``0600``).

Temporary names carry the writer's process id (``.<name>.<pid>-<random>.part``), so that a later run can tell an
orphan (its process was killed) from a file another live run is writing: :func:`remove_orphans`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path


#: ``.<name>.<pid>-<random>.<part|old>``: a temporary (``part``) or a replaced folder on its way out (``old``).
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.(?P<kind>part|old)$")


def temp_name(path: Path, kind: str = "part") -> Path:
    """A fresh ``.<name>.<pid>-<random>.<kind>`` path beside ``path`` (not created)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process: leave its files alone
    return True


def remove_orphans(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Removes the temporaries of dead processes in ``folder`` (of the entry ``name`` only, if given); returns them.

    A replaced folder (``.old``) whose entry no longer exists is put back instead: its run died between the two
    renames of a publish without ``RENAME_EXCHANGE`` (:func:`ditflow.outputs.publish`), so it is the last complete
    state.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        m = _TEMP.match(entry.name)
        if not m or (name is not None and m["name"] != name) or _alive(int(m["pid"])):
            continue
        target = folder / m["name"]
        if m["kind"] == "old" and not os.path.lexists(target):
            os.rename(entry, target)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _create_temp_beside(path: Path) -> Path:
    """Creates an empty :func:`temp_name` file in ``path``'s folder, mode ``0o666`` & ~umask, and returns it."""
    for _ in range(100):
        tmp = temp_name(path)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; it replaces ``path`` when the ``with`` succeeds, else is removed.

    The temporary file lives in the same folder (``.<name>.<pid>-<random>.part``), so the final ``os.replace`` is atomic.
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
