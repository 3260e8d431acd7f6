# SPDX-License-Identifier: Apache-2.0
"""Atomic writes (ditflow.files): normal file modes under any umask, nothing left behind on failure."""

from __future__ import annotations

import contextlib
import os
import stat

import pytest
import torch

from ditflow import Mode
from ditflow.embeds import PositionEmbeds, save_embeds
from ditflow.files import atomic_path, write_json, write_text
from ditflow.video import write_video


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def current_umask() -> int:
    """The process umask, read without changing it for longer than one call (tests are single-threaded)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _embeds() -> PositionEmbeds:
    return PositionEmbeds(mode=Mode.ROPE, variant="5b", grid=(3, 4, 6), head_dim=16, num_inference_steps=4,
                          timesteps=(999, 749), tables=[torch.zeros(2, 2, 72, 16), torch.ones(2, 2, 72, 16)], prompt="a dog")


WRITERS = {
    "text": lambda p: write_text(p / "table.md", "| a |\n"),
    "json": lambda p: write_json(p / "run.json", {"a": 1}),
    "video": lambda p: write_video(p / "result.mp4", torch.zeros(3, 3, 16, 16), 8.0),
    "embeds": lambda p: save_embeds(p / "embeds.safetensors", _embeds()),
}


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_written_files_get_the_normal_mode_for_the_umask(tmp_path, writer, mask, expected):
    with umask(mask):
        WRITERS[writer](tmp_path / "sub")
    (written,) = (tmp_path / "sub").iterdir()  # and no temporary file beside it
    assert mode(written) == expected
    assert mode(tmp_path / "sub") == 0o777 & ~mask  # a created folder follows the umask too


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "run.json"
    write_json(target, {"old": True})
    with pytest.raises(RuntimeError, match="cancelled"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("cancelled")
    assert target.read_text() == '{\n  "old": true\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
