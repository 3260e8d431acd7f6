# SPDX-License-Identifier: Apache-2.0
"""Models by hub id (ditflow.hub), always offline: a local folder laid out as the Hugging Face cache stands in for
the hub, ``HF_HUB_OFFLINE=1`` (conftest) keeps every test off the network.

Cache layout, as ``huggingface_hub`` writes it: ``<cache>/models--THUDM--CogVideoX-5b/refs/main`` holds the commit
hash and ``snapshots/<hash>/`` the repository's files (there, symlinks into ``blobs/``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditflow import DiTFlowError
from ditflow.cli import main
from ditflow.hub import allow_patterns, resolve_model
from ditflow.backbones.cogvideox.loading import load_cogvideox

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "THUDM/CogVideoX-5b"

#: The files of THUDM/CogVideoX-5b on the hub (the repository's tree, revision of 2024-11).
HUB_FILES = [
    ".gitattributes", "LICENSE", "README.md", "README_zh.md", "configuration.json", "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model-00001-of-00002.safetensors",
    "text_encoder/model-00002-of-00002.safetensors", "text_encoder/model.safetensors.index.json",
    "tokenizer/added_tokens.json", "tokenizer/special_tokens_map.json", "tokenizer/spiece.model",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
]


def _one_sentence(message: str) -> bool:
    return message.endswith(".") and not re.search(r"\.\s+[A-Z]", message)


@pytest.fixture()
def hub_cache(tiny_5b_path, tmp_path, monkeypatch):
    """An HF cache holding THUDM/CogVideoX-5b (the tiny 5b model under that id), set as the default cache."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--THUDM--CogVideoX-5b"
    shutil.copytree(tiny_5b_path, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_hub_id_loads_from_the_cache_without_the_network(hub_cache, tiny_5b_path):
    cog = load_cogvideox(REPO, dtype="fp32")
    assert cog.variant == "5b" and cog.path == REPO
    same = load_cogvideox(tiny_5b_path, dtype="fp32", components=("transformer",))
    for (name, a), (_, b) in zip(cog.transformer.state_dict().items(), same.transformer.state_dict().items()):
        assert torch.equal(a, b), name
    assert resolve_model(REPO) == hub_cache / "models--THUDM--CogVideoX-5b" / "snapshots" / COMMIT


def test_a_hub_id_missing_offline_is_one_sentence_naming_the_download(hub_cache):
    with pytest.raises(DiTFlowError) as info:
        load_cogvideox("THUDM/CogVideoX-2b")
    message = str(info.value)
    assert message.startswith("THUDM/CogVideoX-2b is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    assert "`python -m ditflow download THUDM/CogVideoX-2b`" in message and "≈ 13 GB" in message
    assert _one_sentence(message)


def test_an_incomplete_cached_snapshot_says_how_to_complete_it(hub_cache):
    shutil.rmtree(hub_cache / "models--THUDM--CogVideoX-5b" / "snapshots" / COMMIT / "text_encoder")
    with pytest.raises(DiTFlowError) as info:
        load_cogvideox(REPO)
    message = str(info.value)
    assert "has no text_encoder/ subfolder" in message
    assert message.endswith("the cached THUDM/CogVideoX-5b is incomplete; `python -m ditflow download "
                            "THUDM/CogVideoX-5b` fetches the rest.")
    # without the text encoder the rest is complete: what is not asked for is not needed
    assert load_cogvideox(REPO, dtype="fp32", components=("transformer", "vae")).variant == "5b"


def test_only_configs_safetensors_and_the_tokenizer_are_fetched():
    from huggingface_hub.utils import filter_repo_objects

    wanted = set(filter_repo_objects(HUB_FILES + ["transformer/diffusion_pytorch_model.bin", "vae/model.pt"],
                                     allow_patterns=allow_patterns()))
    skipped = {".gitattributes", "LICENSE", "README.md", "README_zh.md", "configuration.json"}
    assert wanted == set(HUB_FILES) - skipped  # no pickles, no documents
    kijai = set(filter_repo_objects(HUB_FILES, allow_patterns=allow_patterns(("scheduler", "vae", "transformer"))))
    assert kijai == {f for f in wanted if not f.startswith(("text_encoder/", "tokenizer/"))}


def test_download_command_prints_the_cached_folder_and_refuses_offline(hub_cache, capsys):
    assert main(["download", REPO]) == 0
    assert capsys.readouterr().out.strip() == str(hub_cache / "models--THUDM--CogVideoX-5b" / "snapshots" / COMMIT)
    assert main(["download", "THUDM/CogVideoX-2b", "--without-text-encoder"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: THUDM/CogVideoX-2b is not in the Hugging Face cache") and "\n" not in err


def test_readme_first_command_reaches_the_model_download_and_says_what_to_get(tmp_path):
    """The README's main job, verbatim (fresh machine, offline, empty cache): the clip is read, then one sentence."""
    fence = re.search(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S).group(1)
    command = fence.splitlines()[0].split(" && ", 1)[1]
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "ditflow", "transfer"] and "THUDM/CogVideoX-5b" in argv
    argv[argv.index("--out") + 1] = str(tmp_path / "out")  # the only change: nothing lands in the checkout
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("num-frames auto: 49 (the clip gives at least 49 from frame 0 with stride 1;")
    assert lines[-1] == (
        "error: THUDM/CogVideoX-5b is not in the Hugging Face cache and HF_HUB_OFFLINE is set, so nothing can be "
        "downloaded; download it (≈ 21 GB) where the hub is reachable with `python -m ditflow download "
        "THUDM/CogVideoX-5b` (or `--dir FOLDER`, then pass that folder), or unset HF_HUB_OFFLINE.")
    assert len(lines) == 2 and not (tmp_path / "out").exists()
