# SPDX-License-Identifier: Apache-2.0
"""End to end through the command line: ``transfer`` then ``inject`` on real clips, and bad input.

Sizes: 9 frames → 3 latent frames; 64×96 px → 8×12 latent px → 4×6 patches; 4 steps, the first 2 guided.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import av
import pytest
import torch
from safetensors import safe_open

from ditflow.cli import main

TINY = ["--num-frames", "9", "--height", "64", "--width", "96", "--steps", "4", "--guidance-fraction", "0.5",
        "--opt-steps", "2", "--guidance-blocks", "1", "--dtype", "fp32", "--device", "cpu"]


def _normal_mode() -> int:
    """0o666 less the process umask: the mode of any new file (0o644 under umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _frames(path):
    with av.open(str(path)) as c:
        frames = [f for f in c.decode(video=0)]
    return len(frames), frames[0].height, frames[0].width


def _transfer_then_inject(model_path, video, mode, tmp_path, extra=()):
    out = tmp_path / "out"
    assert main(["transfer", "--model", str(model_path), "--video", str(video), "--prompt", "a leopard running",
                 "--out", str(out), "--mode", mode, *TINY, *extra]) == 0
    assert _frames(out / "result.mp4") == (9, 64, 96)
    assert _frames(out / "reference.mp4") == (9, 64, 96)
    run = json.loads((out / "run.json").read_text())
    assert run["guidance"]["mode"] == mode and run["guidance"]["guidance_blocks"] == [1]
    assert len(run["loss_per_step"]) == 2 and all(len(s) == 2 for s in run["loss_per_step"])
    assert run["settings"]["frames_written"] == 9
    memory = run["memory"]  # on the CPU: nothing to offload, and auto checkpointing is off (the tiny pass fits)
    assert (memory["offload"], memory["gradient_checkpointing"]) == ("none", False)
    assert run["guidance"]["gradient_checkpointing"] is False
    assert memory["peak_gpu_allocated_gb"] == "n/a (ran on the CPU)" and memory["free_gb"] > 0
    with safe_open(str(out / "embeds.safetensors"), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["mode"] == mode and json.loads(meta["latent_grid"]) == [3, 4, 6]
    assert meta["reference"] == video.name and meta["prompt"] == "a leopard running"
    assert meta["num_inference_steps"] == "4" and len(json.loads(meta["guided_timesteps"])) == 2 == len(keys)

    out2 = tmp_path / "out2"
    assert main(["inject", "--model", str(model_path), "--embeds", str(out / "embeds.safetensors"),
                 "--prompt", "a polar bear walking", "--out", str(out2), "--dtype", "fp32", "--device", "cpu"]) == 0
    assert _frames(out2 / "result.mp4") == (9, 64, 96)
    run2 = json.loads((out2 / "run.json").read_text())
    assert run2["job"] == "inject" and run2["loss_per_step"] == []
    written = sorted(out.iterdir()) + sorted(out2.iterdir())
    assert {p.name for p in written} == {"result.mp4", "reference.mp4", "run.json", "embeds.safetensors"}
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in written} == {p.name: _normal_mode() for p in written}
    return out


@pytest.mark.parametrize("family,mode", [("5b", "rope"), ("2b", "posemb"), ("5b", "latent")])
def test_inject_with_the_reference_video_replays_the_run_with_kv_injection(
    tiny_2b_path, tiny_5b_path, real_clip_path, tmp_path, monkeypatch, family, mode
):
    """The authors' --inject_embeds keeps KV injection on: given the reference, a replay with the same prompt and
    seed is the transfer run itself (same K/V, same ρ or z_t trajectory, same steps); without it, KV injection is
    missing.

    Frames are compared as decoded by the VAE, before mp4 encoding (libx264 is not bit-reproducible across runs)."""
    import ditflow.jobs

    results = []  # the frames of every result.mp4, in the order the runs write them (into a hidden folder first)
    write = ditflow.jobs.write_video
    monkeypatch.setattr(ditflow.jobs, "write_video", lambda path, frames, fps: (
        results.append(frames) if path.name == "result.mp4" else None, write(path, frames, fps))[1])
    model = str({"2b": tiny_2b_path, "5b": tiny_5b_path}[family])
    out = tmp_path / "out"
    assert main(["transfer", "--model", model, "--video", str(real_clip_path), "--prompt", "a leopard running",
                 "--out", str(out), "--mode", mode, "--seed", "5", "--stride", "3", *TINY]) == 0
    replay = ["inject", "--model", model, "--embeds", str(out / "embeds.safetensors"), "--prompt", "a leopard running",
              "--dtype", "fp32", "--device", "cpu"]
    assert main([*replay, "--video", str(real_clip_path), "--out", str(tmp_path / "kv")]) == 0
    assert main([*replay, "--out", str(tmp_path / "plain")]) == 0
    run = json.loads((tmp_path / "kv" / "run.json").read_text())
    assert run["guidance"]["kv_injection_blocks"] == [0] and run["settings"]["seed"] == 5  # seed from the file
    assert run["settings"]["reference"]["stride"] == 3  # frames as recorded in the embeddings
    transfer, with_kv, without = results
    assert torch.equal(with_kv, transfer)
    assert not torch.equal(without, transfer)


def test_inject_refuses_a_reference_of_another_size(tiny_5b_path, real_clip_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["transfer", "--model", str(tiny_5b_path), "--video", str(real_clip_path), "--prompt", "x",
                 "--out", str(out), "--mode", "rope", *TINY]) == 0
    out2 = tmp_path / "out2"
    err = _error(capsys, ["inject", "--model", str(tiny_5b_path), "--embeds", str(out / "embeds.safetensors"),
                          "--video", str(real_clip_path), "--height", "128", "--prompt", "y", "--out", str(out2),
                          "--dtype", "fp32", "--device", "cpu"], out2)
    assert "3×8×6" in err and "3×4×6" in err and "9 frames at 64×96 px" in err


def test_transfer_then_inject_on_bmx_trees_rope(tiny_5b_path, bmx_path, tmp_path):
    _transfer_then_inject(tiny_5b_path, bmx_path, "rope", tmp_path, ["--stride", "2"])


def test_transfer_then_inject_on_a_packaged_real_clip_posemb(tiny_2b_path, real_clip_path, tmp_path):
    _transfer_then_inject(tiny_2b_path, real_clip_path, "posemb", tmp_path)


def _error(capsys, argv, out):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    err = err.splitlines()[-1]  # after any weight-loading progress bar
    assert err.startswith("error: ")
    assert not out.exists() or not any(out.iterdir())  # nothing half-written
    return err


@pytest.mark.parametrize("case,args,message", [
    ("missing video", ["--video", "{tmp}/nope.mp4"], "does not exist"),
    ("too few frames", ["--video", "{bmx}", "--num-frames", "49"], "has 24 frames"),
    ("frame count", ["--video", "{bmx}", "--num-frames", "10"], "4k+1"),
    ("size", ["--video", "{bmx}", "--height", "250"], "multiple of 16"),
    ("block", ["--video", "{bmx}", "--guidance-blocks", "9"], "out of range"),
    ("negative seed", ["--video", "{bmx}", "--seed", "-1"], "seed must be an integer in 0..2^64−1, got -1."),
    ("sample seed of 2^64", ["--video", "{bmx}", "--reference-sample-seed", str(2**64)],
     "the reference sample seed must be an integer in 0..2^64−1"),
])
def test_bad_transfer_input_is_one_clear_line(tiny_5b_path, bmx_path, tmp_path, capsys, case, args, message):
    out = tmp_path / "out"
    base = ["transfer", "--model", str(tiny_5b_path), "--prompt", "x", "--out", str(out), *TINY]
    args = [a.format(tmp=tmp_path, bmx=bmx_path) for a in args]
    assert message in _error(capsys, base + args, out)


def test_corrupt_and_empty_videos_are_refused(tiny_5b_path, tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x01not a video" * 100)
    empty = tmp_path / "frames"
    empty.mkdir()
    for video in (bad, empty):
        out = tmp_path / f"out_{video.name}"
        _error(capsys, ["transfer", "--model", str(tiny_5b_path), "--video", str(video), "--prompt", "x",
                        "--out", str(out), *TINY], out)


def test_missing_model_folder_is_refused(tmp_path, real_clip_path, capsys):
    out = tmp_path / "out"
    err = _error(capsys, ["transfer", "--model", str(tmp_path / "no-model"), "--video", str(real_clip_path),
                          "--prompt", "x", "--out", str(out), *TINY], out)
    assert "no-model" in err


def test_embeddings_of_another_family_are_refused(tiny_2b_path, tiny_5b_path, real_clip_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["transfer", "--model", str(tiny_5b_path), "--video", str(real_clip_path), "--prompt", "x",
                 "--out", str(out), "--mode", "rope", *TINY]) == 0
    out2 = tmp_path / "out2"
    err = _error(capsys, ["inject", "--model", str(tiny_2b_path), "--embeds", str(out / "embeds.safetensors"),
                          "--prompt", "y", "--out", str(out2), "--dtype", "fp32", "--device", "cpu"], out2)
    assert "model 5b," in err and "2b" in err


def test_memory_choices_are_printed_followed_and_recorded(tiny_5b_path, real_clip_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["transfer", "--model", str(tiny_5b_path), "--video", str(real_clip_path), "--prompt", "x",
                 "--out", str(out), *TINY, "--steps", "2", "--offload", "sequential",
                 "--gradient-checkpointing", "on"]) == 0
    err = capsys.readouterr().err
    assert "offload: none (the compute device is the CPU: there is nothing to offload to)" in err
    assert "gradient checkpointing: on (as asked)" in err
    assert err.strip().splitlines()[-2:] == ["peak GPU memory: n/a (ran on the CPU)", f"wrote {out}"]
    run = json.loads((out / "run.json").read_text())
    assert run["guidance"]["gradient_checkpointing"] is True
    assert run["memory"]["checkpointing_reason"] == "as asked" and run["memory"]["estimated_peak_gb"] >= 0


def test_help_documents_every_option():
    for cmd in ("transfer", "inject"):
        text = subprocess.run([sys.executable, "-m", "ditflow", cmd, "--help"], capture_output=True, text=True,
                              check=True).stdout
        for option in ("--model", "--prompt", "--out", "--seed", "--cfg"):
            assert option in text
    text = subprocess.run([sys.executable, "-m", "ditflow", "transfer", "--help"], capture_output=True, text=True,
                          check=True).stdout
    for option in ("--mode", "--guidance-blocks", "--temperature", "--kv-injection", "--lr-end", "--stride",
                   "--offload", "--gradient-checkpointing", "--preset", "--optimizer", "--soft-reference",
                   "--unmasked-loss"):
        assert option in text


def test_num_frames_defaults_to_auto_and_says_so(tiny_5b_path, example_clip_path, tmp_path, capsys):
    # The example clip has 57 frames; stride 6 keeps frames 0, 6, …, 54 → 10 → auto takes 9 (the largest 4k+1).
    out = tmp_path / "out"
    args = [a for a in TINY if a not in ("--num-frames", "9")]
    assert main(["transfer", "--model", str(tiny_5b_path), "--video", str(example_clip_path), "--prompt", "a bunny",
                 "--out", str(out), "--mode", "none", "--stride", "6", *args]) == 0
    err = capsys.readouterr().err
    assert "num-frames auto: 9 (the clip gives 10 from frame 0 with stride 6;" in err
    assert _frames(out / "result.mp4") == (9, 64, 96)
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["reference"]["num_frames"] == "auto" and run["settings"]["num_frames"] == 9
    assert run["settings"]["fps"] == pytest.approx(25 / 6)


def test_image_to_video_starts_from_the_references_first_frame_or_the_given_image(tiny_path, real_clip_path,
                                                                                    tmp_path, capsys):
    """CogVideoX-5b-I2V through the CLI: ``--image`` defaults to the reference's first frame; a file is fitted to the
    size like the reference; the start image changes the result; a text-to-video model refuses ``--image``."""
    import json

    import av
    import numpy as np
    from PIL import Image

    model = str(tiny_path("5b-i2v"))
    common = ["--video", str(real_clip_path), "--prompt", "a fox", *TINY, "--steps", "2", "--opt-steps", "1"]
    first = tmp_path / "first"
    assert main(["transfer", "--model", model, "--out", str(first), *common]) == 0
    assert json.loads((first / "run.json").read_text())["settings"]["image"] == "the reference's first frame"

    picture = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8)).save(picture)
    given = tmp_path / "given"
    assert main(["transfer", "--model", model, "--out", str(given), "--image", str(picture), *common]) == 0
    assert json.loads((given / "run.json").read_text())["settings"]["image"] == str(picture)

    def frames(folder):
        with av.open(str(folder / "result.mp4")) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])

    assert frames(first).shape == frames(given).shape == (9, 64, 96, 3)
    assert not np.array_equal(frames(first), frames(given))  # the start image conditions the whole video

    out = tmp_path / "t2v"
    err = _error(capsys, ["transfer", "--model", str(tiny_path("1.5")), "--out", str(out), "--image", str(picture),
                          *common], out)
    assert err == "error: CogVideoX1.5-5B is text-to-video and takes no start image; drop --image or load an " \
                  "image-to-video model."


def test_i2v_1_5_rope_transfer_replays_exactly_and_inject_needs_a_start_frame(tiny_path, real_clip_path, tmp_path,
                                                                              monkeypatch, capsys):
    """CogVideoX1.5-5B-I2V end to end: transfer in mode rope (start frame: the reference's first), then inject with
    the reference video (KV injection, the same first frame, the seed from the file) is that run again; inject with
    neither --video nor --image is one error line."""
    import ditflow.jobs

    results = []
    write = ditflow.jobs.write_video
    monkeypatch.setattr(ditflow.jobs, "write_video", lambda path, frames, fps: (
        results.append(frames) if path.name == "result.mp4" else None, write(path, frames, fps))[1])
    model = str(tiny_path("1.5-i2v"))
    out = tmp_path / "out"
    assert main(["transfer", "--model", model, "--video", str(real_clip_path), "--prompt", "a fox", "--out", str(out),
                 "--mode", "rope", "--seed", "5", *TINY]) == 0
    replay = ["inject", "--model", model, "--embeds", str(out / "embeds.safetensors"), "--prompt", "a fox",
              "--dtype", "fp32", "--device", "cpu"]
    assert main([*replay, "--video", str(real_clip_path), "--out", str(tmp_path / "kv")]) == 0
    transfer, replayed = results
    assert transfer.shape == (9, 3, 64, 96) and torch.equal(replayed, transfer)
    capsys.readouterr()
    err = _error(capsys, [*replay, "--out", str(tmp_path / "none")], tmp_path / "none")
    assert err == ("error: CogVideoX1.5-5B-I2V generates from a start image; give one with --image (or the reference "
                   "video with --video, whose first frame is then used).")


def test_preset_authors_and_ablation_switches_reach_the_run(tiny_5b_path, real_clip_path, tmp_path):
    """--preset authors sets CFG 7, their negative prompt, 24 stretched frames and a sampled reference; typed options
    override it (here the size, for the tiny model); the ablation switches land in the run's guidance."""
    from ditflow.config import AUTHORS_NEGATIVE_PROMPT

    out = tmp_path / "out"
    tiny = [a for a in TINY if a not in ("--num-frames", "9")]
    assert main(["transfer", "--model", str(tiny_5b_path), "--video", str(real_clip_path), "--prompt", "a leopard",
                 "--out", str(out), "--preset", "authors", *tiny, "--optimizer", "sgd", "--soft-reference",
                 "--unmasked-loss"]) == 0
    run = json.loads((out / "run.json").read_text())
    settings, guidance = run["settings"], run["guidance"]
    assert settings["preset"] == "authors" and settings["negative_prompt"] == AUTHORS_NEGATIVE_PROMPT
    assert settings["reference"] == {"num_frames": 24, "height": 64, "width": 96, "start": 0, "stride": 1,
                                     "resize": "stretch", "sample_seed": 0}
    assert guidance["guidance_scale"] == 7.0 and guidance["num_inference_steps"] == 4
    assert (guidance["optimizer"], guidance["soft_reference"], guidance["masked_loss"]) == ("sgd", True, False)
    assert _frames(out / "reference.mp4") == (24, 64, 96) and _frames(out / "result.mp4") == (24, 64, 96)


def test_unknown_preset_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["transfer", "--model", "m", "--video", "v", "--prompt", "p", "--out", "o", "--preset", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
