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


def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Bytes a new allocation can take on ``device`` (:func:`ditflow.memory.free_bytes`: free GPU memory, or the
    host's available memory), capped on the CPU by the process's address-space limit (``ulimit -v``) when one is
    set; ``None`` when the device does not say (then nothing is refused)."""
    from .memory import free_bytes

    device = torch.device(device)
    free = free_bytes(device)
    if device.type != "cpu":
        return free
    if free is None:  # not Linux: psutil (a ComfyUI dependency) knows
        try:
            import psutil
        except ImportError:  # pragma: no cover
            return None
        free = int(psutil.virtual_memory().available)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS) if resource is not None else (None, None)
    if soft is not None and soft != resource.RLIM_INFINITY:
        import psutil

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
        available: the budget, if the caller already holds part of :func:`available_bytes` (``None``: no check).
    """
    free = available_bytes(device) if available is None else available
    if free is not None and nbytes > free:
        raise DiTFlowError(
            f"{what} needs about {_gb(nbytes)} of memory, but only {_gb(free)} is available on {torch.device(device)}; "
            f"{fix}."
        )


def check_decode_fits(frames: int, height: int, width: int) -> None:
    """Refuses, before any work, a video of ``frames`` × ``height`` × ``width`` px whose decoded frames (float32, on
    the CPU) cannot fit in memory."""
    require(frames * 3 * height * width * FLOAT_BYTES, f"decoding {frames} frames of {width}×{height} px",
            "use a smaller size or fewer frames")


__all__ = ["FLOAT_BYTES", "available_bytes", "check_decode_fits", "require"]
