# SPDX-License-Identifier: Apache-2.0
"""The two pickles DiTFlow reads (CoTracker3's .pth, the FPT .pt) are refused on a torch with CVE-2025-32434.

CoTracker's side is tested with the tracker (tests/test_metrics.py); the FPT conversion and the rule itself here.
"""

from __future__ import annotations

import pytest
import torch

from ditflow.errors import DiTFlowError
from ditflow.pickles import require_safe_torch, unsafe_torch


@pytest.mark.parametrize("version,safe", [("2.5.1+cu121", False), ("2.4.0", False), ("1.13.1", False),
                                          ("2.6.0", True), ("2.13.0+cpu", True), ("3.0.0a0", True)])
def test_torch_up_to_2_5_is_refused_for_pickles(monkeypatch, version, safe):
    monkeypatch.setattr(torch, "__version__", version)
    assert (unsafe_torch("x.pt", "use y") is None) == safe


def test_the_fpt_conversion_refuses_an_unsafe_torch_before_opening_the_pickle(tmp_path, monkeypatch):
    from ditflow.fpt.checkpoint import convert_checkpoint

    src = tmp_path / "flow_poke_open_set_base.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, src)
    opened = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a[0]) or real_load(*a, **k))
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(DiTFlowError, match=r"the FPT checkpoint flow_poke_open_set_base\.pt is a pickle, and torch "
                                           r"2\.5\.1 cannot read one safely \(CVE-2025-32434.*torch ≥ 2\.6"):
        convert_checkpoint(src, tmp_path / "fpt.safetensors")
    assert opened == [] and not (tmp_path / "fpt.safetensors").exists()
    with pytest.raises(DiTFlowError, match="CVE-2025-32434"):
        require_safe_torch("x.pt", "use y")
