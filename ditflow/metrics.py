# SPDX-License-Identifier: Apache-2.0
"""Evaluation metrics of DiTFlow §5.1: Motion Fidelity (MF, from SMM) and Image Quality (IQ, CLIP score).

MF compares the motion of two videos through point tracks (:mod:`ditflow.tracking`); IQ is the CLIP ViT-B/32
cosine between each frame and the prompt. Paper values for comparison are in the design notes (Table 1), and are
only comparable to ours when CoTracker3 is the tracker (``MotionFidelity.tracker``).

Conventions (see ``ditflow/__init__``): frames ``[F, 3, H, W]`` in [-1, 1]; positions pixel (x, y), x right, y down.
Importing this module does not import transformers; :func:`load_clip` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import MFVariant
from .errors import DiTFlowError
from .tracking import DEFAULT_GRID_SIZE, check_frames, to_uint8_rgb, track_points

#: A per-step displacement shorter than this (pixels per frame, at the working size) is "static" (see below).
STATIC_EPS_PX = 1e-2
CLIP_MODEL_ID = "openai/clip-vit-base-patch32"


# ---------------------------------------------------------------------------------------------------------------
# Motion Fidelity (SMM, Yatim et al. 2024; DiTFlow §5.1)
#
# S[n, m] = mean_t cos(d_gen_n(t), d_ref_m(t)), d(t) = p(t+1) − p(t): generated track n against reference track m.
# Three formulas on that matrix (MFVariant):
#   official  — SMM's and DiTFlow's evaluation code (motion_fidelity_score.py of both repositories): S − I (a
#               generated track may not be matched by the reference track that starts at its own grid point), then
#               MF = mean_n max_m. Tracks are cut to the first min(T_gen, T_ref) frames. The paper's Table 1 numbers
#               come from this; it is the default.
#   symmetric — the SMM paper's definition: the mean over generated tracks of their best reference match and the
#               mean over reference tracks of their best generated match, averaged (so it stays in [-1, 1]); no
#               identity subtraction; same frame cut.
#   ours      — mean_n max_m S, no identity subtraction, on videos resampled to the same frame count (uniform
#               indices) before tracking (motion_fidelity), as this pack first shipped.
# Zero-length rule, in all three (the official code divides by |d| and gives NaN): a step shorter than STATIC_EPS_PX
# is a zero vector and has cosine 0 with **anything**, another zero step included. So a frozen video scores 0
# against any reference (it is never rewarded for a still background track), identical still videos score 0 (not 1,
# not NaN), and a track that moves only part of the time earns credit only for its moving steps. Implemented as one
# matmul of unit step directions (a zero step encodes as the zero vector), so a·b = cos. The eps is a numerical
# guard, far below tracker jitter: jittering still points count as moving, as in SMM.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MotionFidelity:
    """Result of :func:`motion_fidelity`.

    Attributes:
        score: MF in [-1, 1]; 1 = every generated track moves like some reference track.
        tracker: which tracker produced the tracks, ``"cotracker3_offline"`` or ``"flow"``.
        tracks_ref, tracks_gen: ``[T, P, 2]`` pixel (x, y) at the working size ``size``, the frames the score used.
        size: (H, W) working size both videos were resized to before tracking.
        similarity: ``[P_gen, P_ref]`` matrix S, only when asked for (3025² floats ≈ 37 MB at the paper's grid).
        variant: the formula (:class:`~ditflow.config.MFVariant`).
    """

    score: float
    tracker: str
    tracks_ref: Tensor
    tracks_gen: Tensor
    size: tuple[int, int]
    similarity: Tensor | None = None
    variant: str = MFVariant.OFFICIAL.value


def _step_codes(tracks: Tensor, static_eps: float) -> Tensor:
    """``[T, P, 2]`` tracks → ``[P, 2·(T−1)]`` unit step directions, zero for a static step (see the banner above)."""
    d = (tracks[1:] - tracks[:-1]).double()  # [T-1, P, 2] per-step displacement, pixels
    length = d.norm(dim=-1, keepdim=True)
    static = length < max(static_eps, 1e-12)
    unit = torch.where(static, torch.zeros_like(d), d / length.clamp_min(max(static_eps, 1e-12)))  # zero step → 0
    return unit.permute(1, 0, 2).reshape(unit.shape[1], -1).float()


def motion_fidelity_from_tracks(
    tracks_ref: Tensor,
    tracks_gen: Tensor,
    *,
    variant: MFVariant | str = MFVariant.OFFICIAL,
    static_eps: float = STATIC_EPS_PX,
    return_similarity: bool = False,
    chunk: int = 1024,
) -> tuple[float, Tensor | None]:
    """MF from point tracks by the ``variant``'s formula (banner above); S is built ``chunk`` rows at a time.

    Args:
        tracks_ref: ``[T, M, 2]`` reference tracks, pixel (x, y).
        tracks_gen: ``[T', N, 2]`` generated tracks. ``official``/``symmetric`` use the first min(T, T') frames of
            both; ``ours`` needs T = T'. ``official`` needs N = M (one grid tracked in both videos).
        variant: :class:`~ditflow.config.MFVariant` (default ``official``, comparable with the paper).
        static_eps: steps shorter than this many pixels are zero vectors: cosine 0 with any step (another zero one too).
        return_similarity: also return S ``[N, M]`` (before the identity subtraction).
        chunk: generated tracks per matmul, bounding the working memory to chunk × M floats.
    Returns:
        (MF, S or None). MF is in [-1, 1] and finite.
    Raises:
        DiTFlowError: if the shapes disagree as above or fewer than 2 frames are left.
    """
    variant = MFVariant.parse(variant)
    if tracks_ref.ndim != 3 or tracks_gen.ndim != 3 or tracks_ref.shape[-1] != 2 or tracks_gen.shape[-1] != 2:
        raise DiTFlowError(f"tracks must be [T, P, 2]; got {tuple(tracks_ref.shape)} and {tuple(tracks_gen.shape)}.")
    if variant is not MFVariant.OURS:
        frames = min(tracks_ref.shape[0], tracks_gen.shape[0])
        tracks_ref, tracks_gen = tracks_ref[:frames], tracks_gen[:frames]
    if tracks_ref.shape[0] != tracks_gen.shape[0] or tracks_ref.shape[0] < 2:
        raise DiTFlowError(
            f"tracks need one frame count T ≥ 2; got {tracks_ref.shape[0]} (ref), {tracks_gen.shape[0]} (gen)."
        )
    if variant is MFVariant.OFFICIAL and tracks_ref.shape[1] != tracks_gen.shape[1]:
        raise DiTFlowError(
            f"the official MF pairs each generated track with the reference track of its own grid point: both need "
            f"the same points, got {tracks_gen.shape[1]} (gen) and {tracks_ref.shape[1]} (ref)."
        )
    steps = tracks_ref.shape[0] - 1
    ref = _step_codes(tracks_ref.cpu(), static_eps)  # [M, 2(T-1)]
    gen = _step_codes(tracks_gen.cpu(), static_eps)  # [N, 2(T-1)]
    row_best, rows = [], []
    col_best = torch.full((ref.shape[0],), -torch.inf)
    for start in range(0, gen.shape[0], chunk):
        s = (gen[start : start + chunk] @ ref.T) / steps  # [chunk, M] mean over t of cos
        if return_similarity:
            rows.append(s.clone())
        col_best = torch.maximum(col_best, s.max(dim=0).values)
        if variant is MFVariant.OFFICIAL:  # S − I: minus 1 where the generated and the reference point coincide
            idx = torch.arange(s.shape[0])
            s[idx, start + idx] -= 1.0
        row_best.append(s.max(dim=1).values)
    score = torch.cat(row_best).double().mean()
    if variant is MFVariant.SYMMETRIC:
        score = (score + col_best.double().mean()) / 2
    return float(score.clamp(-1.0, 1.0)), (torch.cat(rows) if return_similarity else None)


def _resample(frames: Tensor, num_frames: int, size: tuple[int, int]) -> Tensor:
    """Uniform temporal index sampling to ``num_frames`` (round(linspace(0, F−1, T))), then bilinear resize."""
    idx = torch.linspace(0, frames.shape[0] - 1, num_frames).round().long()
    frames = frames[idx]
    if tuple(frames.shape[-2:]) != tuple(size):
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)
    return frames.clamp(-1.0, 1.0)


def motion_fidelity(
    reference: Tensor,
    generated: Tensor,
    *,
    grid_size: int = DEFAULT_GRID_SIZE,
    tracker: str = "auto",
    cotracker_checkpoint: str | os.PathLike | None = None,
    size: tuple[int, int] | None = None,
    static_eps: float = STATIC_EPS_PX,
    return_similarity: bool = False,
    variant: MFVariant | str = MFVariant.OFFICIAL,
) -> MotionFidelity:
    """Motion Fidelity of ``generated`` to ``reference`` (DiTFlow §5.1, SMM's metric).

    Both videos are brought to the working size ``size``, by default the **reference's** (H, W) (the generated video
    is resized to it, aspect included). For ``official`` and ``symmetric`` each is tracked whole and the tracks are
    cut to the first min(T, T') frames, as the official code does; for ``ours`` both are first resampled to the same
    frame count (uniform temporal indices). A grid of first-frame points is tracked in each
    (:func:`ditflow.tracking.track_points`) and compared with :func:`motion_fidelity_from_tracks`.

    Args:
        reference, generated: ``[F, 3, H, W]`` in [-1, 1], F ≥ 2; sizes and frame counts may differ.
        grid_size: points per side (paper: 55).
        tracker: ``"auto"``, ``"cotracker"`` or ``"flow"`` (see :func:`ditflow.tracking.track_points`).
        cotracker_checkpoint: path of CoTracker3's ``scaled_offline.pth``.
        size: working (H, W) in pixels; default the reference's size.
        static_eps: pixel length below which a step is a zero vector, cosine 0 with anything (rule above).
        return_similarity: keep S ``[P, P]`` in the result.
        variant: the formula, :class:`~ditflow.config.MFVariant` (default ``official``, comparable with Table 1).
    Returns:
        :class:`MotionFidelity` with the score, the tracker name, the tracks and the working size.
    Raises:
        DiTFlowError: on bad frames, a bad size or an unavailable tracker.
    """
    reference = check_frames(reference, "reference")
    generated = check_frames(generated, "generated")
    size = tuple(int(v) for v in (size or reference.shape[-2:]))
    if len(size) != 2 or min(size) < 2:
        raise DiTFlowError(f"size must be (height, width) of at least 2 px; got {size}.")
    variant = MFVariant.parse(variant)
    if variant is MFVariant.OURS:
        num_frames = min(reference.shape[0], generated.shape[0])
        reference, generated = _resample(reference, num_frames, size), _resample(generated, num_frames, size)
    else:
        reference, generated = (_resample(v, v.shape[0], size) for v in (reference, generated))
    tracks_ref, name = track_points(reference, grid_size, tracker, cotracker_checkpoint)
    tracks_gen, _ = track_points(generated, grid_size, name if name == "flow" else "cotracker", cotracker_checkpoint)
    frames = min(tracks_ref.shape[0], tracks_gen.shape[0])
    tracks_ref, tracks_gen = tracks_ref[:frames], tracks_gen[:frames]
    score, sim = motion_fidelity_from_tracks(
        tracks_ref, tracks_gen, variant=variant, static_eps=static_eps, return_similarity=return_similarity
    )
    return MotionFidelity(score, name, tracks_ref, tracks_gen, size, sim, variant.value)


# ---------------------------------------------------------------------------------------------------------------
# Image Quality: CLIP ViT-B/32 image-text cosine, averaged over frames (§5.1; no ×100)
# ---------------------------------------------------------------------------------------------------------------


def check_clip_folder(model_path: str | os.PathLike) -> None:
    """Cheap checks of a CLIP folder given explicitly, before any work: it exists and holds safetensors weights.

    Raises:
        DiTFlowError: the folder is missing, or has no ``.safetensors`` file (one sentence saying what to do).
    """
    if not Path(model_path).is_dir():
        raise DiTFlowError(f"CLIP model folder {model_path} does not exist; pass a folder with {CLIP_MODEL_ID}.")
    if not any(Path(model_path).glob("*.safetensors")):
        raise DiTFlowError(
            f"CLIP model folder {model_path} has no .safetensors weights (a pytorch_model.bin pickle is never read); "
            f"download model.safetensors of {CLIP_MODEL_ID} into it."
        )


def load_clip(model_path: str | os.PathLike | None = None):
    """Loads CLIP ViT-B/32 (``CLIPModel``, ``CLIPProcessor``) from local files only; never downloads.

    Args:
        model_path: a folder holding ``openai/clip-vit-base-patch32`` (config, weights, tokenizer, preprocessor);
            default: that model id in the local Hugging Face cache.
    Returns:
        (model in eval mode, processor).
    Raises:
        DiTFlowError: if the folder is missing or the weights are not on disk, saying how to provide them.
    """
    from transformers import CLIPModel, CLIPProcessor

    if model_path is not None:
        check_clip_folder(model_path)
    source = str(model_path) if model_path is not None else CLIP_MODEL_ID
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=True, use_safetensors=True)  # never a pickle
        processor = CLIPProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        raise DiTFlowError(
            f"CLIP weights not found locally ({source}); download {CLIP_MODEL_ID} once "
            f"(e.g. `huggingface-cli download {CLIP_MODEL_ID} --local-dir <folder>`) "
            "and pass that folder (--clip-model on the command line, model_path in Python)."
        ) from err
    return model.eval(), processor


def _embedding(out) -> Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and an output with ``pooler_output`` in 5."""
    return out if isinstance(out, Tensor) else out.pooler_output


def clip_frame_scores(
    frames: Tensor,
    prompt: str,
    *,
    model_path: str | os.PathLike | None = None,
    model=None,
    processor=None,
    batch_size: int = 16,
) -> Tensor:
    """Per-frame CLIP cosine between each frame and ``prompt``.

    Frames go through the processor's standard CLIP preprocessing (resize short side, centre crop); the prompt is
    truncated to CLIP's 77 tokens.

    Args:
        frames: ``[F, 3, H, W]`` in [-1, 1] (a single frame is allowed here).
        prompt: the text.
        model_path: see :func:`load_clip`; ignored when ``model`` and ``processor`` are given.
        model, processor: a loaded ``CLIPModel`` and ``CLIPProcessor`` (tests pass tiny random ones).
        batch_size: frames per forward pass.
    Returns:
        ``[F]`` float32 cosines in [-1, 1].
    Raises:
        DiTFlowError: on bad frames or missing weights.
    """
    frames = torch.as_tensor(frames)
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] < 1:
        raise DiTFlowError(f"frames must be [F, 3, H, W] in [-1, 1]; got shape {tuple(frames.shape)}.")
    if model is None or processor is None:
        model, processor = load_clip(model_path)
    param = next(model.parameters())
    images = list(to_uint8_rgb(frames.float()))
    with torch.inference_mode():
        text = processor.tokenizer([prompt], padding=True, truncation=True, return_tensors="pt").to(param.device)
        t = F.normalize(_embedding(model.get_text_features(**text)).float(), dim=-1)  # [1, D]
        scores = []
        for i in range(0, len(images), batch_size):
            pix = processor.image_processor(images[i : i + batch_size], return_tensors="pt")["pixel_values"]
            v = _embedding(model.get_image_features(pixel_values=pix.to(param.device, param.dtype)))
            scores.append((F.normalize(v.float(), dim=-1) @ t.T)[:, 0])
    return torch.cat(scores).cpu()


def clip_score(
    frames: Tensor, prompt: str, *, model_path: str | os.PathLike | None = None, model=None, processor=None
) -> float:
    """IQ (§5.1): CLIP ViT-B/32 image-text cosine averaged over frames (no ×100); see :func:`clip_frame_scores`."""
    return float(clip_frame_scores(frames, prompt, model_path=model_path, model=model, processor=processor).mean())


# ---------------------------------------------------------------------------------------------------------------
# Plot for the ComfyUI node
# ---------------------------------------------------------------------------------------------------------------

_REF_RGB, _GEN_RGB = (0, 200, 255), (255, 60, 160)


def plot_motion_fidelity(
    reference: Tensor,
    generated: Tensor,
    tracks_ref: Tensor,
    tracks_gen: Tensor,
    score: float,
    *,
    tracker: str | None = None,
    every: int = 5,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Draws both videos' tracks over the first reference frame, with the score; the generated first frame is inset.

    Args:
        reference, generated: ``[F, 3, H, W]`` in [-1, 1].
        tracks_ref, tracks_gen: ``[T, P, 2]`` pixel (x, y) with P a square grid (from :class:`MotionFidelity`).
        score: MF to print; ``tracker`` is printed beside it when given.
        every: draw every ``every``-th grid point along each axis (55 → 11×11 tracks).
        size: (H, W) the tracks' pixel space (``MotionFidelity.size``); default the reference's size.
    Returns:
        ``[H', W', 3]`` uint8 RGB, H' = H scaled up to at least 256 px.
    """
    size = tuple(size or reference.shape[-2:])
    base = to_uint8_rgb(reference[:1])[0]
    scale = max(1, -(-256 // min(size)))  # upscale small frames so lines and text stay legible
    canvas = cv2.resize(base, (size[1] * scale, size[0] * scale), interpolation=cv2.INTER_LINEAR)
    canvas = (canvas * 0.6).astype(np.uint8)  # dim the frame under the tracks
    inset = cv2.resize(to_uint8_rgb(generated[:1])[0], (canvas.shape[1] // 4, canvas.shape[0] // 4))
    canvas[: inset.shape[0], -inset.shape[1] :] = inset
    cv2.rectangle(canvas, (canvas.shape[1] - inset.shape[1], 0), (canvas.shape[1] - 1, inset.shape[0]), _GEN_RGB, 1)
    for tracks, colour in ((tracks_ref, _REF_RGB), (tracks_gen, _GEN_RGB)):
        side = round(tracks.shape[1] ** 0.5)
        keep = tracks.reshape(tracks.shape[0], side, side, 2)[:, ::every, ::every].reshape(tracks.shape[0], -1, 2)
        pts = np.round((keep.cpu().numpy() + 0.5) * scale - 0.5).astype(np.int32)  # pixel centres scale about 0.5
        for t in range(len(pts) - 1):
            for a, b in zip(pts[t], pts[t + 1]):
                cv2.line(canvas, tuple(map(int, a)), tuple(map(int, b)), colour, 1, cv2.LINE_AA)
        for p in pts[-1]:
            cv2.circle(canvas, tuple(map(int, p)), 2, colour, -1, cv2.LINE_AA)
    label = f"MF {score:.3f}" + (f" ({tracker})" if tracker else "")
    legend = ((label, (6, 18), (255, 255, 255)), ("ref", (6, 36), _REF_RGB), ("gen", (40, 36), _GEN_RGB))
    for text, org, colour in legend:
        cv2.putText(canvas, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3, cv2.LINE_AA)  # outline
        cv2.putText(canvas, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1, cv2.LINE_AA)
    return canvas
