# SPDX-License-Identifier: Apache-2.0
"""Never lose or mix results: ``--out`` is checked before the model loads, written as one set and published with
one rename; a failure, Ctrl-C or kill at any point leaves the old state or the complete new set, and says which.

CLI runs use the tiny 5b model: 9 frames → 3 latent frames; 64×96 px → 4×6 patches; 2 steps, the first guided.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ditflow import DiTFlowError
from ditflow.cli import main
from ditflow.embeds import load_embeds
from ditflow.files import remove_orphans, write_json, write_text
from ditflow.outputs import OutputSet, check_output_folder

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--num-frames", "9", "--height", "64", "--width", "96", "--steps", "2", "--guidance-fraction", "0.5",
        "--opt-steps", "1", "--guidance-blocks", "1", "--dtype", "fp32", "--device", "cpu", "--no-vae-tiling"]


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the model is loaded: these checks must come first."""
    import ditflow.jobs

    monkeypatch.setattr(ditflow.jobs, "load_for_run", lambda *a, **k: pytest.fail("the model was loaded"))


def _snapshot(folder: Path) -> dict:
    """Name → bytes of every entry under ``folder`` (and beside it: the parent's listing), to prove nothing moved."""
    inside = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return {"inside": inside, "beside": sorted(p.name for p in folder.parent.iterdir())}


def _old_run(out: Path) -> dict:
    """``out`` filled as an earlier rope run left it (its files' content does not matter here)."""
    out.mkdir()
    for name in ("result.mp4", "reference.mp4", "embeds.safetensors"):
        (out / name).write_bytes(b"earlier run " + name.encode())
    (out / "run.json").write_text('{"job": "transfer", "earlier": true}')
    return _snapshot(out)


def _transfer(model, video, out, *extra) -> list[str]:
    return ["transfer", "--model", str(model), "--video", str(video), "--prompt", "x", "--out", str(out), *FAST, *extra]


def _last_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


# --- checked before the model loads -----------------------------------------------------------------------------


def test_a_non_empty_out_is_refused_unless_overwrite(tiny_5b_path, pan_clip, tmp_path, capsys, no_model):
    out = tmp_path / "out"
    before = _old_run(out)
    assert main(_transfer(tiny_5b_path, pan_clip, out)) == 2
    err = _last_line(capsys)
    assert err.startswith(f"error: --out {out} already holds embeds.safetensors, reference.mp4, result.mp4, run.json")
    assert "--overwrite" in err and _snapshot(out) == before


@pytest.mark.parametrize("where", ["video in out", "embeds in out", "model in out", "out in the model"])
def test_overwrite_never_replaces_a_folder_holding_an_input(tiny_5b_path, pan_clip, tmp_path, capsys, no_model, where):
    import shutil

    out = tmp_path / "o"
    out.mkdir()
    model, video = tiny_5b_path, pan_clip
    if where == "video in out":
        video = Path(shutil.copy(pan_clip, out / "reference.mp4"))
    if where == "model in out":
        model = Path(shutil.copytree(tiny_5b_path, out / "model"))
    if where == "out in the model":
        model = Path(shutil.copytree(tiny_5b_path, tmp_path / "model"))
        out = model / "transformer"
    before = _snapshot(out)
    if where == "embeds in out":
        (out / "embeds.safetensors").write_bytes(b"embeddings")
        before = _snapshot(out)
        argv = ["inject", "--model", str(model), "--embeds", str(out / "embeds.safetensors"), "--prompt", "x",
                "--out", str(out), "--overwrite"]
    else:
        argv = _transfer(model, video, out, "--overwrite")
    assert main(argv) == 2
    err = _last_line(capsys)
    assert "overlaps the input" in err and "choose an --out outside it" in err
    assert _snapshot(out) == before


@pytest.mark.parametrize("fps", ["0", "-8", "nan", "inf", "1e9"])
def test_an_unwritable_fps_is_refused(tiny_5b_path, pan_clip, tmp_path, capsys, no_model, fps):
    out = tmp_path / "out"
    assert main(_transfer(tiny_5b_path, pan_clip, out, f"--fps={fps}")) == 2
    assert "fps must be a finite number in (0, 1000]" in _last_line(capsys)
    assert not out.exists()


def test_out_that_is_a_file_or_lies_under_a_file_is_refused(tiny_5b_path, pan_clip, tmp_path, capsys, no_model):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    assert main(_transfer(tiny_5b_path, pan_clip, afile)) == 2
    assert _last_line(capsys) == f"error: --out {afile} is a file; give a folder (it is created if missing)."
    assert main(_transfer(tiny_5b_path, pan_clip, afile / "out")) == 2
    assert "cannot write beside --out" in _last_line(capsys)
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# --- one set, published at once ---------------------------------------------------------------------------------


def test_overwrite_publishes_exactly_the_new_set_with_normal_modes(tiny_5b_path, pan_clip, tmp_path, capsys):
    out = tmp_path / "out"
    _old_run(out)
    old_mask = os.umask(0o022)
    try:
        assert main(_transfer(tiny_5b_path, pan_clip, out, "--overwrite")) == 0
    finally:
        os.umask(old_mask)
    assert _last_line(capsys) == f"wrote {out}"
    assert sorted(p.name for p in out.iterdir()) == ["embeds.safetensors", "reference.mp4", "result.mp4", "run.json"]
    assert json.loads((out / "run.json").read_text())["guidance"]["mode"] == "latent"
    assert load_embeds(out / "embeds.safetensors").mode.value == "latent"  # this run's z_t trajectory, not stale ρ
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old folder left beside it
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}


def _raise_at(monkeypatch, module, name, exc, after: int = 0):
    """Makes ``module.name`` raise ``exc`` on its call number ``after + 1`` (the calls before it run normally)."""
    real, calls = getattr(module, name), []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, patched)


def test_ctrl_c_after_the_first_file_leaves_the_old_set_and_says_nothing_was_written(
    tiny_5b_path, pan_clip, tmp_path, capsys, monkeypatch
):
    import ditflow.jobs

    out = tmp_path / "out"
    before = _old_run(out)
    _raise_at(monkeypatch, ditflow.jobs, "write_video", KeyboardInterrupt(), after=1)  # result.mp4 is written
    assert main(_transfer(tiny_5b_path, pan_clip, out, "--overwrite")) == 130
    assert _last_line(capsys) == f"interrupted: nothing was written ({out} is as it was)"
    assert _snapshot(out) == before


def test_ctrl_c_right_after_publishing_says_the_set_was_written(tmp_path, capsys, monkeypatch):
    import ditflow.jobs

    def transfer(model, video, prompt, out_dir, **kwargs):  # publishes, then the interrupt lands
        with OutputSet(out_dir, overwrite=kwargs["overwrite"]) as folder:
            write_json(folder / "run.json", {"job": "transfer"})
        raise KeyboardInterrupt

    monkeypatch.setattr(ditflow.jobs, "transfer", transfer)
    out = tmp_path / "out"
    _old_run(out)
    assert main(_transfer("model", "clip.mp4", out, "--overwrite")) == 130
    assert _last_line(capsys) == f"interrupted after {out} was written in full"
    assert [p.name for p in out.iterdir()] == ["run.json"]


def test_a_full_disk_while_writing_the_set_leaves_out_as_it_was(tmp_path):
    from ditflow.jobs import _write_all

    out = tmp_path / "out"
    before = _old_run(out)

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DiTFlowError, match=r"could not write the results \(No space left on device\); nothing was "
                       r"written to .*out: free some space"):
        output = OutputSet(out, overwrite=True)
        with output as folder:
            _write_all(output, folder, {"run.json": lambda p: write_json(p, {}), "result.mp4": full})
    assert _snapshot(out) == before


def test_sigterm_mid_run_leaves_out_as_it_was_and_no_staging_folder(tiny_5b_path, pan_clip, tmp_path):
    out = tmp_path / "out"
    before = _old_run(out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    args = [a if a != "2" else "50" for a in _transfer(tiny_5b_path, pan_clip, out, "--overwrite")]  # 50 steps: long
    proc = subprocess.Popen([sys.executable, "-m", "ditflow", *args], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.endswith(".part") for p in tmp_path.iterdir()):  # staging made: the run has begun
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == f"interrupted: nothing was written ({out} is as it was)"
    assert _snapshot(out) == before


# --- the library pieces ---------------------------------------------------------------------------------------


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_orphans_of_killed_runs_are_removed_and_a_stranded_old_folder_is_put_back(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / f".out.{dead}-0123abcd.part").mkdir()  # a staging folder of a killed run
    (tmp_path / f".out.{dead}-0123abcd.part" / "result.mp4").write_bytes(b"half")
    (out / f".run.json.{dead}-89abcdef.part").write_text("{")  # a killed atomic write inside
    (tmp_path / f".out.{live}-0123abcd.part").mkdir()  # a live run's staging folder: left alone
    assert check_output_folder(out) == out.resolve()  # empty once the orphan is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.{live}-0123abcd.part", "out"]
    assert list(out.iterdir()) == []

    # Killed between the two renames of a publish without RENAME_EXCHANGE: the old folder is put back.
    gone = tmp_path / "gone"
    stranded = tmp_path / f".gone.{dead}-00000000.old"
    stranded.mkdir()
    (stranded / "run.json").write_text("{}")
    remove_orphans(tmp_path)
    assert (gone / "run.json").read_text() == "{}" and not stranded.exists()


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two renames"])
def test_output_set_replaces_the_folder_as_a_whole_and_honours_the_umask(tmp_path, monkeypatch, exchange):
    import ditflow.outputs

    if not exchange:
        monkeypatch.setattr(ditflow.outputs, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "embeds.safetensors").write_text("old")
    old_mask = os.umask(0o002)
    try:
        with OutputSet(out, overwrite=True) as folder:
            write_json(folder / "run.json", {"new": True})
            write_text(folder / "notes" / "table.md", "| a |\n")
            assert (out / "embeds.safetensors").exists() and not (out / "run.json").exists()  # not yet published
    finally:
        os.umask(old_mask)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["notes", "notes/table.md", "run.json"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o775 and stat.S_IMODE((out / "run.json").stat().st_mode) == 0o664
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_out_filled_by_another_run_meanwhile_keeps_both(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DiTFlowError, match=r"another run filled --out .* this run's results are in .*out\.new-"):
        with OutputSet(out) as folder:
            write_json(folder / "run.json", {"mine": True})
            out.mkdir()
            (out / "run.json").write_text('{"theirs": true}')
    (kept,) = tmp_path.glob("out.new-*")
    assert json.loads((kept / "run.json").read_text()) == {"mine": True}
    assert json.loads((out / "run.json").read_text()) == {"theirs": True}


def test_a_failed_publish_keeps_the_new_set_visibly_and_out_unchanged(tmp_path, monkeypatch):
    import ditflow.outputs

    def cross_device(a, b):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(ditflow.outputs, "_exchange", cross_device)
    out = tmp_path / "out"
    before = _old_run(out)
    with pytest.raises(DiTFlowError, match=r"could not put the results at .*out \(Invalid cross-device link\); it is "
                       r"unchanged and this run's results are in .*out\.new-\d+\."):
        with OutputSet(out, overwrite=True) as folder:
            write_json(folder / "run.json", {"new": True})
    assert _snapshot(out)["inside"] == before["inside"]
    (kept,) = tmp_path.glob("out.new-*")
    assert json.loads((kept / "run.json").read_text()) == {"new": True}


def test_a_mount_point_is_refused_as_out():
    with pytest.raises(DiTFlowError, match="is a mount point, which cannot be replaced by a rename"):
        check_output_folder("/", overwrite=True)
