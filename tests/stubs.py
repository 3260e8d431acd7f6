# SPDX-License-Identifier: Apache-2.0
"""Weightless stand-ins for a loaded backbone, for tests of what only reads its identity, defaults and positions."""

from __future__ import annotations

from types import SimpleNamespace

from ditflow.backbones.base import PositionKind
from ditflow.backbones.cogvideox.variants import VARIANTS

#: The positions of each released CogVideoX (its transformer config's flags).
_KINDS = {"2b": {PositionKind.SINCOS}, "5b-i2v": {PositionKind.ROPE, PositionKind.LEARNED}}


def variant_model(key: str, num_blocks: int = 42, **fields) -> SimpleNamespace:
    """What ``GuidanceConfig.resolved`` and the mode checks read of a loaded CogVideoX of variant ``key``."""
    v = VARIANTS[key]
    return SimpleNamespace(variant=key, name=v.name, num_blocks=num_blocks, defaults=v.defaults,
                           position_kinds=frozenset(_KINDS.get(key, {PositionKind.ROPE})), needs_image=v.image_to_video,
                           **fields)
