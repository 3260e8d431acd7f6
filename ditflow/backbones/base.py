# SPDX-License-Identifier: Apache-2.0
"""What DiTFlow needs from a video diffusion transformer: the backbone interface.

The method (:mod:`ditflow.amf`, :mod:`ditflow.objectives`, :mod:`ditflow.params`, the sampler loop, reference
extraction, embeddings, jobs and nodes) talks to a loaded model only through :class:`Backbone`. It never names a
model: where variants differ it asks a capability (:attr:`Backbone.position_kinds`, :attr:`Backbone.needs_image`,
:meth:`Backbone.geometry`) and lets the backbone do the model-specific part. Each backbone is one package under
``ditflow/backbones/`` that owns, for its models: loading, text encoding, VAE encode/decode and the latent layout,
the attention hook (a processor per block that serves an :class:`~ditflow.attention.AttentionController`), the
truncated forward, the positions (kind, stock tables, install), the scheduler and the CFG rule, and its defaults.
The registry in :mod:`ditflow.backbones` detects which backbone a folder holds.

What is shared, and so stated here once:

- **Video size** ``(frames, height, width)`` in video pixels is the one size every caller speaks.
  :meth:`Backbone.geometry` turns it into the backbone's latent shape and its **token grid** ``(F, h, w)``: the
  AMF's frames are token frames (a token may span several latent frames), ``S = h·w`` patches per token frame,
  tokens frame-major then row-major, ``idx = f·S + y·w + x`` (see ``ditflow/__init__``).
- **Latents** handed between the backbone and the method are the backbone's scaled latents ``[B, F, C, H, W]``
  with F the *video's* latent frames (what the VAE encodes and decodes). Latent frames the backbone adds for its
  own patching are added and removed inside it (:meth:`Backbone.pad_latents`, :attr:`Geometry.pad_frames`); the
  sampler draws its noise in the padded shape :attr:`Geometry.latent_shape`, as the backbone's own pipeline does.
- **Passes.** A run builds one :class:`RunInputs` per conditioning (the generation's, the reference's) with
  :meth:`Backbone.run_inputs`; every pass (:meth:`Backbone.forward_until`, :meth:`Backbone.predict`) takes it and
  runs inside :meth:`Backbone.attention`, which installs the backbone's processors for an
  :class:`~ditflow.attention.AttentionController` and restores the stock model in ``finally``.
- **Positions** are read by the method only to be optimised (DiTFlow-ρ_t): :meth:`Backbone.stock_positions` gives
  the stock tables of one kind for a run, and the controller's ``rope`` / ``table`` fields override them in a pass.

Nothing here imports torch at module level beyond typing, nor any model library.
"""

from __future__ import annotations

import enum
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor

    from ..attention import AttentionController
    from ..text import PromptEmbeds


class PositionKind(str, enum.Enum):
    """How a backbone tells its transformer where a token is (what DiTFlow-ρ_t can optimise, §4.3).

    ``rope``: rotary tables applied to the video Q and K in every block; optimisable as separate Q and K tables
    ``[2 (q, k), 2 (cos, sin), n, head_dim]``. ``sincos``: a fixed sin-cos table added once to the video tokens at
    the patch embedding, ``[n, inner_dim]``; optimisable. ``learned``: a trained table added at the patch embedding
    for one fixed grid; declared (it fixes the size) but not optimised.
    """

    ROPE = "rope"
    SINCOS = "sincos"
    LEARNED = "learned"


@dataclass(frozen=True)
class Defaults:
    """A model's own settings, used where the user gives none.

    Attributes:
        guidance_block: transformer block whose attention gives the AMF.
        guidance_block_source: where that number comes from: the paper (§5.1: 15 on CogVideoX-2b, 20 on -5b) or
            carried over from a sibling model and not validated on real weights.
        cfg: classifier-free guidance scale; dynamic_cfg: whether it is ramped over the steps.
        frames, height, width: native video size (frames, px); fps: native frame rate.
    """

    guidance_block: int
    guidance_block_source: str
    cfg: float
    dynamic_cfg: bool
    frames: int
    height: int
    width: int
    fps: float


@dataclass(frozen=True)
class Geometry:
    """How a video of ``frames × height × width`` px sits in a backbone (from :meth:`Backbone.geometry`).

    Attributes:
        frames, height, width: the video size in px.
        latent_frames: latent frames of the video (what the VAE encodes and decodes).
        pad_frames: latent frames the backbone puts in front for its temporal patching (0 for most); the noise,
            the denoised latents and the reference pass carry them, the decoded video does not.
        latent_shape: ``(F + pad, C, H, W)`` of the latents the transformer denoises (batch excluded).
        token_grid: ``(F, h, w)`` token frames and patch rows/columns: the AMF's grid; ``n = F·h·w`` video tokens.
    """

    frames: int
    height: int
    width: int
    latent_frames: int
    pad_frames: int
    latent_shape: tuple[int, int, int, int]
    token_grid: tuple[int, int, int]

    @property
    def size(self) -> tuple[int, int, int]:
        """``(frames, height, width)`` in px."""
        return self.frames, self.height, self.width

    @property
    def num_tokens(self) -> int:
        """Video tokens ``n = F·h·w``."""
        frames, h, w = self.token_grid
        return frames * h * w


@runtime_checkable
class RunInputs(Protocol):
    """What every transformer pass of one run needs besides latents, text and timestep: the stock positions for
    the run's grid and the backbone's conditioning (e.g. an image latent, an offset embedding). Built once per run by
    :meth:`Backbone.run_inputs`; opaque to the method except for :attr:`geometry`."""

    geometry: Geometry


@runtime_checkable
class Schedule(Protocol):
    """One run's noise schedule (:meth:`Backbone.schedule`): timesteps, and one sampler update per step.

    Attributes:
        timesteps: ``[steps]`` decreasing timesteps (0..999 for the CogVideoX family).
        init_noise_sigma: scale of the initial noise.
        denoised: after :meth:`step`, that step's prediction of the clean latents (previews); ``None`` before.
    """

    timesteps: Tensor
    init_noise_sigma: float
    denoised: Tensor | None

    def scale_model_input(self, latents: Tensor, t: Tensor) -> Tensor:
        """The latents as the transformer takes them at ``t``."""

    def add_noise(self, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Clean ``latents`` noised to ``t`` with ``noise`` (KV injection's reference, §3)."""

    def step(self, i: int, prediction: Tensor, latents: Tensor) -> Tensor:
        """The latents after denoising step ``i`` (0-based) given the model's (CFG-combined) prediction."""


@runtime_checkable
class Backbone(Protocol):
    """A loaded video diffusion transformer, its VAE and text encoder, as DiTFlow uses them.

    Attributes:
        variant: the model variant's key, stable across versions (saved in embeddings files), e.g. ``"5b"``.
        name: its display name, e.g. ``"CogVideoX-5b"``.
        transformer, vae, text_encoder, tokenizer: the networks (``None`` when not loaded); the memory managers of
            the CLI and of ComfyUI move the first three.
        dtype: the dtype they were loaded in; path: the folder or hub id they came from.
        num_blocks, num_heads, head_dim, inner_dim: the transformer's shape; text_tokens: text sequence length.
        vae_scaling_factor: the factor between raw VAE latents and the scaled latents of the library
            (ComfyUI's LATENT is raw; :mod:`ditflow.layout` converts).
        defaults: :class:`Defaults`.
        position_kinds: the :class:`PositionKind` s the transformer uses.
        needs_image: image-to-video: every run is conditioned on a start image (:meth:`encode_start`).
    """

    variant: str
    name: str
    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    dtype: Any
    path: str
    defaults: Defaults
    position_kinds: frozenset[PositionKind]
    needs_image: bool

    @property
    def num_blocks(self) -> int: ...

    @property
    def num_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...

    @property
    def inner_dim(self) -> int: ...

    @property
    def text_tokens(self) -> int: ...

    @property
    def patch_size(self) -> int:
        """Latent pixels per patch side (the memory estimates of :mod:`ditflow.memory` read it)."""

    @property
    def vae_scaling_factor(self) -> float: ...

    # -- memory placement --------------------------------------------------------------------------------------

    def on_device(self, *names: str) -> AbstractContextManager:
        """Within the ``with``, the named networks sit on the compute device (sequential offload)."""

    def keep_on_device(self) -> None:
        """Ends sequential offload: every loaded network moves to the compute device and stays."""

    # -- sizes -------------------------------------------------------------------------------------------------

    def geometry(self, frames: int, height: int, width: int) -> Geometry:
        """The :class:`Geometry` of a video of that size; raises :class:`~ditflow.errors.DiTFlowError` naming the
        nearest sizes this model takes (frame counts, multiples, a fixed size, a largest grid)."""

    def size_of_grid(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """The video size ``(frames, height, width)`` in px of a token ``grid`` (the smallest frame count with it)."""

    def geometry_of_latents(self, latents: Tensor) -> Geometry:
        """The geometry of scaled video latents ``[B, F, C, H, W]`` (unpadded); raises if they cannot be this
        model's."""

    def pad_latents(self, latents: Tensor, geometry: Geometry) -> Tensor:
        """Video latents ``[B, F, C, H, W]`` → the transformer's ``[B, F + pad, C, H, W]`` (a no-op without pad)."""

    def unpad_latents(self, latents: Tensor, geometry: Geometry) -> Tensor:
        """The inverse of :meth:`pad_latents`: the video's latent frames only."""

    # -- text and VAE ------------------------------------------------------------------------------------------

    def encode_text(self, prompt: str) -> Tensor:
        """Text embeddings ``[1, text_tokens, D_text]`` of one prompt, as the model's pipeline encodes it."""

    def encode_video(self, frames: Tensor, *, sample_seed: int | None = None, tiling: bool | None = None,
                     slicing: bool | None = None) -> Tensor:
        """Frames ``[T, 3, H, W]`` in [-1, 1] → scaled latents ``[1, F, C, H/8, W/8]`` (posterior mean, or a
        sample seeded with ``sample_seed``); ``tiling`` / ``slicing`` the VAE's memory savers (``None``: as set)."""

    def decode_latents(self, latents: Tensor, *, tiling: bool | None = None, slicing: bool | None = None) -> Tensor:
        """Scaled latents ``[1, F, C, H, W]`` → frames ``[T, 3, H·8, W·8]`` in [-1, 1], float32, CPU."""

    def encode_start(self, image: Tensor, generator) -> Tensor:
        """Image-to-video only: the start image ``[3, H, W]`` in [-1, 1] → its conditioning latents, drawn from the
        VAE posterior with ``generator`` (the run's, before its noise, as the model's pipeline does)."""

    # -- passes ------------------------------------------------------------------------------------------------

    def run_inputs(self, geometry: Geometry, device, *, start: Tensor | None = None,
                   reference: Tensor | None = None) -> RunInputs:
        """The constant inputs of a run's passes at ``geometry``: stock positions and conditioning.

        Image-to-video models take the start latents (:meth:`encode_start`) of a generation, or for a pass over
        reference latents ``[1, F, C, H, W]`` (``reference``) their own first frame; other models take neither.
        """

    def stock_positions(self, inputs: RunInputs, kind: PositionKind) -> Tensor:
        """The stock table of ``kind`` for the run, fp32: ``rope`` → ``[2 (cos, sin), n, head_dim]``,
        ``sincos`` → ``[n, inner_dim]``. Raises if the model has no such kind."""

    def attention(self, controller: AttentionController) -> AbstractContextManager[AttentionController]:
        """Installs the backbone's processors (and position hooks) serving ``controller`` on every block; the stock
        model is restored in ``finally``, also on error or cancel."""

    def forward_until(self, controller: AttentionController, latents: Tensor, text: Tensor, timestep: Tensor,
                      inputs: RunInputs, *, gradient_checkpointing: bool = False) -> None:
        """A pass that stops at ``controller.stop_block`` (after its Q/K) or after the deepest block of
        ``controller.capture_outputs``; what it records is left on the controller. ``latents`` are padded
        ``[B, F + pad, C, H, W]``; inside :meth:`attention`."""

    def predict(self, latents: Tensor, text: Tensor, timestep: Tensor, inputs: RunInputs) -> Tensor:
        """The full transformer's prediction ``[B, F + pad, C, H, W]`` (fp32) for a batch (CFG: uncond, cond);
        inside :meth:`attention`."""

    # -- schedule ----------------------------------------------------------------------------------------------

    def schedule(self, num_steps: int, device, generator) -> Schedule:
        """A fresh :class:`Schedule` of ``num_steps`` (its stochastic updates draw from ``generator``)."""

    def cfg_scale(self, scale: float, dynamic: bool, t: Tensor, num_steps: int) -> float:
        """The CFG weight at timestep ``t`` (the model's own rule for ``dynamic``)."""
