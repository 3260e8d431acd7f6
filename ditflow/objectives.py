# SPDX-License-Identifier: Apache-2.0
"""What guidance compares, per loss: a registry instead of if-chains (DiTFlow §4.2 Eq. 8, and the baselines of §5).

Each :class:`Objective` says what a pass must record at the guidance blocks (attention Q/K with an early exit, or
block outputs run in full), what the reference pass keeps from it (the hard AMF, or block-output features), and the
loss of an optimisation pass against that target, averaged over the guidance blocks:

- ``amf`` (DiTFlow): Q/K after QK-norm and positions; reference = AMF (argmax, or soft-argmax with ``soft``), loss =
  Eq. 8 between it and the soft AMF (:mod:`ditflow.amf`).
- ``moft`` / ``smm`` (baselines ported to the DiT, :mod:`ditflow.losses`): block-output video features
  ``[F, C, h, w]``; MOFT picks its motion channels from the reference once per run.

An unknown loss raises (:func:`objective_for`); nothing falls through to a default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .amf import amf_loss, attention_motion_flow
from .attention import AttentionController
from .config import Loss
from .errors import DiTFlowError, check_finite
from .losses import moft_channels, moft_loss, smm_loss, video_features


def _amf(generated: Tensor, reference: Tensor, _extra, config) -> Tensor:
    return amf_loss(reference, generated, masked=config.masked_loss)


def _moft(generated: Tensor, reference: Tensor, channels: Tensor, _config) -> Tensor:
    return moft_loss(generated, reference, channels)


def _smm(generated: Tensor, reference: Tensor, _extra, _config) -> Tensor:
    return smm_loss(generated, reference)


@dataclass(frozen=True)
class Objective:
    """One guidance loss.

    Attributes:
        loss: the :class:`~ditflow.config.Loss`.
        field: the :class:`~ditflow.reference.ReferenceMotion` field holding its targets: ``amf`` (read from
            attention Q/K, early exit) or ``features`` (block outputs, the blocks run in full).
        compare: ``(generated, reference, extra, config) → loss`` for one block.
        precompute: what ``compare`` needs from a reference target, computed once per run (``extra``), or ``None``.
    """

    loss: Loss
    field: str
    compare: Callable[[Tensor, Tensor, Any, Any], Tensor]
    precompute: Callable[[Tensor], Any] | None = None

    @property
    def reads_outputs(self) -> bool:
        """Whether the guidance blocks run in full and their outputs are read (else: early exit after Q/K)."""
        return self.field == "features"

    def watch(self, controller: AttentionController, blocks, **fields) -> None:
        """Resets ``controller`` for a pass that records what this loss reads at ``blocks`` (plus ``fields``)."""
        blocks = frozenset(blocks)
        if self.reads_outputs:
            controller.reset(capture_outputs=blocks, **fields)
        else:
            controller.reset(capture_blocks=blocks, stop_block=max(blocks), **fields)

    def _read(self, controller: AttentionController, grid, temperature: float, hard: bool) -> dict[int, Tensor]:
        """Block → this pass's AMF (hard or soft) or block-output features."""
        if self.reads_outputs:
            return {b: video_features(hidden, grid) for b, hidden in controller.outputs.items()}
        return {b: attention_motion_flow(q[0], k[0], grid, temperature=temperature, hard=hard)
                for b, (q, k) in controller.captured.items()}

    def record(self, controller: AttentionController, grid, *, temperature: float, soft: bool, fix: str
               ) -> dict[int, Tensor]:
        """The reference's targets from a pass made under :meth:`watch`: block → AMF ``[F², S, 2]`` or features
        ``[F, C, h, w]``, float32 on the CPU. Raises :class:`DiTFlowError` naming the block if the pass went
        non-finite (``fix`` says what to do)."""
        for b, hidden in controller.outputs.items():
            check_finite(hidden, f"the reference pass's output of block {b}", fix, limit=None)
        for b, (q, k) in controller.captured.items():
            for name, values in (("queries", q), ("keys", k)):
                check_finite(values, f"the reference pass's attention {name} at block {b}", fix, limit=None)
        return {b: t.float().cpu() for b, t in self._read(controller, grid, temperature, not soft).items()}

    def prepare(self, targets: dict[int, Tensor], device) -> dict[int, tuple[Tensor, Any]]:
        """Per block, the target on ``device`` (fp32) and :attr:`precompute` of it (``None`` without one)."""
        prepared = {}
        for b, target in targets.items():
            target = target.to(device).float().clone()
            prepared[b] = (target, self.precompute(target) if self.precompute else None)
        return prepared

    def __call__(self, controller: AttentionController, prepared, grid, config) -> Tensor:
        """The loss of the pass just made under :meth:`watch`, averaged over the guidance blocks (fp32 scalar);
        ``config`` is the run's :class:`~ditflow.config.GuidanceConfig` (τ, masking)."""
        generated = self._read(controller, grid, config.temperature, hard=False)
        losses = [self.compare(generated[b], *prepared[b], config) for b in sorted(generated)]
        return torch.stack(losses).mean()


#: Every guidance loss.
OBJECTIVES: dict[Loss, Objective] = {o.loss: o for o in (
    Objective(Loss.AMF, "amf", _amf),
    Objective(Loss.MOFT, "features", _moft, moft_channels),
    Objective(Loss.SMM, "features", _smm),
)}


def objective_for(loss: Loss | str) -> Objective:
    """The :class:`Objective` of ``loss``; raises :class:`DiTFlowError` naming the losses for anything else."""
    try:
        return OBJECTIVES[Loss.parse(loss)]
    except KeyError:
        raise DiTFlowError(f"no objective for loss {loss!r}; choose one of {', '.join(l.value for l in OBJECTIVES)}."
                           ) from None
