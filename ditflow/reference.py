# SPDX-License-Identifier: Apache-2.0
"""The reference video's side of DiTFlow: the reference AMF (§4.1–4.2, Alg. 1 line 1), through the backbone
interface (VAE encoding is the backbone's: ``model.encode_video``).

For the baselines' losses (MOFT/SMM, :mod:`ditflow.losses`) the same reference pass records the guidance blocks'
output features instead of Q/K; only what the chosen loss reads is computed.

Differs from the authors' script (method.md §6): the reference is encoded deterministically (posterior mean, or
a seeded sample), the AMF grid is the run's own (no hard-coded 6×30×45), and the AMF pass is skipped entirely
when no guidance needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .attention import AttentionController
from .config import Loss, check_blocks
from .errors import DiTFlowError
from .objectives import objective_for
from .text import encode_prompt

# ---------------------------------------------------------------------------------------------------------------------
# Reference AMF
# ---------------------------------------------------------------------------------------------------------------------

_MODEL_FIX = ("the transformer turns finite inputs into NaN/Inf: its weights are damaged (re-download or re-convert "
              "transformer/) or its dtype overflows (with fp16 try bf16 or fp32)")


@dataclass
class ReferenceMotion:
    """What guidance needs from the reference video.

    Attributes:
        amf: guidance block → hard reference AMF ``[F², S, 2]``, (dx, dy) in patch-grid units; pair ``i·F + j``.
        grid: token grid (F, h, w) of the reference latents (token frames).
        temperature: τ used for the reference (the generated AMF uses the same).
        latents: the scaled reference latents ``[1, F, C, H, W]``, kept for KV injection (noised per step);
            ``None`` for a target made without a video (:mod:`ditflow.motion_target`): no KV injection then.
        features: guidance block → block-output video features ``[F, C, h, w]`` (float32, CPU), for the MOFT/SMM
            losses; empty when the reference was extracted for AMF.
        soft: the AMF is the soft-argmax one (Eq. 7) rather than the argmax one (the authors' ablation switch).
    """

    amf: dict[int, Tensor]
    grid: tuple[int, int, int]
    temperature: float
    latents: Tensor | None
    features: dict[int, Tensor] = field(default_factory=dict)
    soft: bool = False

    @property
    def blocks(self) -> tuple[int, ...]:
        """Blocks the reference was extracted at (its AMF's, else its features')."""
        return tuple(sorted(self.amf or self.features))

    def has(self, loss: Loss | str) -> bool:
        """Whether this reference holds what ``loss`` compares against (AMF, or block-output features)."""
        return bool(self.features if Loss.parse(loss).uses_features else self.amf)


def reference_without_amf(model, latents: Tensor) -> ReferenceMotion:
    """A reference that serves KV injection only (modes ``none``): no AMF pass is run for it."""
    return ReferenceMotion(amf={}, grid=latent_grid(model, latents), temperature=0.0, latents=latents.detach().cpu())


def latent_grid(model, latents: Tensor) -> tuple[int, int, int]:
    """(F, h, w) token grid of scaled video latents ``[B, F, C, H, W]`` on ``model`` (token frames: on CogVideoX 1.5
    a token spans two latent frames); raises :class:`DiTFlowError` for latents the model cannot take."""
    return model.geometry_of_latents(latents).token_grid


@torch.no_grad()
def extract_reference(
    model, latents: Tensor, blocks, *, temperature: float = 2.0, loss: Loss | str = Loss.AMF,
    empty_prompt: Tensor | None = None, soft: bool = False,
) -> ReferenceMotion:
    """Reference motion at ``blocks``: one pass at timestep 0 with the empty prompt, no CFG (§4.2).

    For ``loss="amf"`` the pass stops after the deepest block's Q/K and keeps the hard AMF; for ``"moft"`` /
    ``"smm"`` it stops after the deepest block's output and keeps the block-output features
    (:mod:`ditflow.objectives`). Nothing else is run. On a backbone that pads latent frames the latents are padded as
    its pipeline pads them; on an image-to-video backbone the pass is conditioned on the reference's own first frame.

    Args:
        model: a loaded backbone (:class:`~ditflow.backbones.base.Backbone`).
        latents: scaled reference latents ``[1, F, C, H, W]`` from the model's ``encode_video``.
        blocks: guidance block indices (see :class:`~ditflow.config.GuidanceConfig`).
        temperature: τ (Eq. 3); recorded but unused by the feature losses.
        loss: the guidance loss the reference is for (:class:`~ditflow.config.Loss`).
        empty_prompt: T5 embedding of the empty prompt ``[1, L, D_text]``; encoded here (text encoder needed)
            when not given.
        soft: soft-argmax reference AMF (Eq. 7) instead of the paper's argmax
            (:attr:`~ditflow.config.GuidanceConfig.soft_reference`).
    Raises:
        DiTFlowError: a block out of range, latents of the wrong shape, or NaN/Inf in the pass (damaged weights).
    """
    objective = objective_for(loss)
    blocks = check_blocks(blocks, model.num_blocks)
    if not blocks:
        raise DiTFlowError("at least one guidance block is needed to extract the reference motion.")
    geometry = model.geometry_of_latents(latents)
    transformer = model.transformer
    device, dtype = transformer.device, transformer.dtype
    if empty_prompt is None:
        empty_prompt = encode_prompt(model, "").cond
    empty = empty_prompt.to(device, dtype)
    with torch.inference_mode(False):
        z = latents.to(device, dtype).clone()
        inputs = model.run_inputs(geometry, device, reference=z)
        controller = AttentionController()
        objective.watch(controller, blocks)
        t0 = torch.zeros(1, device=device, dtype=torch.long)
        with model.attention(controller):
            model.forward_until(controller, model.pad_latents(z, geometry), empty, t0, inputs)
        targets = objective.record(controller, geometry.token_grid, temperature=temperature, soft=soft, fix=_MODEL_FIX)
    held = {objective.field: targets}
    return ReferenceMotion(amf=held.get("amf", {}), grid=geometry.token_grid, temperature=temperature,
                           latents=latents.detach().cpu(), features=held.get("features", {}),
                           soft=soft and "amf" in held)
