# SPDX-License-Identifier: Apache-2.0
"""Our Flow Poke Transformer against the authors' implementation, on a seeded random state dict.

The fixture ``tests/data/fpt_parity.safetensors`` (65 KB) was made once by running the authors' code
(github.com/CompVis/flow-poke-transformer at 104f9c3, unmodified, outside this repository, torch 2.13.0 CPU):

- model: their ``FlowPokeTransformer`` at a reduced size (width 64, 2 blocks of 2 heads × 32, input and output MLPs
  2 deep, DINOv2 64 wide with 2 layers, 2 heads, 4 registers, 14-px patches, images at 70 px → 5×5 features), its
  ``torch.hub`` DINOv2 load patched to return a locally built DINOv2 of that size (no network);
- weights: ``ditflow.testing.tiny_fpt.random_reference_state_dict(config, 13)``, loaded with ``strict=True`` (which
  also checks our statement of their checkpoint layout); its SHA-256 is in the fixture's metadata;
- inputs (seed 1): two 84×84 random images (bytes; ``u8/127.5 − 1``), 3 pokes, 6 queries, 6 flows to score,
  camera static for the first batch element only;
- outputs: the image features; for ``predict_parallel`` with 6 queries (their flex-attention block mask), with 1
  query (their causal SDPA path) and with no pokes: mixture weights, component means and Cholesky factors, the mixture
  mean and log-probabilities; ``dist.sample()`` after ``torch.manual_seed(2)``; ``predict_autoregressive`` with
  ``randomize_order=True`` after ``torch.manual_seed(3 + b)`` for each batch element b on its own (their sampler
  fails for batch sizes above 1), with their bf16 KV cache switched to fp32 (bf16 only works under autocast).

Tolerances are fp32 round-off: the network runs in fp32 (our attention is computed differently from their flex
attention, so sums are ordered differently) and the mixture head in fp64. Measured on this machine (torch 2.13.0
CPU): features bit-identical; weights, means and Cholesky factors ≤ 7e-7 abs (values up to 1.6); log-probs
≤ 1.1e-6 abs; samples ≤ 6.3e-7 (parallel) and ≤ 4.8e-7 (autoregressive); without pokes ≤ 1e-15.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from ditflow.fpt.checkpoint import convert_state_dict, load_fpt, save_fpt
from ditflow.fpt.config import FPTConfig
from ditflow.testing.tiny_fpt import random_reference_state_dict

FIXTURE = Path(__file__).parent / "data" / "fpt_parity.safetensors"
ATOL = 1e-5  # fp32 round-off of O(1) values through a few layers; the measured error is ~10× below
RTOL = 1e-4


@pytest.fixture(scope="module")
def reference():
    from safetensors import safe_open

    with safe_open(str(FIXTURE), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    inputs = {k.removeprefix("input."): v for k, v in tensors.items() if k.startswith("input.")}
    inputs["image"] = inputs["image"].float() / 127.5 - 1
    inputs["camera_static"] = inputs["camera_static"].bool()
    return inputs, {k.removeprefix("output."): v for k, v in tensors.items() if k.startswith("output.")}, meta


@pytest.fixture(scope="module")
def ours(reference, tmp_path_factory):
    """Our model from the same seeded state dict, through the real conversion and loading path."""
    _, _, meta = reference
    config = FPTConfig.from_json(meta["config"])
    state = random_reference_state_dict(config, int(meta["state_seed"]))
    digest = hashlib.sha256()
    for k in sorted(state):
        digest.update(k.encode())
        digest.update(state[k].numpy().tobytes())
    assert digest.hexdigest() == meta["state_sha256"], "the seeded state dict differs from the fixture's (torch RNG?)"
    path = tmp_path_factory.mktemp("fpt") / "parity.safetensors"
    save_fpt(convert_state_dict(state, config), config, path)
    return load_fpt(path)


def close(actual, expected, what):
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def test_image_features_match(reference, ours):
    inputs, out, _ = reference
    close(ours.embed_image(inputs["image"]), out["features"], "features")


@pytest.mark.parametrize("case", ["parallel", "single", "nopoke"])
def test_mixtures_match(reference, ours, case):
    """Several queries (their block-mask path), one query (their causal path), and no pokes at all."""
    inputs, out, _ = reference
    queries = inputs["query_pos"][:, :1] if case == "single" else inputs["query_pos"]
    pokes = slice(0, 0) if case == "nopoke" else slice(None)
    mixture = ours.predict_parallel(inputs["poke_pos"][:, pokes], inputs["poke_flow"][:, pokes], queries,
                                    ours.embed_image(inputs["image"]), camera_static=inputs["camera_static"])
    close(mixture.weights, out[f"{case}_probs"], "weights")
    close(mixture.means, out[f"{case}_means"], "component means")
    close(mixture.scale_tril, out[f"{case}_scale_tril"], "Cholesky factors")
    close(mixture.mean, out[f"{case}_mean"], "mixture mean")
    close(mixture.log_prob(inputs["eval_flow"][:, : queries.shape[1]]), out[f"{case}_log_prob"], "log-prob")


def test_parallel_samples_match_for_the_same_seed(reference, ours):
    inputs, out, meta = reference
    mixture = ours.predict_parallel(inputs["poke_pos"], inputs["poke_flow"], inputs["query_pos"],
                                    ours.embed_image(inputs["image"]), camera_static=inputs["camera_static"])
    sample = mixture.sample(torch.Generator().manual_seed(int(meta["sample_seed"])))
    close(sample, out["parallel_sample"], "samples")
    assert not torch.allclose(sample, mixture.sample(torch.Generator().manual_seed(int(meta["sample_seed"]) + 1)))


@pytest.mark.parametrize("b", [0, 1])
def test_autoregressive_samples_match_for_the_same_seed(reference, ours, b):
    inputs, out, meta = reference
    one = slice(b, b + 1)
    flows = ours.predict_autoregressive(
        inputs["poke_pos"][one], inputs["poke_flow"][one], inputs["query_pos"][one],
        ours.embed_image(inputs["image"][one]), camera_static=inputs["camera_static"][one], randomize_order=True,
        generator=torch.Generator().manual_seed(int(meta["ar_seed"]) + b),
    )
    close(flows, out[f"autoregressive_{b}"], "autoregressive samples")
