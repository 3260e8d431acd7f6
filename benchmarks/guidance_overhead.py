# SPDX-License-Identifier: Apache-2.0
"""Cost of DiTFlow guidance: the same generation with and without it, per phase, against a block-forward count.

Usage (from the repository root)::

    python benchmarks/guidance_overhead.py                          # tiny model, CPU (seconds)
    python benchmarks/guidance_overhead.py --size small --steps 10  # 42 blocks × 8 heads × 64, CPU (minutes)
    python benchmarks/guidance_overhead.py --size 5b --device cuda --dtype bf16      # 49 frames, 480×720
    python benchmarks/guidance_overhead.py --size 2b --frames 9 --height 96 --width 160 --steps 5

Models are random-init from the REAL configs below (no download; timing and memory do not depend on weight
values): ``2b`` and ``5b`` are CogVideoX-2b / -5b with their real block counts, widths, 226 text tokens of
width 4096 and the real VAE; ``small`` is the 5b structure (42 blocks, RoPE, head_dim 64, 226 × 4096 text)
with 8 heads instead of 48 and a tiny VAE, a size where block compute dominates on a CPU; ``tiny`` is the test
model (4 blocks × 2 heads × 16). T5 is replaced by a random embedding table of the right width (its cost is
the same in both runs and not DiTFlow's).

Both runs use batched CFG. The guided run adds the reference encode, the reference AMF pass, and per guided
step the KV-injection reference pass and K_opt optimisation passes (``ditflow.sampler``).

Block-forward count (unit: one transformer block run forward on a batch of 1, "B1F"; a batch-2 CFG block is 2):

- unguided: ``steps · 2 · L``
- guided:   ``unguided + (n + φ) + G · [(m + φ)·inj + K · ((1 + β)(n + φ) + R)]``

with L blocks, guidance block n (the deepest), KV-injection block m, G guided steps, K Adam iterations, R the
blocks recomputed by gradient checkpointing (blocks 0..n except the captured ones, 0 when it is off), β the cost
of a backward in forwards and φ the part of the stop block that runs (its Q/K/V, then the pass stops). The
**issue count** takes φ = 1 and β = 2. The **refined count** takes φ = 1/4 (the QKV projections are 3 of a
block's 12·D² multiply-adds per token) and β measured on one block of this model (weights are frozen, so the
backward computes input gradients only and β is nearer 1 than 2). Ratios are over the transformer phases
(reference AMF, KV, optimisation, denoising); encode and decode are printed apart. Hooks on the blocks also count
the block forwards each run really made, printed next to the count's forward part (β = 0): the wall-clock ratios
vary with the machine's load, the counts do not.

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA (absolute, weights included); on CPU the process's
peak RSS during the run minus its RSS before (weights excluded).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here reads the hub
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GB = 1e9

# ----------------------------------------------------------------------------------------------------------------
# Configs: the real THUDM/CogVideoX-2b and -5b transformer/vae/scheduler config.json, as dicts
# ----------------------------------------------------------------------------------------------------------------

_TRANSFORMER_COMMON = dict(
    activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=64, dropout=0.0, flip_sin_to_cos=True,
    freq_shift=0, in_channels=16, max_text_seq_length=226, norm_elementwise_affine=True, norm_eps=1e-5,
    out_channels=16, patch_size=2, sample_frames=49, sample_height=60, sample_width=90,
    spatial_interpolation_scale=1.875, temporal_compression_ratio=4, temporal_interpolation_scale=1.0,
    text_embed_dim=4096, time_embed_dim=512, timestep_activation_fn="silu",
)
TRANSFORMER = {
    "2b": dict(_TRANSFORMER_COMMON, num_attention_heads=30, num_layers=30, use_rotary_positional_embeddings=False),
    "5b": dict(_TRANSFORMER_COMMON, num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True),
    # CogVideoX1.5-5B (diffusers' conversion script): temporal patch 2, no patch bias, a 300×300 slice-RoPE grid.
    "1.5": dict(_TRANSFORMER_COMMON, num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True,
                patch_size_t=2, patch_bias=False, sample_height=300, sample_width=300, sample_frames=81),
    # Not a released model: the 5b structure with 8 heads (inner 512), for CPU measurements.
    "small": dict(_TRANSFORMER_COMMON, num_attention_heads=8, num_layers=42, use_rotary_positional_embeddings=True),
    # ditflow.testing.tiny_model's transformer (5b variant).
    "tiny": dict(num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, time_embed_dim=32,
                 text_embed_dim=32, num_layers=4, sample_width=12, sample_height=8, sample_frames=49, patch_size=2,
                 temporal_compression_ratio=4, max_text_seq_length=16, use_rotary_positional_embeddings=True),
}
_VAE_REAL = dict(
    act_fn="silu", block_out_channels=(128, 256, 256, 512), down_block_types=("CogVideoXDownBlock3D",) * 4,
    force_upcast=True, in_channels=3, latent_channels=16, layers_per_block=3, norm_eps=1e-6, norm_num_groups=32,
    out_channels=3, sample_height=480, sample_width=720, temporal_compression_ratio=4,
    up_block_types=("CogVideoXUpBlock3D",) * 4, use_post_quant_conv=False, use_quant_conv=False,
)
_VAE_TINY = dict(in_channels=3, out_channels=3, block_out_channels=(16, 16, 16, 16), latent_channels=16,
                 layers_per_block=1, norm_num_groups=4, temporal_compression_ratio=4, sample_height=64,
                 sample_width=96)
SCALING = {"2b": 1.15258426, "5b": 0.7, "1.5": 0.7, "small": 0.7, "tiny": 0.7}
FAMILY = {"2b": "2b", "5b": "5b", "1.5": "1.5", "small": "5b", "tiny": "5b"}
SCHEDULER = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False,
                 clip_sample_range=1.0, num_train_timesteps=1000, prediction_type="v_prediction",
                 rescale_betas_zero_snr=True, sample_max_value=1.0, set_alpha_to_one=True, steps_offset=0,
                 timestep_spacing="trailing", trained_betas=None)
SNR_SHIFT = {"2b": 3.0, "5b": 1.0, "1.5": 1.0}  # 1.5: assumed as 5b (its scheduler config was not read)

#: (frames, height, width, steps) per size when not overridden; 2b/5b are the models' native 49 × 480×720.
DEFAULT_RUN = {"tiny": (9, 64, 96, 50), "small": (9, 96, 160, 10), "2b": (49, 480, 720, 50), "5b": (49, 480, 720, 50),
               "1.5": (81, 768, 1360, 50)}


class _RandomText(torch.nn.Module):
    """Stands in for T5: a random embedding table of the real width, called as ``encode_prompt`` calls T5."""

    def __init__(self, dim: int):
        super().__init__()
        self.table = torch.nn.Embedding(256, dim)

    def forward(self, ids):
        return (self.table(ids),)


class _ByteTokenizer:
    """Bytes as token ids, padded to ``max_length`` when given: as much of a T5 tokenizer as ditflow.text uses."""

    def __call__(self, prompt, *, max_length=None, **_):
        if max_length is None:  # ditflow.text's untruncated length check
            return SimpleNamespace(input_ids=[[b % 256 for b in p.encode()] for p in prompt])
        ids = [[b % 256 for b in p.encode()][:max_length] + [0] * max(0, max_length - len(p.encode())) for p in prompt]
        return SimpleNamespace(input_ids=torch.tensor(ids))

    def decode(self, ids, **_):
        return bytes(ids).decode(errors="replace")


def build_model(size: str, device: str, dtype: torch.dtype, vae: str):
    """A random-init :class:`ditflow.backbones.cogvideox.model.CogVideoX` of ``size`` on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    from ditflow.backbones.cogvideox.model import CogVideoX
    from ditflow.backbones.cogvideox.variants import VARIANTS

    tcfg = TRANSFORMER[size]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    with torch.inference_mode(False), torch.device(device):
        torch.set_default_dtype(dtype)  # build in the run dtype: 5b in fp32 would not fit next to its bf16 copy
        try:
            transformer = CogVideoXTransformer3DModel(**tcfg).eval().requires_grad_(False)
            vae_model = None
            if vae != "none":
                vcfg = dict(_VAE_REAL if vae == "real" else _VAE_TINY, scaling_factor=SCALING[size])
                vae_model = AutoencoderKLCogVideoX(**vcfg).eval().requires_grad_(False)
                if vae == "real":  # as load_cogvideox(vae_tiling=True); 240×360-px tiles, a no-op below that
                    vae_model.enable_tiling()
            text = _RandomText(tcfg["text_embed_dim"]).eval().requires_grad_(False)
        finally:
            torch.set_default_dtype(default)
    family = FAMILY[size]
    return CogVideoX(
        transformer=transformer, vae=vae_model, text_encoder=text, tokenizer=_ByteTokenizer(),
        scheduler_config=dict(SCHEDULER, snr_shift_scale=SNR_SHIFT[family]), spec=VARIANTS[family], dtype=dtype,
        path=f"random-init {size}", transformer_config=dict(transformer.config),
        vae_config={"scaling_factor": SCALING[size]},
    )


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------


class Meter:
    """Wall time (synchronised on CUDA) and peak memory of one phase or run."""

    def __init__(self, device: str):
        self.device = device

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _rss(self, field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    def reset_peak(self):
        self.sync()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets VmHWM to the current RSS
                f.write("5")
        self.base = self._rss("VmRSS")

    def peak(self) -> float:
        self.sync()
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / GB
        return (self._rss("VmHWM") - self.base) / GB

    @contextlib.contextmanager
    def timed(self, times: dict, key: str):
        self.sync()
        tic = time.perf_counter()
        yield
        self.sync()
        times[key] = times.get(key, 0.0) + time.perf_counter() - tic


def backward_factor(model, tokens: int, device: str, repeats: int = 3) -> float:
    """β: (forward+backward − forward) / forward of one block on batch 1, input gradients only (frozen weights)."""
    block = model.transformer.transformer_blocks[0]
    cfg = model.transformer.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    dtype = model.dtype
    text_len = cfg.max_text_seq_length
    video = torch.randn(1, tokens, inner, device=device, dtype=dtype)
    text = torch.randn(1, text_len, inner, device=device, dtype=dtype)
    emb = torch.randn(1, cfg.time_embed_dim, device=device, dtype=dtype)
    meter = Meter(device)

    def fwd(grad: bool):
        with torch.enable_grad() if grad else torch.no_grad():
            v = video.detach().requires_grad_(grad)
            out, _ = block(v, text, emb, None)
            if grad:
                out.float().square().mean().backward()

    clock = time.process_time if device == "cpu" else time.perf_counter  # CPU time resists a shared machine
    best = {}
    for grad in (False, True, False, True):  # first pair warms up
        meter.sync()
        tic = clock()
        for _ in range(repeats):
            fwd(grad)
        meter.sync()
        best[grad] = (clock() - tic) / repeats
    return max(0.0, best[True] / best[False] - 1.0)


@dataclasses.dataclass(frozen=True)
class Count:
    """Inputs of the block-forward count, taken from the actual run's settings."""

    steps: int
    guided: int
    iterations: int
    blocks: int
    guidance_block: int
    kv_block: int | None
    cfg: bool
    recomputed: int

    def unguided(self) -> float:
        return self.steps * (2 if self.cfg else 1) * self.blocks

    def guided_total(self, phi: float, beta: float) -> float:
        n = self.guidance_block + phi
        kv = (self.kv_block + phi) if self.kv_block is not None else 0.0
        return self.unguided() + n + self.guided * (kv + self.iterations * ((1 + beta) * n + self.recomputed))


@contextlib.contextmanager
def counting_blocks(transformer):
    """Counts block forwards in B1F (each call weighs its batch size) while the ``with`` runs; yields ``[count]``.

    Forward pre-hooks fire on every call, so a stop block that raises after its Q/K counts 1 (φ = 1) and a block
    recomputed by gradient checkpointing counts again; backward passes are not forwards and do not count.
    """
    count = [0]

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        count[0] += hidden.shape[0]

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in transformer.transformer_blocks]
    try:
        yield count
    finally:
        for h in handles:
            h.remove()


def run_once(model, prompt, config, *, size, reference_frames, seed, meter, vae: bool, guided: bool) -> dict:
    """One generation; returns per-phase seconds, the transformer-phase total, block forwards and peak memory."""
    from ditflow.reference import extract_reference
    from ditflow.sampler import sample

    times: dict[str, float] = {}
    meter.reset_peak()
    reference = None
    frames, height, width = size
    if guided:
        with meter.timed(times, "reference encode"):
            if vae:
                latents = model.encode_video(reference_frames)
            else:
                latents = torch.randn(1, (frames - 1) // 4 + 1, 16, height // 8, width // 8)
    cpu0 = time.process_time()
    with counting_blocks(model.transformer) as blocks:
        if guided:
            with meter.timed(times, "AMF extraction"):
                reference = extract_reference(model, latents, config.guidance_blocks, temperature=config.temperature)
        with meter.timed(times, "sampling (total)"):
            result = sample(model, prompt, config, size=size, seed=seed, reference=reference)
    cpu = time.process_time() - cpu0
    for key, value in result.timings.items():
        times[f"  {key}"] = value
    if vae:
        with meter.timed(times, "decode"):
            model.decode_latents(result.latents)
    times["transformer phases"] = times.get("AMF extraction", 0.0) + times["sampling (total)"]
    return {"times": times, "peak": meter.peak(), "cpu": cpu, "losses": result.losses, "blocks": blocks[0]}


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> None:
    from ditflow import GuidanceConfig, Mode
    from ditflow.backbones.cogvideox.loading import parse_dtype
    from ditflow.memory import estimate_memory, free_bytes, plan_memory
    from ditflow.text import encode_prompt

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(TRANSFORMER), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: fp32 on cpu, bf16 on cuda)")
    parser.add_argument("--frames", type=int, help="video frames, 4k+1")
    parser.add_argument("--height", type=int, help="pixels, multiple of 16")
    parser.add_argument("--width", type=int, help="pixels, multiple of 16")
    parser.add_argument("--steps", type=int, help="denoising steps")
    parser.add_argument("--mode", default="latent", choices=["latent", "rope", "posemb"])
    parser.add_argument("--block", type=int, help="guidance block (default: the model's, 15 on 2b, 20 on the others; "
                                                  "scaled to the block count for tiny)")
    parser.add_argument("--kv-block", type=int, default=0, help="KV-injection block; -1 turns injection off")
    parser.add_argument("--opt-steps", type=int, default=GuidanceConfig.opt_steps)
    parser.add_argument("--guidance-fraction", type=float, default=GuidanceConfig.guidance_fraction)
    parser.add_argument("--checkpointing", choices=["on", "off", "both", "auto"], default="on",
                        help="gradient checkpointing in the optimisation passes; 'both' runs the guided case twice; "
                        "'auto' runs what ditflow.memory.plan_memory picks from the free memory (always printed)")
    parser.add_argument("--vae", choices=["real", "tiny", "none"], default=None,
                        help="VAE for encode/decode (default: real for 2b/5b, tiny otherwise; none = random latents)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=1, help="repeat each run, keep the fastest (default 1)")
    args = parser.parse_args(argv)

    device = args.device
    dtype = parse_dtype(args.dtype or ("bf16" if device == "cuda" else "fp32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    frames, height, width, steps = DEFAULT_RUN[args.size]
    frames, height, width = args.frames or frames, args.height or height, args.width or width
    steps = args.steps or steps
    vae = args.vae or ("real" if args.size in ("2b", "5b", "1.5") else "tiny")
    family = FAMILY[args.size]
    num_blocks = TRANSFORMER[args.size]["num_layers"]
    from ditflow.backbones.cogvideox.variants import VARIANTS

    block = args.block if args.block is not None else (2 if args.size == "tiny" else
                                                       VARIANTS[family].defaults.guidance_block)
    kv_blocks = () if args.kv_block < 0 else (args.kv_block,)
    mode = args.mode
    if mode == "rope" and family == "2b" or mode == "posemb" and family != "2b":
        parser.error(f"mode {mode} does not fit the {family} model's positions")

    free = free_bytes(device)  # before the model occupies it, as the CLI reads it
    t0 = time.perf_counter()
    model = build_model(args.size, device, dtype, vae)
    build_s = time.perf_counter() - t0
    meter = Meter(device)
    prompt = encode_prompt(model, "a leopard running up a snowy hill", "")
    gen = torch.Generator().manual_seed(0)
    reference_frames = torch.rand(frames, 3, height, width, generator=gen) * 2 - 1

    base = GuidanceConfig(mode=mode, guidance_blocks=(block,), kv_injection_blocks=kv_blocks,
                          num_inference_steps=steps, opt_steps=args.opt_steps,
                          guidance_fraction=args.guidance_fraction)
    unguided_cfg = GuidanceConfig(mode=Mode.NONE, kv_injection_blocks=(), num_inference_steps=steps)
    plan = plan_memory(estimate_memory(model, model.geometry(frames, height, width).token_grid, base.resolved(model)),
                       free, offload="none", on_cpu=device == "cpu")
    ckpt = {"on": [True], "off": [False], "both": [True, False], "auto": [plan.gradient_checkpointing]}[args.checkpointing]
    size = (frames, height, width)
    common = dict(size=size, reference_frames=reference_frames, seed=0, meter=meter, vae=vae != "none")

    # Warm-up: one short guided run (forward, backward and CFG paths), so one-time costs are not counted.
    warm = dataclasses.replace(base, num_inference_steps=2, guidance_fraction=0.5, opt_steps=1)
    run_once(model, prompt, warm, guided=True, **common)

    configs = {"unguided": (unguided_cfg, False)}
    for c in ckpt:
        configs[f"guided, checkpointing {'on' if c else 'off'}"] = (dataclasses.replace(base, gradient_checkpointing=c), True)
    runs: dict[str, dict] = {}
    for _ in range(args.repeats):  # interleaved; the fastest repeat of each run is kept (shared machines)
        for name, (cfg, guided) in configs.items():
            r = run_once(model, prompt, cfg, guided=guided, **common)
            if name not in runs or r["times"]["transformer phases"] < runs[name]["times"]["transformer phases"]:
                runs[name] = r

    resolved = base.resolved(model)
    video_tokens = model.geometry(frames, height, width).num_tokens  # token frames: 2 latent frames each on 1.5
    beta = backward_factor(model, video_tokens, device)

    # Report
    cfg_on = resolved.guidance_scale > 1.0
    print(f"# DiTFlow guidance overhead: size {args.size}, {device} ({torch.cuda.get_device_name() if device == 'cuda' else _cpu_name()}, "
          f"{torch.get_num_threads()} threads), {str(dtype).removeprefix('torch.')}")
    print(f"{num_blocks} blocks × {TRANSFORMER[args.size]['num_attention_heads']} heads × "
          f"{TRANSFORMER[args.size]['attention_head_dim']}; {frames} frames {height}×{width} → "
          f"{video_tokens} video + {TRANSFORMER[args.size]['max_text_seq_length']} text tokens; VAE {vae}; "
          f"model built in {build_s:.1f} s")
    print(f"mode {mode}; {steps} steps, {resolved.num_guided_steps} guided × {base.opt_steps} Adam iterations; "
          f"guidance block {block}; KV-injection block {kv_blocks[0] if kv_blocks else 'off'}; "
          f"CFG {'batched (batch 2)' if cfg_on else 'off'}")
    print(f"gradient checkpointing auto: {'on' if plan.gradient_checkpointing else 'off'} ({plan.checkpointing_reason})\n")

    names = list(runs)
    order = ["reference encode", "AMF extraction", "sampling (total)"]
    found = list(dict.fromkeys(k for r in runs.values() for k in r["times"]))
    keys = [k for k in order if k in found] + [k for k in found if k.startswith("  ")]
    keys += [k for k in found if k not in keys]  # decode, transformer phases
    print("| phase (s) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key in keys:
        cells = [f"{runs[n]['times'][key]:.2f}" if key in runs[n]["times"] else "–" for n in names]
        print(f"| {key.replace('  ', '↳ ')} | " + " | ".join(cells) + " |")
    mem = "peak GPU memory allocated (GB)" if device == "cuda" else "peak RSS above the loaded model (GB)"
    print("| CPU time of the transformer phases (s) | " + " | ".join(f"{runs[n]['cpu']:.2f}" for n in names) + " |")
    print(f"| {mem} | " + " | ".join(f"{runs[n]['peak']:.2f}" for n in names) + " |")

    print("\nGuided/unguided ratio of the transformer phases (AMF extraction + sampling), "
          "unit = batch-1 block forward (B1F):\n")
    print("| run | measured (wall) | measured (CPU time) | predicted, issue count (φ=1, β=2) | predicted, refined (φ=¼, "
          f"β={beta:.2f} measured) | measured / issue | B1F guided / unguided (issue) |")
    print("|---|---|---|---|---|---|---|")
    unguided_s = runs["unguided"]["times"]["transformer phases"]
    keep = {block}
    counts = {}
    for name in names[1:]:
        checkpointing = "on" in name.split("checkpointing ")[1]
        count = counts[name] = Count(
            steps=steps, guided=resolved.num_guided_steps, iterations=base.opt_steps, blocks=num_blocks,
            guidance_block=block, kv_block=kv_blocks[0] if kv_blocks else None, cfg=cfg_on,
            recomputed=(block + 1 - len(keep)) if checkpointing else 0)
        measured = runs[name]["times"]["transformer phases"] / unguided_s
        issue = count.guided_total(1.0, 2.0) / count.unguided()
        refined = count.guided_total(0.25, beta) / count.unguided()
        verdict = "≤ 1.10 ✓" if measured <= 1.10 * issue else "> 1.10 ✗"
        cpu_ratio = runs[name]["cpu"] / runs["unguided"]["cpu"]
        print(f"| {name} | {measured:.3f} | {cpu_ratio:.3f} | {issue:.3f} | {refined:.3f} | {measured / issue:.3f} ({verdict}) | "
              f"{count.guided_total(1.0, 2.0):.0f} / {count.unguided():.0f} |")
    print("\nBlock forwards of the transformer phases, counted by hooks on the blocks against the count's forward part "
          "(β = 0: backward passes are not forwards; checkpoint recomputation is):\n")
    print("| run | counted (B1F) | predicted (φ=1, β=0) |")
    print("|---|---|---|")
    for name in names:
        predicted = counts[name].guided_total(1.0, 0.0) if name in counts else next(iter(counts.values())).unguided()
        print(f"| {name} | {runs[name]['blocks']} | {predicted:.0f} |")
    e2e = {n: sum(v for k, v in runs[n]["times"].items() if k in ("reference encode", "AMF extraction",
                                                                   "sampling (total)", "decode")) for n in names}
    print("\nEnd to end (encode + AMF + sampling + decode): "
          + "; ".join(f"{n} {e2e[n]:.2f} s" for n in names)
          + "; ratio " + ", ".join(f"{e2e[n] / e2e['unguided']:.3f}" for n in names[1:]))


if __name__ == "__main__":
    main()
