# SPDX-License-Identifier: Apache-2.0
"""The CogVideoX variants DiTFlow runs on, told apart by their ``transformer/config.json`` alone.

Facts per variant, each checked against the published configs and diffusers 0.42's pipelines
(``pipelines/cogvideo/pipeline_cogvideox.py`` and ``pipeline_cogvideox_image2video.py``):

=========  ===============================  =========  =====================================  ==========================
key        hub id                           positions  conditioning                           native size, fps
=========  ===============================  =========  =====================================  ==========================
2b         THUDM/CogVideoX-2b               sin-cos    text                                   49 × 480×720, 8
5b         THUDM/CogVideoX-5b               RoPE       text                                   49 × 480×720, 8
5b-i2v     THUDM/CogVideoX-5b-I2V           RoPE +     text, image latent on channels         49 × 480×720 (fixed), 8
                                            learned
1.5        THUDM/CogVideoX1.5-5B            RoPE       text; temporal patch 2                 81 × 768×1360, 16
1.5-i2v    THUDM/CogVideoX1.5-5B-I2V        RoPE       text, image latent, ofs; patch 2       81 × 768×1360, 16
=========  ===============================  =========  =====================================  ==========================

Guidance blocks: the paper gives 15 for 2B and 20 for 5B (§5.1); the other variants have 5B's 42 blocks and take
20 too, **not validated on real weights**. CFG: 6 everywhere, static on 2B and ramped ("dynamic") on the others,
as the models' cards and the CogVideo repository's ``cli_demo.py`` run them; that demo also pairs 2B with
``CogVideoXDDIMScheduler`` and the 5B models with ``CogVideoXDPMScheduler``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import DiTFlowError
from ..base import Defaults, PositionKind

#: Where a default guidance block comes from (:attr:`~ditflow.backbones.base.Defaults.guidance_block_source`).
PAPER = "the paper (§5.1)"
CARRIED_OVER = "carried over from CogVideoX-5b (same 42 blocks); not validated on real weights"


@dataclass(frozen=True)
class Variant:
    """One CogVideoX variant.

    Attributes:
        key: stable key (embeddings files, the tiny-model builder's ``--variant``).
        name: display name; hub_id: the Hugging Face repository of its weights.
        defaults: its :class:`~ditflow.backbones.base.Defaults`.
        scheduler: ``"ddim"`` (``CogVideoXDDIMScheduler``) or ``"dpm"`` (``CogVideoXDPMScheduler``).
        image_to_video: the image latent is concatenated to the noisy latent on channels.
        patch_size_t: latent frames per token (2 on CogVideoX 1.5), ``None`` for one.
    """

    key: str
    name: str
    hub_id: str
    defaults: Defaults
    scheduler: str
    image_to_video: bool
    patch_size_t: int | None = None

    @property
    def layout_config(self) -> dict:
        """The ``transformer/config.json`` keys :mod:`.layout` reads for sizes alone (no weights needed)."""
        return {"patch_size": 2, "patch_size_t": self.patch_size_t}


_V10 = Defaults(guidance_block=20, guidance_block_source=PAPER, cfg=6.0, dynamic_cfg=True, frames=49, height=480,
                width=720, fps=8.0)
_V15 = Defaults(guidance_block=20, guidance_block_source=CARRIED_OVER, cfg=6.0, dynamic_cfg=True, frames=81,
                height=768, width=1360, fps=16.0)

#: Every supported variant by key.
VARIANTS: dict[str, Variant] = {v.key: v for v in (
    Variant("2b", "CogVideoX-2b", "THUDM/CogVideoX-2b",
            Defaults(15, PAPER, 6.0, False, 49, 480, 720, 8.0), "ddim", False),
    Variant("5b", "CogVideoX-5b", "THUDM/CogVideoX-5b", _V10, "dpm", False),
    Variant("5b-i2v", "CogVideoX-5b-I2V", "THUDM/CogVideoX-5b-I2V",
            Defaults(20, CARRIED_OVER, 6.0, True, 49, 480, 720, 8.0), "dpm", True),
    Variant("1.5", "CogVideoX1.5-5B", "THUDM/CogVideoX1.5-5B", _V15, "dpm", False, 2),
    Variant("1.5-i2v", "CogVideoX1.5-5B-I2V", "THUDM/CogVideoX1.5-5B-I2V", _V15, "dpm", True, 2),
)}


def position_kinds(config: dict) -> frozenset[PositionKind]:
    """The positions a CogVideoX transformer config uses: RoPE or sin-cos, plus the learned table if any."""
    kinds = {PositionKind.ROPE if config.get("use_rotary_positional_embeddings", False) else PositionKind.SINCOS}
    if config.get("use_learned_positional_embeddings", False):
        kinds.add(PositionKind.LEARNED)
    return frozenset(kinds)


def detect_variant(config: dict) -> Variant:
    """The variant of a CogVideoX ``transformer/config.json`` (missing keys take diffusers' defaults).

    Image-to-video is ``in_channels`` = 2 × ``out_channels`` (noise ‖ image latent); CogVideoX 1.5 has
    ``patch_size_t`` = 2; 2b is the only one without RoPE.

    Raises:
        DiTFlowError: "… is not supported", naming what was detected, for another transformer class, a patch size or
            temporal compression other than 2 / 4, or a combination no released CogVideoX has.
    """
    cls = config.get("_class_name", "CogVideoXTransformer3DModel")
    if cls != "CogVideoXTransformer3DModel":
        raise DiTFlowError(f"a {cls} transformer is not supported; DiTFlow runs the CogVideoX models "
                           f"({', '.join(v.name for v in VARIANTS.values())}).")
    patch, patch_t = config.get("patch_size", 2), config.get("patch_size_t")
    compression = config.get("temporal_compression_ratio", 4)
    if patch != 2 or patch_t not in (None, 2) or compression != 4:
        raise DiTFlowError(
            f"a CogVideoX with patch_size={patch}, patch_size_t={patch_t} and temporal_compression_ratio={compression} "
            "is not supported; the released models use 2, none (1.0) or 2 (1.5), and 4."
        )
    in_ch = config.get("in_channels", 16)
    out_ch = config.get("out_channels") or in_ch
    i2v = in_ch == 2 * out_ch
    rope = bool(config.get("use_rotary_positional_embeddings", False))
    learned = bool(config.get("use_learned_positional_embeddings", False))
    ofs = bool(config.get("ofs_embed_dim"))
    key = {(False, None, False): "2b", (False, None, True): "5b", (True, None, True): "5b-i2v",
           (False, 2, True): "1.5", (True, 2, True): "1.5-i2v"}.get((i2v, patch_t, rope))
    if key is None or (in_ch != out_ch and not i2v) or (learned and key != "5b-i2v") or (ofs and key != "1.5-i2v"):
        raise DiTFlowError(
            f"a CogVideoX with in_channels={in_ch}, out_channels={out_ch}, patch_size_t={patch_t}, RoPE={rope}, "
            f"learned positional embeddings={learned} and ofs_embed_dim={config.get('ofs_embed_dim')} is not "
            f"supported: no released CogVideoX has that combination ({', '.join(VARIANTS)} are)."
        )
    return VARIANTS[key]
