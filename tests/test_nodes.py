# SPDX-License-Identifier: Apache-2.0
"""The ComfyUI nodes, run as ComfyUI runs them (inside ``torch.inference_mode()``) against stub ComfyUI modules.

Sizes: 9 frames → 3 latent frames; 64×96 px → latent 8×12 → 4×6 patches. Tiny models have 4 blocks, so the
guidance block is 1 instead of the paper's 20.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import comfy_stubs
from ditflow import DiTFlowError

ROOT = Path(__file__).resolve().parents[1]
FRAMES, HEIGHT, WIDTH = 9, 64, 96
FAST = dict(steps=4, cfg=6.0, seed=3, guidance_fraction=0.5, opt_steps=2, lr_start=0.002, lr_end=0.001,
            kv_injection=True, kv_block=0, num_frames=FRAMES, width=WIDTH, height=HEIGHT)


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """Stub ComfyUI with a base folder holding models/CogVideo/tiny-{5b, 2b, 5b-i2v, 1.5-i2v}; removed after the
    module."""
    from ditflow.testing.tiny_model import build_tiny_model

    base = tmp_path_factory.mktemp("comfy")
    for variant in ("5b", "2b", "5b-i2v", "1.5-i2v"):
        build_tiny_model(base / "models" / "CogVideo" / f"tiny-{variant}", variant)
    (base / "output").mkdir()
    mods = comfy_stubs.install(str(base))
    yield mods
    comfy_stubs.uninstall()


@pytest.fixture(scope="module")
def N(comfy):
    """NODE_CLASS_MAPPINGS, imported after the stubs."""
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def reference_image(request):
    """IMAGE [T, H, W, 3] in [0, 1]: bmx-trees when the workspace has it, else the Big Buck Bunny test clip."""
    from ditflow.layout import frames_to_image
    from ditflow.video import load_video

    try:
        path = request.getfixturevalue("bmx_path")
    except pytest.skip.Exception:
        path = request.getfixturevalue("real_clip_path")
    frames, _ = load_video(path, max_frames=24)
    return frames_to_image(frames)


run = comfy_stubs.run_node


@pytest.fixture(scope="module")
def models(N):
    return {v: run(N["DiTFlowLoadCogVideoX"], model=f"tiny-{v}", precision="fp32")[0] for v in ("5b", "2b")}


@pytest.fixture(scope="module")
def chain_5b(N, models, reference_image):
    """Text encode → encode reference → extract AMF at block 1, on tiny-5b."""
    model = models["5b"]
    cond = run(N["DiTFlowTextEncode"], model=model, prompt="a bmx rider in the trees", negative_prompt="")[0]
    latent, frames = run(N["DiTFlowEncodeReference"], model=model, images=reference_image, width=WIDTH, height=HEIGHT,
                         num_frames=FRAMES, start=0, stride=2, resize="crop")
    amf = run(N["DiTFlowExtractAMF"], model=model, reference=latent, blocks="1", temperature=2.0)[0]
    return {"model": model, "cond": cond, "latent": latent, "frames": frames, "amf": amf}


@pytest.fixture(scope="module")
def rope_run(N, comfy, chain_5b):
    """One rope-mode sampler run on tiny-5b (4 steps, 2 guided × 2 Adam iterations), with what the stubs saw."""
    mm, utils, lp = comfy["comfy.model_management"], comfy["comfy.utils"], comfy["latent_preview"]
    mm.loaded.clear()
    utils.updates.clear()
    utils.previews.clear()
    lp.previews.clear()
    latent, embeds = run(N["DiTFlowGuidedSampler"], model=chain_5b["model"], conditioning=chain_5b["cond"],
                         mode="rope", amf=chain_5b["amf"], **FAST)
    return {"latent": latent, "embeds": embeds, "loaded": list(mm.loaded), "updates": list(utils.updates),
            "previews": list(utils.previews), "previewed": list(lp.previews)}


# ---------------------------------------------------------------------------------------------------------------
# Node definitions
# ---------------------------------------------------------------------------------------------------------------


def test_every_node_definition_is_well_formed(N):
    import nodes

    assert set(nodes.NODE_DISPLAY_NAME_MAPPINGS) == set(N)
    for key, cls in N.items():
        assert key.startswith("DiTFlow") and cls.CATEGORY.startswith("DiTFlow/"), key
        assert cls.DESCRIPTION.endswith(".") and not re.search(r"\.\s+[A-Z]", cls.DESCRIPTION), key  # one sentence
        assert callable(getattr(cls, cls.FUNCTION)), key
        if cls.RETURN_TYPES:
            assert len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), key
        else:
            assert cls.OUTPUT_NODE, key
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}, key
        for section in ("required", "optional"):
            for name, (kind, *opts) in spec.get(section, {}).items():
                assert isinstance(kind, (str, list)), (key, name)
                options = opts[0] if opts else {}
                assert options.get("tooltip"), f"{key}.{name} has no tooltip"
                if kind in ("INT", "FLOAT"):
                    assert options["min"] <= options["default"] <= options["max"], (key, name)
                if isinstance(kind, list) and "default" in options:
                    assert options["default"] in kind, (key, name)


def test_the_model_combo_lists_folders_from_every_registered_path(N, comfy, tmp_path):
    from ditflow.testing.tiny_model import build_tiny_model

    fp = comfy["folder_paths"]
    extra = tmp_path / "elsewhere"
    build_tiny_model(extra / "tiny-extra", "5b", num_layers=1)
    (extra / "not-a-model").mkdir()
    fp.add_model_folder_path("CogVideo", str(extra))
    try:
        choices = N["DiTFlowLoadCogVideoX"].INPUT_TYPES()["required"]["model"][0]
        assert choices == ["tiny-1.5-i2v", "tiny-2b", "tiny-5b", "tiny-5b-i2v", "tiny-extra", "CogVideoX-5b",
                           "CogVideoX-2b", "CogVideoX-5b-I2V",
                           "CogVideoX1.5-5B", "CogVideoX1.5-5B-I2V"]  # absent: downloadable
    finally:
        fp.folder_names_and_paths["CogVideo"][0].remove(str(extra))


def test_the_cotracker_checkpoint_is_a_choice_from_models_cotracker_never_a_server_path(N, comfy, tmp_path):
    node = N["DiTFlowMotionFidelity"]
    folder = Path(comfy["folder_paths"].models_dir) / "cotracker"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scaled_offline.pth").write_bytes(b"weights")
    secret = tmp_path / "secret.pth"
    secret.write_bytes(b"x")
    try:
        choices, options = node.INPUT_TYPES()["optional"]["cotracker_checkpoint"]
        assert choices == ["(torch.hub cache)", "scaled_offline.pth"] and options["default"] == choices[0]
        frames = torch.rand(5, 32, 32, 3)
        messages = []
        for path in (str(secret), str(tmp_path / "missing.pth"), "../../secret.pth"):  # exists, absent, escaping
            with pytest.raises(DiTFlowError, match="is not one of the files in .*cotracker") as err:
                run(node, reference=frames, generated=frames, grid_size=4, tracker="flow", cotracker_checkpoint=path)
            messages.append(str(err.value).replace(path, "PATH"))
        assert len(set(messages)) == 1  # the answer does not reveal which paths exist
        score, _ = run(node, reference=frames, generated=frames, grid_size=4, tracker="flow",
                       cotracker_checkpoint="scaled_offline.pth", variant="ours")  # no own-point subtraction
        assert score == pytest.approx(1.0, abs=1e-4)
    finally:
        (folder / "scaled_offline.pth").unlink()


@pytest.fixture(scope="module")
def kijai(comfy):
    """models/CogVideo/tiny-kijai in kijai's layout (transformer/ vae/ scheduler/), its T5 as
    models/text_encoders/t5xxl_bf16.safetensors and the tokenizer where ComfyUI keeps its own
    (comfy/text_encoders/t5_tokenizer); the same weights as tiny-5b."""
    from ditflow.testing.tiny_model import build_tiny_kijai_model

    base = Path(comfy["folder_paths"].base_path)
    build_tiny_kijai_model(base / "models" / "CogVideo" / "tiny-kijai", base / "models" / "text_encoders" /
                           "t5xxl_bf16.safetensors", base / "comfy" / "text_encoders" / "t5_tokenizer", "5b",
                           t5_weights="bf16")
    yield base
    shutil.rmtree(base / "models" / "CogVideo" / "tiny-kijai")
    shutil.rmtree(base / "models" / "text_encoders")


def test_a_kijai_folder_loads_with_t5_from_text_encoders_and_comfys_tokenizer(N, kijai, models):
    spec = N["DiTFlowLoadCogVideoX"].INPUT_TYPES()["required"]
    assert "tiny-kijai" in spec["model"][0] and spec["text_encoder"][0] == ["auto", "t5xxl_bf16.safetensors"]
    for choice in ("auto", "t5xxl_bf16.safetensors"):
        model = run(N["DiTFlowLoadCogVideoX"], model="tiny-kijai", precision="fp32", text_encoder=choice)[0]
        assert model.bundle.tokenizer.name_or_path.endswith(os.path.join("comfy", "text_encoders", "t5_tokenizer"))
        cond = run(N["DiTFlowTextEncode"], model=model, prompt="a bmx rider", negative_prompt="")[0]
        ref = run(N["DiTFlowTextEncode"], model=models["5b"], prompt="a bmx rider", negative_prompt="")[0]
        assert torch.equal(cond.cond, ref.cond)  # same T5 weights, same tokenizer: the same embedding


def test_an_absent_known_model_is_downloaded_into_models_cogvideo_or_explained(N, kijai, monkeypatch):
    from ditflow import hub

    spec = N["DiTFlowLoadCogVideoX"].INPUT_TYPES()["required"]
    assert spec["download_missing"][1]["default"] is True
    target = str(kijai / "models" / "CogVideo" / "CogVideoX-5b")
    with pytest.raises(DiTFlowError) as info:  # HF_HUB_OFFLINE (conftest): nothing is fetched
        run(N["DiTFlowLoadCogVideoX"], model="CogVideoX-5b", precision="bf16", download_missing=True)
    assert str(info.value).startswith(f"THUDM/CogVideoX-5b is not in {target} and HF_HUB_OFFLINE is set")
    with pytest.raises(DiTFlowError, match=rf"turn on the loader's download_missing, or run `python -m ditflow "
                       rf"download THUDM/CogVideoX-5b --dir {re.escape(target)}`"):
        run(N["DiTFlowLoadCogVideoX"], model="CogVideoX-5b", precision="bf16", download_missing=False)
    calls = []
    monkeypatch.setattr(hub, "download", lambda repo, **kw: calls.append((repo, kw)) or (_ for _ in ()).throw(
        DiTFlowError("stop here.")))
    with pytest.raises(DiTFlowError, match="stop here"):
        run(N["DiTFlowLoadCogVideoX"], model="CogVideoX-5b", precision="bf16")
    # a T5 file is at hand (auto): kijai's download, transformer/ vae/ scheduler/ only, into models/CogVideo/<name>
    ((repo, kw),) = calls
    assert repo == "THUDM/CogVideoX-5b" and str(kw["local_dir"]) == target
    assert tuple(kw["subfolders"]) == ("scheduler", "vae", "transformer")


def test_importing_the_pack_loads_no_heavy_module_and_shadows_no_comfy_module():
    code = textwrap.dedent(f"""
        import importlib.util, json, sys, types
        sys.modules["nodes"] = comfy_nodes = types.ModuleType("nodes")  # ComfyUI's own top-level module
        # as ComfyUI's load_custom_node does: the module is named after the pack's path
        spec = importlib.util.spec_from_file_location({str(ROOT).replace(".", "_x_")!r}, {str(ROOT / "__init__.py")!r})
        pack = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = pack
        spec.loader.exec_module(pack)
        print(json.dumps({{
            "nodes": sorted(pack.NODE_CLASS_MAPPINGS) == sorted(pack.NODE_DISPLAY_NAME_MAPPINGS) != [],
            "heavy": sorted(m for m in ("diffusers", "transformers", "cv2", "comfy.model_management") if m in sys.modules),
            "comfy_nodes_kept": sys.modules["nodes"] is comfy_nodes,
            "appended": sys.path[-1] == {str(ROOT)!r},
        }}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"nodes": True, "heavy": [], "comfy_nodes_kept": True, "appended": True}


# ---------------------------------------------------------------------------------------------------------------
# The chain
# ---------------------------------------------------------------------------------------------------------------


def test_rope_chain_on_5b_optimises_saves_loads_and_injects(N, comfy, chain_5b, rope_run):
    fp = comfy["folder_paths"]
    model = chain_5b["model"]
    assert chain_5b["latent"]["samples"].shape == (1, 16, 3, 8, 12)  # [B, C, T, H, W]
    assert chain_5b["frames"].shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert chain_5b["amf"].blocks == (1,) and chain_5b["amf"].grid == (3, 4, 6)

    latent, embeds = rope_run["latent"], rope_run["embeds"]
    *fit, sampling = [[p.model.inner for p in ps] for ps, _ in rope_run["loaded"]]
    assert sampling == [model.bundle.transformer] and fit in ([], [[model.bundle.vae]])  # preview fit: once, VAE
    assert all(full for _, full in rope_run["loaded"])
    assert rope_run["updates"] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert latent["samples"].shape == (1, 16, 3, 8, 12)
    assert embeds is not None and len(embeds.tables) == 2  # round(0.5 · 4) guided steps

    image = run(N["DiTFlowDecode"], model=model, samples=latent)[0]
    assert image.shape == (FRAMES, HEIGHT, WIDTH, 3) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0

    ui = run(N["DiTFlowSaveEmbeds"], embeds=embeds, filename_prefix="ditflow/embeds")
    saved = ui["ui"]["text"][0]
    assert saved == os.path.join("ditflow", "embeds_00001_.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(os.path.join(fp.get_output_directory(), saved)).st_mode & 0o777 == 0o666 & ~mask  # not 0600
    choices = N["DiTFlowLoadEmbeds"].INPUT_TYPES()["required"]["embeds_file"][0]
    assert "embeds_00001_.safetensors" in choices  # output/ditflow is an embeddings folder
    mtime = N["DiTFlowLoadEmbeds"].IS_CHANGED("embeds_00001_.safetensors")
    assert mtime == os.path.getmtime(os.path.join(fp.get_output_directory(), saved))
    loaded = run(N["DiTFlowLoadEmbeds"], embeds_file="embeds_00001_.safetensors")[0]

    cond2 = run(N["DiTFlowTextEncode"], model=model, prompt="a dog on a bike", negative_prompt="")[0]
    injected, none_embeds = run(N["DiTFlowGuidedSampler"], model=model, conditioning=cond2, mode="none",
                                embeds=loaded, **{**FAST, "steps": 50})  # the embeddings' 4 steps win
    assert none_embeds is None
    video = run(N["DiTFlowDecode"], model=model, samples=injected)[0]
    assert video.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert not torch.equal(video, image)


def test_sampling_shows_a_live_preview_of_each_denoising_step(N, comfy, chain_5b, rope_run):
    """Through ComfyUI's latent_preview: one preview per step, the first latent frame of the predicted clean video
    projected with the model's own latent → RGB fit (ditflow.preview), on the progress bar's update."""
    lp = comfy["latent_preview"]
    fit = chain_5b["model"].latent_rgb()
    assert lp.formats[-1].latent_rgb_factors == fit.factors.tolist() and lp.formats[-1].taesd_decoder_name is None
    assert [value for value, _ in rope_run["previews"]] == [1, 2, 3, 4]
    assert [shape for shape, _ in rope_run["previewed"]] == [(1, 16, 3, 8, 12)] * 4  # [B, C, T, H, W], raw
    first, last = rope_run["previewed"][0][1], rope_run["previewed"][-1][1]
    assert first.shape == (3, 8, 12) and not torch.equal(first, last)  # the picture changes as sampling goes
    final = rope_run["latent"]["samples"][0, :, 0]  # the last step's prediction of the clean video is the result
    torch.testing.assert_close(last.clamp(-1, 1), fit.project(final), atol=1e-4, rtol=0)


def test_no_preview_and_no_fit_when_the_server_runs_without_previews(N, comfy, models, monkeypatch):
    ca, lp, utils = comfy["comfy.cli_args"], comfy["latent_preview"], comfy["comfy.utils"]
    monkeypatch.setattr(ca.args, "preview_method", ca.LatentPreviewMethod.NoPreviews)
    model = models["2b"]
    model._latent_rgb = None
    utils.previews.clear()
    cond = run(N["DiTFlowTextEncode"], model=model, prompt="x", negative_prompt="")[0]
    run(N["DiTFlowGuidedSampler"], model=model, conditioning=cond, mode="none",
        **{**FAST, "steps": 2, "num_frames": 5, "width": 32, "height": 48})
    assert utils.previews == [] and model._latent_rgb is None


def test_each_network_is_named_in_comfyuis_model_management(N, models):
    """ComfyUI logs "Requested to load <class name of the ModelPatcher's model>": the network's, not a wrapper's."""
    names = {part: type(p.model).__name__ for part, p in models["5b"].patchers.items()}
    assert names == {"transformer": "CogVideoXTransformer3DModel", "vae": "AutoencoderKLCogVideoX",
                     "text_encoder": "T5EncoderModel"}
    assert type(models["5b"].patchers["vae"].model) is type(models["2b"].patchers["vae"].model)  # one class each


def test_a_kijai_layout_latent_is_taken_and_said_so_another_models_is_refused(N, chain_5b, caplog):
    model = chain_5b["model"]
    latent = chain_5b["latent"]["samples"]  # [1, 16, 3, 8, 12] raw
    kijai = {"samples": latent.permute(0, 2, 1, 3, 4) * model.bundle.vae_scaling_factor}  # [B, T, C, H, W] scaled
    ours = run(N["DiTFlowDecode"], model=model, samples=chain_5b["latent"])[0]
    with caplog.at_level("WARNING", logger="ditflow"):
        theirs = run(N["DiTFlowDecode"], model=model, samples=kijai)[0]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert "kijai's CogVideoXWrapper layout" in caplog.text and "[1, 3, 16, 8, 12]" in caplog.text
    with pytest.raises(DiTFlowError, match=r"4 channels where CogVideoX has 16.*DiTFlow Encode Reference"):
        run(N["DiTFlowDecode"], model=model, samples={"samples": torch.zeros(1, 4, 3, 8, 12)})


def test_the_sampler_takes_frames_and_size_from_the_reference_or_refuses_a_mismatch(N, chain_5b):
    spec = N["DiTFlowGuidedSampler"].INPUT_TYPES()["required"]
    assert {k: spec[k][1]["default"] for k in ("num_frames", "width", "height")} == {
        "num_frames": 0, "width": 0, "height": 0}
    args = dict(model=chain_5b["model"], conditioning=chain_5b["cond"], mode="none", amf=chain_5b["amf"],
                **{**FAST, "steps": 2})
    out = run(N["DiTFlowGuidedSampler"], **{**args, "num_frames": 0, "width": 0, "height": 0})[0]
    assert out["samples"].shape == (1, 16, 3, 8, 12)  # the reference's 9 × 64 × 96
    with pytest.raises(DiTFlowError, match=r"num_frames is 49 but the connected reference has 9; set num_frames "
                       r"to 0 \(take it from the reference\) or to 9"):
        run(N["DiTFlowGuidedSampler"], **{**args, "num_frames": 49, "width": 0, "height": 0})
    with pytest.raises(DiTFlowError, match=r"width is 720 but the connected reference has 96"):
        run(N["DiTFlowGuidedSampler"], **{**args, "num_frames": 0, "width": 720, "height": 0})
    with pytest.raises(DiTFlowError, match=r"num_frames, width 0 means 'from the reference or embeddings', but "
                       r"neither is connected"):
        run(N["DiTFlowGuidedSampler"], **{**args, "amf": None, "num_frames": 0, "width": 0, "height": 64})


def test_embeds_with_the_reference_connected_replay_the_run_with_kv_injection(N, chain_5b, rope_run):
    """Zero-shot with the reference's AMF connected runs KV injection in the saved steps, as the authors'
    --inject_embeds: with the run's prompt and seed it is the optimising run itself."""
    kw = dict(model=chain_5b["model"], conditioning=chain_5b["cond"], mode="none", embeds=rope_run["embeds"], **FAST)
    with_kv = run(N["DiTFlowGuidedSampler"], amf=chain_5b["amf"], **kw)[0]["samples"]
    without = run(N["DiTFlowGuidedSampler"], **kw)[0]["samples"]
    assert torch.equal(with_kv, rope_run["latent"]["samples"])
    assert not torch.equal(without, rope_run["latent"]["samples"])


def test_multi_block_soft_reference_and_the_ablation_switches(N, chain_5b):
    """The Extract AMF node takes several blocks (their losses are averaged) and the soft reference; the sampler
    follows the AMF's kind and takes the optimiser and loss-mask switches."""
    amf = run(N["DiTFlowExtractAMF"], model=chain_5b["model"], reference=chain_5b["latent"], blocks="1, 2",
              temperature=2.0, reference_amf="soft")[0]
    assert amf.blocks == (1, 2) and amf.soft
    assert not torch.equal(amf.amf[1], chain_5b["amf"].amf[1])  # soft-argmax, not argmax
    out, _ = run(N["DiTFlowGuidedSampler"], model=chain_5b["model"], conditioning=chain_5b["cond"], mode="latent",
                 amf=amf, optimizer="adamw", masked_loss=False, **FAST)
    assert torch.isfinite(out["samples"]).all()
    with pytest.raises(DiTFlowError, match="10,15,20"):
        run(N["DiTFlowExtractAMF"], model=chain_5b["model"], reference=chain_5b["latent"], blocks="1;2",
            temperature=2.0)


def test_latent_mode_on_2b(N, models, reference_image):
    model = models["2b"]
    cond = run(N["DiTFlowTextEncode"], model=model, prompt="a bmx rider", negative_prompt="blurry")[0]
    latent, _ = run(N["DiTFlowEncodeReference"], model=model, images=reference_image, width=WIDTH, height=HEIGHT,
                    num_frames=FRAMES, start=0, stride=1, resize="pad")
    amf = run(N["DiTFlowExtractAMF"], model=model, reference=latent, blocks="1", temperature=2.0)[0]
    out, embeds = run(N["DiTFlowGuidedSampler"], model=model, conditioning=cond, mode="latent", amf=amf, **FAST)
    assert embeds is not None and embeds.mode.value == "latent" and len(embeds.tables) == 2  # the z_t trajectory
    assert run(N["DiTFlowDecode"], model=model, samples=out)[0].shape == (FRAMES, HEIGHT, WIDTH, 3)


@pytest.mark.parametrize("variant", ["5b-i2v", "1.5-i2v"])
def test_image_to_video_chain_takes_its_start_frame_from_an_image_input(N, comfy, reference_image, variant):
    """The I2V workflow's chain: the reference's frames (Encode Reference's second output) as start_image; the VAE
    is loaded with the transformer for the start latents; without a start image, one sentence."""
    mm = comfy["comfy.model_management"]
    model = run(N["DiTFlowLoadCogVideoX"], model=f"tiny-{variant}", precision="fp32")[0]
    cond = run(N["DiTFlowTextEncode"], model=model, prompt="a fox on a trail", negative_prompt="")[0]
    latent, frames = run(N["DiTFlowEncodeReference"], model=model, images=reference_image, width=WIDTH, height=HEIGHT,
                         num_frames=FRAMES, start=0, stride=2, resize="crop")
    amf = run(N["DiTFlowExtractAMF"], model=model, reference=latent, blocks="1", temperature=2.0)[0]
    mm.loaded.clear()
    out, _ = run(N["DiTFlowGuidedSampler"], model=model, conditioning=cond, mode="latent", amf=amf,
                 start_image=frames, **FAST)
    sampler_load = [type(p.model).__name__ for p in mm.loaded[-1][0]]
    assert sampler_load == ["CogVideoXTransformer3DModel", "AutoencoderKLCogVideoX"]
    assert out["samples"].shape == (1, 16, 3, HEIGHT // 8, WIDTH // 8)  # the video's latent frames, unpadded
    assert run(N["DiTFlowDecode"], model=model, samples=out)[0].shape == (FRAMES, HEIGHT, WIDTH, 3)
    with pytest.raises(DiTFlowError, match="generates from a start image; give one"):
        run(N["DiTFlowGuidedSampler"], model=model, conditioning=cond, mode="latent", amf=amf, **FAST)


def test_backbone_without_reference_uses_the_size_widgets(N, chain_5b):
    out, _ = run(N["DiTFlowGuidedSampler"], model=chain_5b["model"], conditioning=chain_5b["cond"], mode="none",
                 **{**FAST, "num_frames": 5, "width": 32, "height": 48})
    assert out["samples"].shape == (1, 16, 2, 6, 4)  # 5 frames → 2 latent; 48×32 px → 6×4 latent px


def test_each_component_is_loaded_through_model_management_before_use(N, comfy, chain_5b, reference_image):
    mm = comfy["comfy.model_management"]
    model = chain_5b["model"]
    assert {n: (p.load_device.type, p.offload_device.type) for n, p in model.patchers.items()} == {
        n: ("cpu", "cpu") for n in ("transformer", "vae", "text_encoder")}
    mm.loaded.clear()
    run(N["DiTFlowTextEncode"], model=model, prompt="x", negative_prompt="")
    run(N["DiTFlowEncodeReference"], model=model, images=reference_image, width=WIDTH, height=HEIGHT,
        num_frames=FRAMES, start=0, stride=1, resize="stretch")
    run(N["DiTFlowExtractAMF"], model=model, reference=chain_5b["latent"], blocks="1", temperature=2.0)
    names = {id(p): n for n, p in model.patchers.items()}
    assert [sorted(names[id(p)] for p in ps) for ps, _ in mm.loaded] == [
        ["text_encoder"], ["vae"], ["text_encoder"], ["transformer"]]  # AMF: T5 for "", then the transformer alone


def test_visualize_amf_draws_colors_and_arrows_at_video_size(N, chain_5b):
    colors, arrows = run(N["DiTFlowVisualizeAMF"], amf=chain_5b["amf"], query_frame=0, key_frame=2, arrow_stride=1,
                         frames=chain_5b["frames"])
    grey_colors, grey_arrows = run(N["DiTFlowVisualizeAMF"], amf=chain_5b["amf"], query_frame=1, key_frame=0,
                                   arrow_stride=2)
    for im in (colors, arrows, grey_colors, grey_arrows):
        assert im.shape == (1, HEIGHT, WIDTH, 3) and im.dtype == torch.float32
        assert 0.0 <= im.min() and im.max() <= 1.0
    with pytest.raises(DiTFlowError, match="out of range"):
        run(N["DiTFlowVisualizeAMF"], amf=chain_5b["amf"], query_frame=3, key_frame=0, arrow_stride=1)


# ---------------------------------------------------------------------------------------------------------------
# Weights moved under inference mode (what a GPU does; the stubs copy tensors on every load and eviction)
# ---------------------------------------------------------------------------------------------------------------


def _inference_tensors(model, component="transformer") -> int:
    module = getattr(model.bundle, component)
    return sum(t.is_inference() for t in (*module.parameters(), *module.buffers()))


def _guided_chain(N, model, reference_image, mode, loss):
    """Text encode → encode reference → Extract AMF (loads the transformer first) → Guided Sampler."""
    cond = run(N["DiTFlowTextEncode"], model=model, prompt="a bmx rider", negative_prompt="")[0]
    latent, _ = run(N["DiTFlowEncodeReference"], model=model, images=reference_image, width=WIDTH, height=HEIGHT,
                    num_frames=FRAMES, start=0, stride=1, resize="crop")
    amf = run(N["DiTFlowExtractAMF"], model=model, reference=latent, blocks="1", temperature=2.0, loss=loss)[0]
    # our own loads move outside inference mode: none of the three networks holds an inference tensor
    assert [_inference_tensors(model, c) for c in ("transformer", "vae", "text_encoder")] == [0, 0, 0]
    return run(N["DiTFlowGuidedSampler"], model=model, conditioning=cond, mode=mode, amf=amf, loss=loss, **FAST)


@pytest.mark.parametrize("variant,mode,loss", [
    ("5b", "latent", "amf"), ("5b", "rope", "amf"), ("2b", "posemb", "amf"), ("5b", "latent", "moft"),
    ("2b", "latent", "smm"),
])
def test_every_guided_mode_runs_with_weights_moved_as_comfyui_moves_them(N, comfy, models, reference_image,
                                                                         variant, mode, loss):
    mm = comfy["comfy.model_management"]
    model = models[variant]
    with torch.inference_mode():
        mm.unload_all_models()  # end of a previous prompt under --disable-smart-memory: evicted in inference mode
    latent, embeds = _guided_chain(N, model, reference_image, mode, loss)
    assert latent["samples"].shape == (1, 16, 3, 8, 12)
    assert embeds is not None and embeds.mode.value == mode  # ρ, or the z_t trajectory in mode latent
    assert _inference_tensors(model) == 0


@pytest.mark.parametrize("eviction", ["another model's load", "/free", "OOM handler"])
def test_guided_sampler_runs_again_after_comfyui_evicts_and_reloads_the_model(N, comfy, chain_5b, eviction):
    mm = comfy["comfy.model_management"]
    model = chain_5b["model"]
    sampler = dict(model=model, conditioning=chain_5b["cond"], mode="latent", amf=chain_5b["amf"], **FAST)
    first = run(N["DiTFlowGuidedSampler"], **sampler)[0]
    if eviction == "/free":  # POST /free: unload_all_models in the prompt worker, outside inference mode
        mm.unload_all_models()
    else:  # inside another node (its load_models_gpu → free_memory) or the executor's OOM handler
        with torch.inference_mode():
            mm.free_memory(1e30, torch.device("cpu")) if eviction == "another model's load" else mm.unload_all_models()
    assert model.patchers["transformer"] not in mm.current_loaded_models
    again = run(N["DiTFlowGuidedSampler"], **sampler)[0]  # reloads the transformer, then optimises through it
    assert torch.equal(again["samples"], first["samples"])


def test_weights_moved_behind_comfyuis_back_are_repaired_by_the_sampler(N, comfy, chain_5b):
    mm = comfy["comfy.model_management"]
    model = chain_5b["model"]
    run(N["DiTFlowExtractAMF"], model=model, reference=chain_5b["latent"], blocks="1", temperature=2.0)
    with torch.inference_mode():  # another pack moves the module by hand: ComfyUI still counts it as loaded,
        mm.move(model.patchers["transformer"])  # so the sampler's load moves nothing
    assert model.patchers["transformer"] in mm.current_loaded_models and _inference_tensors(model) > 0
    latent, embeds = run(N["DiTFlowGuidedSampler"], model=model, conditioning=chain_5b["cond"], mode="rope",
                         amf=chain_5b["amf"], **FAST)
    assert embeds is not None and _inference_tensors(model) == 0


# ---------------------------------------------------------------------------------------------------------------
# Memory: working memory declared to ComfyUI, checkpointing from its free memory
# ---------------------------------------------------------------------------------------------------------------


def test_nodes_declare_working_memory_and_the_sampler_checkpoints_only_when_comfyui_lacks_memory(
    N, comfy, chain_5b, reference_image, monkeypatch, capsys
):
    import ditflow.sampler
    from ditflow import GuidanceConfig
    from ditflow.memory import MARGIN, RESERVE, module_bytes, transformer_workspaces
    from nodes.model import DiTFlowModel

    mm = comfy["comfy.model_management"]
    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cuda"))  # load devices only: nothing moves
    model = DiTFlowModel(chain_5b["model"].bundle)  # the same networks, ModelPatchers whose load device is a GPU
    bundle = model.bundle
    seen = []  # the checkpointing each sample() call was given
    original = ditflow.sampler.sample

    def spy(*args, **kwargs):
        seen.append(args[2].gradient_checkpointing)
        return original(*args, **kwargs)

    monkeypatch.setattr(ditflow.sampler, "sample", spy)

    # Encode, decode and extract declare their workspaces; T5 then counts as memory ComfyUI can evict.
    with torch.inference_mode():
        mm.unload_all_models()
    mm.memory_required.clear()
    cond = run(N["DiTFlowTextEncode"], model=model, prompt="a bmx rider", negative_prompt="")[0]
    run(N["DiTFlowEncodeReference"], model=model, images=reference_image, width=WIDTH, height=HEIGHT,
        num_frames=FRAMES, start=0, stride=1, resize="crop")
    assert len(mm.memory_required) == 2 and all(m > 0 for m in mm.memory_required)
    free, on_cpu = model.available_memory("transformer")
    # T5 sits on the transformer's GPU and counts; the VAE's load device (vae_device) is still the CPU here
    assert (free, on_cpu) == (mm.FREE + module_bytes(bundle.text_encoder), False)

    weights = module_bytes(bundle.transformer)
    config = GuidanceConfig(mode="rope", guidance_blocks=(1,)).resolved(bundle)
    sampling, checkpointed, full = transformer_workspaces(bundle, (3, 4, 6), config)
    tight = int((weights + full) * MARGIN + RESERVE)  # the pass without checkpointing just does not fit
    for free, expected in ((tight - 1, True), (tight + 1, False)):
        with torch.inference_mode():
            mm.unload_all_models()  # nothing held: ComfyUI can give exactly FREE
        mm.FREE = free
        mm.memory_required.clear()
        run(N["DiTFlowGuidedSampler"], model=model, conditioning=cond, mode="rope", amf=chain_5b["amf"], **FAST)
        assert seen[-1] is expected
        # (the first run also fits the preview projection with the VAE: a 64-px encode that declares nothing)
        assert [m for m in mm.memory_required if m] == [max(sampling, checkpointed if expected else full)]
        assert f"gradient checkpointing {'on' if expected else 'off'} (" in capsys.readouterr().out
    run(N["DiTFlowGuidedSampler"], model=model, conditioning=cond, mode="rope", amf=chain_5b["amf"],
        **FAST, gradient_checkpointing="on")
    assert seen[-1] is True and "gradient checkpointing on (as asked)" in capsys.readouterr().out
    mm.FREE = 64 * 10**9


# ---------------------------------------------------------------------------------------------------------------
# Errors and cancel
# ---------------------------------------------------------------------------------------------------------------


def test_wrong_frame_count_is_one_readable_sentence(N, chain_5b, reference_image):
    with pytest.raises(DiTFlowError, match=r"frame count 47 is not of the form 4k\+1.*use 45 or 49"):
        run(N["DiTFlowEncodeReference"], model=chain_5b["model"], images=reference_image, width=WIDTH, height=HEIGHT,
            num_frames=47, start=0, stride=1, resize="crop")


def test_block_out_of_range_names_the_models_range(N, chain_5b):
    with pytest.raises(DiTFlowError, match=r"guidance block 20 is out of range: this model has blocks 0\.\.3"):
        run(N["DiTFlowExtractAMF"], model=chain_5b["model"], reference=chain_5b["latent"], blocks="20", temperature=2.0)


def test_embeds_from_another_model_are_refused(N, models, rope_run):
    embeds = rope_run["embeds"]
    cond_2b = run(N["DiTFlowTextEncode"], model=models["2b"], prompt="x", negative_prompt="")[0]
    with pytest.raises(DiTFlowError, match="model 5b, but this run has 2b"):
        run(N["DiTFlowGuidedSampler"], model=models["2b"], conditioning=cond_2b, mode="none", embeds=embeds, **FAST)


def test_missing_model_folder_and_bad_save_inputs_are_refused(N, rope_run):
    with pytest.raises(DiTFlowError, match="'CogVideoX-7b' was not found in .*CogVideo"):
        run(N["DiTFlowLoadCogVideoX"], model="CogVideoX-7b", precision="bf16")
    with pytest.raises(DiTFlowError, match="no embeddings to save"):
        run(N["DiTFlowSaveEmbeds"], embeds=None, filename_prefix="ditflow/embeds")
    with pytest.raises(DiTFlowError, match="outside the output folder"):
        run(N["DiTFlowSaveEmbeds"], embeds=rope_run["embeds"], filename_prefix="../../escape/embeds")


def test_nan_widgets_and_nan_latents_are_refused_as_in_the_cli(N, chain_5b):
    model = chain_5b["model"]
    with pytest.raises(DiTFlowError, match=r"lr_start must be a finite number in \[0, 1\]"):
        run(N["DiTFlowGuidedSampler"], model=model, conditioning=chain_5b["cond"], mode="latent", amf=chain_5b["amf"],
            **{**FAST, "lr_start": float("nan")})
    nan = {"samples": torch.full((1, 16, 3, 8, 12), float("nan"))}
    with pytest.raises(DiTFlowError, match="latents to decode went non-finite"):
        run(N["DiTFlowDecode"], model=model, samples=nan)


@pytest.mark.parametrize("prefix", ["", "   "])
def test_an_empty_save_prefix_saves_where_load_embeds_lists_it(N, rope_run, prefix):
    saved = run(N["DiTFlowSaveEmbeds"], embeds=rope_run["embeds"], filename_prefix=prefix)["ui"]["text"][0]
    assert not Path(saved).name.startswith(".") and Path(saved).parts[0] == "ditflow"
    assert str(Path(saved).relative_to("ditflow")) in N["DiTFlowLoadEmbeds"].INPUT_TYPES()["required"]["embeds_file"][0]


def test_a_save_prefix_naming_a_hidden_file_is_refused(N, rope_run):
    for prefix in (".", ".hidden", "ditflow/.hidden"):
        with pytest.raises(DiTFlowError, match="hidden file that DiTFlow Load Embeds does not list"):
            run(N["DiTFlowSaveEmbeds"], embeds=rope_run["embeds"], filename_prefix=prefix)


def test_cancel_mid_optimisation_leaves_the_model_stock(N, comfy, chain_5b, monkeypatch):
    from ditflow.backbones.cogvideox.attention import DiTFlowAttnProcessor

    mm = comfy["comfy.model_management"]
    transformer = chain_5b["model"].bundle.transformer
    before = [b.attn1.processor for b in transformer.transformer_blocks]
    calls = []
    original = mm.throw_exception_if_processing_interrupted

    def interrupt_on_second_iteration():
        calls.append(1)
        mm.INTERRUPT = len(calls) == 2  # the user presses Cancel during the first guided step
        original()

    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", interrupt_on_second_iteration)
    with pytest.raises(comfy_stubs.InterruptProcessingException):
        run(N["DiTFlowGuidedSampler"], model=chain_5b["model"], conditioning=chain_5b["cond"], mode="rope",
            amf=chain_5b["amf"], **FAST)
    assert len(calls) == 2
    assert [b.attn1.processor for b in transformer.transformer_blocks] == before
    assert not any(isinstance(b.attn1.processor, DiTFlowAttnProcessor) for b in transformer.transformer_blocks)
    assert not transformer.patch_embed._forward_hooks
    assert not any(p.requires_grad for p in transformer.parameters())
