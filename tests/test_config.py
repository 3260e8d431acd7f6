# SPDX-License-Identifier: Apache-2.0
"""GuidanceConfig: the paper's defaults, the lr schedule that ends exactly at lr_end, and refusals."""

from __future__ import annotations

import pytest

from ditflow import DiTFlowError, GuidanceConfig, Mode

from stubs import variant_model


def test_paper_defaults_guide_the_first_ten_of_fifty_steps_with_lr_from_2e3_to_exactly_1e3():
    cfg = GuidanceConfig()
    assert cfg.num_guided_steps == 10
    lrs = [cfg.learning_rate(i) for i in range(cfg.num_guided_steps)]
    assert lrs[0] == 2e-3 and lrs[-1] == 1e-3  # exact: the authors' script stops at 0.0011
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("variant,block,cfg,dynamic", [
    ("5b", 20, 6.0, True), ("2b", 15, 6.0, False), ("5b-i2v", 20, 6.0, True), ("1.5", 20, 6.0, True),
    ("1.5-i2v", 20, 6.0, True),
])
def test_model_defaults_fill_block_and_cfg(variant, block, cfg, dynamic):
    resolved = GuidanceConfig().resolved(variant_model(variant))
    assert resolved.guidance_blocks == (block,)
    assert (resolved.guidance_scale, resolved.dynamic_cfg) == (cfg, dynamic)


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="bogus"), "choose one of latent, rope, posemb, none"),
    (dict(guidance_fraction=1.5), "guidance fraction"),
    (dict(temperature=0), "temperature"),
    (dict(num_inference_steps=0), "steps"),
])
def test_bad_settings_are_refused_with_the_value(kwargs, message):
    with pytest.raises(DiTFlowError, match=message):
        GuidanceConfig(**kwargs)


def test_blocks_and_modes_are_checked_against_the_model():
    with pytest.raises(DiTFlowError, match=r"guidance block 30 is out of range: this model has blocks 0..29"):
        GuidanceConfig(guidance_blocks=(30,)).resolved(variant_model("2b", 30))
    with pytest.raises(DiTFlowError, match="KV injection block 42"):
        GuidanceConfig(kv_injection_blocks=(42,)).resolved(variant_model("5b", 42))
    with pytest.raises(DiTFlowError, match="mode 'rope' optimises RoPE tables, but CogVideoX-2b has sincos positions; "
                       "use mode latent or posemb"):
        GuidanceConfig(mode=Mode.ROPE).resolved(variant_model("2b", 30))
    for key in ("5b", "5b-i2v", "1.5", "1.5-i2v"):  # a capability, not a name: every RoPE model takes rope
        GuidanceConfig(mode=Mode.ROPE).resolved(variant_model(key))
        with pytest.raises(DiTFlowError, match="use mode latent or rope"):
            GuidanceConfig(mode=Mode.POSEMB).resolved(variant_model(key))


def test_block_lists_parse_the_same_for_the_command_line_and_the_nodes():
    from ditflow.config import parse_blocks

    assert parse_blocks(20) == parse_blocks("20") == (20,)
    assert parse_blocks("10,15,20") == parse_blocks("10, 15 20") == (10, 15, 20)
    assert parse_blocks("none") == parse_blocks("") == ()
    with pytest.raises(DiTFlowError, match="like 20 or 10,15,20, got '1;2'"):
        parse_blocks("1;2")


def test_ablation_switches_default_to_the_paper():
    cfg = GuidanceConfig()
    assert (cfg.optimizer.value, cfg.soft_reference, cfg.masked_loss) == ("adam", False, True)
    assert GuidanceConfig(optimizer="sgd").optimizer.value == "sgd"
    with pytest.raises(DiTFlowError, match="choose one of adam, adamw, sgd"):
        GuidanceConfig(optimizer="lbfgs")



@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "3"])
def test_seeds_are_unsigned_64_bit_integers(seed):
    from ditflow.config import MAX_SEED, ReferenceOptions, check_seed

    assert check_seed(0) == 0 and check_seed(MAX_SEED) == 2**64 - 1
    with pytest.raises(DiTFlowError, match=r"^seed must be an integer in 0..2\^64−1, got "):
        check_seed(seed)
    with pytest.raises(DiTFlowError, match=r"^the reference sample seed must be an integer in 0..2\^64−1"):
        ReferenceOptions(sample_seed=seed)
