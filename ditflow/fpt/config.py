# SPDX-License-Identifier: Apache-2.0
"""Sizes of a Flow Poke Transformer and of its DINOv2 image encoder (FPT §3.2; the released base model).

The defaults are those of the released open-set base model (``flow_poke_open_set_base.pt``: width 768, 12 blocks,
DINOv2-B/14 with 4 registers at 448 px). Everything but ``EncoderConfig.image_size`` and the encoder's head count
can be read off a checkpoint's tensor shapes; :func:`ditflow.fpt.checkpoint.infer_config` does so.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderConfig:
    """DINOv2 ViT with registers (Oquab et al. 2024; Darcet et al. 2024), FPT's image encoder."""

    hidden_size: int = 768
    layers: int = 12
    heads: int = 12  #: DINOv2's heads are 64 wide in every size; not in the weights' shapes
    registers: int = 4
    patch_size: int = 14
    #: side of the learned position-embedding grid (518 px / 14 = 37); resampled to the input's patch grid
    position_grid: int = 37
    #: images are resized to this square before encoding: 448 / 14 = 32×32 feature cells (not in the weights)
    image_size: int = 448

    @property
    def feature_grid(self) -> int:
        """Feature cells per side: ``image_size // patch_size``."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class FPTConfig:
    """The transformer around the encoder: widths, depths and the size of the mixture head."""

    width: int = 768
    depth: int = 12
    head_dim: int = 64
    ff_expand: int = 3  #: SwiGLU hidden width = ff_expand · width
    input_mlp_depth: int = 2
    output_mlp_depth: int = 2
    components: int = 4  #: Gaussians per predicted 2-D flow distribution
    #: flows are squashed by tanh(flow_prescale · flow) before their Fourier embedding (range ±1/flow_prescale)
    flow_prescale: float = 0.5
    encoder: EncoderConfig = EncoderConfig()

    @property
    def heads(self) -> int:
        return self.width // self.head_dim

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FPTConfig:
        data = json.loads(text)
        return cls(**{**data, "encoder": EncoderConfig(**data["encoder"])})


__all__ = ["EncoderConfig", "FPTConfig"]
