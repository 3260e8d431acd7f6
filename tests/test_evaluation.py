# SPDX-License-Identifier: Apache-2.0
"""Evaluation: the bench-eval runner (manifest → videos, per-item records, one table; resumable; Ray) and the
``evaluate`` command.

Runner clip (VAE tiling off, see ``TINY_MODEL``): 12 frames of a panning texture at 64×96 px; the range [0, 12, 1] gives 12 frames → the first 4k+1 = 9
→ 3 latent frames of 4×6 patches on the tiny 5b model; 2 denoising steps, the first guided with 2 Adam iterations.
MF uses the flow tracker on an 11×11 grid; IQ is skipped (no CLIP weights here) and the table says why.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ditflow import DiTFlowError, GuidanceConfig
from ditflow.cli import main
from ditflow.evaluation import (
    BenchOptions,
    clip_frame_count,
    load_manifest,
    run_benchmark,
)
from ditflow.jobs import ModelOptions
from ditflow.video import write_video

REPO = Path(__file__).resolve().parents[1]


def TINY_MODEL(path) -> ModelOptions:
    # VAE tiling off: diffusers' tile strides on the tiny VAE (26 px) turn 64-px frames into 9 latent rows.
    return ModelOptions(str(path), dtype="fp32", device="cpu", vae_tiling=False)


@pytest.fixture(autouse=True)
def no_cotracker_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    # No CLIP in the default place either, whatever this machine's Hugging Face cache holds: IQ is skipped.
    monkeypatch.setattr("ditflow.metrics.CLIP_MODEL_ID", "ditflow-tests/no-such-clip")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """A 1-video manifest (caption prompt only) next to its clip, referenced by a relative path."""
    folder = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.random((64, 160)).astype(np.float32), (0, 0), 2.0)
    texture = (texture - texture.min()) / (texture.max() - texture.min()) * 2 - 1
    frames = torch.from_numpy(np.stack([np.repeat(texture[None, :, 3 * t : 3 * t + 96], 3, 0) for t in range(12)]))
    write_video(folder / "clips" / "pan.mp4", frames, 8.0)
    path = folder / "manifest.json"
    path.write_text(json.dumps({"videos": [{"name": "pan", "video": "clips/pan.mp4", "frames": [0, 12, 1],
                                            "prompts": {"caption": "a panning texture"}}]}))
    return path


def _cli_args(model, manifest, out, methods):
    return ["bench-eval", "--model", str(model), "--dtype", "fp32", "--device", "cpu", "--no-vae-tiling",
            "--manifest", str(manifest),
            "--methods", methods, "--out", str(out), "--height", "64", "--width", "96", "--max-frames", "9",
            "--steps", "2", "--guidance-fraction", "0.5", "--opt-steps", "2", "--guidance-blocks", "1",
            "--grid-size", "11", "--tracker", "flow"]


def _count_samples(monkeypatch) -> list:
    import ditflow.jobs

    calls, real = [], ditflow.jobs.sample
    monkeypatch.setattr(ditflow.jobs, "sample", lambda *a, **k: calls.append(k.get("seed")) or real(*a, **k))
    return calls


def test_manifest_paths_ranges_and_frame_counts(manifest, tmp_path):
    (video,) = load_manifest(manifest)
    assert video.path == manifest.parent / "clips" / "pan.mp4" and video.frames == (0, 12, 1)
    assert clip_frame_count((0, 24, 1)) == 21  # the paper's 24 frames → the largest 4k+1
    assert clip_frame_count((0, 24, 2)) == 9 and clip_frame_count((0, 100, 1), max_frames=9) == 9
    with pytest.raises(DiTFlowError, match="at least 5"):
        clip_frame_count((0, 4, 1))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"videos": [{"name": "x y", "video": "a.mp4", "frames": [0, 9, 1], "prompts": {}}]}))
    with pytest.raises(DiTFlowError, match="name"):
        load_manifest(bad)
    with pytest.raises(DiTFlowError, match="unknown method"):
        BenchOptions(model=ModelOptions("m"), methods=("ditflow", "motionclone"))


_GOOD = {"name": "pan", "video": "clips/pan.mp4", "frames": [0, 12, 1], "prompts": {"caption": "a panning texture"}}


@pytest.mark.parametrize("case,entry,message", [
    ("video a number", {"video": 5}, "video must be a path as a string, got 5"),
    ("null caption", {"prompts": {"caption": None}}, "the caption prompt must be non-empty text, got None"),
    ("empty subject", {"prompts": {"subject": " "}}, "the subject prompt must be non-empty text"),
    ("boolean frame", {"frames": [True, 12, 1]}, "frames must be [start, end, step] integers"),
    ("one boolean", {"frames": [True]}, "got [True]"),
    ("name a number", {"name": 5}, "name 5 must be a unique string"),
    ("deep prompts", {"prompts": {"caption": [[[[[["x"]]]]]]}}, "got [[[...]]]"),
])
def test_manifests_with_wrong_types_are_refused_in_one_sentence(
    tiny_5b_path, manifest, tmp_path, capsys, monkeypatch, case, entry, message
):
    import ditflow.jobs

    monkeypatch.setattr(ditflow.jobs, "load_for_run", lambda *a, **k: pytest.fail("the model was loaded"))
    bad = manifest.parent / "bad.json"
    bad.write_text(json.dumps({"videos": [{**_GOOD, **entry}]}))
    assert main(_cli_args(tiny_5b_path, bad, tmp_path / "out", "backbone")) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: manifest ")
    assert message in err


def test_a_deeply_nested_manifest_is_refused_in_one_sentence(manifest):
    bad = manifest.parent / "deep.json"
    bad.write_text('{"videos": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DiTFlowError, match="nested too deeply"):
        load_manifest(bad)


def test_bench_eval_writes_videos_records_and_table_then_skips_finished_items(
    tiny_5b_path, manifest, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    calls = _count_samples(monkeypatch)
    assert main(_cli_args(tiny_5b_path, manifest, out, "ditflow,backbone")) == 0
    assert len(calls) == 2
    for method in ("ditflow", "backbone"):
        sid = _result(out, f"pan_{method}_caption").name.split(".")[1]
        assert (out / "videos" / f"pan_{method}_caption.{sid}.mp4").is_file()
        record = json.loads(_result(out, f"pan_{method}_caption").read_text())
        assert record["frames"] == 9 and record["tracker"] == "flow" and math.isfinite(record["mf"])
        assert record["iq"] is None and "CLIP weights not found locally" in record["iq_skipped"]
        assert record["settings_id"] == sid and record["settings"]["method"] == method
    assert json.loads(_result(out, "pan_ditflow_caption").read_text())["guidance"]["loss"] == "amf"
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert [(r["method"], r["prompt_kind"]) for r in rows] == [
        ("ditflow", "caption"), ("ditflow", "all"), ("backbone", "caption"), ("backbone", "all")]
    assert {(r["model"], r["steps"], r["seed"]) for r in rows} == {(str(tiny_5b_path), "2", "0")}
    table = (out / "table.md").read_text()
    assert "| ditflow |" in table and "| backbone |" in table and "IQ skipped" in table
    assert table in capsys.readouterr().out

    # Re-run: nothing is sampled again and no file is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "videos").iterdir()}
    assert main(_cli_args(tiny_5b_path, manifest, out, "ditflow,backbone")) == 0
    assert len(calls) == 2
    assert {p: p.stat().st_mtime_ns for p in (out / "videos").iterdir()} == stamps
    # An item without its record (say, killed after writing the video) is run again, alone.
    _result(out, "pan_backbone_caption").unlink()
    report = run_benchmark(manifest, _options(tiny_5b_path, out, methods=("ditflow", "backbone")), out)
    assert report.ran == ["pan_backbone_caption"] and report.skipped == ["pan_ditflow_caption"]
    assert len(calls) == 3 and len(report.records) == 2


def _result(out: Path, key: str) -> Path:
    """The one result record of ``key`` in ``out`` (its name carries the settings id)."""
    (path,) = (out / "results").glob(f"{key}*.json")
    return path


def _options(model, out, *, methods=("backbone",), steps=2, seed=0) -> BenchOptions:
    """The options ``_cli_args`` gives, with other methods, steps or seed."""
    return BenchOptions(model=TINY_MODEL(model), methods=methods, height=64, width=96, max_frames=9,
                        guidance=GuidanceConfig(num_inference_steps=steps, guidance_fraction=0.5, opt_steps=2,
                                                guidance_blocks=(1,)),
                        seed=seed, grid_size=11, tracker="flow")


def test_resume_is_keyed_by_the_full_settings_and_the_table_names_them(tiny_5b_path, manifest, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = _count_samples(monkeypatch)
    first = run_benchmark(manifest, _options(tiny_5b_path, out), out)
    assert first.ran == ["pan_backbone_caption"] and calls == [0]
    lines = []
    again = run_benchmark(manifest, _options(tiny_5b_path, out), out, log=lines.append)
    assert again.skipped == ["pan_backbone_caption"] and calls == [0]

    # Another seed, then other steps: each runs anew, and each table holds and names only its own settings.
    other_seed = run_benchmark(manifest, _options(tiny_5b_path, out, seed=1), out)
    assert other_seed.ran == ["pan_backbone_caption"] and calls == [0, 1]
    assert "2 steps, seed 1, 64×96 px, 9 frames." in other_seed.table_md.read_text()
    assert other_seed.records[0]["seed"] == 1 and other_seed.records[0]["settings"]["seed"] == 1
    other_steps = run_benchmark(manifest, _options(tiny_5b_path, out, steps=3), out)
    assert other_steps.ran == ["pan_backbone_caption"] and calls == [0, 1, 0]
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert {(r["steps"], r["seed"], r["n"]) for r in rows} == {("3", "0", "1")}
    assert f"Model {tiny_5b_path} (5b), 3 steps, seed 0" in (out / "table.md").read_text()
    # Earlier results are kept, one record and one video per settings.
    assert len(list((out / "results").glob("pan_backbone_caption.*.json"))) == 3
    assert len(list((out / "videos").glob("pan_backbone_caption.*.mp4"))) == 3
    assert run_benchmark(manifest, _options(tiny_5b_path, out, seed=1), out).skipped == ["pan_backbone_caption"]
    assert lines == ["skip pan_backbone_caption (finished with these settings)"]


@pytest.mark.parametrize("damage", ["zero bytes", "cut short"])
def test_a_zero_byte_or_cut_short_record_is_redone(tiny_5b_path, manifest, tmp_path, monkeypatch, damage):
    out = tmp_path / "out"
    calls = _count_samples(monkeypatch)
    run_benchmark(manifest, _options(tiny_5b_path, out), out)
    record = _result(out, "pan_backbone_caption")
    text = record.read_text()
    record.write_text("" if damage == "zero bytes" else text[: len(text) // 2])
    lines = []
    report = run_benchmark(manifest, _options(tiny_5b_path, out), out, log=lines.append)
    assert report.ran == ["pan_backbone_caption"] and len(calls) == 2
    assert lines[0] == f"redo pan_backbone_caption: its result record {record.name} is unreadable (empty or cut short)"
    assert json.loads(record.read_text())["settings_id"] == record.name.split(".")[1]


def test_bench_out_that_is_a_file_is_refused_before_the_model_loads(tiny_5b_path, manifest, tmp_path, capsys,
                                                                    monkeypatch):
    import ditflow.jobs

    monkeypatch.setattr(ditflow.jobs, "load_for_run", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "table.csv"
    out.write_text("mine")
    assert main(_cli_args(tiny_5b_path, manifest, out, "backbone")) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {out} is a file; give a folder (it is created if " \
        "missing, and reused to resume)."
    assert out.read_text() == "mine"


@pytest.mark.parametrize("case", ["missing folder", "folder without safetensors"])
def test_bench_eval_with_a_clip_model_that_cannot_serve_fails_before_any_work(tiny_5b_path, manifest, tmp_path, capsys,
                                                                             monkeypatch, case):
    """--clip-model given explicitly is an error when unusable (as for evaluate), not IQ quietly skipped after every
    generation: exit 2, one sentence, before any video is read, any model loaded or --out created."""
    import ditflow.evaluation
    import ditflow.jobs
    import ditflow.metrics

    monkeypatch.setattr(ditflow.jobs, "load_for_run", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(ditflow.evaluation, "_reference_frames", lambda *a, **k: pytest.fail("a video was read"))
    clip, out = tmp_path / "clip", tmp_path / "out"
    if case == "folder without safetensors":
        clip.mkdir()
        (clip / "pytorch_model.bin").write_bytes(b"not read")
    assert main([*_cli_args(tiny_5b_path, manifest, out, "backbone"), "--clip-model", str(clip)]) == 2
    err = capsys.readouterr().err
    clip_id = ditflow.metrics.CLIP_MODEL_ID  # openai/clip-vit-base-patch32, renamed for these tests
    expected = (f"CLIP model folder {clip} does not exist; pass a folder with {clip_id}."
                if case == "missing folder" else
                f"CLIP model folder {clip} has no .safetensors weights (a pytorch_model.bin pickle is never read); "
                f"download model.safetensors of {clip_id} into it.")
    assert err.strip() == f"error: {expected}"
    assert not out.exists()


def test_bench_eval_over_a_local_two_worker_ray(tiny_5b_path, manifest, tmp_path):
    ray = pytest.importorskip("ray")
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1",
           "TORCH_HOME": str(tmp_path / "hub"), "HF_HUB_CACHE": str(tmp_path / "hf")}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        options = BenchOptions(model=TINY_MODEL(tiny_5b_path),
                               methods=("injection", "backbone"), height=64, width=96, max_frames=9,
                               guidance=GuidanceConfig(num_inference_steps=2), grid_size=11, tracker="flow")
        report = run_benchmark(manifest, options, tmp_path / "out", ray_address="local", ray_workers=2)
    finally:
        ray.shutdown()
    assert sorted(report.ran) == ["pan_backbone_caption", "pan_injection_caption"]
    assert all((tmp_path / "out" / "videos" / f"{k}.mp4").is_file() for k in report.ran)
    assert "| injection |" in report.table_md.read_text()


def test_ray_missing_is_one_readable_error(tiny_5b_path, manifest, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    options = BenchOptions(model=TINY_MODEL(tiny_5b_path), methods=("backbone",),
                           height=64, width=96, max_frames=9)
    with pytest.raises(DiTFlowError, match="optional 'ray' package"):
        run_benchmark(manifest, options, tmp_path / "out", ray_address="auto")


# --- evaluate ---------------------------------------------------------------------------------------------------


def _mf(text: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith("MF "))
    return float(line.split()[1])


def test_evaluate_bmx_against_itself_and_reversed(bmx_path, tmp_path, capsys):
    from ditflow.video import load_video

    frames, fps = load_video(bmx_path)
    reversed_path = write_video(tmp_path / "reversed.mp4", frames.flip(0), fps)
    args = ["evaluate", "--reference", str(bmx_path), "--size", "120x180", "--tracker", "flow"]
    assert main([*args, "--generated", str(bmx_path)]) == 0
    same = capsys.readouterr().out
    assert _mf(same) >= 0.99 and "tracker: flow" in same and "IQ skipped: no --prompt given" in same
    assert main([*args, "--generated", str(reversed_path)]) == 0
    assert _mf(capsys.readouterr().out) < 0.0


def test_evaluate_real_clip_reports_mf_and_why_iq_was_skipped(real_clip_path, capsys, monkeypatch):
    # No --clip-model and no CLIP in the local cache: IQ is skipped with the reason (an explicit --clip-model that
    # cannot load is an error instead: tests/test_limits_and_notices.py).
    monkeypatch.setattr("ditflow.metrics.CLIP_MODEL_ID", "ditflow-tests/no-such-clip")
    args = ["evaluate", "--reference", str(real_clip_path), "--generated", str(real_clip_path), "--max-frames", "9",
            "--size", "72x128", "--grid-size", "11", "--prompt", "a big rabbit"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert -1.0 <= _mf(out) <= 1.0 and "(tracker: flow" in out
    assert "IQ skipped: CLIP weights not found locally (ditflow-tests/no-such-clip)" in out


# --- DiTFlow Motion Fidelity node ---------------------------------------------------------------------------------


def test_motion_fidelity_node_scores_and_plots_two_image_batches():
    from ditflow.layout import frames_to_image
    from nodes.metrics_nodes import DiTFlowMotionFidelity

    rng = np.random.default_rng(1)
    texture = cv2.GaussianBlur(rng.random((64, 120)).astype(np.float32), (0, 0), 2.0)
    texture = (texture - texture.min()) / (texture.max() - texture.min()) * 2 - 1
    pan = torch.from_numpy(np.stack([np.repeat(texture[None, :, 2 * t : 2 * t + 64], 3, 0) for t in range(9)]))
    image = frames_to_image(pan)  # IMAGE [9, 64, 64, 3] in [0, 1]
    node = DiTFlowMotionFidelity()
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        same, plot = node.measure(image, image, grid_size=11, tracker="flow")
        reverse, _ = node.measure(image, image.flip(0), grid_size=11, tracker="flow")
    assert isinstance(same, float) and same >= 0.99 and reverse < -0.5
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3 and plot.dtype == torch.float32
    assert 0.0 <= plot.min() and plot.max() <= 1.0


def test_sample_manifest_points_at_bmx_trees_with_three_prompt_kinds(bmx_path):
    from pathlib import Path

    from ditflow.evaluation import PROMPT_KINDS, load_manifest

    manifest = Path(__file__).resolve().parents[1] / "benchmarks/manifests/bmx_manifest.json"
    (video,) = load_manifest(manifest)
    assert video.path.resolve() == bmx_path.resolve()
    assert sorted(video.prompts) == sorted(PROMPT_KINDS) and video.frames == (0, 24, 1)


# --- The paper's evaluation set ------------------------------------------------------------------------------------


def _davis_root(tmp_path, clips) -> Path:
    """A DAVIS 2017 layout with one (empty) frame folder per clip: what the manifest resolves, not what it reads."""
    for clip in clips:
        (tmp_path / "DAVIS" / "JPEGImages" / "480p" / clip).mkdir(parents=True)
    return tmp_path / "DAVIS"


def test_paper_manifest_is_50_davis_clips_of_24_frames_with_three_prompts(tmp_path):
    from ditflow.evaluation import PROMPT_KINDS

    manifest = REPO / "benchmarks/manifests/davis_paper.json"
    names = [e["davis"] for e in json.loads(manifest.read_text())["videos"]]
    videos = load_manifest(manifest, davis_root=_davis_root(tmp_path, names))
    assert len(videos) == 50 == len(set(names))
    assert all(sorted(v.prompts) == sorted(PROMPT_KINDS) for v in videos)  # 150 prompts
    assert all(len(range(*v.frames)) == 24 for v in videos)  # the paper's 24 frames per clip
    bmx = next(v for v in videos if v.name == "bmx-trees")
    assert bmx.path == (tmp_path / "DAVIS/JPEGImages/480p/bmx-trees").resolve() and bmx.frames == (0, 24, 1)
    assert bmx.prompts["subject"] == "Leopard running up a grassy hill"


def test_a_missing_davis_clip_or_root_is_one_sentence_naming_it(tiny_5b_path, tmp_path, capsys, monkeypatch):
    import ditflow.jobs

    monkeypatch.setattr(ditflow.jobs, "load_for_run", lambda *a, **k: pytest.fail("the model was loaded"))
    manifest = REPO / "benchmarks/manifests/davis_paper.json"
    names = [e["davis"] for e in json.loads(manifest.read_text())["videos"]]
    root = _davis_root(tmp_path, [n for n in names if n != "car-turn"])
    args = _cli_args(tiny_5b_path, manifest, tmp_path / "out", "backbone")
    assert main([*args, "--davis-root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "DAVIS clip 'car-turn'" in err and "JPEGImages/480p/car-turn" in err
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "names the DAVIS clip 'blackswan'" in err and "--davis-root" in err


def test_authors_preset_runs_whole_24_frame_ranges_stretched_with_their_negative_prompt(
    tiny_5b_path, tmp_path, monkeypatch
):
    """bench-eval --preset authors: each clip's whole range (24 frames → 6 latent frames, decoded to 24),
    stretched, CFG 7 and the authors' negative prompt; MF by the official formula."""
    import ditflow.evaluation
    import ditflow.jobs
    from ditflow.config import AUTHORS_NEGATIVE_PROMPT

    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.random((64, 200)).astype(np.float32), (0, 0), 2.0)
    texture = (texture - texture.min()) / (texture.max() - texture.min()) * 2 - 1
    frames = torch.from_numpy(np.stack([np.repeat(texture[None, :, 3 * t : 3 * t + 100], 3, 0) for t in range(24)]))
    write_video(tmp_path / "pan24.mp4", frames, 8.0)
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"videos": [{"name": "pan24", "video": "pan24.mp4", "frames": [0, 24, 1],
                                                "prompts": {"caption": "a panning texture"}}]}))
    seen = []
    real = ditflow.jobs.generate
    monkeypatch.setattr(ditflow.evaluation, "generate", lambda *a, **k: seen.append((a[2], k)) or real(*a, **k))
    args = _cli_args(tiny_5b_path, manifest, tmp_path / "out", "backbone")
    args = [a for a in args if a not in ("--max-frames", "9")]
    assert main([*args, "--preset", "authors"]) == 0
    (record_path,) = (tmp_path / "out/results").glob("pan24_backbone_caption*.json")
    record = json.loads(record_path.read_text())
    config, kwargs = seen[0]
    # 24 frames → 6 latent frames, which the VAE decodes to 24 (pairs of latent frames; layout.decoded_frames)
    assert kwargs["size"] == (24, 64, 96) and record["frames"] == 24
    assert config.guidance_scale == 7.0 and kwargs["negative_prompt"] == AUTHORS_NEGATIVE_PROMPT
    assert record["mf_variant"] == "official" and math.isfinite(record["mf"])
