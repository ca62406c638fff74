"""What every trainer copies from grpo.py (the group advantage, the aggregations, the micro-batch weight), held to the
same hand-computed results in every file: a fork edits one copy, and grpo.py's tests alone would not notice."""
import math

import pytest
import torch

import delta_l
import dph_rl
import dppo
import grpo
import lp_reg
import rl_plus

ALL = [grpo, dph_rl, lp_reg, rl_plus, delta_l, dppo]
GRPO_AGG = [grpo, dph_rl, lp_reg, rl_plus, dppo]  # delta_l's aggregate is the method itself (tests/test_delta_l.py)
GRPO_MICRO = [grpo, lp_reg, rl_plus, dppo]  # dph_rl weighs inside dph_loss; delta_l has its own
ids = lambda mods: [m.__name__ for m in mods]  # noqa: E731


@pytest.mark.parametrize("mod", ALL, ids=ids(ALL))
def test_group_advantages_hand_computed(mod):
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    # group 1: mean .25, Bessel std sqrt((.75^2 + 3 * .25^2) / 3) = .5; group 2: mean .5, std sqrt(4 * .25 / 3)
    s2 = math.sqrt(1 / 3)
    expect = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.5 / s2, 0.5 / s2, -0.5 / s2, -0.5 / s2])
    assert torch.allclose(mod.group_advantages(r, 4, eps=0.0), expect, atol=1e-6)
    centred = torch.tensor([.75, -.25, -.25, -.25, .5, .5, -.5, -.5])
    assert torch.allclose(mod.group_advantages(r, 4, eps=1.0), centred / torch.tensor([1.5] * 4 + [1 + s2] * 4))
    assert torch.allclose(mod.group_advantages(r, 4, scale_std=False), centred)
    assert torch.allclose(mod.group_advantages(torch.tensor([1.0, 0.0]), 2, eps=0.0),  # G = 2: std = 1 / sqrt(2)
                          torch.tensor([math.sqrt(0.5), -math.sqrt(0.5)]), atol=1e-6)
    assert torch.allclose(mod.group_advantages(r, 4), mod.group_advantages(r, 4, eps=1e-6), atol=0, rtol=0)  # default
    assert torch.equal(mod.group_advantages(torch.tensor([1.0, 0.0]), 1), torch.zeros(2))  # G = 1: 0, never NaN


@pytest.mark.parametrize("mod", ALL, ids=ids(ALL))
def test_equal_reward_groups_get_zero_and_the_input_is_left_alone(mod):
    for r in (torch.zeros(8), torch.ones(8)):
        assert torch.equal(mod.group_advantages(r, 4), torch.zeros(8))
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    mod.group_advantages(r, 2)
    assert torch.equal(r, torch.tensor([1.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("mod", GRPO_AGG, ids=ids(GRPO_AGG))
def test_aggregations_hand_computed(mod):
    x = torch.tensor([[1.0, 2, 3, 99], [4, 5, 99, 99], [7, 99, 99, 99]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])  # 3, 2 and 1 real tokens; width 4
    assert mod.aggregate(x, mask, "token-mean").item() == pytest.approx((1 + 2 + 3 + 4 + 5 + 7) / 6)
    assert mod.aggregate(x, mask).item() == mod.aggregate(x, mask, "token-mean").item()  # the default
    assert mod.aggregate(x[2:], mask[2:], "token-mean").item() == 7.0  # one token: divided by 1
    assert mod.aggregate(x, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4.5 + 7) / 3)
    assert mod.aggregate(x, mask, "seq-mean-token-sum-norm", max_len=5).item() == pytest.approx(22 / (3 * 5))
    assert mod.aggregate(x, mask, "seq-mean-token-sum-norm").item() == pytest.approx(22 / (3 * 4))  # padded width
    empty = torch.zeros(2, 4)
    assert mod.aggregate(x[:2], empty, "token-mean").item() == 0 == mod.aggregate(x[:2], empty, "seq-mean-token-mean")
    with pytest.raises(ValueError, match="unknown agg"):
        mod.aggregate(x, mask, "sum")


@pytest.mark.parametrize("mod", GRPO_MICRO, ids=ids(GRPO_MICRO))
def test_micro_weight_hand_computed(mod):
    mini = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]])  # 6 tokens, 4 rows
    micro = mini[:2]  # 5 tokens, 2 rows
    assert mod.micro_weight(micro, mini, "token-mean") == pytest.approx(5 / 6)
    assert mod.micro_weight(micro, mini, "token-mean", n_tokens=torch.tensor(10.0)) == pytest.approx(5 / 10)
    assert mod.micro_weight(mini[2:3], mini[2:3], "token-mean") == pytest.approx(1.0)  # a 1-token mini-batch
    assert mod.micro_weight(mini[3:], mini[3:], "token-mean") == 0.0  # no tokens: 0, not NaN
    for agg in ("seq-mean-token-mean", "seq-mean-token-sum-norm"):
        assert mod.micro_weight(micro, mini, agg) == pytest.approx(2 / 4)
