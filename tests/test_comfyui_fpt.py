# SPDX-License-Identifier: Apache-2.0
"""The Flow Poke Transformer workflow in the real ComfyUI server (CPU) with the tiny random FPT.

Skipped unless a ComfyUI install (``$COMFY_HOME``, default ``/root/comfy``) and the shared harness exist, as
``test_comfyui_server.py``. ``workflows/fpt_poke_flow.json`` is converted to API format by the harness and shrunk:
a 90×60 px image, pokes inside it, 8 query points along the longer side.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_comfyui_server import HARNESS, ROOT, URL, comfy_server, pytestmark  # noqa: F401 (skip marker)

TINY = {
    "DiTFlowPokes": {"pokes": "30,30,42,25\n60,40,60,50"},
    "DiTFlowFPTPredictFlow": {"grid": 8},
    "DiTFlowFPTMotionDensity": {"query_x": 40.0, "query_y": 30.0},
}


@pytest.fixture(scope="module")
def server():
    """A ComfyUI server with this pack, the tiny FPT as models/fpt/fpt_base.safetensors and a 90×60 example.png."""
    import cv2
    import numpy as np

    from ditflow.testing.tiny_fpt import build_tiny_fpt

    with comfy_server() as base:
        build_tiny_fpt(base / "models" / "fpt" / "fpt_base.safetensors")
        rng = np.random.default_rng(0)
        cv2.imwrite(str(base / "input" / "example.png"), rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
        yield base


def run(tmp_path: Path, overrides: dict) -> tuple[int, dict]:
    api = tmp_path / "fpt_api.json"
    tool = [sys.executable, str(HARNESS / "run_api_workflow.py"), "--server", URL]
    conv = subprocess.run([*tool, str(ROOT / "workflows" / "fpt_poke_flow.json"), "--convert-only", str(api)],
                          capture_output=True, text=True, timeout=60)
    assert conv.returncode == 0, conv.stdout + conv.stderr
    prompt = json.loads(api.read_text())
    prompt = prompt.get("prompt", prompt)
    for node in prompt.values():
        node["inputs"].update({**TINY.get(node["class_type"], {}), **overrides.get(node["class_type"], {})})
    api.write_text(json.dumps(prompt))
    done = subprocess.run([*tool, str(api), "--timeout", "300"], capture_output=True, text=True, timeout=360)
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
