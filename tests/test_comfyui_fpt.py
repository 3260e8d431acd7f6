# SPDX-License-Identifier: Apache-2.0
"""The Flow Poke Transformer workflows in the real ComfyUI server (CPU) with the tiny random FPT (and tiny-5b).

Skipped unless a ComfyUI install (``$COMFY_HOME``, default ``/root/comfy``) and the shared harness exist, as
``test_comfyui_server.py``. ``workflows/fpt_poke_flow.json`` and ``fpt_poke_motion.json`` are converted to API format
by the harness and shrunk: a 90×60 px image, pokes inside it, 8 query points along the longer side; the video
9 frames at 64×96 px, 4 steps (2 guided, 2 Adam iterations), guidance block 1 of tiny-5b's 4.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_comfyui_server import HARNESS, ROOT, URL, comfy_server, pytestmark  # noqa: F401 (skip marker)

TINY = {
    "DiTFlowPokes": {"pokes": "30,30,42,25\n60,40,60,50"},
    "DiTFlowFPTPredictFlow": {"grid": 8},
    "DiTFlowFPTMotionDensity": {"query_x": 40.0, "query_y": 30.0},
    "DiTFlowPokeMotionTarget": {"width": 96, "height": 64, "num_frames": 9, "block": 1},
    "DiTFlowLoadCogVideoX": {"model": "tiny-5b", "precision": "fp32"},
    "DiTFlowGuidedSampler": {"steps": 4, "guidance_fraction": 0.5, "opt_steps": 2},
    "DiTFlowVisualizeAMF": {"key_frame": 2},
}


@pytest.fixture(scope="module")
def server():
    """A ComfyUI server with this pack, the tiny FPT as models/fpt/fpt_base.safetensors, tiny-5b and tiny-5b-i2v in
    models/CogVideo and a 90×60 example.png."""
    import cv2
    import numpy as np

    from ditflow.testing.tiny_fpt import build_tiny_fpt
    from ditflow.testing.tiny_model import build_tiny_model

    with comfy_server() as base:
        build_tiny_fpt(base / "models" / "fpt" / "fpt_base.safetensors")
        for variant in ("5b", "5b-i2v"):
            build_tiny_model(base / "models" / "CogVideo" / f"tiny-{variant}", variant)
        rng = np.random.default_rng(0)
        cv2.imwrite(str(base / "input" / "example.png"), rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
        yield base


def run(tmp_path: Path, overrides: dict, name: str = "fpt_poke_flow") -> tuple[int, dict]:
    api = tmp_path / f"{name}_api.json"
    tool = [sys.executable, str(HARNESS / "run_api_workflow.py"), "--server", URL]
    conv = subprocess.run([*tool, str(ROOT / "workflows" / f"{name}.json"), "--convert-only", str(api)],
                          capture_output=True, text=True, timeout=60)
    assert conv.returncode == 0, conv.stdout + conv.stderr
    prompt = json.loads(api.read_text())
    prompt = prompt.get("prompt", prompt)
    for node in prompt.values():
        node["inputs"].update({**TINY.get(node["class_type"], {}), **overrides.get(node["class_type"], {})})
    api.write_text(json.dumps(prompt))
    done = subprocess.run([*tool, str(api), "--timeout", "600"], capture_output=True, text=True, timeout=660)
    return done.returncode, json.loads(done.stdout)


def test_poke_workflow_shows_flow_and_density(server, tmp_path):
    code, report = run(tmp_path, {})
    assert code == 0, json.dumps(report, indent=1)[:4000]
    print(f"fpt_poke_flow: execution_ms={report['timing'].get('execution_ms')}")
    pngs = [f for f in report["files"] if f["type"] == "temp" and f["filename"].endswith(".png")]
    assert len(pngs) == 2
    import cv2

    for f in pngs:
        assert cv2.imread(str(server / "temp" / f["subfolder"] / f["filename"])).shape == (60, 90, 3)


def test_a_bad_poke_reaches_the_ui_as_one_sentence(server, tmp_path):
    code, report = run(tmp_path, {"DiTFlowPokes": {"pokes": "30,30,42"}})
    assert code == 1
    (error,) = report["errors"]
    assert error["node_type"] == "DiTFlowPokes" and error["exception_type"].endswith("DiTFlowError")
    assert error["exception_message"].strip() == (
        "Poke 1 ('30,30,42') has 3 numbers, not 4: write x0,y0,x1,y1 (start and end in pixels).")


@pytest.mark.parametrize("name, model", [("fpt_poke_motion", "tiny-5b"), ("fpt_poke_motion_i2v", "tiny-5b-i2v")])
def test_poke_motion_workflow_generates_a_video_guided_by_the_target(server, tmp_path, name, model):
    """Load image → Embed → Pokes → Predict Flow → Motion Target → Guided Sampler (latent, no KV injection) →
    Decode → SaveVideo, plus the flow and target pictures; in the I2V workflow the poked image is the start image."""
    import av

    log = server / "comfyui.log"
    before = len(log.read_text())
    code, report = run(tmp_path, {"DiTFlowLoadCogVideoX": {"model": model}}, name)
    assert code == 0, json.dumps(report, indent=1)[:4000]
    print(f"{name}: execution_ms={report['timing'].get('execution_ms')}")
    (video,) = [f for f in report["files"] if f["type"] == "output" and f["filename"].endswith(".mp4")]
    with av.open(str(server / "output" / video["subfolder"] / video["filename"])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (64, 96, 3)
    pngs = [f for f in report["files"] if f["type"] == "temp" and f["filename"].endswith(".png")]
    assert len(pngs) == 2  # the flow with its pokes, the target's arrows
    losses = [float(x) for x in re.findall(r"AMF loss ([\d.]+)", log.read_text()[before:])]
    assert len(losses) == 4 and losses[1] < losses[0] and losses[3] < losses[2]  # 2 guided steps × 2 iterations
