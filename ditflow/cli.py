# SPDX-License-Identifier: Apache-2.0
"""Command line: ``python -m ditflow {transfer,inject,download,evaluate,bench-eval,poke,fpt-convert} ...``;
``--help`` on each documents every option.

Bad input ends with one line ``error: ...`` and exit status 2, no traceback; progress goes to stderr. Ctrl-C or
SIGTERM end with exit status 130 and a line that says what was written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys

from .backbones import VARIANT_INFO
from .config import (
    PRESETS,
    GuidanceConfig,
    Loss,
    Mode,
    Optimizer,
    ReferenceOptions,
    MFVariant,
    parse_blocks,
    settings,
)
from .errors import DiTFlowError
from .memory import CHECKPOINTING, OFFLOAD

_DEFAULTS = GuidanceConfig()
_REF = ReferenceOptions()
_UNSET = argparse.SUPPRESS  # options not typed are absent from the namespace: the preset, then the defaults, apply


def _ints(text: str) -> tuple[int, ...]:
    """'20' or '10,15,20' → (10, 15, 20); 'none' or '' → () (:func:`~ditflow.config.parse_blocks`)."""
    try:
        return parse_blocks(text)
    except DiTFlowError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def _frame_count(text: str) -> int | str:
    """'auto' or an integer (checked for 4k+1 later, with the clip)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a frame count like 49 or auto, got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="a hub id (THUDM/CogVideoX-5b or -2b: taken from the Hugging Face "
                   "cache, missing files downloaded, configs and safetensors only) or a diffusers-format CogVideoX "
                   "folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/)")
    g.add_argument("--text-encoder", default=None, metavar="FILE",
                   help="single-file T5-XXL .safetensors (fp16, fp8 or scaled fp8, as ComfyUI's models/text_encoders/"
                   "t5xxl_fp16.safetensors) instead of the model's text_encoder/; needed for kijai's layout "
                   "(transformer/ vae/ scheduler/ only)")
    g.add_argument("--tokenizer", default=None, metavar="FOLDER",
                   help="T5 tokenizer folder (spiece.model or tokenizer.json) instead of the model's tokenizer/; "
                   "without either, THUDM/CogVideoX-5b's tokenizer (< 1 MB) is taken from the Hugging Face cache")
    g.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="model precision (default bf16; the 2B weights are fp16); optimised tensors are fp32 anyway")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--no-vae-tiling", action="store_true", help="decode/encode without VAE tiling (more memory)")
    g.add_argument("--vae-slicing", action="store_true", help="VAE slicing (less memory for batches)")
    m = p.add_argument_group("memory (the choices and their reasons are printed; run.json records them with the peak)")
    m.add_argument("--offload", choices=OFFLOAD, default="auto",
                   help="none: keep T5, transformer and VAE on the GPU together (faster; the 5b weights alone are "
                   "21 GB); sequential: each moves to the GPU only while it runs; auto (default): none when the free "
                   "GPU memory allows, else sequential")
    m.add_argument("--no-offload", dest="offload", action="store_const", const="none", help="same as --offload none")
    m.add_argument("--gradient-checkpointing", choices=CHECKPOINTING, default="auto",
                   help="recompute block activations in the backward of the guided passes: on saves memory (5b, 49 "
                   "frames: 17.5 instead of 58.1 GB), off is faster (≈ 12%% end to end); auto (default): off when "
                   "the guided pass fits in the free memory")
    m.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_const", const="off",
                   help="same as --gradient-checkpointing off")


def _add_preset_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="paper", choices=list(PRESETS),
                   help="paper (default): the paper's settings where it gives them, ours elsewhere; authors: the "
                   "authors' code's protocol (CFG 7, their negative prompt, the first 24 frames stretched to 720×480, "
                   "a posterior sample of the reference). Options given explicitly override the preset; the README "
                   "lists which setting comes from where")


def _add_reference_args(p: argparse.ArgumentParser, *, replay: bool = False, frames: bool = True) -> None:
    """The reference video and how its frames are taken. For ``inject`` (``replay``) the video is optional and the
    frames default to what the embeddings file recorded; ``bench-eval`` (``frames=False``) takes them from its
    manifest."""
    r = p.add_argument_group("reference video" + (" (optional: KV injection in the saved steps)" if replay else ""))
    note = " (default: as recorded in the embeddings file)" if replay else ""
    if replay:
        r.add_argument("--video", default=None, help="the reference the embeddings were made from: turns on KV "
                       "injection (see --kv-injection); frames and size default to those recorded in the embeddings")
    elif frames:
        source = r.add_mutually_exclusive_group(required=True)
        source.add_argument("--video", help="mp4/webm/mov/gif file or a folder of frames")
        source.add_argument("--flow", help="instead of a video, a flow field to follow: the flow.safetensors of "
                            "'poke' (each 16 px patch moves in a straight line by its mean flow from the first to the "
                            "last frame; no KV injection); --num-frames auto is 49, --resize fits the poked image")
    if frames:
        r.add_argument("--num-frames", dest="num_frames", type=_frame_count, default=_UNSET,
                       help="frames to use: 4k+1 or a multiple of 8 (the authors' 24), at least 5; or auto: the "
                       "largest 4k+1 the clip gives after --start and --stride, at most 49 (the models' native count; "
                       "the paper runs 24); the choice is printed and kept in run.json"
                       + (note or " (default auto; the authors preset: 24)"))
    r.add_argument("--height", type=int, default=_UNSET, help=f"height in px, multiple of 16{note or f' (default {_REF.height})'}")
    r.add_argument("--width", type=int, default=_UNSET, help=f"width in px, multiple of 16{note or f' (default {_REF.width})'}")
    if frames:
        r.add_argument("--start", type=int, default=_UNSET, help=f"first frame index{note or ' (default 0)'}")
        r.add_argument("--stride", type=int, default=_UNSET, help=f"take every n-th frame{note or ' (default 1)'}")
    r.add_argument("--resize", default=_UNSET, choices=["crop", "stretch", "pad"],
                   help="fit to the size by centre crop keeping aspect, stretch (the authors'), or pad"
                   + (note or " (default crop)"))
    r.add_argument("--reference-sample-seed", dest="sample_seed", type=int, default=_UNSET,
                   help="encode the reference with a posterior sample drawn from this seed instead of the posterior "
                   "mean (the authors sample, unseeded)" + (note or ""))
    if frames:
        r.add_argument("--image", default=None,
                       help="image-to-video models (CogVideoX-5b-I2V, CogVideoX1.5-5B-I2V): the start frame, an image "
                       "file (png/jpg/webp) or a video's first frame, fitted to the size like the reference (default: "
                       "the reference's first frame" + ("; without --video it is needed" if replay else "; with --flow it is "
                       "needed: the poked image") + ")")
    if frames and not replay:
        f = p.add_argument_group("motion from a flow (--flow)")
        f.add_argument("--flow-scale", type=float, default=1.0, help="multiplies the flow (default 1)")
        f.add_argument("--min-motion", type=float, default=0.0, help="patches moving less than this many px over "
                       "the clip get no target (left free) instead of being held still (default 0)")


def _add_guidance_args(p: argparse.ArgumentParser, *, mode: bool = True, kv: bool = True) -> None:
    """Every :class:`~ditflow.config.GuidanceConfig` option; defaults shown are the paper's (the ``paper`` preset)."""
    g = p.add_argument_group("guidance (paper defaults: DiTFlow §4.3, §5.1)")
    if mode:
        g.add_argument("--mode", default=_UNSET, choices=[m.value for m in Mode],
                       help="latent: optimise z_t (best motion); rope: RoPE tables (5B, I2V and 1.5 models), posemb: "
                       "sin-cos table (2B); "
                       "all three are saved for reuse with 'inject'; none: no optimisation ('backbone' with "
                       "--kv-injection none, the 'injection only' baseline with KV injection on). Default latent")
        g.add_argument("--loss", default=_UNSET, choices=[x.value for x in Loss],
                       help="what the optimisation matches at the guidance block(s): amf = Attention Motion Flow "
                       "(DiTFlow, default); moft = MOFT's motion channels of the block output; smm = SMM's "
                       "spatial-mean differences of the block output (the paper's baselines, ported to the DiT)")
    g.add_argument("--steps", dest="num_inference_steps", type=int, default=_UNSET,
                   help=f"denoising steps (default {_DEFAULTS.num_inference_steps})")
    g.add_argument("--guidance-blocks", dest="guidance_blocks", type=_ints, default=_UNSET,
                   help="block(s) whose attention gives the AMF (or whose output gives the MOFT/SMM features), e.g. "
                   "20 or 10,15,20 (default the model's: "
                   f"{', '.join(f'{d.guidance_block} on {k}' for k, (_, _, d) in VARIANT_INFO.items())})")
    g.add_argument("--temperature", type=float, default=_UNSET,
                   help=f"softmax temperature τ of the AMF (default {_DEFAULTS.temperature})")
    g.add_argument("--guidance-fraction", dest="guidance_fraction", type=float, default=_UNSET,
                   help=f"leading fraction of steps that are guided (default {_DEFAULTS.guidance_fraction})")
    g.add_argument("--opt-steps", dest="opt_steps", type=int, default=_UNSET,
                   help=f"optimiser iterations per guided step (default {_DEFAULTS.opt_steps})")
    g.add_argument("--lr-start", dest="lr_start", type=float, default=_UNSET, help=f"default {_DEFAULTS.lr_start}")
    g.add_argument("--lr-end", dest="lr_end", type=float, default=_UNSET,
                   help=f"learning rate of the last guided step (default {_DEFAULTS.lr_end})")
    g.add_argument("--optimizer", default=_UNSET, choices=[o.value for o in Optimizer],
                   help="optimiser of each guided step, fresh per step with PyTorch's defaults (default adam; adamw "
                   "and sgd are the paper's Table 3c ablation)")
    g.add_argument("--soft-reference", dest="soft_reference", action="store_const", const=True, default=_UNSET,
                   help="reference AMF by soft-argmax instead of argmax (ablation; default argmax)")
    g.add_argument("--unmasked-loss", dest="masked_loss", action="store_const", const=False, default=_UNSET,
                   help="average the AMF loss over every entry, not only where the reference moves (ablation)")
    if kv:
        g.add_argument("--kv-injection", dest="kv_injection_blocks", type=_ints, default=_UNSET,
                       help="block(s) where the reference K/V replace the generated ones during guided steps "
                       "(default 0); 'none' turns KV injection off")


def _add_sampling_args(p: argparse.ArgumentParser, *, replay: bool = False, out: bool = True) -> None:
    g = p.add_argument_group("sampling")
    if out:
        g.add_argument("--prompt", required=True, help="target prompt")
    g.add_argument("--negative-prompt", dest="negative_prompt", default=_UNSET,
                   help="negative prompt (default empty, as diffusers; the authors preset sets theirs)")
    g.add_argument("--seed", type=int, default=None if replay else 0,
                   help="seed of the initial noise; bit-reproducible on CPU (default "
                   + ("the one recorded in the embeddings file, else 0)" if replay else "0)"))
    g.add_argument("--cfg", dest="guidance_scale", type=float, default=_UNSET,
                   help="classifier-free guidance scale (default 6; the authors preset: 7)")
    g.add_argument("--dynamic-cfg", dest="dynamic_cfg", type=_on_off, default=_UNSET, metavar="{on,off}",
                   help="cosine-ramped CFG (default: on for 5B, off for 2B, as diffusers)")
    if out:
        g.add_argument("--fps", type=float, default=None, help="frame rate of the written videos (default: the "
                       "reference's fps divided by the stride; for inject and --flow the model's: 8, or 16 on "
                       "CogVideoX 1.5)")
        g.add_argument("--out", required=True, help="output folder: new or empty; its files appear together when the "
                       "run succeeds, and a failed or interrupted run leaves it as it was")
        g.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out (as a "
                       "whole, when this run succeeds; never when --out holds one of the inputs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ditflow", description="DiTFlow motion transfer on CogVideoX.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("transfer", help="re-create a reference video's motion with a new prompt",
                       description="Motion transfer: writes result.mp4, reference.mp4, run.json and "
                       "embeds.safetensors (the optimised ρ or z_t per guided step) into --out; with --flow (motion "
                       "from pokes) result.mp4 and run.json.")
    _add_model_args(t)
    _add_preset_arg(t)
    _add_reference_args(t)
    _add_sampling_args(t)
    _add_guidance_args(t)

    i = sub.add_parser("inject", help="generate with saved embeddings and a new prompt (no optimisation)",
                       description="Zero-shot injection of what 'transfer' saved (RoPE/sin-cos tables, or the z_t "
                       "trajectory): writes result.mp4 and run.json into --out. Steps and size come from the "
                       "embeddings file. With --video (the reference they were made from) the saved steps also run KV "
                       "injection, as the authors' --inject_embeds does.")
    _add_model_args(i)
    _add_preset_arg(i)
    i.add_argument("--embeds", required=True, help="embeds.safetensors written by 'transfer'")
    _add_reference_args(i, replay=True)
    i.add_argument("--kv-injection", dest="kv_injection_blocks", type=_ints, default=_UNSET,
                   help="with --video: block(s) where the reference K/V replace the generated ones in the saved steps "
                   "(default 0, as the authors' --inject_embeds); 'none' turns KV injection off")
    _add_sampling_args(i, replay=True)

    d = sub.add_parser("download", help="fetch a CogVideoX model from the Hugging Face hub (configs and safetensors)",
                       description="Downloads what is missing of a hub model (configs, safetensors weights and the "
                       "tokenizer; never pickled .bin files) into the Hugging Face cache or --dir, with progress bars; "
                       "rerunning resumes an interrupted download. Prints the folder.")
    d.add_argument("model", help="hub id, e.g. THUDM/CogVideoX-5b (≈ 21 GB) or THUDM/CogVideoX-2b (≈ 13 GB)")
    d.add_argument("--dir", default=None, help="write a plain folder there (e.g. ComfyUI/models/CogVideo/CogVideoX-5b) "
                   "instead of the Hugging Face cache")
    d.add_argument("--without-text-encoder", action="store_true",
                   help="kijai's layout: transformer/ vae/ scheduler/ only (≈ 9.5 GB less), for use with a "
                   "single-file T5-XXL (ComfyUI's models/text_encoders, --text-encoder)")

    e = sub.add_parser("evaluate", help="Motion Fidelity (and CLIP image quality) of a generated video",
                       description="Prints MF of --generated against --reference (DiTFlow §5.1, SMM's metric) and "
                       "which tracker produced it, and IQ (CLIP ViT-B/32 frame-prompt cosine) when CLIP weights are "
                       "on disk.")
    e.add_argument("--reference", required=True, help="reference video (file or folder of frames)")
    e.add_argument("--generated", required=True, help="generated video (file or folder of frames)")
    e.add_argument("--prompt", default=None, help="prompt of the generated video, for IQ (without it IQ is skipped)")
    _add_metric_args(e)
    e.add_argument("--size", type=_size, default=None,
                   help="working size HxW in px for tracking, e.g. 240x360 (default: the reference's size)")
    e.add_argument("--max-frames", type=int, default=None, help="use only the first N frames of each video")

    b = sub.add_parser("bench-eval", help="run the paper's evaluation (methods × videos × prompts) into one table",
                       description="For every video and prompt (caption/subject/scene) of --manifest and every "
                       "method, generates a video and measures MF and IQ; writes DIR/videos/*.mp4, "
                       "DIR/results/*.json, DIR/table.csv and DIR/table.md (which name the model, steps and seed). An item "
                       "finished with the same settings (model, frames, size, prompt, seed, guidance, metrics) is skipped "
                       "on a re-run; one with a damaged record is redone; results of other settings are kept. "
                       "Methods: ditflow (latent, AMF), smm and moft (latent, that loss), injection ('injection "
                       "only': mode none with KV injection) and backbone (mode none, no KV injection).")
    _add_model_args(b)
    _add_preset_arg(b)
    b.add_argument("--manifest", required=True, help="JSON manifest (see ditflow/evaluation.py; the paper's 50 DAVIS "
                   "clips: benchmarks/manifests/davis_paper.json with --davis-root)")
    b.add_argument("--davis-root", default=None, help="a local DAVIS 2017 copy (the folder holding "
                   "JPEGImages/480p/<clip>/) for manifests that name DAVIS clips; DAVIS is not redistributed here")
    b.add_argument("--methods", default="ditflow,smm,moft,injection,backbone",
                   help="comma-separated subset of ditflow,smm,moft,injection,backbone (default: all)")
    b.add_argument("--out", required=True, help="output folder")
    _add_reference_args(b, frames=False)
    b.add_argument("--max-frames", type=int, default=None, help="cap on frames per clip; the first 4k+1 frames of "
                   "each range are used (24 → 21; the authors preset keeps all 24; default: no cap)")
    _add_guidance_args(b, mode=False, kv=False)
    _add_sampling_args(b, out=False)
    _add_metric_args(b)
    b.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="distribute items over a Ray cluster ('auto', 'ray://host:10001', or 'local'); needs the "
                   "optional 'ray' package and the model path on every node (default: sequential, here)")
    b.add_argument("--ray-workers", type=int, default=None,
                   help="Ray actors, one model each (default: the cluster's GPU count, else 1)")
    _add_fpt_commands(sub)
    return parser


def _point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a point like 120,80 (x,y in pixels), got {text!r}") from None
    return x, y


def _add_fpt_commands(sub) -> None:
    """``poke`` and ``fpt-convert``: the Flow Poke Transformer (ditflow.fpt)."""
    from .fpt.fields import MODES, PRECISIONS
    from .fpt.jobs import PokeOptions
    from .fpt.view import FITS

    d = PokeOptions()
    p = sub.add_parser("poke", help="Flow Poke Transformer: how an image moves when poked (dense flow field)",
                       description="Predicts the motion of every point of --image given pokes (drag x0,y0 to x1,y1, "
                       "in pixels, x right, y down). Writes flow.safetensors (tensor 'flow' [H, W, 2], (dx, dy) in "
                       "pixels per pixel, OpenCV's layout), flow.png (colour wheel, pokes drawn) and, with --query, "
                       "density.png (where that point may go).")
    p.add_argument("--model", required=True, help="FPT weights converted by 'fpt-convert' (.safetensors)")
    p.add_argument("--image", required=True, help="the image (png, jpg, …)")
    p.add_argument("--pokes", required=True, help="'x0,y0,x1,y1; x0,y0,x1,y1' in pixels ('' for none)")
    p.add_argument("--out", required=True, help="output folder: new or empty; its files appear together when the "
                   "run succeeds, and a failed or interrupted run leaves it as it was")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out (as a whole, "
                   "when this run succeeds; never when --out holds the image or the weights)")
    p.add_argument("--query", type=_point, default=None, help="x,y in pixels: also write density.png for this point")
    p.add_argument("--fit", default=d.fit, choices=FITS, help="non-square images: pad (letterbox, whole image; "
                   "default) or crop (centre square, the authors' demo)")
    p.add_argument("--mode", default=d.mode, choices=MODES, help="mean: expected flow (default); sample: one "
                   "plausible motion (autoregressive on --ar-grid, seeded)")
    p.add_argument("--grid", type=int, default=d.grid, help=f"query points along the longer side (default {d.grid})")
    p.add_argument("--ar-grid", type=int, default=d.ar_grid, help=f"sampled points along the longer side in mode "
                   f"sample (default {d.ar_grid})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of mode sample (default 0)")
    p.add_argument("--moving-camera", action="store_true", help="do not condition on a still camera")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="fp32 (default) or bf16 autocast (GPU)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")

    c = sub.add_parser("fpt-convert", help="convert the released FPT .pt checkpoint to safetensors, once",
                       description="Reads flow_poke_open_set_base.pt (huggingface.co/CompVis/flow-poke-transformer, "
                       "CC BY-NC 4.0) with torch.load(weights_only=True), refuses anything but tensors, and writes "
                       "the weights as safetensors for 'poke' and the ComfyUI nodes (models/fpt/).")
    c.add_argument("checkpoint", help="the authors' .pt")
    c.add_argument("output", help="the .safetensors to write")
    c.add_argument("--encoder-heads", type=int, default=None, help="DINOv2 attention heads, not stored in the "
                   "weights (default: 64-wide heads, 12 for the released DINOv2-B)")
    c.add_argument("--image-size", type=int, default=448, help="side images are resized to before encoding, not "
                   "stored in the weights (default 448, the released model's)")


def _fpt(args) -> None:
    if args.command == "fpt-convert":
        from .fpt.checkpoint import convert_checkpoint

        config = convert_checkpoint(args.checkpoint, args.output, encoder_heads=args.encoder_heads,
                                    image_size=args.image_size)
        print(f"wrote {args.output} (width {config.width}, {config.depth} blocks, DINOv2 "
              f"{config.encoder.hidden_size}×{config.encoder.layers})", file=sys.stderr)
        return
    from .fpt.jobs import PokeOptions, run_poke

    options = PokeOptions(fit=args.fit, mode=args.mode, grid=args.grid, ar_grid=args.ar_grid, seed=args.seed,
                          camera_static=not args.moving_camera, precision=args.precision, query=args.query)
    written = run_poke(args.model, args.image, args.pokes, args.out, options, device=args.device,
                       log=lambda line: print(line, file=sys.stderr, flush=True), overwrite=args.overwrite)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 240x360 (height x width), got {text!r}") from None
    return h, w


def _add_metric_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("metrics")
    g.add_argument("--tracker", default="auto", choices=["auto", "flow", "cotracker"],
                   help="MF point tracker: cotracker = CoTracker3 offline, the paper's, from the local torch.hub cache "
                   "only; flow = weight-free DIS optical flow (numbers not comparable with the paper's); auto = "
                   "cotracker when on disk, else flow (default)")
    g.add_argument("--cotracker-checkpoint", default=None, help="path of CoTracker3's scaled_offline.pth")
    g.add_argument("--grid-size", type=int, default=55, help="tracked points per side (paper: 55)")
    g.add_argument("--mf-variant", default=MFVariant.OFFICIAL.value, choices=[v.value for v in MFVariant],
                   help="Motion Fidelity formula: official = SMM's and DiTFlow's evaluation code (generated → "
                   "reference, own-point match subtracted, first frames; comparable with the paper's Table 1, "
                   "default); symmetric = the SMM paper's both-ways mean; ours = generated → reference on "
                   "resampled frames (see ditflow/metrics.py)")
    g.add_argument("--clip-model", default=None, help="folder of openai/clip-vit-base-patch32 for IQ (default: the "
                   "local Hugging Face cache, and IQ is skipped, with the reason, when it lacks the weights; a folder "
                   "given here that cannot be loaded is an error)")


def _evaluate(args) -> None:
    from .metrics import check_clip_folder, clip_score, load_clip, motion_fidelity
    from .video import load_video

    if args.clip_model is not None and args.prompt is not None:  # a folder given that cannot serve: before any work
        check_clip_folder(args.clip_model)
    ref, _ = load_video(args.reference, max_frames=args.max_frames)
    gen, _ = load_video(args.generated, max_frames=args.max_frames)
    mf = motion_fidelity(ref, gen, grid_size=args.grid_size, tracker=args.tracker,
                         cotracker_checkpoint=args.cotracker_checkpoint, size=args.size, variant=args.mf_variant)
    note = "" if mf.tracker != "flow" else "; weight-free optical flow, not comparable with the paper's CoTracker3 MF"
    print(f"MF {mf.score:.4f}  (tracker: {mf.tracker}{note}; {len(mf.tracks_ref)} frames at {mf.size[0]}x{mf.size[1]}, "
          f"{args.grid_size}x{args.grid_size} points; {args.mf_variant} formula)")
    if args.prompt is None:
        print("IQ skipped: no --prompt given")
        return
    try:
        model, processor = load_clip(args.clip_model)
    except DiTFlowError as err:
        if args.clip_model is not None:  # asked for explicitly: not a reason to skip quietly
            raise
        print(f"IQ skipped: {err} (here: --clip-model FOLDER)")
        return
    print(f"IQ {clip_score(gen, args.prompt, model=model, processor=processor):.4f}  (CLIP ViT-B/32, mean over frames)")


def _download(args) -> None:
    from .hub import SUBFOLDERS, download

    subfolders = ("scheduler", "vae", "transformer") if args.without_text_encoder else SUBFOLDERS
    print(download(args.model, local_dir=args.dir, subfolders=subfolders, log=_log))
#: Namespace attributes that are :func:`~ditflow.config.settings` options (present only when typed: ``_UNSET``).
#: ``gradient_checkpointing`` is the memory group's (auto|on|off, :mod:`ditflow.memory`), not a GuidanceConfig input.
_SETTING_NAMES = (
    {f.name for f in dataclasses.fields(GuidanceConfig)} | {f.name for f in dataclasses.fields(ReferenceOptions)}
    | {"negative_prompt"}
) - {"gradient_checkpointing"}


def _given(args) -> dict:
    """The settings options typed on the command line."""
    return {k: v for k, v in vars(args).items() if k in _SETTING_NAMES}


def _bench(args) -> None:
    from .evaluation import BenchOptions, run_benchmark

    chosen = settings(args.preset, **_given(args))
    options = BenchOptions(
        model=_model_options(args), methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        height=chosen.reference.height, width=chosen.reference.width, resize=chosen.reference.resize,
        sample_seed=chosen.reference.sample_seed, max_frames=args.max_frames, guidance=chosen.guidance, seed=args.seed,
        negative_prompt=chosen.negative_prompt, grid_size=args.grid_size, tracker=args.tracker,
        cotracker_checkpoint=args.cotracker_checkpoint, clip_model=args.clip_model, mf_variant=args.mf_variant,
        clip_frames=chosen.clip_frames,
    )
    report = run_benchmark(args.manifest, options, args.out, ray_address=args.ray, ray_workers=args.ray_workers,
                           davis_root=args.davis_root, log=_log)
    print(report.table_md.read_text(), end="")
    print(f"ran {len(report.ran)}, skipped {len(report.skipped)} finished; table: {report.table_csv}", file=sys.stderr)


class _Progress:
    """Prints one line per denoising step (and per Adam iteration) to stderr."""

    def __call__(self, info: dict) -> None:
        step, n = info["step"] + 1, info["num_steps"]
        if info["iteration"] is None:
            loss = "" if info["loss"] is None else f"  last guidance loss {info['loss']:.5f}"
            print(f"step {step}/{n}  t={info['timestep']}{loss}", file=sys.stderr, flush=True)
        else:
            print(f"  step {step}/{n} opt {info['iteration'] + 1}: loss {info['loss']:.5f}", file=sys.stderr, flush=True)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _model_options(args):
    from .jobs import ModelOptions

    kw = dict(path=args.model, dtype=args.dtype, vae_tiling=not args.no_vae_tiling, vae_slicing=args.vae_slicing,
              offload=args.offload, gradient_checkpointing=args.gradient_checkpointing,
              text_encoder_file=args.text_encoder, tokenizer_path=args.tokenizer)
    if args.device:
        kw["device"] = args.device
    return ModelOptions(**kw)


def _inject(args) -> dict:
    from . import jobs
    from .embeds import load_embeds

    given = _given(args)
    chosen = settings(args.preset, **{k: v for k, v in given.items() if k not in _REFERENCE_NAMES})
    reference = None
    if args.video:  # recorded frames, overridden by what was typed (the preset's frames do not apply to a replay)
        recorded = dataclasses.asdict(jobs.replay_reference(load_embeds(args.embeds)))
        reference = ReferenceOptions(**{**recorded, **{k: v for k, v in given.items() if k in _REFERENCE_NAMES}})
    return jobs.inject(_model_options(args), args.embeds, args.prompt, args.out, video=args.video, image=args.image,
                       reference=reference, negative_prompt=chosen.negative_prompt,
                       config=dataclasses.replace(chosen.guidance, mode=Mode.NONE), seed=args.seed, fps=args.fps,
                       overwrite=args.overwrite, callback=_Progress(), log=_log)


_REFERENCE_NAMES = {f.name for f in dataclasses.fields(ReferenceOptions)}


def _identity(path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, ``None`` if absent: a published output set is a new folder, so this changes."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (``kill``) raises KeyboardInterrupt like Ctrl-C, so that cleanup runs; restored afterwards."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted(args, before) -> str:
    """What an interrupted command leaves behind, truthfully."""
    if args.command == "bench-eval":
        return (f"interrupted: finished items are kept in {args.out} (results/, videos/); run the same command again "
                "to resume")
    if args.command not in ("transfer", "inject", "poke"):
        return "interrupted"
    if _identity(args.out) != before:
        return f"interrupted after {args.out} was written in full"
    return f"interrupted: nothing was written ({args.out} is as it was)"


@contextlib.contextmanager
def _warnings_on_stderr():
    """Warnings of the library (the ``ditflow`` logger) print as ``warning: ...`` lines while the command runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger = logging.getLogger("ditflow")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import jobs

    before = _identity(args.out) if hasattr(args, "out") else None
    try:
        with _sigterm_as_interrupt(), _warnings_on_stderr():
            record = _run(args, jobs)
    except DiTFlowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted(args, before), file=sys.stderr)
        return 130
    if args.command in ("transfer", "inject"):
        peak = record["memory"]["peak_gpu_allocated_gb"]
        _log(f"peak GPU memory: {peak if isinstance(peak, str) else f'{peak:.2f} GB allocated'}")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _run(args, jobs) -> dict | None:
    """Runs the command; returns the run record of ``transfer`` / ``inject``."""
    if args.command in ("poke", "fpt-convert"):
        _fpt(args)
    elif args.command == "download":
        _download(args)
    elif args.command == "evaluate":
        _evaluate(args)
    elif args.command == "bench-eval":
        _bench(args)
    elif args.command == "transfer":
        chosen = settings(args.preset, **_given(args))
        if args.flow is not None:
            ref = chosen.reference
            target = jobs.FlowTarget(num_frames=ref.num_frames, height=ref.height, width=ref.width, fit=ref.resize,
                                     scale=args.flow_scale, min_motion=args.min_motion)
            return jobs.transfer_flow(_model_options(args), args.flow, args.prompt, args.out, target=target,
                                      image=args.image, negative_prompt=chosen.negative_prompt, config=chosen.guidance,
                                      seed=args.seed, fps=args.fps, overwrite=args.overwrite, callback=_Progress(),
                                      log=_log)
        return jobs.transfer(_model_options(args), args.video, args.prompt, args.out,
                             negative_prompt=chosen.negative_prompt, reference=chosen.reference, config=chosen.guidance,
                             seed=args.seed, fps=args.fps, overwrite=args.overwrite, image=args.image, callback=_Progress(),
                             log=_log, preset=args.preset)
    else:
        return _inject(args)
    return None
