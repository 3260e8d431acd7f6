# SPDX-License-Identifier: Apache-2.0
"""What one transformer pass records, injects and where it stops: Q/K capture and KV injection (DiTFlow §4.1 and the
"Injection" baseline, §5), apart from where it is hooked (prompt-to-prompt's split).

One :class:`AttentionController` holds the state of a pass; each backbone installs its own processors that consult
it (:meth:`~ditflow.backbones.base.Backbone.attention`, e.g. :mod:`ditflow.backbones.cogvideox.attention`) and
restores the stock model in ``finally``, also when sampling fails or is cancelled.

State lives on the controller, not in ``attention_kwargs``: extra keys there make every diffusers block log a
warning on every call (method.md §1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import Tensor

# ---------------------------------------------------------------------------------------------------------------------
# Controller: what one pass records, injects and where it stops
# ---------------------------------------------------------------------------------------------------------------------


class StopForward(Exception):
    """Raised by the processor after the Q/K of :attr:`AttentionController.stop_block`; caught by the caller."""


RopeTables = tuple[Tensor, Tensor]  # (cos, sin), each [n_video, head_dim]


@dataclass
class AttentionController:
    """State shared by every DiTFlow processor during one forward pass.

    Attributes:
        capture_blocks: blocks whose video Q and K are recorded into :attr:`captured` (post QK-norm, post RoPE).
        captured: block → (q, k), each ``[B, heads, n_video, head_dim]``, graph kept (for the AMF loss).
        record_kv_blocks: blocks whose video K and V are recorded, detached, into :attr:`recorded_kv`.
        recorded_kv: block → (k, v), each ``[B, heads, n_video, head_dim]`` (post RoPE for K).
        inject_kv: block → (k, v) that **replace** the video K and V (text K/V and all queries stay); batch 1
            broadcasts over the pass's batch (cond and uncond).
        rope: separate (cos, sin) tables for video Q and for video K, overriding the model's shared RoPE
            (DiTFlow-ρ_t on RoPE models); ``None`` uses the run's stock tables.
        table: an additive sin-cos table ``[n, inner_dim]`` that replaces the stock one (DiTFlow-ρ_t on sin-cos
            models); ``None`` uses the stock table of the pass's grid.
        stop_block: raise :class:`StopForward` right after this block's Q/K (and K/V) are recorded; nothing after
            it runs.
        capture_outputs: blocks whose video output hidden states are recorded into :attr:`outputs` by
            the backbone's ``forward_until`` (the block runs in full; MOFT/SMM losses).
        outputs: block → video output hidden states ``[B, n_video, D]``, graph kept.
    """

    capture_blocks: frozenset[int] = frozenset()
    captured: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    record_kv_blocks: frozenset[int] = frozenset()
    recorded_kv: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    inject_kv: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    rope: tuple[RopeTables, RopeTables] | None = None
    table: Tensor | None = None
    stop_block: int | None = None
    capture_outputs: frozenset[int] = frozenset()
    outputs: dict[int, Tensor] = field(default_factory=dict)

    def reset(self, **fields) -> None:
        """Clears all state, then sets ``fields``; one controller serves every pass of a sampling run."""
        for f in dataclasses.fields(self):
            value = fields.pop(f.name, None)
            if value is None:
                value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(self, f.name, value)
        if fields:
            raise TypeError(f"unknown controller fields: {sorted(fields)}")
