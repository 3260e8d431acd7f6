# SPDX-License-Identifier: Apache-2.0
"""Claims about ditflow.video: round trips, frame selection, resize geometry, and one readable error per failure.

Synthetic clips are tiny (9–17 frames of 64×96 px) so the file runs in a few seconds; two real clips are read when
present (see ``conftest.py``).
"""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from ditflow import video
from ditflow.errors import DiTFlowError
from ditflow.layout import image_to_frames
from ditflow.video import RESIZE_MODES, load_video, prepare_reference, write_video


def _levels(values, height: int = 64, width: int = 96) -> torch.Tensor:
    """Frames ``[len(values), 3, H, W]`` where frame k is flat grey at ``values[k]`` (in [-1, 1])."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, height, width).clone()


def _smooth_clip(num_frames: int = 9, height: int = 64, width: int = 96) -> torch.Tensor:
    """Colour gradients drifting right over time, in [-0.8, 0.8] (no clipping at the ends of the range)."""
    y = torch.linspace(-1, 1, height).view(1, height, 1)
    x = torch.linspace(-1, 1, width).view(1, 1, width)
    t = torch.arange(num_frames, dtype=torch.float32).view(num_frames, 1, 1) / num_frames
    rgb = [torch.sin(2 * x - t) + 0 * y, torch.cos(2 * y + t) + 0 * x, 0.5 * (x + y) + 0 * t]
    return 0.8 * torch.stack(rgb, dim=1).clamp(-1, 1)


# --------------------------------------------------------------------------------------------------------------
# Round trip and selection
# --------------------------------------------------------------------------------------------------------------


def test_round_trip_keeps_count_size_fps_and_values(tmp_path):
    frames = _smooth_clip()  # 9 frames = 4·2+1; 64×96 px, multiples of 16
    path = write_video(tmp_path / "new" / "clip.mp4", frames, fps=12.0)  # folder created
    back, fps = load_video(path)
    assert back.shape == frames.shape and back.dtype == torch.float32
    assert fps == pytest.approx(12.0)
    assert back.min() >= -1 and back.max() <= 1
    # h264 is lossy: 4:2:0 chroma subsampling alone costs ≈0.013 mean on these colour gradients (measured via
    # swscale without the codec); CRF 18 adds a little, and ringing reaches ≈0.12 max (it varies run to run with
    # x264's threads). Limits: 0.025 mean (≈3/255), 0.2 max.
    err = (back - frames).abs()
    assert err.mean() < 0.025 and err.max() < 0.2, (err.mean(), err.max())


def test_write_video_accepts_non_integer_fps(tmp_path):
    back, fps = load_video(write_video(tmp_path / "ntsc.mp4", _levels([0.0] * 5), fps=30000 / 1001))
    assert back.shape[0] == 5 and fps == pytest.approx(29.97, abs=1e-2)


def test_start_and_stride_pick_exactly_those_frames_from_a_decoded_video(tmp_path):
    # 17 frames whose brightness steps by 0.1: frame k is -0.8 + 0.1·k, far apart compared with h264 error.
    levels = [-0.8 + 0.1 * k for k in range(17)]
    frames, _ = load_video(write_video(tmp_path / "ramp.mp4", _levels(levels), fps=8))
    picked = prepare_reference(frames, height=64, width=96, num_frames=5, start=2, stride=3)
    assert picked.shape == (5, 3, 64, 96)
    expected = torch.tensor([levels[k] for k in (2, 5, 8, 11, 14)])
    assert torch.allclose(picked.mean(dim=(1, 2, 3)), expected, atol=0.02)


def test_selection_on_a_tensor_is_exact_and_accepts_comfy_images():
    frames = _levels([k / 100 for k in range(20)], 32, 48)
    picked = prepare_reference(frames, height=32, width=48, num_frames=5, start=1, stride=4)
    assert torch.equal(picked[:, 0, 0, 0], torch.tensor([0.01, 0.05, 0.09, 0.13, 0.17]))
    image = torch.rand(5, 40, 60, 3)  # ComfyUI IMAGE [T, H, W, 3] in [0, 1]
    out = prepare_reference(image_to_frames(image), height=32, width=48, num_frames=5)
    assert out.shape == (5, 3, 32, 48) and out.min() >= -1 and out.max() <= 1


# --------------------------------------------------------------------------------------------------------------
# Resize geometry
# --------------------------------------------------------------------------------------------------------------


def _marked_frame() -> torch.Tensor:
    """One 720×480 black frame with a white 8 px centre column (x 356..363) and a white 40 px left band."""
    frame = torch.full((1, 3, 480, 720), -1.0)
    frame[..., 356:364] = 1.0
    frame[..., :40] = 1.0
    return frame


def test_crop_covers_the_target_and_keeps_the_centre():
    # 720×480 → cover 256×256 at scale 256/480: 384×256, then 64 px cut on each side; the centre column
    # (x 360) lands at 360·256/480 − 64 = 128, the left band (x < 40 → < 21 px) is cut away.
    out = prepare_reference(_marked_frame().expand(5, -1, -1, -1), height=256, width=256, num_frames=5,
                            resize="crop")
    assert out.shape == (5, 3, 256, 256)
    row = out[0, 0, 128]
    assert row[126:130].min() > 0.5 and row.argmax().item() in range(125, 131)
    assert row[:100].max() < -0.999 and row[160:].max() < -0.999  # exact -1 up to float rounding


def test_stretch_resizes_without_cutting():
    out = prepare_reference(_marked_frame().expand(5, -1, -1, -1), height=256, width=256, num_frames=5,
                            resize="stretch")
    row = out[0, 0, 128]
    assert row[:10].min() > 0.5  # left band kept: 40 px · 256/720 ≈ 14 px
    assert row[126:130].max() > 0.5 and row[30:110].max() < -0.999


def test_pad_fits_inside_with_black_bars_of_the_right_size():
    # A white 720×480 frame fits 256 wide at scale 256/720: 256×171 px (480·0.356 = 170.7); the 85 spare rows
    # are split 42 above and 43 below, filled with black (-1).
    white = torch.ones(5, 3, 480, 720)
    out = prepare_reference(white, height=256, width=256, num_frames=5, resize="pad")
    assert torch.all(out[..., :42, :] == -1) and torch.all(out[..., 42 + 171 :, :] == -1)
    assert torch.allclose(out[..., 42 : 42 + 171, :], torch.ones(5, 3, 171, 256))


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_every_mode_gives_the_target_shape_in_range(mode):
    frames = _smooth_clip(9, 50, 70)
    out = prepare_reference(frames, height=32, width=64, num_frames=9, resize=mode)
    assert out.shape == (9, 3, 32, 64) and out.min() >= -1 and out.max() <= 1


# --------------------------------------------------------------------------------------------------------------
# Other inputs: frame folders, gif, rotation metadata
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_folder_of_frames_loads_in_natural_order(tmp_path, suffix):
    image = pytest.importorskip("PIL.Image")
    for k in (1, 2, 10):  # natural order 1, 2, 10 (plain string order would be 1, 10, 2)
        image.fromarray(np.full((32, 48, 3), 20 * k, np.uint8)).save(tmp_path / f"frame_{k}{suffix}", quality=95)
    (tmp_path / "notes.txt").write_text("not a frame")
    frames, fps = load_video(tmp_path)
    assert frames.shape == (3, 3, 32, 48) and fps == video.FOLDER_FPS
    expected = torch.tensor([20.0, 40.0, 200.0]) / 127.5 - 1
    assert torch.allclose(frames.mean(dim=(1, 2, 3)), expected, atol=0.02)  # jpg/webp: lossy but flat


def test_gif_loads_with_its_frame_rate(tmp_path):
    image = pytest.importorskip("PIL.Image")
    gif = [image.fromarray(np.full((32, 48, 3), 40 * k, np.uint8)) for k in range(5)]
    gif[0].save(tmp_path / "a.gif", save_all=True, append_images=gif[1:], duration=100, loop=0)  # 100 ms = 10 fps
    frames, fps = load_video(tmp_path / "a.gif")
    assert frames.shape == (5, 3, 32, 48) and fps == pytest.approx(10.0)
    assert torch.allclose(frames.mean(dim=(1, 2, 3)), torch.arange(5) * 40 / 127.5 - 1, atol=0.02)


def test_max_frames_stops_decoding_early(tmp_path):
    path = write_video(tmp_path / "a.mp4", _levels([0.0] * 9), fps=8)
    assert load_video(path, max_frames=3)[0].shape[0] == 3


def test_rotation_metadata_is_applied(tmp_path):
    # A phone-style file: 64×32 stored, display matrix turning it 90° clockwise (rotation -90) → 32×64 upright.
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :16] = 255  # white left band → ends up at the top after a clockwise quarter turn
    with av.open(str(tmp_path / "rot.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(-90)
        for _ in range(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")))
        container.mux(stream.encode(None))
    frames, _ = load_video(tmp_path / "rot.mp4")
    assert frames.shape == (2, 3, 64, 32)
    assert frames[0, :, :12].mean() > 0.8 and frames[0, :, 20:].mean() < -0.8


# --------------------------------------------------------------------------------------------------------------
# Errors: each a DiTFlowError naming the problem and what to do
# --------------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DiTFlowError, match=r"nope\.mp4 does not exist; check the path"):
        load_video(tmp_path / "nope.mp4")


def test_corrupt_file(tmp_path):
    (tmp_path / "x.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DiTFlowError, match=r"could not read .*x\.mp4.*re-encode"):
        load_video(tmp_path / "x.mp4")


def test_file_without_video_stream(tmp_path):
    with av.open(str(tmp_path / "a.m4a"), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(DiTFlowError, match="has no video stream"):
        load_video(tmp_path / "a.m4a")


def test_video_stream_with_zero_decodable_frames(tmp_path):
    # An h264 stream whose packets are all zeros: the decoder drops them and yields no frame.
    with av.open(str(tmp_path / "zero.mkv"), "w") as container:
        stream = container.add_stream("h264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        container.start_encoding()
        for i in range(3):
            packet = av.Packet(bytes(32))
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, Fraction(1, 8)
            container.mux(packet)
    with pytest.raises(DiTFlowError, match="zero frames"):
        load_video(tmp_path / "zero.mkv")


def test_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("no frames here")
    with pytest.raises(DiTFlowError, match=r"holds no image frames; put the frames there as \.png"):
        load_video(tmp_path)


def test_folder_of_mixed_sizes(tmp_path):
    image = pytest.importorskip("PIL.Image")
    image.new("RGB", (48, 32)).save(tmp_path / "0.png")
    image.new("RGB", (64, 32)).save(tmp_path / "1.png")
    with pytest.raises(DiTFlowError, match="differ in size"):
        load_video(tmp_path)


def test_too_few_frames_says_what_fits():
    frames = _levels([0.0] * 24, 32, 48)
    # 24 frames from start 0 stride 2 → 12 usable; largest 4k+1 ≤ 12 is 9; stride (24−1)//(49−1) = 0 never fits.
    with pytest.raises(DiTFlowError, match=r"has 24 frames.*at most 12.*num_frames=9, or a longer clip"):
        prepare_reference(frames, height=32, width=48, num_frames=49, stride=2)
    # 13 frames need stride ≤ (24−1)//12 = 1.
    with pytest.raises(DiTFlowError, match=r"at most 12.*use num_frames=9 or stride=1"):
        prepare_reference(frames, height=32, width=48, num_frames=13, stride=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_frames": 47}, r"frame count 47 is not of the form 4k\+1.*use 45 or 49.*the authors' 24"),
        ({"height": 250}, r"height 250 px is not a positive multiple of 16.*use 240"),
        ({"resize": "zoom"}, r"unknown resize mode 'zoom'; choose one of crop, stretch, pad"),
        ({"stride": 0}, r"stride ≥ 1"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"height": 32, "width": 48, "num_frames": 9} | kwargs
    with pytest.raises(DiTFlowError, match=message):
        prepare_reference(_levels([0.0] * 60, 32, 48), **args)


def test_bad_frame_shape():
    with pytest.raises(DiTFlowError, match=r"\[T, 3, H, W\]"):
        prepare_reference(torch.zeros(9, 32, 48, 3), height=32, width=48, num_frames=9)


def test_odd_size_cannot_be_written(tmp_path):
    with pytest.raises(DiTFlowError, match="needs even sizes"):
        write_video(tmp_path / "odd.mp4", torch.zeros(3, 3, 33, 48), fps=8)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------------


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(DiTFlowError, match=r"\[T, 3, H, W\]"):
        write_video(tmp_path / "out.mp4", torch.zeros(9, 64, 96, 3), fps=8)  # IMAGE layout, not frames
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_encode_keeps_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"previous result")

    def two_frames_then_fail(frames):
        rgb = np.zeros((64, 96, 3), np.uint8)
        yield rgb
        yield rgb
        raise RuntimeError("simulated crash while encoding")

    monkeypatch.setattr(video, "_to_uint8", two_frames_then_fail)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_video(target, _levels([0.0] * 9), fps=8)
    assert os.listdir(tmp_path) == ["out.mp4"] and target.read_bytes() == b"previous result"


# --------------------------------------------------------------------------------------------------------------
# Real clips
# --------------------------------------------------------------------------------------------------------------


def test_bmx_trees_loads_and_fits(bmx_path):
    frames, fps = load_video(bmx_path)
    assert frames.shape == (24, 3, 480, 720) and fps == pytest.approx(10.0)
    ref = prepare_reference(frames, height=480, width=720, num_frames=21)
    assert ref.shape == (21, 3, 480, 720) and torch.equal(ref, frames[:21])  # same size: no resampling
    with pytest.raises(DiTFlowError, match=r"has 24 frames.*num_frames=21"):
        prepare_reference(frames, height=480, width=720)  # default 49


def test_real_footage_loads_and_fits(real_clip_path):
    frames, fps = load_video(real_clip_path, max_frames=17)  # 17 of 132 frames: 17×1280×720 float32 ≈ 190 MB
    assert frames.shape == (17, 3, 720, 1280) and fps == pytest.approx(25.0)
    assert frames.std() > 0.1  # real picture, not a blank decode
    ref = prepare_reference(frames, height=64, width=96, num_frames=9, stride=2)
    assert ref.shape == (9, 3, 64, 96) and ref.dtype == torch.float32
    assert ref.min() >= -1 and ref.max() <= 1


def test_the_shipped_example_clip_is_real_short_and_attributed(example_clip_path):
    assert example_clip_path.stat().st_size <= 2_000_000
    frames, fps = load_video(example_clip_path)
    assert frames.shape == (57, 3, 480, 854) and fps == pytest.approx(25.0)
    assert frames.std() > 0.1 and (frames[1:] - frames[:-1]).abs().mean() > 0.01  # a picture that moves
    notice = (example_clip_path.parent / "README.md").read_text()
    for required in ("Big Buck Bunny", "Blender Foundation", "CC BY 3.0", "creativecommons.org/licenses/by/3.0"):
        assert required in notice


# --------------------------------------------------------------------------------------------------------------
# Frame count "auto"
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("available", "expected"), [(57, 49), (49, 49), (48, 45), (24, 21), (10, 9), (5, 5)])
def test_auto_takes_the_largest_4k_plus_1_up_to_the_native_49(available, expected):
    from ditflow.layout import largest_frame_count

    assert largest_frame_count(available) == expected
    assert largest_frame_count(available, cap=9) == min(expected, 9)


@pytest.mark.parametrize("available", [4, 1, 0])
def test_auto_refuses_clips_too_short_for_motion(available):
    from ditflow.layout import largest_frame_count

    with pytest.raises(DiTFlowError, match=rf"only {available} frame\(s\) are available.*at least 5"):
        largest_frame_count(available)


@pytest.mark.parametrize(("start", "stride", "expected"), [(0, 1, 49), (0, 6, 9), (8, 1, 49), (20, 2, 17)])
def test_read_reference_auto_on_the_example_clip(example_clip_path, start, stride, expected):
    # 57 frames: from 0 → 57 (capped at 49); stride 6 → 10 → 9; from 8 → 49; from 20 with stride 2 → 19 → 17.
    from ditflow.jobs import ReferenceOptions, read_reference

    notes = []
    options = ReferenceOptions(num_frames="auto", height=32, width=48, start=start, stride=stride)
    frames, fps = read_reference(example_clip_path, options, log=notes.append)
    assert frames.shape == (expected, 3, 32, 48) and fps == pytest.approx(25.0)
    (note,) = notes
    assert note.startswith(f"num-frames auto: {expected} ") and f"from frame {start} with stride {stride}" in note


def test_read_reference_auto_refuses_a_selection_too_short_for_motion(example_clip_path):
    from ditflow.jobs import ReferenceOptions, read_reference

    notes = []
    options = ReferenceOptions(num_frames="auto", height=32, width=48, start=50, stride=3)  # frames 50, 53, 56
    with pytest.raises(DiTFlowError, match=r"gives 3 frame\(s\) from frame 50 with stride 3.*at least 5"):
        read_reference(example_clip_path, options, log=notes.append)
    assert notes == []


def test_the_authors_24_frames_encode_to_6_latent_frames(tiny_models):
    """24 frames (the paper's clips, the authors' preset) are whole VAE frame batches: 6 latent frames, like 21."""
    from ditflow.layout import latent_frames

    frames = prepare_reference(_levels([0.1 * i for i in range(30)], 64, 96), height=64, width=96, num_frames=24)
    assert frames.shape == (24, 3, 64, 96) and latent_frames(24) == latent_frames(21) == 6
    assert tiny_models["5b"].encode_video(frames).shape == (1, 6, 16, 8, 12)


def test_even_latent_frame_counts_decode_to_four_frames_each(tiny_models):
    """diffusers' VAE decodes latent frames in pairs: 13 → 49 but 6 → 24 (the paper's clip length), not 21."""
    from ditflow.layout import decoded_frames

    for latent, frames in ((3, 9), (6, 24)):
        z = torch.randn(1, latent, 16, 8, 12, generator=torch.Generator().manual_seed(0))
        assert tiny_models["5b"].decode_latents(z).shape[0] == decoded_frames(latent) == frames
    assert decoded_frames(13) == 49
