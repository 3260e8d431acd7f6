# SPDX-License-Identifier: Apache-2.0
"""Loading a CogVideoX (2b, 5b, 5b-I2V, 1.5, 1.5-I2V: :mod:`.variants`) from a diffusers folder (method.md §1, §7).

:func:`load_cogvideox` reads ``transformer/config.json`` first and refuses unsupported variants before any
weights are read, then loads the components with diffusers / transformers ``from_pretrained`` (safetensors only)
and returns them as a :class:`CogVideoX`. The models stay stock diffusers modules: hooks are installed elsewhere.

ComfyUI runs every node under ``torch.inference_mode()``; weights created there are inference tensors and any
later backward through them fails (DiTFlow optimises through the transformer). Loading therefore runs under
``torch.inference_mode(False)`` so the weights are normal tensors wherever it is called from.

diffusers and transformers are imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ...checkpoint import check_config, check_weights, read_json
from ...errors import DiTFlowError, quote
from .model import CogVideoX
from .schedule import build_scheduler
from .variants import detect_variant

#: The components :func:`load_cogvideox` can load, each from the subfolder of the same name (the text encoder and
#: tokenizer may also come from elsewhere: kijai's layout).
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer")
#: Where the T5 tokenizer comes from when a kijai-layout folder has none and no tokenizer folder is given.
TOKENIZER_REPO = "THUDM/CogVideoX-5b"

_LAYOUT = (
    "a CogVideoX folder holds model_index.json and the subfolders transformer/ vae/ text_encoder/ tokenizer/ "
    "scheduler/, as downloaded from THUDM/CogVideoX-5b (or another CogVideoX repository)"
)

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


# ---------------------------------------------------------------------------------------------------------------
# Checks that need no weights
# ---------------------------------------------------------------------------------------------------------------


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16"`` / ``"fp16"`` / ``"fp32"`` (or that torch dtype) → ``torch.dtype``; raises :class:`DiTFlowError`."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.bfloat16, torch.float16, torch.float32):
            return dtype
    elif isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise DiTFlowError(f"unknown dtype {dtype!r}; choose bf16, fp16 or fp32.")


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def _resolve(path: str | os.PathLike, subfolders: list[str], log: Callable[[str], None] | None) -> Path:
    """The local folder of ``path``: the folder itself, or a hub id's snapshot in the cache (fetching the
    ``subfolders``, see :mod:`ditflow.hub`); raises for a missing local folder."""
    from ... import hub

    text = os.fspath(path)
    if not Path(text).expanduser().is_dir() and not hub.is_hub_id(text):
        raise DiTFlowError(f"model folder {text} does not exist; {_LAYOUT}.")
    return hub.resolve_model(text, subfolders=subfolders, log=log)


def _check_layout(root: Path, subfolders: list[str]) -> None:
    """Raises :class:`DiTFlowError` naming every missing subfolder / config / safetensors file under ``root`` (for a
    snapshot in the hub cache, also how to complete it; for kijai's layout, where T5 comes from)."""
    from ...hub import incomplete_hint

    try:
        _check_files(root, subfolders)
    except DiTFlowError as exc:
        hint = incomplete_hint(root)
        if hint is None:
            raise
        raise DiTFlowError(f"{str(exc).rstrip('.')}; {hint}.") from None


def _check_files(root: Path, subfolders: list[str]) -> None:
    if (root / "config.json").is_file() and not (root / "transformer").is_dir():
        raise DiTFlowError(
            f"{root} looks like one component's subfolder, not a whole model; give its parent folder ({_LAYOUT})."
        )
    kijai = (root / "transformer").is_dir() and not (root / "text_encoder").is_dir() and not (root / "tokenizer").is_dir()
    if "text_encoder" in subfolders and kijai:
        found = sorted((root.parent.parent / "text_encoders").glob("t5*.safetensors"))
        example = found[0] if found else "ComfyUI/models/text_encoders/t5xxl_fp16.safetensors"
        raise DiTFlowError(
            f"{root} has no text_encoder/ (kijai's layout: transformer/ vae/ scheduler/, T5 kept as one file); give "
            f"a single-file T5-XXL with --text-encoder (e.g. {example}; in ComfyUI the loader's text_encoder), or "
            "fetch the full model with `python -m ditflow download THUDM/CogVideoX-5b`."
        )
    needed = {"transformer": "config.json", "scheduler": "scheduler_config.json"}
    needed.update({c: "config.json" for c in subfolders if c in ("vae", "text_encoder")})
    order = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    wanted = [sub for sub in order if sub in needed or sub in subfolders]
    missing = [f"{sub}/" for sub in wanted if not (root / sub).is_dir()]
    if missing:
        noun = "subfolder" if len(missing) == 1 else "subfolders"
        raise DiTFlowError(f"{root} has no {' '.join(missing)} {noun}; {_LAYOUT}.")
    for sub, name in needed.items():
        if not (root / sub / name).is_file():
            raise DiTFlowError(f"{root / sub} has no {name}; {_LAYOUT}.")
    for sub in ("transformer", "vae", "text_encoder"):
        if sub in subfolders and not any((root / sub).glob("*.safetensors")):
            raise DiTFlowError(
                f"{root / sub} has no .safetensors weights; only safetensors are loaded (re-download the folder "
                "from the hub, which ships them)."
            )
    tok = root / "tokenizer"
    if "tokenizer" in subfolders and not ((tok / "spiece.model").is_file() or (tok / "tokenizer.json").is_file()):
        raise DiTFlowError(f"{tok} has neither spiece.model nor tokenizer.json; {_LAYOUT}.")


def _read_config(local: Path, subfolder: str, name: str) -> dict:
    """One component's JSON config; raises :class:`DiTFlowError` naming the file when it is unreadable, not JSON, or
    not a JSON object."""
    path = local / subfolder / name
    config = read_json(path)
    if not isinstance(config, dict):
        raise DiTFlowError(
            f"{path} is not a JSON object but a {type(config).__name__}; re-download {subfolder}/ from the "
            "model's Hugging Face repository."
        )
    return config


def _checked_config(local: Path, kind: str) -> dict:
    """``kind``'s config, checked (:func:`ditflow.checkpoint.check_config`)."""
    name = "scheduler_config.json" if kind == "scheduler" else "config.json"
    return check_config(kind, _read_config(local, kind, name), local / kind / name)


def _tokenizer_folder(local: Path, tokenizer_path: str | os.PathLike | None, log) -> Path:
    """Where the T5 tokenizer is: ``tokenizer_path``, else ``local/tokenizer``, else (kijai's layout, which has
    none) THUDM/CogVideoX-5b's ``tokenizer/`` from the hub cache, fetched if missing (< 1 MB; the same T5 vocabulary
    for 2b and 5b)."""
    from ... import hub

    if tokenizer_path is not None:
        folder = Path(tokenizer_path).expanduser()
        if not ((folder / "spiece.model").is_file() or (folder / "tokenizer.json").is_file()):
            raise DiTFlowError(f"tokenizer folder {folder} has neither spiece.model nor tokenizer.json; give a T5 "
                               "tokenizer folder (e.g. ComfyUI's comfy/text_encoders/t5_tokenizer).")
        return folder
    if (local / "tokenizer").is_dir():
        return local / "tokenizer"
    try:
        return hub.download(TOKENIZER_REPO, subfolders=("tokenizer",), log=log) / "tokenizer"
    except DiTFlowError as exc:
        raise DiTFlowError(
            f"{local} has no tokenizer/ and no T5 tokenizer was given ({str(exc).rstrip('.')}); pass a T5 tokenizer "
            "folder with --tokenizer (spiece.model or tokenizer.json, such as ComfyUI's comfy/text_encoders/"
            "t5_tokenizer)."
        ) from None


def _load_tokenizer(source: str, folder: Path):
    """The checkpoint's T5 tokenizer; checks the SentencePiece backend is present and words are not all unknown."""
    from transformers import AutoTokenizer

    needs_spm = not (folder / "tokenizer.json").is_file()
    if needs_spm:
        modules = {"sentencepiece": "sentencepiece", "protobuf": "google.protobuf"}
        lacking = [package for package, module in modules.items() if importlib.util.find_spec(module) is None]
        if lacking:
            raise DiTFlowError(
                f"the CogVideoX tokenizer (spiece.model) needs the Python packages {' and '.join(lacking)}; "
                f"install them with: pip install {' '.join(lacking)}."
            )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # a damaged spiece.model surfaces as protobuf, tiktoken or OS errors
        raise DiTFlowError(
            f"the tokenizer in {folder} cannot be loaded ({type(e).__name__}), so its spiece.model or JSON files "
            "are damaged; re-download tokenizer/ from the model's Hugging Face repository."
        ) from None
    ids = tokenizer("a video of a dog", add_special_tokens=False).input_ids
    if not ids or all(i == tokenizer.unk_token_id for i in ids):
        raise DiTFlowError(
            f"the tokenizer in {source} maps every word to <unk> (its spiece.model was not loaded); "
            "reinstall sentencepiece and protobuf or re-download tokenizer/."
        )
    return tokenizer


def _transformers_dtype_kwarg(torch_dtype: torch.dtype) -> dict:
    """transformers ≥ 4.56 takes ``dtype=`` (``torch_dtype=`` warns under 5.x); older ones only ``torch_dtype=``."""
    import transformers

    major, minor = (int(p) for p in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype": torch_dtype} if (major, minor) >= (4, 56) else {"torch_dtype": torch_dtype}


@contextlib.contextmanager
def _explained(source: str, component: str) -> Iterator[None]:
    """Last line of defence behind :mod:`ditflow.checkpoint`: a loader error becomes one sentence naming the folder.

    Out-of-memory errors pass through unchanged (they are not damage).
    """
    from safetensors import SafetensorError

    try:
        yield
    except (DiTFlowError, MemoryError, torch.cuda.OutOfMemoryError):  # torch.OutOfMemoryError only since 2.5
        raise
    except (OSError, ValueError, RuntimeError, TypeError, KeyError, AttributeError, SafetensorError) as e:
        raise DiTFlowError(
            f"could not load {source}/{component} ({quote(e)}); re-download {component}/ from the model's Hugging "
            "Face repository."
        ) from e


def _load_text_encoder(local: Path, text_encoder_file, torch_dtype: torch.dtype):
    """T5 from ``text_encoder_file`` (:func:`ditflow.t5_file.load_t5_file`) or from ``local/text_encoder``."""
    if text_encoder_file is not None:
        from ...t5_file import load_t5_file

        return load_t5_file(text_encoder_file, torch_dtype)
    from transformers import T5EncoderModel

    with _explained(os.fspath(local), "text_encoder"):
        return T5EncoderModel.from_pretrained(
            str(local / "text_encoder"), use_safetensors=True, **_transformers_dtype_kwarg(torch_dtype)
        )


def _check_text_dim(text_encoder, transformer_config: dict, where) -> None:
    d_model, wanted = text_encoder.config.d_model, transformer_config.get("text_embed_dim", 4096)
    if d_model != wanted:
        raise DiTFlowError(
            f"the text encoder in {where} gives {d_model}-dim embeddings but this CogVideoX takes {wanted} (T5-XXL); "
            "use T5-v1.1-XXL, e.g. t5xxl_fp16.safetensors."
        )


def _freeze(model):
    model.eval()
    model.requires_grad_(False)
    return model


def load_cogvideox(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "bf16",
    device: str | torch.device = "cpu",
    vae_tiling: bool = False,
    vae_slicing: bool = False,
    components: tuple[str, ...] | list[str] = COMPONENTS,
    offload: bool = False,
    text_encoder_file: str | os.PathLike | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> CogVideoX:
    """Loads a CogVideoX of any supported variant from a diffusers folder (or a hub id) for DiTFlow.

    Safe to call under ``torch.inference_mode()`` (as ComfyUI does): the weights are created as normal tensors,
    so gradients can later flow through the transformer.

    Args:
        path: a local folder laid out like ``THUDM/CogVideoX-5b`` (``model_index.json`` + ``transformer/ vae/
            text_encoder/ tokenizer/ scheduler/``), or a hub id ``owner/name`` when no such folder exists: its
            snapshot in the Hugging Face cache, after fetching what the components need (:mod:`ditflow.hub`).
        dtype: ``"bf16"``, ``"fp16"``, ``"fp32"`` or a torch dtype; all models are loaded in it (the 5b weights
            are bf16 and the 2b weights fp16 on disk), except that transformers keeps T5's feed-forward output
            layers (``wo``) in fp32 under fp16.
        device: where the models are moved after loading (with ``offload``: where :meth:`CogVideoX.on_device`
            moves them while they are used; they are loaded on the CPU).
        vae_tiling: decode/encode in spatial tiles (``vae.enable_tiling()``); saves memory at 480×720.
        vae_slicing: decode/encode one batch element at a time (``vae.enable_slicing()``).
        components: which of ``transformer``, ``vae``, ``text_encoder``, ``tokenizer`` to load; the others are
            ``None``. The transformer and scheduler configs are always read.
        offload: keep the networks on the CPU between uses (sequential offload; see :meth:`CogVideoX.on_device`).
        text_encoder_file: a single-file T5-XXL (``t5xxl_fp16.safetensors``, fp8 or scaled fp8, as in ComfyUI's
            ``models/text_encoders``; :mod:`ditflow.t5_file`) used instead of ``text_encoder/``: kijai's layout
            (``transformer/ vae/ scheduler/`` only) needs one.
        tokenizer_path: a T5 tokenizer folder (``spiece.model`` or ``tokenizer.json``) used instead of
            ``tokenizer/``; without either, THUDM/CogVideoX-5b's tokenizer is taken from the hub cache (fetched
            when missing).
        log: receives a line before a hub download starts.
    Returns:
        :class:`CogVideoX` with the models in eval mode and ``requires_grad`` off.
    Raises:
        DiTFlowError: missing folder, missing subfolder / config / safetensors, unsupported variant (raised from
            the config before any weights are read), unknown dtype or component, a tokenizer that cannot load, or
            a hub id that is not in the cache and cannot be downloaded (offline: how to download it).
    """
    torch_dtype = parse_dtype(dtype)
    components = tuple(components)
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise DiTFlowError(f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}.")
    compute_device = None
    if offload and torch.device(device).type != "cpu":
        compute_device, device = str(device), "cpu"

    # 1. A local folder (a hub id is fetched into the cache first), then its configs: unsupported variants are
    #    refused before any weights are read.
    source = os.fspath(path)
    subfolders = ["scheduler", "transformer", *(c for c in ("vae", "text_encoder", "tokenizer") if c in components)]
    if text_encoder_file is not None:  # kijai's layout: T5 from one file, its tokenizer from elsewhere
        subfolders = [sub for sub in subfolders if sub not in ("text_encoder", "tokenizer")]
    if tokenizer_path is not None and "tokenizer" in subfolders:
        subfolders.remove("tokenizer")
    local = _resolve(path, subfolders, log)
    _check_layout(local, subfolders)
    transformer_config = _read_config(local, "transformer", "config.json")
    variant = detect_variant(transformer_config)
    configs = {"transformer": _checked_config(local, "transformer")}
    configs.update({c: _checked_config(local, c) for c in ("vae", "text_encoder") if c in subfolders})
    scheduler_config = _checked_config(local, "scheduler")
    build_scheduler(variant.scheduler, scheduler_config, str(local))
    for kind, config in configs.items():  # headers, sizes, shard indexes, names and shapes: before any tensor is read
        if kind in components:
            check_weights(local / kind, kind, config)

    # 2. Weights, outside inference mode so they are ordinary (differentiable-through) tensors.
    with torch.inference_mode(False):
        from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

        def where(sub: str) -> dict:
            return {"pretrained_model_name_or_path": str(local / sub), "use_safetensors": True}

        transformer = vae = text_encoder = tokenizer = None
        if "transformer" in components:
            with _explained(source, "transformer"):
                transformer = CogVideoXTransformer3DModel.from_pretrained(
                    **where("transformer"), torch_dtype=torch_dtype
                )
            transformer = _freeze(transformer.to(device))
        if "vae" in components:
            with _explained(source, "vae"):
                vae = AutoencoderKLCogVideoX.from_pretrained(**where("vae"), torch_dtype=torch_dtype)
            vae = _freeze(vae.to(device))
            if vae_tiling:
                vae.enable_tiling()
            if vae_slicing:
                vae.enable_slicing()
        if "text_encoder" in components:
            text_encoder = _freeze(_load_text_encoder(local, text_encoder_file, torch_dtype).to(device))
            _check_text_dim(text_encoder, transformer_config, text_encoder_file or local / "text_encoder")
        if "tokenizer" in components:
            tokenizer = _load_tokenizer(source, _tokenizer_folder(local, tokenizer_path, log))
            if text_encoder is not None and len(tokenizer) > text_encoder.config.vocab_size:
                raise DiTFlowError(
                    f"the tokenizer has {len(tokenizer)} tokens but the T5 text encoder embeds only "
                    f"{text_encoder.config.vocab_size}; use the tokenizer that belongs to that T5."
                )

    if vae is not None:
        vae_config = dict(vae.config)
    elif (local / "vae" / "config.json").is_file():
        vae_config = _checked_config(local, "vae")
    else:
        vae_config = None

    return CogVideoX(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        spec=variant,
        dtype=torch_dtype,
        path=source,
        transformer_config=transformer_config,
        vae_config=vae_config,
        compute_device=compute_device,
    )
