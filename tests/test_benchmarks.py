# SPDX-License-Identifier: Apache-2.0
"""The benchmark scripts run end to end on their smallest sizes on a CPU and print their tables (smoke tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def _table(out: str, header: str) -> list[list[str]]:
    """The cells of the rows of the markdown table whose header line starts with ``header``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header)) + 2  # header, |---|
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_guidance_overhead_prints_phases_ratios_and_counted_block_forwards():
    # tiny model, 5 steps → 1 guided step × 2 Adam iterations; no VAE (random reference latents) to stay fast.
    # Wall-clock ratios depend on the machine's load, so only their presence is checked; the block counts are exact.
    out = _run("guidance_overhead.py", "--size", "tiny", "--steps", "5", "--opt-steps", "2", "--vae", "none",
               "--checkpointing", "both")
    assert "mode latent; 5 steps, 1 guided × 2 Adam iterations; guidance block 2; KV-injection block 0; " \
           "CFG batched (batch 2)" in out
    assert "gradient checkpointing auto: off (the guided pass without it" in out  # what the memory policy picks
    runs = ["unguided", "guided, checkpointing on", "guided, checkpointing off"]
    phases = _table(out, "| phase (s) |")
    assert {r[0] for r in phases} >= {"AMF extraction", "sampling (total)", "↳ optimisation", "transformer phases"}
    total = next(r for r in phases if r[0] == "transformer phases")
    assert all(float(c) >= 0 for c in total[1:]) and len(total) == 1 + len(runs)

    # Count with L = 4 blocks, guidance block n = 2, KV block m = 0, G = 1 guided step, K = 2, CFG batch 2:
    # unguided 5 steps · 2 · 4 = 40; issue count (φ=1, β=2) adds (n+1) + (m+1) + K·(3(n+1) + R), R = n with
    # checkpointing (blocks 0..n−1 recomputed), else 0 → 40 + 3 + 1 + 2·(9 + 2) = 66, or 62 without.
    ratios = _table(out, "| run | measured (wall) |")
    assert [r[0] for r in ratios] == runs[1:]
    assert [r[-1] for r in ratios] == ["66 / 40", "62 / 40"]
    for row in ratios:
        assert all(float(c) > 0 for c in row[1:5])  # measured wall, CPU, issue and refined predictions print
        assert float(row[3]) == pytest.approx(int(row[-1].split(" / ")[0]) / 40, abs=5e-4)
    # Forwards counted by hooks = the count's forward part (β = 0): 40; 40 + 3 + 1 + 2·(3 + 2) = 54; 40 + 3 + 1 + 2·3 = 50.
    counted = _table(out, "| run | counted (B1F) |")
    assert counted == [["unguided", "40", "40"], ["guided, checkpointing on", "54", "54"],
                       ["guided, checkpointing off", "50", "50"]]


@pytest.mark.parametrize("hard", [False, True])
def test_naive_amf_creates_every_tensor_on_the_inputs_device(hard):
    # The naive AMF once built its patch coordinates on the CPU, so `amf_memory.py --device cuda` failed ("mat2 is
    # on cpu"). The meta device stands in for CUDA here: every op's output must be on the inputs' device.
    from torch.utils._python_dispatch import TorchDispatchMode

    from amf_reference import naive_attention_motion_flow

    class Devices(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen |= {t.device.type for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)}
            return out

    q = torch.randn(2, 3 * 4 * 6, 8, device="meta")
    with Devices() as mode:
        amf = naive_attention_motion_flow(q, q, (3, 4, 6), hard=hard)
    assert amf.shape == (9, 24, 2) and amf.device.type == "meta"
    assert mode.seen == {"meta"}
