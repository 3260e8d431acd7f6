# SPDX-License-Identifier: Apache-2.0
"""Video I/O on PyAV: load a reference clip, fit it to the model's frame count and size, write results as mp4.

Frames are ``[T, 3, H, W]`` float32 in [-1, 1] (the library convention, see ``ditflow/__init__``); frame counts
handed to the model are 4k+1 and sizes multiples of 16 px, checked by :mod:`ditflow.layout`. No ComfyUI imports:
the nodes convert IMAGE with :func:`ditflow.layout.image_to_frames` and call :func:`prepare_reference` on that.
"""

from __future__ import annotations

import logging
import math
import os
import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import check_number
from .errors import DiTFlowError
from .files import atomic_path
from .layout import MIN_FRAMES, TEMPORAL_COMPRESSION, check_frame_count, check_size
from .limits import FLOAT_BYTES, available_bytes, require

log = logging.getLogger(__name__)

#: How :func:`prepare_reference` fits a clip to the target size: cover and centre-crop, plain resize, or fit and
#: pad with black.
RESIZE_MODES = ("crop", "stretch", "pad")
#: Image files read from a frame folder (case-insensitive), in natural name order.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: Frame rate given to a folder of frames, which carries none (CogVideoX's native rate).
FOLDER_FPS = 8.0
#: Highest frame rate accepted for written videos (players and h264 levels stop well before).
MAX_FPS = 1000.0
#: Encoders tried by :func:`write_video`, best first; the PyPI ``av`` wheels ship libx264.
_ENCODERS = ("libx264", "h264", "mpeg4")
#: Peak bytes per decoded sample (pixel × channel) in :func:`load_video`: the uint8 frame plus its float32 copy.
DECODED_SAMPLE_BYTES = 1 + FLOAT_BYTES
_TOO_BIG = "use fewer frames (--num-frames, --max-frames) or a smaller copy of the clip"


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """Decoded frame → ``[H, W, 3]`` uint8 RGB, turned upright per its display matrix (phone clips)."""
    rgb = frame.to_ndarray(format="rgb24")
    quarter_turns = round((frame.rotation or 0) / 90) % 4  # both count counter-clockwise
    return np.ascontiguousarray(np.rot90(rgb, quarter_turns)) if quarter_turns else rgb


def _decode(path: Path, max_frames: int | None, budget: int) -> tuple[list[np.ndarray], float, int]:
    """The first ``max_frames`` (or all) frames of the first video stream of ``path``, its frame rate, and how many
    frames the decoder marked corrupt. A clip whose frames cannot fit in ``budget`` bytes is refused: before
    decoding when the container gives its frame count, else as soon as the frames read exceed it."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DiTFlowError(f"{path} has no video stream; pass a video file (mp4, webm, mov, mkv, gif).")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            declared = min(n for n in (stream.frames, max_frames, 1 << 62) if n)
            if declared < 1 << 62:
                _check_fits(declared, stream.codec_context.width, stream.codec_context.height, path, budget)
            frames, corrupt, used = [], 0, 0
            for frame in container.decode(stream):
                used += frame.width * frame.height * 3 * DECODED_SAMPLE_BYTES
                if used > budget:
                    _check_fits(len(frames) + 1, frame.width, frame.height, path, budget)
                frames.append(_to_rgb(frame))
                corrupt += bool(frame.is_corrupt)
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except av.FFmpegError as e:
        raise DiTFlowError(
            f"could not read {path} as video or image ({e.__class__.__name__}: {e.strerror or e}); "
            "check that the file is complete, or re-encode it to h264 mp4."
        ) from e
    return frames, float(rate) if rate else FOLDER_FPS, corrupt


def _check_fits(count: int, width: int, height: int, source: Path, budget: int) -> None:
    """Refuses ``count`` decoded frames of ``width``×``height`` px that do not fit in ``budget`` bytes."""
    need = count * width * height * 3 * DECODED_SAMPLE_BYTES
    require(need, f"decoding {count} frames of {width}×{height} px from {source}", _TOO_BIG, available=budget)


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from an image file's header alone, or None if it cannot tell.

    Pillow's format classes are used directly: ``Image.open`` refuses images above ~179 M px (decompression-bomb
    guard) without telling their size, and it is exactly those sizes that must be estimated.
    """
    from PIL import Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

    readers = {".png": PngImagePlugin.PngImageFile, ".jpg": JpegImagePlugin.JpegImageFile,
               ".jpeg": JpegImagePlugin.JpegImageFile, ".webp": WebPImagePlugin.WebPImageFile}
    reader = readers.get(path.suffix.lower())
    try:
        with reader(str(path)) if reader else Image.open(path) as image:
            return image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # plugins raise SyntaxError on mismatch
        return None


def _natural_key(name: str) -> list:
    """Sort key that puts ``frame2.png`` before ``frame10.png``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _read_folder(folder: Path, max_frames: int | None, budget: int) -> tuple[list[np.ndarray], int]:
    """The image files of ``folder`` in natural name order, each decoded with PyAV as one RGB frame, and how many
    were marked corrupt. The first file's header sizes the whole folder, which is refused before decoding if its
    frames cannot fit in ``budget`` bytes (a 2 MB PNG of 16000×16000 px decodes to 768 MB)."""
    files = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")),
        key=lambda p: _natural_key(p.name),
    )[:max_frames]
    if not files:
        raise DiTFlowError(
            f"folder {folder} holds no image frames; put the frames there as {', '.join(IMAGE_SUFFIXES)} files."
        )
    if (size := _image_size(files[0])) is not None:  # sizes the folder from its first header, before decoding
        _check_fits(len(files), *size, folder, budget)
    frames, corrupt = [], 0
    for file in files:
        if (size := _image_size(file)) is not None:  # the decoder's own probe would already decode the file
            _check_fits(len(frames) + 1, *size, folder, budget)
        decoded, _, bad = _decode(file, 1, budget)
        if not decoded:
            raise DiTFlowError(f"image frame {file} decodes to nothing; replace or delete it.")
        frames.append(decoded[0])
        corrupt += bad
    return frames, corrupt


def load_video(path: str | os.PathLike, *, max_frames: int | None = None) -> tuple[Tensor, float]:
    """Decode a video file (mp4, webm, mov, mkv, gif, ...) or a folder of image frames (alpha is dropped).

    Args:
        path: a video file, or a folder of png/jpg/webp frames taken in natural name order (``2`` before ``10``).
        max_frames: stop after this many frames (``None``: all); bounds memory on long clips, which cost
            T·H·W·12 bytes as float32 (49 frames at 720×480 ≈ 200 MB).
    Returns:
        (frames ``[T, 3, H, W]`` float32 in [-1, 1], frames per second); a folder has :data:`FOLDER_FPS`.
        Frames with rotation metadata are turned upright.
    Raises:
        DiTFlowError: if the path is missing, unreadable or corrupt, has no video stream or no frames, is an
            empty folder, holds frames of different sizes, or its frames cannot fit in memory (estimated from the
            headers before decoding: ``T·H·W·3·``:data:`DECODED_SAMPLE_BYTES` bytes).
    Frames the decoder marks corrupt are used, and counted in a warning on the ``ditflow`` logger.
    """
    path = Path(path).expanduser()
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative paths start at {Path.cwd()})"
        raise DiTFlowError(f"video {path} does not exist; check the path{where}.")
    if max_frames is not None and max_frames < 1:
        raise DiTFlowError(f"max_frames must be at least 1 or None, got {max_frames}.")
    budget = available_bytes()
    budget = math.inf if budget is None else budget  # a device that does not say: nothing is refused
    if path.is_dir():
        (frames, corrupt), fps = _read_folder(path, max_frames, budget), FOLDER_FPS
    else:
        frames, fps, corrupt = _decode(path, max_frames, budget)
    if not frames:
        raise DiTFlowError(f"{path} decodes to zero frames; check the file or re-encode it.")
    if corrupt:
        log.warning(f"{corrupt} of the {len(frames)} frames read from {path} are marked corrupt by the decoder "
                    "(a damaged or truncated stream); they are used as decoded; re-encode or replace the clip.")
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise DiTFlowError(
            f"frames of {path} differ in size ({sorted(s[1::-1] for s in sizes)} as W×H); resize them to one size."
        )
    out = torch.empty((len(frames), 3, *frames[0].shape[:2]))  # filled frame by frame: no second uint8 copy
    for i, rgb in enumerate(frames):
        out[i] = torch.from_numpy(rgb).permute(2, 0, 1)
    return out.div_(127.5).sub_(1.0), fps


# ---------------------------------------------------------------------------------------------------------------
# Fitting a clip to the model
# ---------------------------------------------------------------------------------------------------------------


def _resize(frames: Tensor, height: int, width: int) -> Tensor:
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    return F.interpolate(frames, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


def fit_geometry(src_height: int, src_width: int, height: int, width: int, resize: str) -> tuple[int, int, int, int]:
    """How a ``src_width`` × ``src_height`` picture meets a ``width`` × ``height`` frame under ``resize`` (one of
    :data:`RESIZE_MODES`): ``(new_h, new_w, top, left)``, the size it is resized to and where the resized picture's
    top-left corner lands in the frame, in px (negative for ``crop``, ≥ 0 for ``pad``, 0 for ``stretch``).

    ``crop`` scales (aspect kept) to cover the frame and centre-crops; ``stretch`` resizes to the frame ignoring
    aspect; ``pad`` fits inside and centres. Raises :class:`DiTFlowError` for an unknown mode.
    """
    if resize not in RESIZE_MODES:
        raise DiTFlowError(f"unknown resize mode {resize!r}; choose one of {', '.join(RESIZE_MODES)}.")
    if resize == "stretch":
        return height, width, 0, 0
    if resize == "crop":  # cover, then centre-crop
        scale = max(height / src_height, width / src_width)
        new_h, new_w = max(height, round(src_height * scale)), max(width, round(src_width * scale))
        return new_h, new_w, -((new_h - height) // 2), -((new_w - width) // 2)
    scale = min(height / src_height, width / src_width)  # pad: fit inside, then centre
    new_h, new_w = max(1, min(height, round(src_height * scale))), max(1, min(width, round(src_width * scale)))
    return new_h, new_w, (height - new_h) // 2, (width - new_w) // 2


def place(pictures: Tensor, top: int, left: int, height: int, width: int, *, fill: float = 0.0) -> Tensor:
    """``pictures [..., h', w']`` put into ``[..., height, width]`` with their top-left corner at (``left``,
    ``top``) px (from :func:`fit_geometry`): cropped where they stick out, ``fill`` where they do not cover."""
    h, w = pictures.shape[-2:]
    pads = (left, width - w - left, top, height - h - top)  # negative padding crops
    return F.pad(pictures, pads, value=fill)


def fit_pictures(pictures: Tensor, height: int, width: int, resize: str, *, fill: float = 0.0) -> Tensor:
    """``pictures [N, C, H, W]`` fitted to ``height × width`` px by ``resize`` (:func:`fit_geometry`): bilinear,
    antialiased; ``fill`` where they do not cover the frame (``pad``)."""
    new_h, new_w, top, left = fit_geometry(pictures.shape[-2], pictures.shape[-1], height, width, resize)
    return place(_resize(pictures, new_h, new_w), top, left, height, width, fill=fill)


def selectable_frames(total: int, start: int, stride: int) -> int:
    """How many frames ``start``, ``start + stride``, ... a clip of ``total`` frames holds (0 if start ≥ total)."""
    return (total - 1 - start) // stride + 1 if 0 <= start < total and stride >= 1 else 0


def prepare_reference(
    frames: Tensor,
    *,
    height: int,
    width: int,
    num_frames: int = 49,
    start: int = 0,
    stride: int = 1,
    resize: str = "crop",
) -> Tensor:
    """Pick ``num_frames`` frames (``start``, ``start + stride``, ...) and fit them to ``height`` × ``width``.

    Args:
        frames: ``[T, 3, H, W]`` in [-1, 1], from :func:`load_video` or :func:`ditflow.layout.image_to_frames`.
        height, width: target size in px, positive multiples of 16.
        num_frames: frames to keep, 4k+1 (49 is CogVideoX's native length) or a multiple of 8 (the authors' 24).
        start: index of the first frame kept (0-based).
        stride: step between kept frames (1 keeps consecutive frames, 2 every other one: faster motion).
        resize: one of :data:`RESIZE_MODES`: ``"crop"`` scales (aspect kept) to cover the target and centre-crops,
            ``"stretch"`` resizes to the target ignoring aspect, ``"pad"`` fits inside and pads with black (-1).
    Returns:
        ``[num_frames, 3, height, width]`` float32 in [-1, 1], on the device of ``frames``. Bilinear, antialiased.
    Raises:
        DiTFlowError: on a bad shape, frame count, size, start, stride or mode, if the clip is too short
            (the message gives the largest num_frames and stride that fit), or if the resized frames cannot fit in
            the memory of ``frames``' device (estimated before allocating them).
    """
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise DiTFlowError(
            f"expected frames of shape [T, 3, H, W], got {list(frames.shape)}; load them with load_video."
        )
    check_frame_count(num_frames)
    check_size(height, width)
    new_h, new_w, _, _ = fit_geometry(frames.shape[-2], frames.shape[-1], height, width, resize)  # checks resize
    if start < 0 or stride < 1:
        raise DiTFlowError(f"start must be ≥ 0 and stride ≥ 1, got start={start}, stride={stride}.")
    total = frames.shape[0]
    available = selectable_frames(total, start, stride)
    if available < num_frames:
        fit = (available - 1) // TEMPORAL_COMPRESSION * TEMPORAL_COMPRESSION + 1 if available >= MIN_FRAMES else 0
        hint = f"num_frames={fit}" if fit else "an earlier start"
        max_stride = (total - 1 - start) // (num_frames - 1) if num_frames > 1 and start < total else 0
        if max_stride >= 1:
            hint += f" or stride={max_stride}"
        raise DiTFlowError(
            f"the reference clip has {total} frames, and from frame {start} with stride {stride} it gives at most "
            f"{available}, fewer than num_frames={num_frames}; use {hint}, or a longer clip."
        )
    # The resized copy and the clamped output (plus a float copy of integer input) before any is allocated.
    samples = new_h * new_w + height * width + (0 if frames.is_floating_point() else frames.shape[-2] * frames.shape[-1])
    need = num_frames * 3 * FLOAT_BYTES * samples
    require(need, f"fitting {num_frames} frames to {width}×{height} px", "use a smaller size or fewer frames",
            frames.device)
    clip = frames[start : start + (num_frames - 1) * stride + 1 : stride].float()
    out = fit_pictures(clip, height, width, resize, fill=-1.0)  # padding is black
    return out.clamp(-1.0, 1.0).contiguous()


def load_start_image(path: str | os.PathLike, *, height: int, width: int, resize: str = "crop") -> Tensor:
    """The start frame of an image-to-video run: an image file (png, jpg, webp) or a video's first frame, fitted to
    ``height`` × ``width`` px by ``resize`` as the reference is (:func:`fit_pictures`, black padding):
    ``[3, H, W]`` in [-1, 1].

    Raises:
        DiTFlowError: as :func:`load_video`; an unknown ``resize``.
    """
    frames, _ = load_video(path, max_frames=1)
    return fit_pictures(frames[:1], height, width, resize, fill=-1.0)[0].clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def check_fps(fps: float | None) -> float | None:
    """``None`` (the caller's default), or ``fps`` as a float if it is finite and in (0, :data:`MAX_FPS`].

    Raises:
        DiTFlowError: for 0, a negative number, NaN, ±Inf or more than :data:`MAX_FPS` (no silent default).
    """
    if fps is None:
        return None
    return check_number("fps", fps, 0.0, MAX_FPS, "CogVideoX renders 8; the reference's own rate is the default",
                        low_open=True)


def _encoder() -> str:
    for name in _ENCODERS:
        try:
            av.codec.Codec(name, "w")
            return name
        except (av.FFmpegError, ValueError):
            continue
    raise DiTFlowError(f"this PyAV build has none of the encoders {', '.join(_ENCODERS)}; reinstall av from PyPI.")


def _to_uint8(frames: Tensor) -> np.ndarray:
    """``[T, 3, H, W]`` in [-1, 1] → ``[T, H, W, 3]`` uint8 (clamped, rounded)."""
    rgb = ((frames.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return rgb.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def write_video(path: str | os.PathLike, frames: Tensor, fps: float) -> Path:
    """Write frames as an h264 (yuv420p) mp4, atomically: a temporary file in the same folder is renamed at the end.

    Args:
        path: output file; its folder is created if missing; an existing file is replaced only on success.
        frames: ``[T, 3, H, W]`` in [-1, 1] (clamped), H and W even (yuv420p halves chroma; ours are ×16).
        fps: frames per second, > 0.
    Returns:
        the path written. The encoder is libx264 at CRF 18 (near-transparent), else h264 or mpeg4.
    Raises:
        DiTFlowError: on a bad shape, odd size, fps (see :func:`check_fps`) or an encoding failure; no partial file
            is left behind.
    """
    path = Path(path).expanduser()
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] < 1:
        raise DiTFlowError(f"expected frames of shape [T, 3, H, W] with T ≥ 1, got {list(frames.shape)}.")
    height, width = frames.shape[-2:]
    if height % 2 or width % 2:
        raise DiTFlowError(f"cannot write {width}×{height} px as yuv420p h264, which needs even sizes; crop or resize.")
    check_fps(fps)
    codec = _encoder()
    try:
        with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream(codec, rate=Fraction(float(fps)).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            # Tag what swscale does so players don't guess: BT.601 matrix (6), limited range (1), BT.709 primaries
            # and transfer (1; sRGB shares the primaries); values are FFmpeg's AVCOL_* enums.
            cc = stream.codec_context
            cc.colorspace, cc.color_range, cc.color_primaries, cc.color_trc = 6, 1, 1, 1
            if codec == "libx264":
                stream.options = {"crf": "18"}
            for rgb in _to_uint8(frames):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
            container.mux(stream.encode(None))  # flush delayed frames
    except av.FFmpegError as e:
        raise DiTFlowError(f"could not write {path} ({e}); check the folder is writable and has space.") from e
    return path


__all__ = [
    "FOLDER_FPS", "IMAGE_SUFFIXES", "MAX_FPS", "RESIZE_MODES", "check_fps", "fit_geometry", "fit_pictures",
    "load_start_image", "load_video", "place", "prepare_reference", "selectable_frames", "write_video",
]
