# SPDX-License-Identifier: Apache-2.0
"""Point tracking for the Motion Fidelity metric (DiTFlow §5.1, metric from SMM, Yatim et al. CVPR 2024).

The paper tracks a 55×55 grid of first-frame points with CoTracker3 offline. That tracker needs its code and
weights, which we never download, so there are two trackers behind one call, :func:`track_points`:

- ``"cotracker"``: CoTracker3 offline, used only when the user already has it: the torch.hub code cache
  ``<torch.hub.get_dir()>/facebookresearch_co-tracker_main`` plus either ``cotracker_checkpoint`` or the hub
  checkpoint cache ``<torch.hub.get_dir()>/checkpoints/scaled_offline.pth``. It is loaded with
  ``source="local"`` and ``pretrained=False`` and the weights are read from disk, so nothing is fetched.
- ``"flow"``: weight-free. OpenCV DIS dense optical flow between consecutive frames, chained: each point moves by
  the flow sampled bilinearly at its current position. It drifts more than CoTracker and has no occlusion
  handling, so numbers from it are comparable with each other but not with the paper's table.

Conventions (see ``ditflow/__init__``): frames are ``[F, 3, H, W]`` in [-1, 1]; positions are pixel (x, y), x right,
y down, pixel centres at integers (the top-left pixel's centre is (0, 0)), as in cv2.remap.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from .errors import DiTFlowError
from .pickles import unsafe_torch

#: Paper's query grid: 55×55 points on the first frame (§5.1, following SMM).
DEFAULT_GRID_SIZE = 55
TRACKERS = ("auto", "cotracker", "flow")
COTRACKER_ENTRY = "cotracker3_offline"
#: OpenCV's DIS presets (it has no "fine"); medium is the most accurate of the three.
_DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
_COTRACKER_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


# ---------------------------------------------------------------------------------------------------------------
# Inputs and the query grid
# ---------------------------------------------------------------------------------------------------------------


def check_frames(frames: Tensor, name: str = "frames") -> Tensor:
    """Returns ``frames`` as a float CPU-or-device tensor ``[F, 3, H, W]``; raises :class:`DiTFlowError` if not.

    Needs at least 2 frames (motion is a frame-to-frame quantity). Values are expected in [-1, 1].
    """
    frames = torch.as_tensor(frames)
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise DiTFlowError(f"{name} must be [F, 3, H, W] video frames in [-1, 1]; got shape {tuple(frames.shape)}.")
    if frames.shape[0] < 2:
        raise DiTFlowError(f"{name} has {frames.shape[0]} frame; motion needs at least 2.")
    return frames.float()


def query_grid(height: int, width: int, grid_size: int = DEFAULT_GRID_SIZE) -> Tensor:
    """Evenly spaced query points: the centres of a ``grid_size``×``grid_size`` split of the frame.

    Args:
        height, width: frame size in pixels.
        grid_size: points per side (paper: 55).
    Returns:
        ``[grid_size², 2]`` pixel (x, y), row-major with x fastest; x_i = (i + 0.5)·W/g − 0.5 (pixel centres at
        integers), so the grid is symmetric and never on the border.
    Raises:
        DiTFlowError: if grid_size < 1.
    """
    if grid_size < 1:
        raise DiTFlowError(f"grid_size must be at least 1; got {grid_size}.")
    xs = (torch.arange(grid_size, dtype=torch.float32) + 0.5) * (width / grid_size) - 0.5
    ys = (torch.arange(grid_size, dtype=torch.float32) + 0.5) * (height / grid_size) - 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).reshape(-1, 2)


def to_uint8_rgb(frames: Tensor) -> np.ndarray:
    """``[F, 3, H, W]`` in [-1, 1] → ``[F, H, W, 3]`` uint8 RGB (rounded, clipped)."""
    x = ((frames.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())


# ---------------------------------------------------------------------------------------------------------------
# Weight-free tracker: chained DIS optical flow
# ---------------------------------------------------------------------------------------------------------------


def track_flow(frames: Tensor, queries: Tensor, *, preset: str = "medium") -> Tensor:
    """Tracks ``queries`` through ``frames`` by chaining frame-to-frame OpenCV DIS optical flow.

    p(t+1) = p(t) + flow_t(p(t)), with flow_t the DIS flow from frame t to t+1 on grayscale uint8 and the lookup
    bilinear (``cv2.remap``). Points that leave the frame are **not clamped**: they keep moving with the flow of the
    nearest border pixel (``BORDER_REPLICATE``), so their positions may lie outside [0, W−1] × [0, H−1], as
    CoTracker's do. Clamping was tried and rejected: a clamped point stops and its steps become zero vectors that
    no longer disagree with anything, which pulled MF of two opposite whole-frame pans from −1.0 to −0.05 on a
    64 px test clip.
    No visibility is estimated.

    Args:
        frames: ``[F, 3, H, W]`` in [-1, 1].
        queries: ``[P, 2]`` pixel (x, y) on frame 0.
        preset: OpenCV DIS preset, ``"medium"`` (default, most accurate), ``"fast"`` or ``"ultrafast"``.
    Returns:
        ``[F, P, 2]`` float32 pixel (x, y); row 0 is ``queries``.
    Raises:
        DiTFlowError: on an unknown preset.
    """
    if preset not in _DIS_PRESETS:
        raise DiTFlowError(f"Unknown DIS preset {preset!r}; choose one of {', '.join(_DIS_PRESETS)}.")
    frames = check_frames(frames)
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in to_uint8_rgb(frames)]
    dis = cv2.DISOpticalFlow_create(_DIS_PRESETS[preset])
    pos = queries.detach().cpu().numpy().astype(np.float32).reshape(1, -1, 2)  # cv2.remap maps: [1, P]
    out = [pos[0].copy()]
    for prev, nxt in itertools.pairwise(gray):
        flow = dis.calc(prev, nxt, None)  # [H, W, 2] (dx, dy) in pixels
        step = cv2.remap(flow, pos[..., 0], pos[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        pos = pos + step
        out.append(pos[0].copy())
    return torch.from_numpy(np.stack(out))


# ---------------------------------------------------------------------------------------------------------------
# CoTracker3 offline, from the local torch.hub cache only
# ---------------------------------------------------------------------------------------------------------------


def _unsafe_torch_message() -> str | None:
    """Why CoTracker's ``.pth`` may not be read with this torch (CVE-2025-32434), or ``None`` when it may."""
    return unsafe_torch("CoTracker3's weights file (scaled_offline.pth)", "use tracker 'flow'")


def _cotracker_paths(checkpoint: str | os.PathLike | None) -> tuple[Path, Path] | None:
    """(hub code dir, checkpoint file) when both exist on disk, else None. Never touches the network."""
    hub = Path(torch.hub.get_dir())
    repo = hub / "facebookresearch_co-tracker_main"
    ckpt = Path(checkpoint) if checkpoint is not None else hub / "checkpoints" / "scaled_offline.pth"
    if not (repo / "hubconf.py").is_file() or not ckpt.is_file():
        return None
    return repo, ckpt


def cotracker_available(checkpoint: str | os.PathLike | None = None) -> bool:
    """Whether CoTracker3 offline can run without any download (code in the torch.hub cache, weights on disk) and
    this torch reads its weights safely (≥ :data:`ditflow.pickles.MIN_TORCH`)."""
    return _cotracker_paths(checkpoint) is not None and _unsafe_torch_message() is None


def _load_cotracker(repo: Path, ckpt: Path, device: torch.device) -> torch.nn.Module:
    if (unsafe := _unsafe_torch_message()) is not None:
        raise DiTFlowError(unsafe)
    key = (str(repo), str(ckpt))
    if key not in _COTRACKER_MODELS:
        # source="local" imports hubconf from the directory; pretrained=False skips its URL download.
        model = torch.hub.load(str(repo), COTRACKER_ENTRY, source="local", pretrained=False)
        # CoTracker3 ships its weights only as a .pth; weights_only=True unpickles tensors and containers alone
        # (no code runs) on torch ≥ 2.6, and the file must come from the user's own hub cache or a path they gave.
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        _COTRACKER_MODELS[key] = model.eval()
    return _COTRACKER_MODELS[key].to(device)


def track_cotracker(
    frames: Tensor, queries: Tensor, *, checkpoint: str | os.PathLike | None = None, device: str | None = None
) -> Tensor:  # pragma: no cover - needs the user's CoTracker cache
    """Tracks ``queries`` with CoTracker3 offline (the paper's tracker), loaded from local files only.

    Args:
        frames: ``[F, 3, H, W]`` in [-1, 1]; CoTracker gets ``[1, F, 3, H, W]`` in [0, 255].
        queries: ``[P, 2]`` pixel (x, y) on frame 0.
        checkpoint: a ``scaled_offline.pth`` file; default the torch.hub checkpoint cache.
        device: default CUDA when present, else CPU (slow).
    Returns:
        ``[F, P, 2]`` float32 pixel (x, y) (visibility is dropped, as in SMM's metric).
    Raises:
        DiTFlowError: if the code or the weights are not on disk.
    """
    paths = _cotracker_paths(checkpoint)
    if paths is None:
        raise DiTFlowError(_cotracker_missing_message(checkpoint))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = _load_cotracker(*paths, dev)
    video = ((check_frames(frames) + 1.0) * 127.5).clamp(0, 255)[None].to(dev)
    q = torch.cat([torch.zeros(len(queries), 1), queries.float().cpu()], dim=1)[None].to(dev)  # (t=0, x, y)
    with torch.inference_mode():
        tracks, _visibility = model(video, queries=q)
    return tracks[0].float().cpu()


def _cotracker_missing_message(checkpoint: str | os.PathLike | None) -> str:
    if _cotracker_paths(checkpoint) is not None and (unsafe := _unsafe_torch_message()) is not None:
        return unsafe
    hub = torch.hub.get_dir()
    if checkpoint is not None and not Path(checkpoint).is_file():
        return (
            f"CoTracker checkpoint {checkpoint} does not exist; "
            "pass the path of scaled_offline.pth or use tracker 'flow'."
        )
    return (
        f"CoTracker3 is not available offline: it needs the code in {hub}/facebookresearch_co-tracker_main and "
        f"scaled_offline.pth in {hub}/checkpoints (or a cotracker_checkpoint path); use tracker 'flow' otherwise."
    )


# ---------------------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------------------


def resolve_tracker(tracker: str = "auto", cotracker_checkpoint: str | os.PathLike | None = None) -> str:
    """``"auto"`` → ``"cotracker"`` when :func:`cotracker_available`, else ``"flow"``; checks explicit choices.

    A ``cotracker_checkpoint`` that does not exist makes CoTracker unavailable: ``"auto"`` then falls back to flow
    (the returned tracker name says so) and ``"cotracker"`` raises.

    Raises:
        DiTFlowError: on an unknown name, or ``"cotracker"`` when it is not on disk.
    """
    if tracker not in TRACKERS:
        raise DiTFlowError(f"Unknown tracker {tracker!r}; choose one of {', '.join(TRACKERS)}.")
    if tracker == "flow":
        return "flow"
    if cotracker_available(cotracker_checkpoint):
        return "cotracker"
    if tracker == "cotracker":
        raise DiTFlowError(_cotracker_missing_message(cotracker_checkpoint))
    return "flow"


def track_points(
    frames: Tensor,
    grid_size: int = DEFAULT_GRID_SIZE,
    tracker: str = "auto",
    cotracker_checkpoint: str | os.PathLike | None = None,
) -> tuple[Tensor, str]:
    """Tracks a ``grid_size``² grid of first-frame points (:func:`query_grid`) through a video (§5.1).

    Args:
        frames: ``[F, 3, H, W]`` in [-1, 1], F ≥ 2.
        grid_size: points per side (paper: 55, so P = 3025).
        tracker: ``"auto"`` (CoTracker3 when available offline, else flow), ``"cotracker"`` or ``"flow"``.
        cotracker_checkpoint: path of ``scaled_offline.pth`` (default: the torch.hub checkpoint cache).
    Returns:
        tracks ``[F, P, 2]`` in pixels (x, y), x right, y down; and the tracker that produced them,
        ``"cotracker3_offline"`` or ``"flow"``.
    Raises:
        DiTFlowError: on bad frames, an unknown tracker, or CoTracker asked for but not on disk.
    """
    frames = check_frames(frames)
    name = resolve_tracker(tracker, cotracker_checkpoint)
    queries = query_grid(frames.shape[-2], frames.shape[-1], grid_size)
    if name == "cotracker":  # pragma: no cover - needs the user's CoTracker cache
        return track_cotracker(frames, queries, checkpoint=cotracker_checkpoint), COTRACKER_ENTRY
    return track_flow(frames, queries), "flow"
