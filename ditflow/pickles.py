# SPDX-License-Identifier: Apache-2.0
"""The only pickles DiTFlow reads, and the torch that reads them safely.

Everything else is safetensors. Two upstream checkpoints exist only as pickles: CoTracker3's ``scaled_offline.pth``
(the Motion Fidelity tracker, :mod:`ditflow.tracking`) and the Flow Poke Transformer's ``.pt`` (converted once to
safetensors, :mod:`ditflow.fpt.checkpoint`). Both are read with ``torch.load(weights_only=True)``, PyTorch's
restricted unpickler, which CVE-2025-32434 showed to run code from a crafted file up to torch 2.5.1; so both refuse
an older torch.
"""

from __future__ import annotations

import re

import torch

from .errors import DiTFlowError

#: Oldest torch whose ``torch.load(weights_only=True)`` is safe on a hostile file (CVE-2025-32434: ≤ 2.5.1 is not).
MIN_TORCH = (2, 6)


def unsafe_torch(what: str, alternative: str) -> str | None:
    """The sentence refusing to read ``what`` with this torch, or ``None`` when this torch is ≥ :data:`MIN_TORCH`."""
    major, minor = (int(p) for p in re.findall(r"\d+", torch.__version__)[:2])
    if (major, minor) >= MIN_TORCH:
        return None
    return (
        f"{what} is a pickle, and torch {torch.__version__} cannot read one safely (CVE-2025-32434 runs code from a "
        f"crafted file even with weights_only=True up to torch 2.5.1); upgrade to torch ≥ "
        f"{'.'.join(map(str, MIN_TORCH))} or {alternative}."
    )


def require_safe_torch(what: str, alternative: str) -> None:
    """Raises :class:`DiTFlowError` with :func:`unsafe_torch`'s sentence when this torch cannot read ``what``."""
    if (message := unsafe_torch(what, alternative)) is not None:
        raise DiTFlowError(message)


__all__ = ["MIN_TORCH", "require_safe_torch", "unsafe_torch"]
