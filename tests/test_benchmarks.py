# SPDX-License-Identifier: Apache-2.0
"""The benchmark scripts run end to end on their smallest sizes on a CPU and print their tables (smoke tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_amf_memory_prints_the_table_with_differences_to_naive():
    out = _run("amf_memory.py", "--small")
    assert "| model | heads | F×h×w (n) | impl | peak (GB) |" in out
    streamed = next(line for line in out.splitlines() if "| streamed |" in line)
    cells = [c.strip() for c in streamed.strip("|").split("|")]
    assert float(cells[-1]) < 1e-4 and float(cells[-2]) < 1e-4  # fp32 round-off, not a different computation


def test_guidance_overhead_prints_phases_and_both_ratios():
    # tiny model, 5 steps → 1 guided step × 2 Adam iterations; no VAE (random reference latents) to stay fast.
    out = _run("guidance_overhead.py", "--size", "tiny", "--steps", "5", "--opt-steps", "2", "--vae", "none",
               "--checkpointing", "both")
    assert "| phase (s) | unguided | guided, checkpointing on | guided, checkpointing off |" in out
    assert "| run | measured (wall) |" in out and "predicted, issue count" in out and "predicted, refined" in out
    for name in ("guided, checkpointing on", "guided, checkpointing off"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {name} | ") and "B1F" not in line
                   and line.count("|") > 6)
        measured, _, issue, refined = (float(c) for c in row.strip("|").split("|")[1:5])
        assert measured > 1.0 and issue > 1.0 and refined > 1.0
