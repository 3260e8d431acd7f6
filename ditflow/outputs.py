# SPDX-License-Identifier: Apache-2.0
"""A job's output folder, published as one set: never a mix of two runs, never a half-written run, never an input
overwritten.

``transfer`` and ``inject`` write several files that belong together (``result.mp4``, ``reference.mp4``,
``run.json``, ``embeds.safetensors``). :class:`OutputSet` checks ``--out`` before any work (a folder, not a file;
empty, or replaced only with ``overwrite``; holding none of the job's inputs; writable), lets the job write into a
staging folder beside it (``.<out>.<pid>-<random>.part``, made at the start so an unwritable place fails in the
first second, not after sampling) and publishes that folder with one rename at the end. A crash, Ctrl-C, kill or
full disk at any moment leaves ``out`` as it was or holding the complete new set; orphans of killed runs are
removed (or, for a replaced folder caught between two renames, put back) by the next run
(:func:`ditflow.files.remove_orphans`).

On Linux the replacement of an existing folder is one ``renameat2(RENAME_EXCHANGE)``; elsewhere it is two renames
(the old folder aside, the new one in), with Ctrl-C and SIGTERM held back between them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import threading
from pathlib import Path

from .errors import DiTFlowError
from .files import remove_orphans, temp_name


def _overlap(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are the same path or one lies inside the other."""
    return a == b or a in b.parents or b in a.parents


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def check_output_folder(out: str | os.PathLike, *, overwrite: bool = False, inputs=()) -> Path:
    """Checks ``out`` for a job that publishes a whole folder; returns it resolved (absolute, symlinks followed).

    Args:
        out: the output folder; it may not exist yet.
        overwrite: allow a non-empty ``out`` (replaced as a whole when the job succeeds).
        inputs: paths the job reads (video, frame folder, embeddings, model folder); ``None`` and hub ids that are
            no local path are ignored.
    Raises:
        DiTFlowError: ``out`` is a file or a mount point; it holds files and ``overwrite`` is off; replacing it would
            delete an input (with ``overwrite``, an input inside ``out`` or ``out`` inside an input folder).
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise DiTFlowError(f"--out {out} is a file; give a folder (it is created if missing).")
    if os.path.ismount(out):
        raise DiTFlowError(f"--out {out} is a mount point, which cannot be replaced by a rename; give a folder inside "
                           "it.")
    remove_orphans(out.parent, out.name)
    if out.is_dir():
        remove_orphans(out)  # .part files of writers killed inside it (older versions wrote file by file)
        held = _entries(out)
        if held and not overwrite:
            shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            raise DiTFlowError(f"--out {out} already holds {shown}; choose an empty or new folder, or add --overwrite "
                               "to replace its contents when this run succeeds.")
    for given in inputs:
        if given is None or not os.path.exists(given):
            continue
        path = Path(given).expanduser().resolve()
        if _overlap(path, out) and (overwrite or path == out):
            raise DiTFlowError(f"--out {out} overlaps the input {path}; replacing it would destroy the input, so "
                               "choose an --out outside it.")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swaps ``a`` and ``b`` atomically (Linux ``renameat2``); ``False`` where the system or file system can't."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def _signals_held():
    """Holds SIGINT and SIGTERM back (main thread only); they are delivered when the ``with`` ends."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _keep(staging: Path, out: Path) -> Path:
    """Moves a finished set that cannot go to ``out`` to a visible sibling ``<out>.new-<pid>`` (else leaves it)."""
    kept = out.with_name(f"{out.name}.new-{os.getpid()}")
    try:
        os.rename(staging, kept)
    except OSError:
        return staging
    return kept


def publish(staging: Path, out: Path, *, overwrite: bool) -> None:
    """Puts the complete folder ``staging`` at ``out`` in one step (see the module docstring).

    Raises:
        DiTFlowError: ``out`` was filled by another run meanwhile and ``overwrite`` is off, or the rename failed;
            ``out`` is then unchanged and the new set is kept beside it under a visible name given in the message.
    """
    old = None
    with _signals_held():
        try:
            if not out.exists():
                os.rename(staging, out)
                return
            if _entries(out) and not overwrite:
                raise DiTFlowError(f"another run filled --out {out} while this one worked; this run's results are in "
                                   f"{_keep(staging, out)}.")
            if _exchange(staging, out):
                old = staging  # it now holds the previous contents
            else:
                old = temp_name(out, "old")
                os.rename(out, old)
                try:
                    os.rename(staging, out)
                except OSError:
                    os.rename(old, out)
                    raise
        except OSError as err:
            raise DiTFlowError(f"could not put the results at {out} ({err.strerror or err}); it is unchanged and this "
                               f"run's results are in {_keep(staging, out)}.") from err
    shutil.rmtree(old, ignore_errors=True)


class OutputSet:
    """Context manager: checks ``out`` (:func:`check_output_folder`), yields a staging folder for the job's files and
    publishes it at ``out`` when the ``with`` succeeds; on any exception the staging folder is removed and ``out``
    stays as it was.

    Example::

        with OutputSet(args.out, overwrite=args.overwrite, inputs=[video]) as folder:
            write_video(folder / "result.mp4", frames, fps)
            write_json(folder / "run.json", record)
    """

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False, inputs=()):
        self.out = check_output_folder(out, overwrite=overwrite, inputs=inputs)
        self.overwrite = overwrite
        self.staging: Path | None = None

    def __enter__(self) -> Path:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            staging = temp_name(self.out)
            os.mkdir(staging)  # 0o777 less the umask, as any new folder
        except OSError as err:
            raise DiTFlowError(f"cannot write beside --out {self.out} ({err.strerror or err}); choose a folder you "
                               "can write to.") from None
        self.staging = staging
        return staging

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            publish(self.staging, self.out, overwrite=self.overwrite)  # on failure it keeps the set, visibly
        else:
            shutil.rmtree(self.staging, ignore_errors=True)
        if self.staging.exists():  # after an exchange it holds the replaced contents
            shutil.rmtree(self.staging, ignore_errors=True)


__all__ = ["OutputSet", "check_output_folder", "publish"]
