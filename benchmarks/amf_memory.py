# SPDX-License-Identifier: Apache-2.0
"""Peak memory and time of the soft AMF loss forward+backward: streamed (``ditflow.amf``) vs naive full-matrix.

Usage (from the repository root)::

    python benchmarks/amf_memory.py                  # 2b/5b × 13/6 latent frames on the 30×45 grid, CPU, fp32
    python benchmarks/amf_memory.py --models 1.5     # CogVideoX 1.5 at its native size: 11 token frames × 48×85
    python benchmarks/amf_memory.py --device cuda    # same on a GPU, bf16 q/k as the models run
    python benchmarks/amf_memory.py --small          # CI-sized smoke case

Each (model, frames, implementation) runs in its own subprocess. Peak memory is measured above q and k:
``torch.cuda.max_memory_allocated`` on CUDA; on CPU the subprocess's peak RSS (``VmHWM``, reset once q and k
exist) minus its RSS then, with glibc told to ``mmap`` every block ≥ 64 KiB so that freed tensors leave the RSS.
A one-frame warm-up of the same layout runs first, so one-time BLAS buffers are not counted.
The gradients ∂q, ∂k (the size of q and k) are part of any backward; the "workspace" column subtracts them.
Naive cases whose estimated need, 2·heads·n² fp32 values (the [heads, n, n] logits and their gradient; measured
2·heads − 2 at 5b), is over 75 % of the free memory print "skipped (needs X GB)".
The last two columns compare the streamed AMF values and loss gradients with the naive ones where both ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAD_DIM = 64  # every CogVideoX
#: model → (attention heads, patch grid h×w, default token frames). 2b/5b at 480×720 px → 60×90 latent → 30×45
#: patches, 13 latent frames = 49 video frames; CogVideoX 1.5 at its native 768×1360 px → 96×170 → 48×85 patches,
#: 81 frames → 21 latent frames, padded to 22 → 11 token frames (temporal patch 2): 44,880 video tokens.
MODELS = {"2b": (30, (30, 45), (13, 6, 2)), "5b": (48, (30, 45), (13, 6, 2)), "1.5": (48, (48, 85), (11,))}
GB = 1e9
#: Run a naive case only if its estimated need fits in this fraction of the free memory (the machine is shared).
AVAILABLE_FRACTION = 0.75


# ----------------------------------------------------------------------------------------------------------------
# Worker: one case in a fresh process
# ----------------------------------------------------------------------------------------------------------------


def _rss_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last :func:`_reset_peak_rss`) of this process, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # Linux ≥ 4.0: "5" resets VmHWM to the current RSS
        f.write("5")


def _available_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def run_case(impl: str, heads: int, grid: tuple[int, int, int], device: str, dtype_name: str, save: str) -> dict:
    import torch

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from amf_reference import naive_amf_loss, naive_attention_motion_flow

    from ditflow.amf import amf_loss, attention_motion_flow

    num_frames, h, w = grid
    n, s = num_frames * h * w, h * w
    dtype = getattr(torch, dtype_name)
    if impl == "naive":
        need = 2 * heads * n * n * 4  # the [heads, n, n] logits and, in the backward, their gradient
        if need > AVAILABLE_FRACTION * _available_bytes(device):
            return {"skipped": f"skipped (needs {need / GB:.0f} GB)"}
        amf, loss_fn = naive_attention_motion_flow, naive_amf_loss
    else:
        amf, loss_fn = attention_motion_flow, amf_loss

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    # Warm-up on one frame of the same layout, so one-time BLAS/cuBLAS buffers are not counted below.
    wq = torch.randn(heads, s, HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
    loss_fn(torch.ones(1, s, 2, device=device), amf(wq, wq, (1, h, w), hard=False)).backward()
    del wq

    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(heads, n, HEAD_DIM, generator=gen, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(heads, n, HEAD_DIM, generator=gen, device=device, dtype=dtype, requires_grad=True)
    reference = torch.randint(-3, 4, (num_frames**2, s, 2), generator=gen, device=device).float()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _rss_bytes("VmRSS")

    t0 = time.perf_counter()
    soft = amf(q, k, grid, hard=False)
    loss_fn(reference, soft).backward()
    sync()
    seconds = time.perf_counter() - t0

    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_bytes("VmHWM") - base
    grads = q.grad.nbytes + k.grad.nbytes
    if save:
        from safetensors.torch import save_file

        save_file({"soft": soft.detach().cpu().contiguous(), "gq": q.grad.cpu().contiguous(), "gk": k.grad.cpu().contiguous()}, save)
    return {"peak": peak, "grads": grads, "seconds": seconds}


# ----------------------------------------------------------------------------------------------------------------
# Driver: one subprocess per case, then a Markdown table
# ----------------------------------------------------------------------------------------------------------------


def _spawn(impl: str, heads: int, grid, args, save: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--worker", impl, str(heads), ",".join(map(str, grid)), args.device,
           args.dtype, save]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        return {"skipped": f"failed ({last})"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _max_abs_diff(a_path: str, b_path: str) -> tuple[float, float]:
    from safetensors.torch import load_file

    a, b = load_file(a_path), load_file(b_path)
    values = (a["soft"] - b["soft"]).abs().max().item()
    grads = max((a[g].float() - b[g].float()).abs().max().item() for g in ("gq", "gk"))
    return values, grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", default=None, help="q/k dtype (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["2b", "5b"])
    parser.add_argument("--frames", nargs="+", type=int, default=None, help="token frames (default 13, 6, 2 on "
                        "2b/5b: 13 = 49 video frames, 2 is where naive fits in 24 GB at 30×45; 11 on 1.5)")
    parser.add_argument("--small", action="store_true", help="one CI-sized case: 4 heads, 3 frames, 6×9 patches")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        impl, heads, grid, device, dtype, save = args.worker
        result = run_case(impl, int(heads), tuple(int(g) for g in grid.split(",")), device, dtype, save)
        print(json.dumps(result))
        return

    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.small:
        cases = [("small", 4, (3, 6, 9))]
    else:
        cases = [(m, MODELS[m][0], (f, *MODELS[m][1])) for m in args.models for f in (args.frames or MODELS[m][2])]

    print(f"AMF soft loss forward+backward, {args.device}, q/k {args.dtype}, head_dim {HEAD_DIM}; "
          "memory above q and k; workspace = peak − ∂q − ∂k\n")
    print("| model | heads | F×h×w (n) | impl | peak (GB) | workspace (GB) | time (s) | max |Δ AMF| | max |Δ grad| |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model, heads, grid in cases:
            n = grid[0] * grid[1] * grid[2]
            saved = {impl: os.path.join(tmp, f"{impl}.safetensors") for impl in ("streamed", "naive")}
            results = {impl: _spawn(impl, heads, grid, args, saved[impl]) for impl in ("streamed", "naive")}
            ok = all("skipped" not in r for r in results.values())
            diff = _max_abs_diff(saved["streamed"], saved["naive"]) if ok else None
            for impl, r in results.items():
                head = f"| {model} | {heads} | {grid[0]}×{grid[1]}×{grid[2]} ({n}) | {impl} |"
                if "skipped" in r:
                    print(f"{head} {r['skipped']} | | | | |")
                    continue
                delta = f"{diff[0]:.1e} | {diff[1]:.1e}" if diff and impl == "streamed" else "– | –"
                print(f"{head} {r['peak'] / GB:.3f} | {(r['peak'] - r['grads']) / GB:.3f} | {r['seconds']:.1f} | "
                      f"{delta} |", flush=True)
            for path in saved.values():
                if os.path.exists(path):
                    os.remove(path)


if __name__ == "__main__":
    main()
