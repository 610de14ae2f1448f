"""VLM loss modes against independent scalar-loop computations of each paper's objective (values and grads)."""

from __future__ import annotations

import pytest
import torch

from gen_rl.vlm.objectives import LOSS_MODES, MiniBatchNorms, policy_loss, sequence_log_ratio

CLIP_LOW, CLIP_HIGH, MAX_LENGTH, BETA = 0.2, 0.28, 7, 0.05


def _batch(seed: int = 0):
    """Log-probs far enough from the old ones that some tokens / sequences leave the clip range."""
    generator = torch.Generator().manual_seed(seed)
    batch, length = 5, 6
    old = -torch.rand(batch, length, generator=generator, dtype=torch.float64) * 3
    log_probs = old + 0.4 * torch.randn(batch, length, generator=generator, dtype=torch.float64)
    ref = old + 0.3 * torch.randn(batch, length, generator=generator, dtype=torch.float64)
    advantages = torch.tensor([1.5, -0.7, 0.3, -1.2, 0.9], dtype=torch.float64)
    lengths = [6, 3, 1, 4, 0]  # the last completion has no loss token
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row, count in enumerate(lengths):
        mask[row, :count] = True
    return log_probs, old, ref, advantages, mask


def _ppo_term(ratio, advantage, clip_low, clip_high):
    """-min(rho A, clip(rho) A): PPO eq. 7 in its textbook min form (the library uses a where form)."""
    return -torch.min(ratio * advantage, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantage)


def _k3(log_prob, ref_log_prob):
    return torch.exp(ref_log_prob - log_prob) - (ref_log_prob - log_prob) - 1


def _tokens(mask, row):
    return [t for t in range(mask.shape[1]) if bool(mask[row, t])]


def reference_loss(name, log_probs, old, ref, advantages, mask, beta):
    """Scalar loops over completions and tokens, one paper formula per branch."""
    clip_high = CLIP_HIGH if name == "dapo" else CLIP_LOW
    rows = [row for row in range(mask.shape[0]) if _tokens(mask, row)]
    total_tokens = sum(len(_tokens(mask, row)) for row in rows)
    policy, kl = 0.0, 0.0
    for row in rows:
        tokens = _tokens(mask, row)
        kl_sum = sum(_k3(log_probs[row, t], ref[row, t]) for t in tokens)
        if name in ("grpo", "dr_grpo", "dapo"):
            terms = [
                _ppo_term(torch.exp(log_probs[row, t] - old[row, t]), advantages[row], CLIP_LOW, clip_high)
                for t in tokens
            ]
            if name == "grpo":  # DeepSeekMath eq. 3: 1/G sum_i 1/|o_i| sum_t
                policy = policy + sum(terms) / len(tokens) / len(rows)
                kl = kl + kl_sum / len(tokens) / len(rows)
            elif name == "dr_grpo":  # Dr.GRPO: sum_t / (G * max_length)
                policy = policy + sum(terms) / (len(rows) * MAX_LENGTH)
                kl = kl + kl_sum / (len(rows) * MAX_LENGTH)
            else:  # DAPO eq. 8: 1 / sum_i |o_i| * sum_i sum_t
                policy = policy + sum(terms) / total_tokens
                kl = kl + kl_sum / total_tokens
        elif name == "gspo":  # GSPO eq. 5-7
            log_s = sum(log_probs[row, t] - old[row, t] for t in tokens) / len(tokens)
            policy = policy + _ppo_term(torch.exp(log_s), advantages[row], CLIP_LOW, CLIP_LOW) / len(rows)
            kl = kl + kl_sum / len(tokens) / len(rows)
        else:  # gspo_token, GSPO eq. 13-14: s_it = sg[s_i] pi(y_t) / sg[pi(y_t)]
            log_s = sum(log_probs[row, t] - old[row, t] for t in tokens).detach() / len(tokens)
            terms = [
                _ppo_term(
                    torch.exp(log_s + log_probs[row, t] - log_probs[row, t].detach()),
                    advantages[row],
                    CLIP_LOW,
                    CLIP_LOW,
                )
                for t in tokens
            ]
            policy = policy + sum(terms) / len(tokens) / len(rows)
            kl = kl + kl_sum / len(tokens) / len(rows)
    return policy + beta * kl


def _library_loss(name, log_probs, old, ref, advantages, mask, beta, norms=None):
    return policy_loss(
        name,
        log_probs,
        old,
        advantages,
        mask,
        clip_low=CLIP_LOW,
        clip_high=CLIP_HIGH if name == "dapo" else CLIP_LOW,
        max_completion_length=MAX_LENGTH,
        norms=norms,
        ref_log_probs=ref,
        beta=beta,
    )


@pytest.mark.parametrize("name", list(LOSS_MODES))
@pytest.mark.parametrize("beta", [0.0, BETA])
def test_loss_mode_matches_independent_computation(name, beta):
    log_probs, old, ref, advantages, mask = _batch()
    mine = log_probs.clone().requires_grad_(True)
    output = _library_loss(name, mine, old, ref, advantages, mask, beta)
    output.loss.backward()

    theirs = log_probs.clone().requires_grad_(True)
    expected = reference_loss(name, theirs, old, ref, advantages, mask, beta)
    expected.backward()

    torch.testing.assert_close(output.loss.double(), expected.double(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-9, atol=1e-12)
    assert mine.grad[~mask].abs().max() == 0  # no gradient through padding
    assert mine.grad.abs().max() > 0


def test_batch_exercises_the_clipping_branch():
    """Guard for the test above: the data makes some tokens and some sequences clip, so the min matters."""
    log_probs, old, ref, advantages, mask = _batch()
    token_stats = _library_loss("grpo", log_probs, old, ref, advantages, mask, 0.0).stats
    assert 0 < token_stats["clip_fraction"] < 1
    # GSPO's sequence ratios of length-1 completions leave a tight clip range
    sequence = policy_loss(
        "gspo",
        log_probs,
        old,
        advantages,
        mask,
        clip_low=0.01,
        clip_high=0.01,
        max_completion_length=MAX_LENGTH,
    )
    assert 0 < sequence.stats["clip_fraction"] < 1


def test_sequence_ratio_is_exp_of_mean_log_ratio():
    log_probs, old, _, _, mask = _batch()
    log_s = sequence_log_ratio(log_probs, old, mask)
    for row in range(mask.shape[0]):
        tokens = _tokens(mask, row)
        expected = (
            sum(float(log_probs[row, t] - old[row, t]) for t in tokens) / len(tokens) if tokens else 0.0
        )
        assert float(log_s[row]) == pytest.approx(expected, abs=1e-6)


def test_gspo_token_gradient_equals_gspo_without_clipping():
    """GSPO eq. 14: with one advantage per sequence and no clipping, GSPO-token has GSPO's gradient."""
    log_probs, old, _, advantages, mask = _batch()
    grads = {}
    for name in ("gspo", "gspo_token"):
        leaf = log_probs.clone().requires_grad_(True)
        policy_loss(
            name, leaf, old, advantages, mask, clip_low=10.0, clip_high=10.0, max_completion_length=MAX_LENGTH
        ).loss.backward()
        grads[name] = leaf.grad
    torch.testing.assert_close(grads["gspo"], grads["gspo_token"], rtol=1e-9, atol=1e-12)


def test_on_policy_ratio_one_gives_the_plain_policy_gradient():
    """At ratio 1 (old = current) GRPO's gradient per token is -A_i / (|o_i| * G)."""
    _, old, _, advantages, mask = _batch()
    leaf = old.clone().requires_grad_(True)
    output = policy_loss(
        "grpo", leaf, old, advantages, mask, clip_low=CLIP_LOW, clip_high=CLIP_LOW, max_completion_length=7
    )
    output.loss.backward()
    rows_with_tokens = int(mask.any(dim=1).sum())
    for row in range(mask.shape[0]):
        count = len(_tokens(mask, row))
        for t in range(mask.shape[1]):
            expected = -float(advantages[row]) / (count * rows_with_tokens) if bool(mask[row, t]) else 0.0
            assert float(leaf.grad[row, t]) == pytest.approx(expected, abs=1e-12)
    assert output.stats["ratio_min"] == output.stats["ratio_max"] == 1.0


@pytest.mark.parametrize("name", list(LOSS_MODES))
def test_micro_batches_with_minibatch_norms_sum_to_the_minibatch_loss(name):
    log_probs, old, ref, advantages, mask = _batch(seed=3)
    whole = log_probs.clone().requires_grad_(True)
    full = _library_loss(name, whole, old, ref, advantages, mask, BETA)
    full.loss.backward()

    split = log_probs.clone().requires_grad_(True)
    norms = MiniBatchNorms.of(mask)
    total = 0.0
    for rows in ([0, 3], [1, 2, 4]):
        index = torch.tensor(rows)
        part = _library_loss(
            name, split[index], old[index], ref[index], advantages[index], mask[index], BETA, norms
        )
        part.loss.backward()
        total += float(part.loss.detach())
    assert total == pytest.approx(float(full.loss.detach()), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(split.grad, whole.grad, rtol=1e-9, atol=1e-12)


def test_unknown_loss_and_missing_reference_are_errors():
    log_probs, old, _, advantages, mask = _batch()
    with pytest.raises(ValueError, match="unknown loss"):
        policy_loss(
            "ppo", log_probs, old, advantages, mask, clip_low=0.2, clip_high=0.2, max_completion_length=7
        )
    with pytest.raises(ValueError, match="ref_log_probs"):
        policy_loss(
            "grpo",
            log_probs,
            old,
            advantages,
            mask,
            clip_low=0.2,
            clip_high=0.2,
            max_completion_length=7,
            beta=0.1,
        )
