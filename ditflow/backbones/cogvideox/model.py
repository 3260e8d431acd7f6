# SPDX-License-Identifier: Apache-2.0
"""The loaded CogVideoX: its networks plus the :class:`~ditflow.backbones.base.Backbone` methods DiTFlow calls.

The networks stay stock diffusers / transformers modules; everything model-specific the method needs is a method
here, delegating to this package's modules: :mod:`.layout` (sizes, 1.5 padding), :mod:`.positions`,
:mod:`.attention` (the processor), :mod:`.forward` (passes, conditioning), :mod:`.vae`, :mod:`.schedule`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...attention import AttentionController
from ...errors import DiTFlowError
from ..base import Defaults, Geometry, PositionKind
from . import layout, vae
from .attention import controlled_attention
from .forward import CogVideoXInputs, forward_until, predict
from .positions import owned_sincos, rope_tables, sincos_table
from .schedule import Schedule, build_scheduler, dynamic_cfg_scale
from .variants import Variant, position_kinds

#: 1.5-I2V's offset embedding input, as its pipeline passes it (``latents.new_full((1,), fill_value=2.0)``).
OFS = 2.0


@dataclass(eq=False)
class CogVideoX:
    """The loaded components of one CogVideoX checkpoint, on the device and in the dtype they were loaded with.

    Components not asked for are ``None``. The shape properties read the transformer config, so they work even
    when the transformer itself was not loaded.

    Attributes:
        transformer: ``diffusers.CogVideoXTransformer3DModel`` in eval mode, ``requires_grad`` off.
        vae: ``diffusers.AutoencoderKLCogVideoX`` in eval mode.
        text_encoder: ``transformers.T5EncoderModel`` in eval mode.
        tokenizer: the T5 tokenizer of the checkpoint.
        scheduler_config: the checkpoint's ``scheduler/scheduler_config.json``; see :meth:`make_scheduler`.
        spec: the :class:`~.variants.Variant` (from :func:`~.variants.detect_variant`).
        dtype: the dtype the models were loaded in.
        path: the folder or hub id they came from.
        transformer_config: ``transformer/config.json``.
        vae_config: ``vae/config.json``, or ``None`` when it was neither loaded nor found.
        compute_device: with ``offload``, the device :meth:`on_device` moves components to; else ``None``.
    """

    transformer: Any = field(repr=False)
    vae: Any = field(repr=False)
    text_encoder: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    scheduler_config: dict = field(repr=False)
    spec: Variant
    dtype: torch.dtype
    path: str
    transformer_config: dict = field(default_factory=dict, repr=False)
    vae_config: dict | None = field(default=None, repr=False)
    compute_device: str | None = None

    # -- identity and shape ------------------------------------------------------------------------------------

    @property
    def variant(self) -> str:
        """The variant's key (``2b``, ``5b``, ``5b-i2v``, ``1.5``, ``1.5-i2v``)."""
        return self.spec.key

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def defaults(self) -> Defaults:
        return self.spec.defaults

    @property
    def needs_image(self) -> bool:
        """Image-to-video: every run is conditioned on a start image."""
        return self.spec.image_to_video

    @property
    def position_kinds(self) -> frozenset[PositionKind]:
        return position_kinds(self.transformer_config)

    @property
    def num_blocks(self) -> int:
        """Transformer blocks (30 on 2b, 42 on the others)."""
        return int(self.transformer_config["num_layers"])

    @property
    def num_heads(self) -> int:
        """Attention heads per block (30 on 2b, 48 on the others)."""
        return int(self.transformer_config["num_attention_heads"])

    @property
    def head_dim(self) -> int:
        """Channels per head (64 on all)."""
        return int(self.transformer_config["attention_head_dim"])

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def text_tokens(self) -> int:
        """Text tokens the transformer takes, padded to this length (226 on the real models)."""
        return int(self.transformer_config["max_text_seq_length"])

    @property
    def patch_size(self) -> int:
        """Spatial patch size in latent pixels (2 on all)."""
        return int(self.transformer_config.get("patch_size", 2))

    @property
    def vae_scaling_factor(self) -> float:
        """Latent scale (1.15258426 on 2b, 0.7 on 5b, 0.7 with ``invert_scale_latents`` on 1.5); raises :class:`DiTFlowError` if no VAE config was read."""
        if self.vae_config is None:
            raise DiTFlowError(f"no VAE config was loaded from {self.path}; load the 'vae' component.")
        return float(self.vae_config["scaling_factor"])

    # -- memory placement --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def on_device(self, *names: str) -> Iterator[CogVideoX]:
        """Within the ``with``, the named components sit on :attr:`compute_device`; after it, back on the CPU.

        Sequential offload for the command line: only one network at a time needs GPU memory (the 5b transformer
        11 GB, its T5 9.5 GB). A no-op when the model was loaded without ``offload``.
        """
        if self.compute_device is None:
            yield self
            return
        modules = [getattr(self, n) for n in names]
        try:
            with torch.inference_mode(False):  # moved weights stay normal tensors even if a caller is in it
                for m in modules:
                    m.to(self.compute_device)
            yield self
        finally:
            with torch.inference_mode(False):
                for m in modules:
                    m.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def keep_on_device(self) -> None:
        """Ends sequential offload: every loaded network moves to :attr:`compute_device` and stays there."""
        if self.compute_device is None:
            return
        with torch.inference_mode(False):
            for name in ("transformer", "vae", "text_encoder"):
                module = getattr(self, name)
                if module is not None:
                    module.to(self.compute_device)
        self.compute_device = None

    # -- sizes -------------------------------------------------------------------------------------------------

    def geometry(self, frames: int, height: int, width: int) -> Geometry:
        return layout.geometry(self.transformer_config, frames, height, width, name=self.name)

    def size_of_grid(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        return layout.size_of_grid(self.transformer_config, grid)

    def geometry_of_latents(self, latents: Tensor) -> Geometry:
        return layout.geometry_of_latents(self.transformer_config, latents, name=self.name)

    def pad_latents(self, latents: Tensor, geometry: Geometry) -> Tensor:
        return layout.pad_latents(latents, geometry)

    def unpad_latents(self, latents: Tensor, geometry: Geometry) -> Tensor:
        return layout.unpad_latents(latents, geometry)

    # -- text and VAE ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, prompt: str) -> Tensor:
        """T5 embeddings ``[1, text_tokens, D_text]`` as diffusers' ``CogVideoXPipeline._get_t5_prompt_embeds``:
        padded to ``text_tokens``, truncated beyond; on the text encoder's device, in its dtype."""
        ids = self.tokenizer([prompt], padding="max_length", max_length=self.text_tokens, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(ids.to(device))[0]

    def encode_video(self, frames: Tensor, *, sample_seed: int | None = None, tiling: bool | None = None,
                     slicing: bool | None = None) -> Tensor:
        """:func:`.vae.encode_video`."""
        return vae.encode_video(self, frames, sample_seed=sample_seed, tiling=tiling, slicing=slicing)

    def decode_latents(self, latents: Tensor, *, tiling: bool | None = None, slicing: bool | None = None) -> Tensor:
        """:func:`.vae.decode_latents`."""
        return vae.decode_latents(self, latents, tiling=tiling, slicing=slicing)

    def encode_start(self, image: Tensor, generator) -> Tensor:
        """The start image ``[3, H, W]`` in [-1, 1] → I2V latents ``[1, 1, C, H/8, W/8]`` (:func:`.vae.encode_start`)."""
        if not self.needs_image:
            raise DiTFlowError(f"{self.name} is text-to-video: it takes no start image.")
        return vae.encode_start(self, image, generator)

    # -- passes ------------------------------------------------------------------------------------------------

    def run_inputs(self, geometry: Geometry, device, *, start: Tensor | None = None,
                   reference: Tensor | None = None) -> CogVideoXInputs:
        """Stock RoPE for ``geometry`` and, on I2V, the image latents: the start latents (:meth:`encode_start`) of a
        generation, or the first latent frame of ``reference`` latents ``[1, F, C, H, W]`` for a pass over them,
        followed by zeros up to the padded frame count, as the I2V pipeline pads them."""
        rope = None
        if PositionKind.ROPE in self.position_kinds:
            rope = tuple(t.to(device) for t in rope_tables(self.transformer_config, geometry.token_grid, device))
        image = ofs = None
        if self.needs_image:
            if start is None and reference is None:
                raise DiTFlowError(f"{self.name} generates from a start image; give one (the reference's first frame "
                                   "is the usual choice).")
            first = start if start is not None else vae.video_to_image_latents(self, reference[:, :1])
            first = first.to(device, self.transformer.dtype)
            zeros = first.new_zeros((1, geometry.latent_shape[0] - 1, *first.shape[2:]))
            image = torch.cat([first, zeros], dim=1)
            if self.transformer.ofs_embedding is not None:
                ofs = torch.full((1,), OFS, device=device, dtype=self.transformer.dtype)
        return CogVideoXInputs(geometry=geometry, rope=rope, image_latents=image, ofs=ofs)

    def stock_positions(self, inputs: CogVideoXInputs, kind: PositionKind) -> Tensor:
        """Stock ``rope`` tables ``[2 (cos, sin), n, head_dim]`` or the ``sincos`` table ``[n, inner_dim]``, fp32."""
        if kind not in self.position_kinds or kind is PositionKind.LEARNED:
            raise DiTFlowError(f"{self.name} has no {kind.value} positions to optimise.")
        if kind is PositionKind.ROPE:
            return torch.stack(inputs.rope).float()
        return sincos_table(self.transformer, inputs.geometry.token_grid).to(self.transformer.device)

    @contextlib.contextmanager
    def attention(self, controller: AttentionController) -> Iterator[AttentionController]:
        """DiTFlow's processor on every block and, on 2b, the sin-cos table owned (``controller.table`` or the stock
        one for the pass's grid); all restored in ``finally``."""
        stock: dict[tuple[int, int, int], Tensor] = {}

        def table(grid: tuple[int, int, int]) -> Tensor:
            if controller.table is not None:
                return controller.table
            if grid not in stock:
                stock[grid] = sincos_table(self.transformer, grid).to(self.transformer.device)
            return stock[grid]

        with controlled_attention(self.transformer, controller), owned_sincos(self.transformer, table):
            yield controller

    def forward_until(self, controller: AttentionController, latents: Tensor, text: Tensor, timestep: Tensor,
                      inputs: CogVideoXInputs, *, gradient_checkpointing: bool = False) -> None:
        forward_until(self.transformer, controller, latents, text, timestep, inputs,
                      gradient_checkpointing=gradient_checkpointing)

    def predict(self, latents: Tensor, text: Tensor, timestep: Tensor, inputs: CogVideoXInputs) -> Tensor:
        return predict(self.transformer, latents, text, timestep, inputs)

    # -- schedule ----------------------------------------------------------------------------------------------

    def make_scheduler(self):
        """A fresh diffusers scheduler of this variant (:func:`.schedule.build_scheduler`)."""
        return build_scheduler(self.spec.scheduler, self.scheduler_config, self.path)

    def schedule(self, num_steps: int, device, generator) -> Schedule:
        return Schedule(self.make_scheduler(), num_steps, device, generator)

    def cfg_scale(self, scale: float, dynamic: bool, t: Tensor, num_steps: int) -> float:
        return dynamic_cfg_scale(scale, t, num_steps) if dynamic else scale
