# SPDX-License-Identifier: Apache-2.0
"""The one exception type users see, and the check that stops a run before it turns into garbage.

Every check on user input (files, sizes, frame counts, blocks, embeddings) raises :class:`DiTFlowError` with a
single sentence that says what was wrong and what to do. The CLI prints it without a traceback and the ComfyUI
nodes let it reach the UI as is. It subclasses ``ValueError`` so callers that catch that keep working.

Notices (work that goes ahead but the user should know of) are warnings on the ``ditflow`` logger, see below.
"""

from __future__ import annotations

import contextvars
import functools
import logging

#: Largest magnitude a healthy run's latents, positional tables and decoded frames reach. Scaled CogVideoX latents
#: and the noisy z_t have unit variance, RoPE cos/sin and the sin-cos table lie in [-1, 1]; anything this large is a
#: blow-up on its way to Inf (fp16 overflows at 65504), and an all-black video if decoded.
HEALTHY_MAGNITUDE = 1e4


class DiTFlowError(ValueError):
    """Bad input or an unsupported model, explained in one sentence."""


def quote(exc: BaseException) -> str:
    """``"TypeName: first line of the message"`` (160 characters at most): a library's complaint, for quoting
    inside one of our sentences."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__


def check_finite(values, what: str, fix: str, *, limit: float | None = HEALTHY_MAGNITUDE) -> None:
    """Raises :class:`DiTFlowError` "<what> went non-finite (...); <fix>." if ``values`` holds NaN or ±Inf, or exceeds
    ``limit`` in magnitude (``None``: no limit).

    Args:
        values: a tensor (any shape, any float dtype) or a float.
        what: where it went wrong, e.g. "the latents after denoising step 3 of 50".
        fix: what to change, e.g. "lower the CFG scale".
    """
    import torch

    t = torch.as_tensor(values).detach()
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        nan = int(torch.isnan(t).sum())
        raise DiTFlowError(f"{what} went non-finite ({nan} NaN and {t.numel() - nan - int(finite.sum())} ±Inf of "
                           f"{t.numel()} values); {fix}.")
    if limit is not None and t.numel() and float(t.abs().max()) > limit:
        raise DiTFlowError(f"{what} blew up (|value| up to {float(t.abs().max()):.3g}, a healthy run stays below "
                           f"{limit:g}); {fix}.")


# ---------------------------------------------------------------------------------------------------------------
# Notices: what is done anyway but the user should know (a prompt cut to 226 tokens, corrupt frames) goes to the
# ``ditflow`` logger as a warning; the CLI prints them as "warning: ..." and jobs copy them into run.json.
# ---------------------------------------------------------------------------------------------------------------

_collected: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("ditflow_warnings", default=None)


class _Collector(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        found = _collected.get()
        if found is not None:
            found.append(record.getMessage())


def collecting_warnings(job):
    """Decorator: while ``job`` runs, warnings on the ``ditflow`` logger are also kept (:func:`collected_warnings`)."""

    @functools.wraps(job)
    def run(*args, **kwargs):
        logger, handler = logging.getLogger("ditflow"), _Collector(logging.WARNING)
        token = _collected.set([])
        logger.addHandler(handler)
        try:
            return job(*args, **kwargs)
        finally:
            logger.removeHandler(handler)
            _collected.reset(token)

    return run


def collected_warnings() -> list[str]:
    """The warnings logged so far inside the innermost :func:`collecting_warnings` job (empty outside one)."""
    return list(_collected.get() or [])
