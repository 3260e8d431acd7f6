# SPDX-License-Identifier: Apache-2.0
"""Guidance settings: the paper's defaults live here, once (DiTFlow §4.3, §5.1, Alg. 1).

Docstrings elsewhere point to :class:`GuidanceConfig` instead of repeating numbers, so they cannot drift.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass

from .errors import DiTFlowError


class Choice(str, enum.Enum):
    """A string option: ``Mode.parse("latent")`` → ``Mode.LATENT``; the CLI, the jobs and the nodes all parse this way."""

    @classmethod
    def parse(cls, value):
        """The member named by ``value``; raises :class:`DiTFlowError` naming the choices."""
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise DiTFlowError(f"Unknown guidance {cls.__name__.lower()} {value!r}; choose one of {choices}.") from None


class Mode(Choice):
    """What the guidance optimises (§4.3).

    ``latent``: the noisy latent z_t itself (DiTFlow-z_t, best motion fidelity).
    ``rope``: trainable RoPE cos/sin tables, separate for Q and K (DiTFlow-ρ_t on RoPE models: CogVideoX-5b, the I2V
    and 1.5 models).
    ``posemb``: trainable video slice of the additive sin-cos table (DiTFlow-ρ_t on sin-cos models: CogVideoX-2b).
    Which mode a model takes is its positions' capability (:mod:`ditflow.params`).
    ``none``: no optimisation: the backbone, or the "Injection" baseline when KV injection is on.
    """

    LATENT = "latent"
    ROPE = "rope"
    POSEMB = "posemb"
    NONE = "none"


class Loss(Choice):
    """What the guidance loss compares at the guidance block(s) (§4.2 and the baselines of §5, method.md §4).

    ``amf``: Attention Motion Flow, Eq. 8 (DiTFlow). ``moft``: MOFT's motion channels of the block's output
    features. ``smm``: SMM's spatial-marginal-mean differences of the block's output features. The last two are the
    paper's baselines ported to the DiT; see :mod:`ditflow.losses`.
    """

    AMF = "amf"
    MOFT = "moft"
    SMM = "smm"

    @property
    def uses_features(self) -> bool:
        """Whether the loss reads block-output features (the block runs in full) rather than attention Q/K."""
        return self is not Loss.AMF


class Optimizer(Choice):
    """The optimiser of each guided step, fresh per step with PyTorch's defaults (Alg. 1; Table 3c ablation, 5B MF:
    Adam 0.797, AdamW 0.803, SGD 0.623 — at the paper's lr plain SGD barely moves, like no guidance)."""

    ADAM = "adam"
    ADAMW = "adamw"
    SGD = "sgd"


def parse_blocks(text) -> tuple[int, ...]:
    """Block indices from the command line or a node widget: ``20``, ``"20"``, ``"10,15,20"``, ``"10 15 20"``;
    ``""``/``"none"``/``"off"`` → ``()``. Raises :class:`DiTFlowError` naming what was given."""
    if isinstance(text, int) and not isinstance(text, bool):
        return (text,)
    parts = str(text).replace(",", " ").split()
    if not parts or (len(parts) == 1 and parts[0].lower() in ("none", "off")):
        return ()
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise DiTFlowError(f"expected block numbers like 20 or 10,15,20, got {text!r}.") from None


def check_blocks(blocks, num_blocks: int, what: str = "guidance block") -> tuple[int, ...]:
    """Sorted unique block indices, each in 0..num_blocks−1; raises :class:`DiTFlowError` naming the range."""
    blocks = tuple(sorted({int(b) for b in blocks}))
    for b in blocks:
        if not 0 <= b < num_blocks:
            raise DiTFlowError(f"{what} {b} is out of range: this model has blocks 0..{num_blocks - 1}; pick one in range.")
    return blocks


def check_number(name: str, value, low: float, high: float, usual: str, *, low_open: bool = False) -> float:
    """``value`` as a float if it is finite and in [low, high] (``(low, high]`` with ``low_open``); else raises
    :class:`DiTFlowError` naming the range and the ``usual`` values. NaN and ±Inf are never accepted."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DiTFlowError(f"{name} must be a number, got {value!r}.") from None
    inside = (low < number if low_open else low <= number) and number <= high
    if not (math.isfinite(number) and inside):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise DiTFlowError(f"{name} must be a finite number in {interval} ({usual}), got {value!r}.")
    return number


#: Largest seed: seeds are unsigned 64-bit integers (``torch.Generator.manual_seed``'s range, ComfyUI's seed widget).
MAX_SEED = 2**64 - 1


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` if it is an integer in 0..:data:`MAX_SEED` (a bool is not); else raises :class:`DiTFlowError`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise DiTFlowError(f"{name} must be an integer in 0..2^64−1, got {str(seed)[:40]}.")
    return seed


@dataclass(frozen=True)
class GuidanceConfig:
    """Every knob of guided sampling, with the paper's defaults.

    Attributes:
        mode: what is optimised, see :class:`Mode`.
        loss: what the optimisation compares, see :class:`Loss` (DiTFlow: ``amf``; baselines ``moft``, ``smm``).
        guidance_blocks: transformer blocks whose attention gives the AMF (or whose output features give the
            MOFT/SMM loss); ``()`` means the model's default
            (:attr:`~ditflow.backbones.base.Defaults.guidance_block`). Several blocks average their losses (§5.3 ablation {10, 15, 20}).
        temperature: τ multiplying the head-averaged logits before the softmax (Eq. 3; authors' ``motion_temp`` = 2).
        guidance_fraction: T_opt, the leading fraction of denoising steps that are guided (paper: 20 %).
        opt_steps: K_opt, Adam iterations per guided step, each with a fresh Adam (paper: 5).
        lr_start, lr_end: learning rate, linear over the guided steps; the last guided step uses exactly
            ``lr_end`` (the authors' script stops at 0.0011 by an off-by-one).
        kv_injection_blocks: blocks where the generated video K/V are replaced by the noised reference's
            during guided steps (§3 "KV injection"; authors' default block 0); ``()`` turns injection off.
        num_inference_steps: denoising steps (paper: 50).
        guidance_scale: classifier-free guidance weight w; ``None`` means the model's default (its :class:`~ditflow.backbones.base.Defaults`).
        dynamic_cfg: cosine-ramped CFG as diffusers does for the 5B models; ``None`` means the model's default.
        gradient_checkpointing: recompute block activations in the backward of optimisation passes.
        optimizer: the optimiser of each guided step, see :class:`Optimizer` (paper: Adam).
        soft_reference: the reference AMF by soft-argmax (Eq. 7) instead of argmax (§4.1, paper: argmax; the
            authors' ``argmax_motion_flow`` ablation switch).
        masked_loss: average Eq. 8 over the entries where the reference moves (paper and authors' ``threshloss``);
            off averages over every entry, static ones and i = j pairs included.

    Raises:
        DiTFlowError: on construction, for an unknown mode or loss, or a number outside its range; NaN and ±Inf
            are refused everywhere, learning rates above 1 and CFG scales above 100 as certain blow-ups.
    """

    mode: Mode = Mode.LATENT
    loss: Loss = Loss.AMF
    guidance_blocks: tuple[int, ...] = ()
    temperature: float = 2.0
    guidance_fraction: float = 0.2
    opt_steps: int = 5
    lr_start: float = 2e-3
    lr_end: float = 1e-3
    kv_injection_blocks: tuple[int, ...] = (0,)
    num_inference_steps: int = 50
    guidance_scale: float | None = None
    dynamic_cfg: bool | None = None
    gradient_checkpointing: bool = True
    optimizer: Optimizer = Optimizer.ADAM
    soft_reference: bool = False
    masked_loss: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode.parse(self.mode))
        object.__setattr__(self, "loss", Loss.parse(self.loss))
        object.__setattr__(self, "optimizer", Optimizer.parse(self.optimizer))
        object.__setattr__(self, "guidance_blocks", tuple(int(b) for b in self.guidance_blocks))
        object.__setattr__(self, "kv_injection_blocks", tuple(int(b) for b in self.kv_injection_blocks))
        if self.num_inference_steps < 1:
            raise DiTFlowError(f"steps must be at least 1, got {self.num_inference_steps}.")
        check_number("guidance fraction", self.guidance_fraction, 0.0, 1.0, "paper: 0.2")
        if self.opt_steps < 0:
            raise DiTFlowError(f"optimisation steps must be >= 0, got {self.opt_steps}.")
        check_number("temperature", self.temperature, 0.0, 100.0, "paper: 2; its ablation spans 1–10", low_open=True)
        # Adam moves each value by about the learning rate per iteration; latents have unit variance and the
        # positional tables lie in [-1, 1], so beyond 1 every step destroys them.
        for name in ("lr_start", "lr_end"):
            check_number(f"learning rate {name}", getattr(self, name), 0.0, 1.0, "paper: 0.002 → 0.001")
        if self.guidance_scale is not None:
            check_number("CFG scale", self.guidance_scale, 0.0, 100.0, "CogVideoX uses 6; ≤ 1 turns CFG off")

    @property
    def num_guided_steps(self) -> int:
        """Number of leading denoising steps that are guided: round(T_opt · steps)."""
        return int(round(self.guidance_fraction * self.num_inference_steps))

    def learning_rate(self, guided_step: int) -> float:
        """Learning rate at guided step ``guided_step`` (0-based): linear, ``lr_start`` first, ``lr_end`` last."""
        n = self.num_guided_steps
        if n <= 1:
            return self.lr_start
        return self.lr_start + (self.lr_end - self.lr_start) * guided_step / (n - 1)

    def resolved(self, model) -> GuidanceConfig:
        """Fill ``model``'s defaults (:class:`~ditflow.backbones.base.Defaults`) and check the blocks and the mode
        against it (:func:`~ditflow.params.check_mode`: a mode needs the positions it optimises); raises
        :class:`DiTFlowError`."""
        from .params import check_mode

        num_blocks, defaults = model.num_blocks, model.defaults
        blocks = self.guidance_blocks or (defaults.guidance_block,)
        if self.mode is Mode.NONE:  # no AMF or feature is read: the blocks are not used
            blocks = self.guidance_blocks
        check_mode(self.mode, model)
        cfg, dyn = defaults.cfg, defaults.dynamic_cfg
        return dataclasses.replace(
            self,
            guidance_blocks=check_blocks(blocks, num_blocks),
            kv_injection_blocks=check_blocks(self.kv_injection_blocks, num_blocks, "KV injection block"),
            guidance_scale=cfg if self.guidance_scale is None else self.guidance_scale,
            dynamic_cfg=dyn if self.dynamic_cfg is None else self.dynamic_cfg,
        )


#: ``ReferenceOptions.num_frames`` value that takes as many frames as the clip gives (see
#: :func:`~ditflow.jobs.read_reference`).
AUTO = "auto"


@dataclass(frozen=True)
class ReferenceOptions:
    """Which frames of the reference video, at which size (video pixels; :func:`~ditflow.video.prepare_reference`).

    Attributes:
        num_frames: frames used, 4k+1 or a multiple of 8 (the authors' 24, see :data:`PRESETS`), or :data:`AUTO`:
            the largest 4k+1 the clip gives from ``start`` with ``stride``, at most
            :data:`~ditflow.layout.NATIVE_FRAMES` (49, the native count of CogVideoX-2b and -5b; ours — the paper
            runs 24 input frames).
        height, width: size in px, multiples of 16 (CogVideoX's native 480×720).
        start, stride: first frame and step between used frames.
        resize: ``crop`` (cover and centre-crop, aspect kept), ``stretch`` (the authors' code) or ``pad``.
        sample_seed: encode with a posterior sample drawn from this seed; ``None`` takes the posterior mean.
    """

    num_frames: int | str = AUTO
    height: int = 480
    width: int = 720
    start: int = 0
    stride: int = 1
    resize: str = "crop"
    sample_seed: int | None = None

    def __post_init__(self) -> None:
        if self.sample_seed is not None:
            check_seed(self.sample_seed, "the reference sample seed")


# ---------------------------------------------------------------------------------------------------------------------
# Presets: named sets of overrides (data), applied by settings()
# ---------------------------------------------------------------------------------------------------------------------

#: The negative prompt of the authors' code (its command line default).
AUTHORS_NEGATIVE_PROMPT = "bad quality, distortions, unrealistic, distorted image, watermark, signature"

#: Preset name → overrides over the defaults. Keys are :class:`GuidanceConfig` or :class:`ReferenceOptions` fields,
#: or the other :class:`Settings` fields (``negative_prompt``, ``clip_frames``). ``paper`` is the defaults themselves; ``authors`` is the protocol of the authors' code
#: (ditflow/ditflow ``motion_guidance.py`` and ``configs/guidance_config.yaml``): CFG 7, their negative prompt,
#: the first 24 frames stretched to 720×480 (6 latent frames) and a posterior sample of the reference (theirs draws
#: it unseeded; here seed 0, so runs repeat). Their bugs are not part of it (method.md §6).
PRESETS: dict[str, dict[str, object]] = {
    "paper": {},
    "authors": {
        "guidance_scale": 7.0,
        "negative_prompt": AUTHORS_NEGATIVE_PROMPT,
        "num_frames": 24,
        "height": 480,
        "width": 720,
        "resize": "stretch",
        "sample_seed": 0,
        "clip_frames": "range",
    },
}


class ClipFrames(Choice):
    """How ``bench-eval`` takes frames from a manifest's ``[start, end, step]`` range: the ``first`` 4k+1 of them
    (ours: 24 → 21) or the whole ``range`` (the paper's 24; must be 4k+1 or a multiple of 8)."""

    FIRST = "first"
    RANGE = "range"


@dataclass(frozen=True)
class Settings:
    """Everything a run is told besides its inputs: guidance, reference frames, negative prompt, and how
    ``bench-eval`` takes a clip's frames."""

    guidance: GuidanceConfig = GuidanceConfig()
    reference: ReferenceOptions = ReferenceOptions()
    negative_prompt: str = ""
    clip_frames: ClipFrames = ClipFrames.FIRST


def settings(preset: str = "paper", **given) -> Settings:
    """Defaults, then the ``preset``'s overrides (:data:`PRESETS`), then the options ``given`` explicitly.

    The command line passes only the options a user typed, the nodes their widgets; both end here, so a preset
    means the same everywhere.

    Raises:
        DiTFlowError: an unknown preset or option name, or a bad value (from the dataclasses' own checks).
    """
    if preset not in PRESETS:
        raise DiTFlowError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    options = {**PRESETS[preset], **given}
    guidance_fields = {f.name for f in dataclasses.fields(GuidanceConfig)}
    reference_fields = {f.name for f in dataclasses.fields(ReferenceOptions)}
    unknown = set(options) - guidance_fields - reference_fields - {"negative_prompt", "clip_frames"}
    if unknown:
        raise DiTFlowError(f"unknown option(s) {', '.join(sorted(unknown))}.")
    return Settings(
        guidance=GuidanceConfig(**{k: v for k, v in options.items() if k in guidance_fields}),
        reference=ReferenceOptions(**{k: v for k, v in options.items() if k in reference_fields}),
        negative_prompt=str(options.get("negative_prompt", "")),
        clip_frames=ClipFrames.parse(options.get("clip_frames", ClipFrames.FIRST)),
    )


class MFVariant(Choice):
    """Which Motion Fidelity formula (:func:`~ditflow.metrics.motion_fidelity_from_tracks`): ``official`` (the
    SMM and DiTFlow evaluation code; comparable with the paper's Table 1, the default), ``symmetric`` (the SMM paper's
    definition, both ways) or ``ours`` (generated → reference on resampled frames, no own-point subtraction)."""

    OFFICIAL = "official"
    SYMMETRIC = "symmetric"
    OURS = "ours"
