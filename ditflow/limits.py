# SPDX-License-Identifier: Apache-2.0
"""Memory estimates: a request whose buffers cannot fit is refused in one sentence before they are allocated.

Without this, a 16384×16384 size or a folder of 16000×16000 PNGs (2 MB each on disk, 768 MB each decoded) ends in
an allocator traceback, or in the operating system killing the process, after minutes of work. The estimates
count the large buffers only (decoded frames, resized copies); small ones are covered by a margin.
"""

from __future__ import annotations

import torch

try:  # POSIX only; Windows has no address-space limit to respect
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

from .errors import DiTFlowError

#: Bytes per float32 sample.
FLOAT_BYTES = 4


def available_bytes(device: str | torch.device = "cpu") -> int:
    """Bytes a new allocation can take on ``device``: free GPU memory, or the host's available memory (capped by the
    process's address-space limit, ``ulimit -v``, when one is set)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    free = int(psutil.virtual_memory().available)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS) if resource is not None else (None, None)
    if soft is not None and soft != resource.RLIM_INFINITY:
        free = min(free, max(0, soft - psutil.Process().memory_info().vms))
    return free


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GB"


def require(nbytes: int, what: str, fix: str, device: str | torch.device = "cpu", available: int | None = None) -> None:
    """Raises :class:`DiTFlowError` when ``nbytes`` exceed the memory available on ``device``.

    Args:
        nbytes: the estimate.
        what: the buffers, as a sentence subject ("decoding 49 frames of 16000×16000 px").
        fix: what to change ("use fewer or smaller frames").
        available: the budget, if the caller already holds part of :func:`available_bytes`.
    """
    free = available_bytes(device) if available is None else available
    if nbytes > free:
        raise DiTFlowError(
            f"{what} needs about {_gb(nbytes)} of memory, but only {_gb(free)} is available on {torch.device(device)}; "
            f"{fix}."
        )


__all__ = ["FLOAT_BYTES", "available_bytes", "require"]
