"""Tests for gen_rl.core.losses: hand-worked PPO clipping cases, KL cross-checks and aggregation by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence

from gen_rl.core.losses import (
    SurrogateOutput,
    aggregate,
    clipped_surrogate,
    gaussian_kl,
    surrogate_stats,
    token_kl,
)

LOG = math.log


def _t(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# clipped_surrogate
# ----------------------------------------------------------------------------------------------------


def _surrogate_with_grad(ratios, advantages, **clip_kwargs):
    log_probs = _t([[LOG(r) for r in ratios]], dtype=torch.float64).requires_grad_(True)
    old_log_probs = torch.zeros_like(log_probs)
    out = clipped_surrogate(log_probs, old_log_probs, _t(advantages, dtype=torch.float64), **clip_kwargs)
    out.loss.sum().backward()
    return out, log_probs.grad


def test_positive_advantage_clips_above_only():
    # A=+1, eps=0.2, ratios [1.5, 0.5, 1.1]:
    #   1.5 > 1.2: max(-1.5, -1.2) = -1.2 (clipped branch, d/dlogp = 0)
    #   0.5 < 0.8: max(-0.5, -0.8) = -0.5 (NOT clipped: pessimistic bound keeps the gradient -A*rho = -0.5)
    #   1.1 inside: -1.1, d/dlogp = -A*rho = -1.1
    out, grad = _surrogate_with_grad([1.5, 0.5, 1.1], [1.0], clip_low=0.2)
    assert isinstance(out, SurrogateOutput)
    torch.testing.assert_close(out.loss, _t([[-1.2, -0.5, -1.1]], torch.float64))
    torch.testing.assert_close(out.ratio, _t([[1.5, 0.5, 1.1]], torch.float64))
    assert out.clipped.tolist() == [[True, False, False]]
    torch.testing.assert_close(grad, _t([[0.0, -0.5, -1.1]], torch.float64))


def test_negative_advantage_clips_below_only():
    # A=-1, eps=0.2, ratios [1.5, 0.5, 1.1]:
    #   1.5: max(1.5, 1.2) = 1.5 (NOT clipped, gradient -A*rho = +1.5)
    #   0.5 < 0.8: max(0.5, 0.8) = 0.8 (clipped, gradient 0)
    #   1.1: 1.1, gradient +1.1
    out, grad = _surrogate_with_grad([1.5, 0.5, 1.1], [-1.0], clip_low=0.2)
    torch.testing.assert_close(out.loss, _t([[1.5, 0.8, 1.1]], torch.float64))
    assert out.clipped.tolist() == [[False, True, False]]
    torch.testing.assert_close(grad, _t([[1.5, 0.0, 1.1]], torch.float64))


def test_zero_advantage_gives_zero_loss_and_no_clipping():
    out, grad = _surrogate_with_grad([1.5, 0.5], [0.0], clip_low=0.2)
    assert out.loss.abs().max().item() == 0.0
    assert not out.clipped.any()
    assert grad.abs().max().item() == 0.0


def test_clip_higher_is_asymmetric():
    # DAPO clip-higher: clip_low=0.2, clip_high=0.28.
    # A=+1, ratio 1.25 < 1.28 -> not clipped, loss -1.25 (symmetric 0.2 would clip to -1.2)
    # A=-1, ratio 0.75 < 0.8 -> still clipped by the low side, loss 0.8
    out, grad = _surrogate_with_grad([1.25], [1.0], clip_low=0.2, clip_high=0.28)
    assert out.loss.item() == pytest.approx(-1.25) and not out.clipped.item()
    assert grad.item() == pytest.approx(-1.25)
    symmetric, _ = _surrogate_with_grad([1.25], [1.0], clip_low=0.2)
    assert symmetric.loss.item() == pytest.approx(-1.2) and symmetric.clipped.item()
    low, low_grad = _surrogate_with_grad([0.75], [-1.0], clip_low=0.2, clip_high=0.28)
    assert low.loss.item() == pytest.approx(0.8) and low.clipped.item() and low_grad.item() == 0.0


def test_surrogate_matches_ppo_formula_and_advantage_broadcast():
    generator = torch.Generator().manual_seed(0)
    log_probs = torch.randn(4, 6, generator=generator, dtype=torch.float64) * 0.3
    old_log_probs = torch.randn(4, 6, generator=generator, dtype=torch.float64) * 0.3
    advantages = torch.randn(4, generator=generator, dtype=torch.float64)
    out = clipped_surrogate(log_probs, old_log_probs, advantages, clip_low=0.1, clip_high=0.3)
    ratio = torch.exp(log_probs - old_log_probs)
    per_unit_adv = advantages[:, None].expand(4, 6)
    expected = torch.maximum(-per_unit_adv * ratio, -per_unit_adv * ratio.clamp(0.9, 1.3))
    torch.testing.assert_close(out.loss, expected)
    full = clipped_surrogate(log_probs, old_log_probs, per_unit_adv.clone(), clip_low=0.1, clip_high=0.3)
    torch.testing.assert_close(full.loss, out.loss)
    assert torch.equal(full.clipped, out.clipped)


def test_surrogate_treats_old_log_probs_and_advantages_as_constants():
    log_probs = torch.zeros(2, 3, requires_grad=True)
    old_log_probs = torch.full((2, 3), -0.05, requires_grad=True)
    advantages = torch.tensor([1.0, -2.0], requires_grad=True)
    clipped_surrogate(log_probs, old_log_probs, advantages, clip_low=0.2).loss.sum().backward()
    assert old_log_probs.grad is None and advantages.grad is None
    # ratio = exp(0.05) = 1.0513 inside [0.8, 1.2]: grad = -A * ratio per unit
    expected = -torch.tensor([[1.0], [-2.0]]) * math.exp(0.05)
    torch.testing.assert_close(log_probs.grad, expected.expand(2, 3))


def test_surrogate_computes_bf16_inputs_in_float32():
    log_probs = torch.zeros(1, 2, dtype=torch.bfloat16)
    out = clipped_surrogate(log_probs, log_probs, torch.ones(1, dtype=torch.bfloat16), clip_low=0.2)
    assert out.loss.dtype == torch.float32 and out.ratio.dtype == torch.float32


def test_surrogate_shape_errors():
    with pytest.raises(ValueError, match=r"log_probs \(2, 3\), old_log_probs \(2, 4\)"):
        clipped_surrogate(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), clip_low=0.2)
    with pytest.raises(ValueError, match=r"advantages must be \[B\] = \(2,\) or \[B, T\] = \(2, 3\)"):
        clipped_surrogate(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), clip_low=0.2)
    with pytest.raises(ValueError, match="must be \\[B, T\\]"):
        clipped_surrogate(torch.zeros(3), torch.zeros(3), torch.zeros(3), clip_low=0.2)
    with pytest.raises(ValueError, match="must be >= 0"):
        clipped_surrogate(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), clip_low=-0.1)


# ----------------------------------------------------------------------------------------------------
# gaussian_kl
# ----------------------------------------------------------------------------------------------------


def test_gaussian_kl_hand_worked():
    # sample 0: diffs [1, 2], std 1 -> per element [1/2, 4/2] -> mean 1.25
    # sample 1: diffs [3, 0], std 2 -> per element [9/8, 0]  -> mean 0.5625
    mean = _t([[1.0, 2.0], [3.0, 0.0]])
    kl = gaussian_kl(mean, torch.zeros(2, 2), _t([1.0, 2.0]))
    torch.testing.assert_close(kl, _t([1.25, 0.5625]))


def test_gaussian_kl_matches_torch_distributions():
    generator = torch.Generator().manual_seed(1)
    mean = torch.randn(3, 4, 5, 6, generator=generator, dtype=torch.float64)
    ref_mean = mean + 0.1 * torch.randn(3, 4, 5, 6, generator=generator, dtype=torch.float64)
    std = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    expected = kl_divergence(Normal(mean, std.view(3, 1, 1, 1)), Normal(ref_mean, std.view(3, 1, 1, 1)))
    torch.testing.assert_close(gaussian_kl(mean, ref_mean, std), expected.mean(dim=(1, 2, 3)))
    # a scalar std (same noise level for the whole batch) and a broadcastable [B, 1, 1, 1] std agree
    scalar = kl_divergence(Normal(mean, 0.7), Normal(ref_mean, 0.7)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_kl(mean, ref_mean, 0.7), scalar)
    torch.testing.assert_close(gaussian_kl(mean, ref_mean, torch.full((3, 1, 1, 1), 0.7)), scalar)


def test_gaussian_kl_gradient_and_errors():
    mean = torch.tensor([[1.0, 3.0]], requires_grad=True)
    gaussian_kl(mean, torch.zeros(1, 2), torch.tensor([2.0])).sum().backward()
    # d/dmean of mean_j (m_j^2 / 8) over 2 elements = m_j / 8
    torch.testing.assert_close(mean.grad, torch.tensor([[0.125, 0.375]]))
    with pytest.raises(ValueError, match="shape mismatch"):
        gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2))
    with pytest.raises(ValueError, match="does not broadcast"):
        gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(5))


# ----------------------------------------------------------------------------------------------------
# token_kl
# ----------------------------------------------------------------------------------------------------


def test_token_kl_hand_worked():
    # logp = log 0.5, logp_ref = log 0.25 -> d = logp_ref - logp = log 0.5 = -0.69314718
    # k1 = -d = 0.69314718; k2 = 0.5 d^2 = 0.24022651; k3 = e^d - d - 1 = 0.5 + 0.69314718 - 1 = 0.19314718
    log_probs, ref_log_probs = _t([[LOG(0.5)]]), _t([[LOG(0.25)]])
    assert token_kl(log_probs, ref_log_probs, estimator="k1").item() == pytest.approx(0.69314718)
    assert token_kl(log_probs, ref_log_probs, estimator="k2").item() == pytest.approx(0.24022651)
    assert token_kl(log_probs, ref_log_probs).item() == pytest.approx(0.19314718)


def test_k1_and_k3_are_unbiased_in_expectation_for_categoricals():
    # E_{x~p}[k(x)] as an explicit sum over the support equals KL(p || q) for k1 and k3 (not for k2).
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    true_kl = kl_divergence(Categorical(probs=p), Categorical(probs=q)).item()
    expectation = {
        name: (p * token_kl(p.log()[None], q.log()[None], estimator=name)[0]).sum().item()
        for name in ("k1", "k2", "k3")
    }
    assert expectation["k1"] == pytest.approx(true_kl, rel=1e-12)
    assert expectation["k3"] == pytest.approx(true_kl, rel=1e-12)
    assert expectation["k2"] != pytest.approx(true_kl, rel=1e-3)


def test_k3_nonnegative_and_accurate_for_small_log_ratios():
    generator = torch.Generator().manual_seed(2)
    log_probs = torch.randn(8, 50, generator=generator) * 3
    ref_log_probs = torch.randn(8, 50, generator=generator) * 3
    assert (token_kl(log_probs, ref_log_probs) >= 0).all()
    # tiny float32 log-ratio: k3 ~ d^2/2 = 5e-9; a naive exp(d) - d - 1 in float32 loses all digits
    d = 1e-4
    k3 = token_kl(torch.zeros(1, 1), torch.full((1, 1), d)).item()
    assert k3 == pytest.approx(math.expm1(d) - d, rel=1e-3)


def test_token_kl_errors():
    with pytest.raises(ValueError, match=r"valid options are \['k1', 'k2', 'k3'\]"):
        token_kl(torch.zeros(1, 2), torch.zeros(1, 2), estimator="k4")
    with pytest.raises(ValueError, match="shape mismatch"):
        token_kl(torch.zeros(1, 2), torch.zeros(1, 3))


# ----------------------------------------------------------------------------------------------------
# aggregate
# ----------------------------------------------------------------------------------------------------

PER_UNIT = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
MASK = [[True, True, False], [True, False, False]]


def test_aggregate_modes_hand_worked():
    per_unit, mask = _t(PER_UNIT), torch.tensor(MASK)
    # sample_mean: sample 0 -> (1+2)/2 = 1.5, sample 1 -> 4; mean over samples = 2.75
    assert aggregate(per_unit, mask).item() == pytest.approx(2.75)
    # sample_mean with normalizer 4 (e.g. samples over all processes): (1.5 + 4) / 4 = 1.375
    assert aggregate(per_unit, mask, normalizer=4).item() == pytest.approx(1.375)
    # global_mean: (1+2+4)/3 = 7/3; with normalizer 10: 7/10
    assert aggregate(per_unit, mask, mode="global_mean").item() == pytest.approx(7 / 3)
    assert aggregate(per_unit, mask, mode="global_mean", normalizer=10).item() == pytest.approx(0.7)
    # constant (Dr.GRPO): 7 / (B=2 * 3) = 7/6
    assert aggregate(per_unit, mask, mode="constant", normalizer=3).item() == pytest.approx(7 / 6)


def test_sample_mean_weights_samples_global_mean_weights_units():
    mask = torch.tensor(MASK)
    per_unit = _t(PER_UNIT).requires_grad_(True)
    aggregate(per_unit, mask, mode="sample_mean").backward()
    # each sample gets total weight 1/2, split over its units: sample 0 -> 1/4 per unit, sample 1 -> 1/2
    torch.testing.assert_close(per_unit.grad, _t([[0.25, 0.25, 0.0], [0.5, 0.0, 0.0]]))
    per_unit.grad = None
    aggregate(per_unit, mask, mode="global_mean").backward()
    torch.testing.assert_close(per_unit.grad, _t([[1 / 3, 1 / 3, 0.0], [1 / 3, 0.0, 0.0]]))
    per_unit.grad = None
    aggregate(per_unit, mask, mode="constant", normalizer=3).backward()
    torch.testing.assert_close(per_unit.grad, _t([[1 / 6, 1 / 6, 0.0], [1 / 6, 0.0, 0.0]]))


def test_sample_without_units_is_skipped_in_sample_mean():
    per_unit, mask = _t(PER_UNIT), torch.tensor([[True, True, False], [False, False, False]])
    assert aggregate(per_unit, mask).item() == pytest.approx(1.5)  # not (1.5 + 0) / 2
    assert aggregate(per_unit, mask, mode="global_mean").item() == pytest.approx(1.5)
    assert aggregate(per_unit, mask, mode="constant", normalizer=3).item() == pytest.approx(0.5)  # 3 / 6


@pytest.mark.parametrize("mode", ["sample_mean", "global_mean"])
def test_mean_modes_do_not_depend_on_number_of_units(mode):
    # repeating every unit twice (twice as many trained steps / tokens of the same values) changes nothing
    per_unit, mask = _t(PER_UNIT), torch.tensor(MASK)
    doubled = aggregate(per_unit.repeat_interleave(2, dim=1), mask.repeat_interleave(2, dim=1), mode=mode)
    assert doubled.item() == pytest.approx(aggregate(per_unit, mask, mode=mode).item())


@pytest.mark.parametrize(
    ("mode", "normalizer"), [("sample_mean", None), ("global_mean", None), ("constant", 3)]
)
def test_empty_mask_returns_zero_with_graph(mode, normalizer):
    per_unit = torch.randn(2, 3, requires_grad=True)
    loss = aggregate(per_unit, torch.zeros(2, 3, dtype=torch.bool), mode=mode, normalizer=normalizer)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert per_unit.grad is not None and torch.equal(per_unit.grad, torch.zeros(2, 3))


@pytest.mark.parametrize("mode", ["sample_mean", "global_mean", "constant"])
def test_masked_out_nan_does_not_leak(mode):
    per_unit = _t(PER_UNIT)
    per_unit[0, 2] = float("nan")
    per_unit[1, 1] = float("-inf")
    per_unit.requires_grad_(True)
    loss = aggregate(per_unit, torch.tensor(MASK), mode=mode, normalizer=3)
    clean = aggregate(_t(PER_UNIT), torch.tensor(MASK), mode=mode, normalizer=3)
    assert loss.item() == pytest.approx(clean.item())
    loss.backward()
    assert torch.isfinite(per_unit.grad).all()


def test_float_mask_acts_as_weights():
    # weights [[1, 0.5, 0], [1, 0, 0]]: global_mean = (1 + 1 + 4) / 2.5 = 2.4;
    # sample_mean = ((1 + 1) / 1.5 + 4) / 2 = (1.3333 + 4) / 2 = 2.6667
    weights = _t([[1.0, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate(_t(PER_UNIT), weights, mode="global_mean").item() == pytest.approx(2.4)
    assert aggregate(_t(PER_UNIT), weights).item() == pytest.approx(8 / 3)


def test_aggregate_errors():
    per_unit, mask = _t(PER_UNIT), torch.tensor(MASK)
    with pytest.raises(ValueError, match="needs normalizer"):
        aggregate(per_unit, mask, mode="constant")
    with pytest.raises(ValueError, match="valid options are"):
        aggregate(per_unit, mask, mode="token_sum")
    with pytest.raises(ValueError, match=r"per_unit \(2, 3\), mask \(2, 2\)"):
        aggregate(per_unit, mask[:, :2])
    with pytest.raises(ValueError, match="normalizer must be > 0"):
        aggregate(per_unit, mask, mode="global_mean", normalizer=0)


# ----------------------------------------------------------------------------------------------------
# surrogate_stats
# ----------------------------------------------------------------------------------------------------


def test_surrogate_stats_hand_worked():
    # ratios [1.5, 0.5, 100] with the last unit masked out, A=+1, eps=0.2:
    # clipped [True, False, (masked)] -> clip_fraction 0.5
    # approx_kl = 0.5 * mean(log(1.5)^2, log(0.5)^2) = 0.25 * (0.16440195 + 0.48045301) = 0.16121374
    # ratio_mean (1.5 + 0.5)/2 = 1.0, min 0.5, max 1.5
    log_probs = _t([[LOG(1.5), LOG(0.5), LOG(100.0)]])
    old_log_probs = torch.zeros(1, 3)
    mask = torch.tensor([[True, True, False]])
    out = clipped_surrogate(log_probs, old_log_probs, _t([1.0]), clip_low=0.2)
    stats = surrogate_stats(out, log_probs, old_log_probs, mask)
    assert set(stats) == {"clip_fraction", "approx_kl", "ratio_mean", "ratio_min", "ratio_max"}
    assert all(isinstance(value, float) for value in stats.values())
    assert stats["clip_fraction"] == pytest.approx(0.5)
    assert stats["approx_kl"] == pytest.approx(0.16121374, rel=1e-5)
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["ratio_min"] == pytest.approx(0.5)
    assert stats["ratio_max"] == pytest.approx(1.5)


def test_surrogate_stats_empty_mask_and_shape_error():
    log_probs = torch.zeros(2, 3)
    out = clipped_surrogate(log_probs, log_probs, torch.ones(2), clip_low=0.2)
    stats = surrogate_stats(out, log_probs, log_probs, torch.zeros(2, 3, dtype=torch.bool))
    assert stats == {
        "clip_fraction": 0.0,
        "approx_kl": 0.0,
        "ratio_mean": 1.0,
        "ratio_min": 1.0,
        "ratio_max": 1.0,
    }
    with pytest.raises(ValueError, match=r"mask \(2, 2\)"):
        surrogate_stats(out, log_probs, log_probs, torch.ones(2, 2, dtype=torch.bool))
