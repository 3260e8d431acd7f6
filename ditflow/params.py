# SPDX-License-Identifier: Apache-2.0
"""What guidance optimises, per mode (DiTFlow §4.3): a registry instead of if-chains over modes and models.

- ``latent`` (DiTFlow-z_t): the noisy latent z_t itself, a fresh fp32 copy per guided step.
- ``rope`` (DiTFlow-ρ_t on RoPE models): trainable RoPE cos/sin tables with **separate copies for Q and K**,
  shared by all blocks and heads, video tokens only, ``[2 (q, k), 2 (cos, sin), n, head_dim]``; warm-started from
  the previous guided step; after the guided window the stock tables are used again.
- ``posemb`` (DiTFlow-ρ_t on sin-cos models): the video slice of the additive table, ``[n, inner_dim]``, warm-started.

A mode needs its :class:`~ditflow.backbones.base.PositionKind` in the model's ``position_kinds``
(:func:`check_mode`), so whether a mode fits a model is a capability, never a model name. The backbone gives the
stock tables (:meth:`~ditflow.backbones.base.Backbone.stock_positions`) and applies the controller's ``rope`` /
``table`` overrides in its passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .attention import AttentionController
from .backbones.base import PositionKind
from .config import Mode
from .errors import DiTFlowError


def stack_rope(stock: Tensor) -> Tensor:
    """Trainable layout ``[2 (q, k), 2 (cos, sin), n, head_dim]`` from the stock ``[2 (cos, sin), n, head_dim]``, fp32."""
    pair = stock.float()
    return torch.stack([pair, pair.clone()])


def unstack_rope(tables: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``[2, 2, n, d]`` → ((cos_q, sin_q), (cos_k, sin_k)), the controller's ``rope`` field."""
    return (tables[0, 0], tables[0, 1]), (tables[1, 0], tables[1, 1])


@dataclass(frozen=True)
class Param:
    """One mode's optimised tensor.

    Attributes:
        mode: the :class:`~ditflow.config.Mode`.
        kind: the positions it optimises, ``None`` for the latent itself.
        what: its name in messages ("latents", "RoPE tables", ...).
    """

    mode: Mode
    kind: PositionKind | None
    what: str

    def initial(self, stock: Tensor) -> Tensor:
        """The trainable tensor before the first guided step, fp32, from the backbone's stock table of :attr:`kind`."""
        return stack_rope(stock) if self.kind is PositionKind.ROPE else stock.float().clone()

    def begin(self, latents: Tensor, carried: Tensor | None) -> Tensor:
        """The fp32 tensor a guided step optimises: a fresh copy of z_t, or the positions carried from the last step."""
        if self.kind is None:
            return latents.detach().float().clone()
        return carried.detach().clone()

    def apply(self, controller: AttentionController, value: Tensor, latents: Tensor) -> Tensor:
        """Puts ``value`` in place for the next pass and returns the latents that pass takes (``value`` itself, in
        the latents' dtype, in mode latent)."""
        if self.kind is None:
            return value.to(latents.dtype)
        if self.kind is PositionKind.ROPE:
            controller.rope = unstack_rope(value)
        else:
            controller.table = value
        return latents

    def end(self, value: Tensor, latents: Tensor, carried: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(latents, carried positions) after a guided step optimised ``value``."""
        if self.kind is None:
            return value.detach().to(latents.dtype), carried
        return latents, value.detach()


#: The optimisable modes; :attr:`Mode.NONE` optimises nothing and has no entry.
PARAMS: dict[Mode, Param] = {p.mode: p for p in (
    Param(Mode.LATENT, None, "latents"),
    Param(Mode.ROPE, PositionKind.ROPE, "RoPE tables"),
    Param(Mode.POSEMB, PositionKind.SINCOS, "sin-cos table"),
)}


def param_for(mode: Mode | str) -> Param:
    """The :class:`Param` of an optimising mode; raises :class:`DiTFlowError` for ``none`` or an unknown mode."""
    mode = Mode.parse(mode)
    if mode not in PARAMS:
        raise DiTFlowError(f"mode '{mode.value}' optimises nothing; choose one of {', '.join(m.value for m in PARAMS)}.")
    return PARAMS[mode]


def modes_for(model) -> list[Mode]:
    """The optimising modes ``model`` can run (its position kinds decide)."""
    return [m for m, p in PARAMS.items() if p.kind is None or p.kind in model.position_kinds]


def check_mode(mode: Mode | str, model) -> None:
    """Raises :class:`DiTFlowError` if ``model`` lacks the positions ``mode`` optimises, naming the modes it can run."""
    mode = Mode.parse(mode)
    if mode is Mode.NONE or mode in modes_for(model):
        return
    has = " and ".join(sorted(k.value for k in model.position_kinds))
    raise DiTFlowError(
        f"mode '{mode.value}' optimises {PARAMS[mode].what}, but {model.name} has {has} positions; use mode "
        f"{' or '.join(m.value for m in modes_for(model))}."
    )
