# SPDX-License-Identifier: Apache-2.0
"""``python -m ditflow fpt-convert`` and ``poke`` end to end on the tiny random FPT (``ditflow.testing.tiny_fpt``):
a .pt in the released layout is converted, then a 90×60 px PNG is poked."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from safetensors import safe_open

from ditflow.cli import main
from ditflow.testing.tiny_fpt import TINY, random_reference_state_dict


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fpt_cli")
    torch.save({"model": random_reference_state_dict(TINY, 0)}, root / "fpt.pt")
    rng = np.random.default_rng(0)
    cv2.imwrite(str(root / "image.png"), rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
    return root


@pytest.fixture(scope="module")
def weights(files):
    """The tiny .pt converted through the CLI; its encoder heads and image size are not the release's defaults."""
    from ditflow.fpt.checkpoint import read_fpt

    out = files / "fpt.safetensors"
    assert main(["fpt-convert", str(files / "fpt.pt"), str(out), "--encoder-heads", "2", "--image-size", "56"]) == 0
    assert read_fpt(out)[1] == TINY
    return out


def test_poke_writes_a_flow_field_and_pictures(files, weights, tmp_path):
    out = tmp_path / "out"
    assert main(["poke", "--model", str(weights), "--image", str(files / "image.png"), "--pokes", "30,30,42,25",
                 "--out", str(out), "--grid", "8", "--query", "40,30", "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["density.png", "flow.png", "flow.safetensors"]
    with safe_open(str(out / "flow.safetensors"), framework="pt") as f:
        flow, meta = f.get_tensor("flow"), f.metadata()
    assert flow.shape == (60, 90, 2) and flow.dtype == torch.float32 and torch.isfinite(flow).all()
    assert meta["pokes"] == "30,30,42,25" and "(dx, dy) in pixels" in meta["convention"]
    assert cv2.imread(str(out / "flow.png")).shape == (60, 90, 3) == cv2.imread(str(out / "density.png")).shape


@pytest.mark.parametrize("args, message", [
    (["--pokes", "30,30,42"], "Poke 1 ('30,30,42') has 3 numbers, not 4"),
    (["--pokes", "300,30,42,25"], "Poke 1 starts at (300, 30), outside the 90×60 px image."),
    (["--pokes", "", "--query", "5,100"], "query point (5, 100) is outside"),
    (["--pokes", "", "--image", "missing.png"], "does not exist"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(files, weights, tmp_path, capsys, args, message):
    base = {"--model": str(weights), "--image": str(files / "image.png"), "--out": str(tmp_path / "out")}
    extra = dict(zip(args[::2], args[1::2]))
    argv = ["poke"] + [x for k, v in (base | extra).items() for x in (k, v)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "out").exists()


def test_unconverted_weights_are_refused(files, tmp_path, capsys):
    assert main(["poke", "--model", str(files / "fpt.pt"), "--image", str(files / "image.png"), "--pokes", "",
                 "--out", str(tmp_path / "out")]) == 2
    assert "not a .safetensors file; convert the released .pt once" in capsys.readouterr().err


def test_poke_out_is_one_output_set(files, weights, tmp_path, capsys, monkeypatch):
    """--out as transfer/inject treat it: a non-empty folder is refused without --overwrite, replaced as a whole with
    it (no file of an earlier run left), and a failed write leaves it as it was."""
    import ditflow.fpt.jobs as jobs

    out = tmp_path / "out"
    base = ["poke", "--model", str(weights), "--image", str(files / "image.png"), "--pokes", "30,30,42,25",
            "--out", str(out), "--grid", "8", "--device", "cpu"]
    assert main(base + ["--query", "40,30"]) == 0
    first = (out / "flow.safetensors").read_bytes()
    assert main(base) == 2
    assert "already holds density.png, flow.png, flow.safetensors" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["density.png", "flow.png", "flow.safetensors"]

    def full_disk(path, image):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jobs, "_write_png", full_disk)
    assert main(base + ["--overwrite", "--pokes", "30,30,20,25"]) == 2
    assert "nothing was written to" in capsys.readouterr().err.strip().splitlines()[-1]
    assert (out / "flow.safetensors").read_bytes() == first and len(list(out.iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left beside it
    monkeypatch.undo()

    assert main(base + ["--overwrite", "--pokes", "30,30,20,25"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["flow.png", "flow.safetensors"]  # the old density.png is gone
    assert (out / "flow.safetensors").read_bytes() != first


TINY_VIDEO = ["--num-frames", "9", "--height", "64", "--width", "96", "--steps", "4", "--guidance-fraction", "0.5",
              "--opt-steps", "3", "--lr-start", "0.2", "--lr-end", "0.1", "--guidance-blocks", "1", "--dtype", "fp32",
              "--device", "cpu"]


def test_poke_then_transfer_flow_generates_a_video_guided_by_the_pokes(files, weights, tiny_5b_path, tmp_path):
    """``poke`` writes flow.safetensors; ``transfer --flow`` follows it on tiny-5b (9 frames at 64×96 px)."""
    import json

    import av

    poked = tmp_path / "poked"
    assert main(["poke", "--model", str(weights), "--image", str(files / "image.png"), "--pokes", "30,30,60,25",
                 "--out", str(poked), "--grid", "8", "--device", "cpu"]) == 0
    out = tmp_path / "out"
    assert main(["transfer", "--model", str(tiny_5b_path), "--flow", str(poked / "flow.safetensors"), "--prompt",
                 "a red ball", "--out", str(out), "--flow-scale", "3", *TINY_VIDEO]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["result.mp4", "run.json"]
    with av.open(str(out / "result.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (64, 96, 3)
    run = json.loads((out / "run.json").read_text())
    assert run["job"] == "transfer_flow" and run["settings"]["flow_metadata"]["pokes"] == "30,30,60,25"
    assert run["settings"]["target"]["scale"] == 3.0 and run["guidance"]["kv_injection_blocks"] == []
    assert all(step[-1] < step[0] for step in run["loss_per_step"]) and len(run["loss_per_step"]) == 2


def test_bad_flow_input_is_one_line_before_the_model_loads(files, tmp_path, capsys):
    from safetensors.torch import save_file

    still, other = tmp_path / "still.safetensors", tmp_path / "other.safetensors"
    save_file({"flow": torch.zeros(60, 90, 2)}, str(still))
    save_file({"weights": torch.zeros(3)}, str(other))
    base = ["transfer", "--model", str(tmp_path / "no_model"), "--prompt", "x", "--out", str(tmp_path / "out"),
            *TINY_VIDEO]
    for args, message in [
        (["--flow", str(still)], "the motion target is still everywhere"),
        (["--flow", str(other)], "holds no tensor 'flow' (it has weights)"),
        (["--flow", str(tmp_path / "missing.safetensors")], "does not exist; make one with 'python -m ditflow poke'"),
        (["--flow", str(still), "--loss", "smm"], "a flow gives an AMF motion target"),
    ]:
        assert main(base + args) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # argparse: one of them, not both
        main(base + ["--flow", str(still), "--video", str(files / "image.png")])
    assert "not allowed with argument" in capsys.readouterr().err


def test_transfer_flow_on_an_image_to_video_model_starts_from_the_poked_image(files, tiny_path, tmp_path, capsys):
    """tiny 5b-I2V: --image (the poked image, fitted as the flow) is the first frame; without it, one sentence."""
    import json

    from safetensors.torch import save_file

    flow = torch.zeros(60, 90, 2)
    flow[..., 0] = 20.0
    save_file({"flow": flow}, str(tmp_path / "flow.safetensors"), metadata={"pokes": "30,30,50,30"})
    base = ["transfer", "--model", str(tiny_path("5b-i2v")), "--flow", str(tmp_path / "flow.safetensors"),
            "--prompt", "a red ball", *TINY_VIDEO]
    assert main(base + ["--out", str(tmp_path / "no_image")]) == 2
    assert "generates from a start image; give it with --image (the poked image" in capsys.readouterr().err
    assert not (tmp_path / "no_image").exists()
    out = tmp_path / "out"
    assert main(base + ["--out", str(out), "--image", str(files / "image.png")]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["image"] == str(files / "image.png") and run["settings"]["model_family"] == "5b-i2v"
    assert all(step[-1] < step[0] for step in run["loss_per_step"]) and len(run["loss_per_step"]) == 2
