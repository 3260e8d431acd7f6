# SPDX-License-Identifier: Apache-2.0
"""The example workflows in the real ComfyUI server (CPU) with tiny models: import, validation, execution.

Skipped unless a ComfyUI install (``$COMFY_HOME``, default ``/root/comfy``) and the shared harness exist. Each
workflow is converted to API format by the harness (through ``/object_info``), then shrunk for the CPU:
9 frames at 64×96 px, 4 steps (2 guided, 2 Adam iterations), guidance block 1 of the tiny model's 4.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = Path(os.environ.get("DITFLOW_COMFY_HARNESS", ROOT.parent / "shared" / "comfy_harness"))
COMFY_HOME = Path(os.environ.get("COMFY_HOME", "/root/comfy"))
PORT = int(os.environ.get("DITFLOW_COMFY_PORT", "8197"))
URL = f"http://127.0.0.1:{PORT}"
WORKFLOWS = ROOT / "workflows"

pytestmark = pytest.mark.skipif(
    not (COMFY_HOME / "ComfyUI" / "main.py").is_file() or not (HARNESS / "start_comfy.sh").is_file(),
    reason=f"needs ComfyUI in {COMFY_HOME} and the harness in {HARNESS}",
)

# Per node type: widget → tiny value (9 frames → 3 latent frames; 64×96 px → 4×6 patches). VAE tiling stays on:
# the tiny VAE keeps the real 480×720 sample size, so 64×96 frames are below its tiling threshold.
TINY = {
    "DiTFlowLoadCogVideoX": {"model": "tiny-5b", "precision": "fp32"},
    "DiTFlowEncodeReference": {"width": 96, "height": 64, "num_frames": 9, "stride": 2},
    "DiTFlowExtractAMF": {"blocks": "1"},
    "DiTFlowGuidedSampler": {"steps": 4, "guidance_fraction": 0.5, "opt_steps": 2},  # size 0: from the AMF
    "DiTFlowVisualizeAMF": {"key_frame": 2},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    """A ComfyUI server with this pack, tiny-5b, -5b-i2v and -1.5-i2v in models/CogVideo and the reference clip
    uploaded."""
    from ditflow.testing.tiny_model import build_tiny_model

    try:
        clip = request.getfixturevalue("bmx_path")
    except pytest.skip.Exception:
        clip = request.getfixturevalue("real_clip_path")
    with comfy_server() as base:
        build_tiny_model(base / "models" / "CogVideo" / "tiny-5b", "5b")
        for variant in ("5b-i2v", "1.5-i2v"):
            build_tiny_model(base / "models" / "CogVideo" / f"tiny-{variant}", variant)
        shutil.copy(clip, base / "input" / "reference.mp4")
        yield {"base": base, "log": base / "comfyui.log"}


@contextlib.contextmanager
def comfy_server():
    """Starts ComfyUI with this pack on ``PORT`` (a fresh base folder, yielded) and stops it afterwards."""
    base = COMFY_HOME / "runs" / f"port-{PORT}"
    started = subprocess.run([str(HARNESS / "start_comfy.sh"), "-n", str(ROOT), "-p", str(PORT), "--",
                              "--preview-method", "auto"], capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    pid = started.stdout.strip().splitlines()[-1]
    try:
        yield base
    finally:
        subprocess.run([str(HARNESS / "stop_comfy.sh"), pid], capture_output=True, timeout=60)


def tiny_prompt(name: str, tmp_path: Path, overrides: dict | None = None) -> Path:
    """``workflows/<name>.json`` converted to API format by the harness and shrunk (TINY); returns its path."""
    api_path = tmp_path / f"{name}_api.json"
    tool = [sys.executable, str(HARNESS / "run_api_workflow.py"), "--server", URL]
    conv = subprocess.run([*tool, str(WORKFLOWS / f"{name}.json"), "--convert-only", str(api_path)],
                          capture_output=True, text=True, timeout=60)
    assert conv.returncode == 0, conv.stdout + conv.stderr
    prompt = json.loads(api_path.read_text())
    prompt = prompt.get("prompt", prompt)
    for node in prompt.values():
        node["inputs"].update({**TINY.get(node["class_type"], {}), **(overrides or {}).get(node["class_type"], {})})
        if node["class_type"] == "LoadVideo":
            node["inputs"]["file"] = "reference.mp4"
    api_path.write_text(json.dumps(prompt))
    return api_path


def run_workflow(name: str, tmp_path: Path, overrides: dict | None = None) -> dict:
    """Converts ``workflows/<name>.json`` to API format, shrinks it, runs it; returns the harness report."""
    api_path = tiny_prompt(name, tmp_path, overrides)
    tool = [sys.executable, str(HARNESS / "run_api_workflow.py"), "--server", URL]
    done = subprocess.run([*tool, str(api_path), "--timeout", "600"], capture_output=True, text=True, timeout=660)
    report = json.loads(done.stdout)
    assert done.returncode == 0, json.dumps(report, indent=1)[:4000]
    return report


def video_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def saved_videos(report: dict, base: Path) -> list[Path]:
    return [base / "output" / f["subfolder"] / f["filename"] for f in report["files"]
            if f["type"] == "output" and f["filename"].endswith(".mp4")]


def test_the_pack_imports_cleanly_and_fast(server):
    log = server["log"].read_text()
    assert "IMPORT FAILED" not in log
    times = re.findall(rf"^\s*([\d.]+) seconds: .*custom_nodes/{re.escape(ROOT.name)}$", log, re.M)
    assert times and float(times[0]) < 0.5, log[-3000:]
    print(next(line.strip() for line in log.splitlines() if f"custom_nodes/{ROOT.name}" in line))
    with urllib.request.urlopen(f"{URL}/object_info/DiTFlowGuidedSampler") as r:
        info = json.load(r)["DiTFlowGuidedSampler"]
    assert info["category"] == "DiTFlow/sampling"
    with urllib.request.urlopen(f"{URL}/object_info/DiTFlowLoadCogVideoX") as r:
        assert "tiny-5b" in json.load(r)["DiTFlowLoadCogVideoX"]["input"]["required"]["model"][0]


def test_latent_workflow_writes_a_9_frame_video(server, tmp_path):
    report = run_workflow("ditflow_t2v_latent", tmp_path)
    print(f"ditflow_t2v_latent: execution_ms={report['timing'].get('execution_ms')}")
    videos = saved_videos(report, server["base"])
    assert len(videos) == 1 and video_frames(videos[0]) == 9
    assert any(f["type"] == "temp" and f["filename"].endswith(".png") for f in report["files"])  # AMF arrows


@pytest.mark.parametrize("variant", ["5b-i2v", "1.5-i2v"])
def test_i2v_workflow_writes_a_9_frame_video_from_the_references_first_frame(server, tmp_path, variant):
    report = run_workflow("ditflow_i2v_latent", tmp_path, {"DiTFlowLoadCogVideoX": {"model": f"tiny-{variant}"}})
    print(f"ditflow_i2v_latent on tiny-{variant}: execution_ms={report['timing'].get('execution_ms')}")
    videos = saved_videos(report, server["base"])
    assert len(videos) == 1 and video_frames(videos[0]) == 9


def test_rope_workflow_saves_embeds_and_inject_workflow_replays_them(server, tmp_path):
    report = run_workflow("ditflow_rope_optimize_and_save", tmp_path)
    print(f"ditflow_rope_optimize_and_save: execution_ms={report['timing'].get('execution_ms')}")
    assert [video_frames(v) for v in saved_videos(report, server["base"])] == [9]
    embeds = sorted((server["base"] / "output" / "ditflow").glob("embeds_*_.safetensors"))
    assert [e.name for e in embeds] == ["embeds_00001_.safetensors"]

    report = run_workflow("ditflow_rope_inject", tmp_path)
    print(f"ditflow_rope_inject: execution_ms={report['timing'].get('execution_ms')}")
    assert [video_frames(v) for v in saved_videos(report, server["base"])] == [9]
    assert "AMF loss" in server["log"].read_text()  # the rope run printed its optimisation losses


def run_watching_the_socket(api_path: Path, timeout: float = 600) -> dict:
    """Queues an API prompt as the browser does (a websocket client id) and counts what the socket carries until the
    prompt finishes: ``previews`` (binary preview-image events: types 1 and 4 of ComfyUI's protocol), ``progress``
    (node → progress events) and ``executed`` (node → its ``ui`` output)."""
    websocket = pytest.importorskip("websocket")  # websocket-client, requirements-test.txt
    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{PORT}/ws?clientId={client_id}", timeout=timeout)
    try:
        body = json.dumps({"prompt": json.loads(api_path.read_text()), "client_id": client_id}).encode()
        request = urllib.request.Request(f"{URL}/prompt", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as r:
            prompt_id = json.load(r)["prompt_id"]
        seen = {"previews": 0, "progress": {}, "executed": {}, "error": None}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            opcode, data = ws.recv_data()
            if opcode == websocket.ABNF.OPCODE_BINARY:
                seen["previews"] += int.from_bytes(data[:4], "big") in (1, 4)  # PREVIEW_IMAGE(_WITH_METADATA)
                continue
            message = json.loads(data)
            kind, info = message.get("type"), message.get("data", {})
            if info.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "progress":
                seen["progress"][info["node"]] = seen["progress"].get(info["node"], 0) + 1
            elif kind == "executed":
                seen["executed"][info["node"]] = info["output"]
            elif kind == "execution_error":
                seen["error"] = info
                return seen
            elif kind == "executing" and info.get("node") is None:
                return seen
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")
    finally:
        ws.close()


def test_the_sampler_shows_live_previews_and_the_console_names_the_networks(server, tmp_path):
    """--preview-method auto (the fixture's server): ComfyUI's latent_preview sends a preview image per step."""
    api = tiny_prompt("ditflow_t2v_latent", tmp_path, {"DiTFlowGuidedSampler": {"steps": 3, "opt_steps": 1}})
    seen = run_watching_the_socket(api)
    assert seen["error"] is None, seen["error"]
    sampler = next(k for k, v in json.loads(api.read_text()).items() if v["class_type"] == "DiTFlowGuidedSampler")
    print(f"preview events: {seen['previews']}, progress events of the sampler: {seen['progress'].get(sampler)}")
    assert seen["previews"] >= 3 and seen["progress"].get(sampler, 0) >= 3
    log = server["log"].read_text()
    for network in ("CogVideoXTransformer3DModel", "AutoencoderKLCogVideoX", "T5EncoderModel"):
        assert f"Requested to load {network}" in log
    assert "_Carrier" not in log


def test_save_embeds_reports_its_file_to_the_ui_and_the_extension_is_served(server, tmp_path):
    with urllib.request.urlopen(f"{URL}/extensions/{ROOT.name}/ditflow.js") as r:
        script = r.read().decode()
    assert "DiTFlowSaveEmbeds" in script and "snapFrames" in script
    api = tiny_prompt("ditflow_rope_optimize_and_save", tmp_path,
                      {"DiTFlowSaveEmbeds": {"filename_prefix": "ditflow/ui_check"}})
    seen = run_watching_the_socket(api)
    assert seen["error"] is None, seen["error"]
    save = next(k for k, v in json.loads(api.read_text()).items() if v["class_type"] == "DiTFlowSaveEmbeds")
    (text,) = seen["executed"][save]["text"]
    assert text == os.path.join("ditflow", "ui_check_00001_.safetensors")
    assert (server["base"] / "output" / text).is_file()


def test_a_library_error_reaches_the_ui_as_one_sentence(server, tmp_path):
    api = tmp_path / "bad_api.json"
    tool = [sys.executable, str(HARNESS / "run_api_workflow.py"), "--server", URL]
    subprocess.run([*tool, str(WORKFLOWS / "ditflow_t2v_latent.json"), "--convert-only", str(api)], check=True,
                   capture_output=True, timeout=60)
    prompt = json.loads(api.read_text())
    for node in prompt.values():
        node["inputs"].update(TINY.get(node["class_type"], {}))
        if node["class_type"] == "LoadVideo":
            node["inputs"]["file"] = "reference.mp4"
        if node["class_type"] == "DiTFlowEncodeReference":
            node["inputs"]["num_frames"] = 7
    api.write_text(json.dumps(prompt))
    done = subprocess.run([*tool, str(api)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout
    (error,) = json.loads(done.stdout)["errors"]
    assert error["node_type"] == "DiTFlowEncodeReference"
    assert error["exception_type"].endswith("DiTFlowError")
    assert error["exception_message"].strip() == (
        "frame count 7 is not of the form 4k+1 that CogVideoX needs; use 5 or 9 (49 is native; multiples of 8, such "
        "as the authors' 24, also work).")
