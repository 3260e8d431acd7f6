# SPDX-License-Identifier: Apache-2.0
"""Limits and notices: requests that cannot fit are refused before allocating, and what goes ahead but deserves a
word (corrupt frames, a prompt cut to the text encoder's length) is said on stderr and kept in run.json.

Tiny sizes: 9 frames at 64×96 px → 3 latent frames × 4×6 patches; the tiny text encoder reads 16 tokens (real: 226).
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import zlib

import av
import pytest
import torch

from ditflow import video
from ditflow.cli import main
from ditflow.errors import DiTFlowError
from ditflow.layout import check_frame_count
from ditflow.text import encode_prompt
from ditflow.video import load_video, prepare_reference, write_video

LONG_PROMPT = " ".join(["a brown dog runs along the beach at sunset while waves roll in"] * 4)  # > 16 tokens
TINY = ["--height", "64", "--width", "96", "--steps", "2", "--guidance-fraction", "0.5", "--opt-steps", "1",
        "--guidance-blocks", "1", "--dtype", "fp32", "--device", "cpu"]


def _black_png(path, width: int, height: int) -> None:
    """A valid RGB PNG of black pixels, written without compressing its ``3·w·h`` zero bytes one by one.

    Every row is a 0 filter byte and zeros, so the image data is all zeros: one raw-deflate chunk of zeros ending in
    a full flush (which resets the compressor, so the same bytes encode the next chunk) is repeated, then a final
    block; the zlib checksum of n zeros is adler32 = (n mod 65521) << 16 | 1.
    """
    total, chunk = (1 + 3 * width) * height, 1 << 20
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(bytes(chunk)) + deflate.flush(zlib.Z_FULL_FLUSH)
    last = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = last.compress(bytes(total % chunk)) + last.flush()
    data = b"\x78\xda" + block * (total // chunk) + tail + struct.pack(">I", (total % 65521) << 16 | 1)

    def part(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + part(b"IHDR", ihdr) + part(b"IDAT", data) + part(b"IEND", b""))


# ---------------------------------------------------------------------------------------------------------------
# Requests that cannot fit
# ---------------------------------------------------------------------------------------------------------------


def test_the_black_png_helper_writes_a_png_that_decodes(tmp_path):
    (tmp_path / "f").mkdir()
    _black_png(tmp_path / "f" / "0.png", 640, 1700)  # 3.3 MB of zeros: several flushed chunks and a tail
    frames, _ = load_video(tmp_path / "f")
    assert frames.shape == (1, 3, 1700, 640) and bool((frames == -1).all())


def test_a_folder_of_16000px_pngs_is_refused_before_decoding(tmp_path, monkeypatch):
    folder = tmp_path / "frames"
    folder.mkdir()
    _black_png(folder / "frame_000.png", 16000, 16000)  # ~0.7 MB on disk, 768 MB decoded
    for i in range(1, 49):
        os.link(folder / "frame_000.png", folder / f"frame_{i:03d}.png")
    monkeypatch.setattr(video, "_decode", lambda *a, **k: pytest.fail("decoding started"))
    with pytest.raises(DiTFlowError, match=r"decoding 49 frames of 16000×16000 px from .*frames needs about "
                                           r"\d+\.\d GB of memory, but only"):
        load_video(folder)


def test_a_16384px_request_is_refused_before_allocating():
    frames = torch.zeros(49, 3, 16, 16)  # crop: resized to 16384² too, so 2 × 49·3·16384²·4 bytes
    with pytest.raises(DiTFlowError, match=r"fitting 49 frames to 16384×16384 px needs about 29\d\.\d GB"):
        prepare_reference(frames, height=16384, width=16384, num_frames=49)


def test_a_16384px_transfer_is_one_line_on_the_command_line(tiny_5b_path, real_clip_path, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["transfer", "--model", str(tiny_5b_path), "--video", str(real_clip_path), "--prompt", "x",
                 "--out", str(out), "--num-frames", "49", *TINY, "--height", "16384", "--width", "16384"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("error: fitting 49 frames to 16384×16384 px needs about")


# ---------------------------------------------------------------------------------------------------------------
# Frame counts
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count,message", [
    (1, r"frame count 1 is too few: motion needs at least 5 frames"),
    (3, r"frame count 3 is too few"),
    (0, r"frame count 0 is too few"),
    (7, r"frame count 7 is not of the form 4k\+1 that CogVideoX needs; use 5 or 9"),
])
def test_fewer_than_5_frames_are_refused_and_no_hint_suggests_1(count, message):
    with pytest.raises(DiTFlowError, match=message) as err:
        check_frame_count(count)
    assert "use 1 " not in str(err.value)


def test_a_clip_too_short_for_5_frames_does_not_suggest_1():
    with pytest.raises(DiTFlowError, match=r"at most 3.*use an earlier start, or a longer clip"):
        prepare_reference(torch.zeros(3, 3, 16, 16), height=16, width=16, num_frames=5)


def test_num_frames_1_on_the_command_line_is_exit_2(tiny_5b_path, real_clip_path, tmp_path, capsys):
    code = main(["transfer", "--model", str(tiny_5b_path), "--video", str(real_clip_path), "--prompt", "x",
                 "--out", str(tmp_path / "out"), "--num-frames", "1", *TINY])
    assert code == 2 and "frame count 1 is too few" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Notices: corrupt frames, long prompts
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corrupt_clip(tmp_path_factory):
    """A 9-frame 64×96 clip in which the decoder marks at least one frame corrupt yet decodes all nine.

    A textured frame pans 2 px per frame; 16 bytes in one inter frame are inverted. Which frame conceals its damage
    without a decoding error depends on the encoder, so each inter frame is tried in turn.
    """
    folder = tmp_path_factory.mktemp("corrupt")
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, 64, 96, generator=g) * 2 - 1
    write_video(folder / "clean.mp4", torch.cat([base.roll(2 * i, dims=-1) for i in range(9)]), 8)
    data = (folder / "clean.mp4").read_bytes()
    with av.open(str(folder / "clean.mp4")) as c:
        packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size and not p.is_keyframe]
    for pos, size in packets:
        damaged = bytearray(data)
        start = pos + size * 3 // 10
        damaged[start : start + 16] = bytes(b ^ 0xFF for b in damaged[start : start + 16])
        try:
            with av.open(io.BytesIO(bytes(damaged))) as c:
                flags = [f.is_corrupt for f in c.decode(video=0)]
        except av.FFmpegError:
            continue
        if len(flags) == 9 and any(flags):
            (folder / "damaged.mp4").write_bytes(bytes(damaged))
            return folder / "damaged.mp4", sum(flags)
    pytest.skip("no single-frame damage that the decoder conceals and flags was found for this encoder")


def test_frames_marked_corrupt_are_counted_in_a_warning(corrupt_clip, caplog):
    path, corrupt = corrupt_clip
    with caplog.at_level(logging.WARNING, logger="ditflow"):
        frames, _ = load_video(path)
    assert frames.shape[0] == 9
    assert [r.getMessage() for r in caplog.records] == [
        f"{corrupt} of the 9 frames read from {path} are marked corrupt by the decoder (a damaged or truncated "
        "stream); they are used as decoded; re-encode or replace the clip."
    ]


def test_a_prompt_longer_than_the_text_encoder_is_cut_with_a_warning(tiny_models, caplog):
    model = tiny_models["5b"]
    with caplog.at_level(logging.WARNING, logger="ditflow"):
        long = encode_prompt(model, LONG_PROMPT, "blurry")
    (record,) = caplog.records
    assert "the prompt is" in record.getMessage() and "more than the 16 the text encoder reads" in record.getMessage()
    assert LONG_PROMPT.startswith(long.prompt_used) and len(long.prompt_used) < len(LONG_PROMPT)
    assert long.negative_prompt_used == "blurry"
    # The recorded text is exactly what was encoded.
    assert torch.equal(encode_prompt(model, long.prompt_used).cond, long.cond)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ditflow"):
        short = encode_prompt(model, "a dog")
    assert short.prompt_used == "a dog" and not caplog.records


def test_notices_reach_stderr_and_run_json(tiny_5b_path, corrupt_clip, tmp_path, capsys):
    path, corrupt = corrupt_clip
    out = tmp_path / "out"
    assert main(["transfer", "--model", str(tiny_5b_path), "--video", str(path), "--prompt", LONG_PROMPT,
                 "--out", str(out), "--num-frames", "9", *TINY]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2
    assert "marked corrupt" in warnings[0] and "the prompt is" in warnings[1]
    run = json.loads((out / "run.json").read_text())
    assert run["warnings"] == [w.removeprefix("warning: ") for w in warnings]
    assert run["settings"]["prompt"] == LONG_PROMPT
    assert LONG_PROMPT.startswith(run["settings"]["prompt_used"]) and run["settings"]["prompt_used"] != LONG_PROMPT


# ---------------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------------


def test_evaluate_with_a_missing_clip_model_is_an_error(tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    write_video(clip, torch.rand(5, 3, 32, 32) * 2 - 1, 8)
    code = main(["evaluate", "--reference", str(clip), "--generated", str(clip), "--prompt", "a dog",
                 "--tracker", "flow", "--grid-size", "4", "--clip-model", str(tmp_path / "missing")])
    captured = capsys.readouterr()
    assert code == 2 and "IQ skipped" not in captured.out
    assert captured.err.strip() == f"error: CLIP model folder {tmp_path / 'missing'} does not exist; pass a folder " \
                                   "with openai/clip-vit-base-patch32."
