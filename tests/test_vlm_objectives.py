"""VLM loss modes against independent scalar-loop computations of each paper's objective (values and grads)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gen_rl.vlm.objectives import AGGREGATIONS, LOSS_MODES, MiniBatchNorms, policy_loss, sequence_log_ratio

CLIP_LOW, CLIP_HIGH, MAX_LENGTH, BETA = 0.2, 0.28, 7, 0.05
TAU_POS, TAU_NEG = 1.0, 1.05  # SAPO's defaults


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


def _sigmoid(x):
    return 1 / (1 + torch.exp(-x))


def _token_term(name, log_probs, old, advantage, row, t, tokens, dual_clip=0.0):
    """One token's loss from its paper's formula, written out."""
    clip_high = CLIP_HIGH if name == "dapo" else CLIP_LOW
    if name in ("grpo", "dr_grpo", "dapo"):  # PPO eq. 7, + Ye et al. eq. 4 dual clip
        ratio = torch.exp(log_probs[row, t] - old[row, t])
        objective = torch.min(ratio * advantage, torch.clamp(ratio, 1 - CLIP_LOW, 1 + clip_high) * advantage)
        if dual_clip and advantage < 0:
            objective = torch.max(objective, dual_clip * advantage)
        return -objective
    if name == "gspo":  # GSPO eq. 5-7: one clipped sequence ratio
        log_s = sum(log_probs[row, u] - old[row, u] for u in tokens) / len(tokens)
        return _ppo_term(torch.exp(log_s), advantage, CLIP_LOW, CLIP_LOW)
    if name == "gspo_token":  # GSPO eq. 13-14: s_it = sg[s_i] pi(y_t) / sg[pi(y_t)]
        log_s = sum(log_probs[row, u] - old[row, u] for u in tokens).detach() / len(tokens)
        ratio = torch.exp(log_s + log_probs[row, t] - log_probs[row, t].detach())
        return _ppo_term(ratio, advantage, CLIP_LOW, CLIP_LOW)
    if name == "cispo":  # MiniMax-M1 eq. 4: sg[clip(r)] * A * log pi
        weight = float(torch.exp(log_probs[row, t] - old[row, t]).detach())
        weight = min(max(weight, 1 - CLIP_LOW), 1 + CLIP_LOW)
        return -weight * advantage * log_probs[row, t]
    # sapo, SAPO eq. 5: f(r) = 4 / tau * sigmoid(tau (r - 1)), tau by the sign of A
    tau = TAU_POS if advantage > 0 else TAU_NEG
    ratio = torch.exp(log_probs[row, t] - old[row, t])
    return -(4 / tau) * _sigmoid(tau * (ratio - 1)) * advantage


def _aggregate_loop(per_token, mask, aggregation):
    """``per_token[row][t]`` over each row's tokens, reduced by the named aggregation's formula."""
    rows = [row for row in range(mask.shape[0]) if _tokens(mask, row)]
    total_tokens = sum(len(_tokens(mask, row)) for row in rows)
    value = 0.0
    for row in rows:
        tokens = _tokens(mask, row)
        row_sum = sum(per_token[row][t] for t in tokens)
        if aggregation == "token_mean":  # DAPO eq. 8: 1 / sum_i |o_i| * sum_i sum_t
            value = value + row_sum / total_tokens
        elif aggregation == "seq_mean_token_mean":  # GRPO: 1/G sum_i 1/|o_i| sum_t
            value = value + row_sum / len(tokens) / len(rows)
        elif aggregation == "seq_mean_token_sum":  # 1/G sum_i sum_t
            value = value + row_sum / len(rows)
        else:  # constant, Dr.GRPO: sum_i sum_t / (G * max_length)
            value = value + row_sum / (len(rows) * MAX_LENGTH)
    return value


PAPER_AGGREGATION = {
    "grpo": "seq_mean_token_mean", "dr_grpo": "constant", "dapo": "token_mean", "gspo": "seq_mean_token_mean",
    "gspo_token": "seq_mean_token_mean", "cispo": "token_mean", "sapo": "seq_mean_token_mean",
}  # fmt: skip


def reference_loss(
    name, log_probs, old, ref, advantages, mask, beta, aggregation=None, dual_clip=0.0, token_weights=None
):
    """Scalar loops over completions and tokens: each paper's per-token term, then its aggregation."""
    aggregation = aggregation or PAPER_AGGREGATION[name]
    policy, kl = {}, {}
    for row in range(mask.shape[0]):
        tokens = _tokens(mask, row)
        policy[row], kl[row] = {}, {}
        for t in tokens:
            term = _token_term(name, log_probs, old, advantages[row], row, t, tokens, dual_clip)
            weight = 1.0 if token_weights is None else float(token_weights[row, t])
            policy[row][t] = weight * term
            kl[row][t] = _k3(log_probs[row, t], ref[row, t])
    return _aggregate_loop(policy, mask, aggregation) + beta * _aggregate_loop(kl, mask, aggregation)


def _library_loss(name, log_probs, old, ref, advantages, mask, beta, norms=None, **options):
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
        kl_coef=beta,
        tau_pos=TAU_POS,
        tau_neg=TAU_NEG,
        **options,
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
            kl_coef=0.1,
        )


def _value_and_grad(function, log_probs):
    leaf = log_probs.clone().requires_grad_(True)
    value = function(leaf)
    value = value.loss if hasattr(value, "loss") else value
    value.backward()
    return value.detach().double(), leaf.grad


@pytest.mark.parametrize("name", list(LOSS_MODES))
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_every_aggregation_with_every_loss_matches_the_scalar_loop(name, aggregation):
    """algorithm.loss_aggregation is independent of the loss: each pair against its written-out formula."""
    log_probs, old, ref, advantages, mask = _batch(seed=1)
    mine = _value_and_grad(
        lambda lp: _library_loss(name, lp, old, ref, advantages, mask, BETA, aggregation=aggregation),
        log_probs,
    )
    theirs = _value_and_grad(
        lambda lp: reference_loss(name, lp, old, ref, advantages, mask, BETA, aggregation=aggregation),
        log_probs,
    )
    torch.testing.assert_close(mine[0], theirs[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mine[1], theirs[1], rtol=1e-9, atol=1e-12)


def test_aggregations_differ_on_this_batch():
    """Guard: the batch has unequal lengths, so the four aggregations give four different losses."""
    log_probs, old, ref, advantages, mask = _batch(seed=1)
    values = {
        aggregation: float(
            _library_loss("grpo", log_probs, old, ref, advantages, mask, 0.0, aggregation=aggregation).loss
        )
        for aggregation in AGGREGATIONS
    }
    assert len({round(value, 9) for value in values.values()}) == len(AGGREGATIONS)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo"])
def test_dual_clip_matches_ye_et_al(name):
    """Dual clip c: for A < 0 the objective is max(min(rA, clip(r)A), cA); the batch has tokens where it binds."""
    log_probs, old, ref, advantages, mask = _batch(seed=2)
    log_probs = log_probs + 0.5 * (advantages < 0).double()[:, None]  # push bad completions' ratios up
    dual_clip = 1.5
    mine = _value_and_grad(
        lambda lp: _library_loss(name, lp, old, ref, advantages, mask, BETA, dual_clip=dual_clip), log_probs
    )
    theirs = _value_and_grad(
        lambda lp: reference_loss(name, lp, old, ref, advantages, mask, BETA, dual_clip=dual_clip), log_probs
    )
    torch.testing.assert_close(mine[0], theirs[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mine[1], theirs[1], rtol=1e-9, atol=1e-12)
    plain = _value_and_grad(lambda lp: _library_loss(name, lp, old, ref, advantages, mask, BETA), log_probs)
    assert float(mine[0]) < float(plain[0])  # the cap binds on this batch, lowering the loss
    ratio = torch.exp(log_probs - old)
    bound_tokens = mask & (advantages[:, None] < 0) & (ratio > dual_clip)
    assert bound_tokens.any()
    # a capped token gets no policy gradient (only its KL term remains)
    kl_only = _value_and_grad(
        lambda lp: _library_loss(name, lp, old, ref, advantages * 0, mask, BETA), log_probs
    )
    torch.testing.assert_close(mine[1][bound_tokens], kl_only[1][bound_tokens], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(LOSS_MODES))
def test_token_weights_gate_the_policy_term_only(name):
    """High-entropy tokens only (80/20 rule): gated tokens lose their policy gradient, denominators unchanged."""
    log_probs, old, ref, advantages, mask = _batch(seed=4)
    weights = (torch.rand(mask.shape, generator=torch.Generator().manual_seed(9)) < 0.5).double()
    mine = _value_and_grad(
        lambda lp: _library_loss(name, lp, old, ref, advantages, mask, BETA, token_weights=weights), log_probs
    )
    theirs = _value_and_grad(
        lambda lp: reference_loss(name, lp, old, ref, advantages, mask, BETA, token_weights=weights),
        log_probs,
    )
    torch.testing.assert_close(mine[0], theirs[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mine[1], theirs[1], rtol=1e-9, atol=1e-12)


def test_cispo_keeps_a_gradient_where_ppo_clips():
    """CISPO's point (MiniMax-M1 sec. 3.1): a token whose ratio left the clip range still gets -w A / N."""
    log_probs, old, _, advantages, mask = _batch()
    ratio = torch.exp(log_probs - old)
    options = {"clip_low": CLIP_LOW, "clip_high": CLIP_LOW, "max_completion_length": MAX_LENGTH}
    grads = {}
    for name in ("dapo", "cispo"):
        leaf = log_probs.clone().requires_grad_(True)
        policy_loss(name, leaf, old, advantages, mask, **options).loss.backward()
        grads[name] = leaf.grad
    positive, negative = advantages[:, None] > 0, advantages[:, None] < 0
    clipped = mask & ((positive & (ratio > 1 + CLIP_LOW)) | (negative & (ratio < 1 - CLIP_LOW)))
    assert clipped.any()
    assert grads["dapo"][clipped].abs().max() == 0
    weight = ratio.clamp(1 - CLIP_LOW, 1 + CLIP_LOW)
    expected = -(weight * advantages[:, None])[clipped] / mask.sum()
    torch.testing.assert_close(grads["cispo"][clipped], expected, rtol=1e-12, atol=0)


def test_sapo_gradient_is_the_soft_gate_times_the_policy_gradient():
    """SAPO eq. 7: d/dlogp of -f(r) A is -4 sigma (1 - sigma) r A; at r = 1 that is GRPO's -A / (|o| G)."""
    log_probs, old, _, advantages, mask = _batch()
    leaf = log_probs.clone().requires_grad_(True)
    options = {"clip_low": CLIP_LOW, "clip_high": CLIP_LOW, "max_completion_length": MAX_LENGTH}
    policy_loss(
        "sapo", leaf, old, advantages, mask, tau_pos=TAU_POS, tau_neg=TAU_NEG, **options
    ).loss.backward()
    ratio = torch.exp(log_probs - old)
    tau = torch.tensor([TAU_POS if a > 0 else TAU_NEG for a in advantages.tolist()], dtype=torch.float64)[
        :, None
    ]
    gate = torch.sigmoid(tau * (ratio - 1))
    lengths = mask.sum(dim=1, keepdim=True).clamp_min(1)
    expected = -4 * gate * (1 - gate) * ratio * advantages[:, None] / lengths / int(mask.any(dim=1).sum())
    torch.testing.assert_close(leaf.grad, torch.where(mask, expected, 0.0), rtol=1e-10, atol=1e-14)
    on_policy = old.clone().requires_grad_(True)
    policy_loss("sapo", on_policy, old, advantages, mask, **options).loss.backward()
    grpo = old.clone().requires_grad_(True)
    policy_loss("grpo", grpo, old, advantages, mask, **options).loss.backward()
    torch.testing.assert_close(on_policy.grad, grpo.grad, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------------------
# advantages: RLOO and REINFORCE++ against scalar loops
# ------------------------------------------------------------------------------------------------------

from gen_rl.core.advantages import reinforce_pp_advantages, rloo_advantages  # noqa: E402

REWARDS = [1.0, 0.0, 0.5, float("nan"), 2.0, 2.0, 3.0, 0.25, 7.0, 1.0, 4.0]
GROUPS = [0, 0, 0, 0, 1, 1, 2, 2, 3, 4, 4]  # a NaN in group 0, a zero-spread group 1, a lone group 3


def _finite(values):
    return [value for value in values if value == value]


def _pop_std(values):
    mean = sum(values) / len(values)
    return (sum((value - mean) ** 2 for value in values) / len(values)) ** 0.5


def test_rloo_is_reward_minus_the_mean_of_the_other_members():
    expected = []
    for i, (reward, group) in enumerate(zip(REWARDS, GROUPS, strict=True)):
        others = _finite([REWARDS[j] for j in range(len(REWARDS)) if GROUPS[j] == group and j != i])
        expected.append(0.0 if reward != reward or not others else reward - sum(others) / len(others))
    output = rloo_advantages(torch.tensor(REWARDS), torch.tensor(GROUPS))
    assert output.advantages.tolist() == pytest.approx(expected, abs=1e-6)
    assert output.num_invalid == 1 and output.num_groups == 5
    assert output.advantages[8] == 0  # a lone completion has no baseline


@pytest.mark.parametrize("baseline", [False, True])
def test_reinforce_pp_normalises_over_the_whole_batch(baseline):
    valid = [i for i, reward in enumerate(REWARDS) if reward == reward]
    if baseline:  # REINFORCE++-Baseline: group mean first, then the batch std of what is left
        centred = {}
        for i in valid:
            members = _finite([REWARDS[j] for j in range(len(REWARDS)) if GROUPS[j] == GROUPS[i]])
            centred[i] = REWARDS[i] - sum(members) / len(members)
    else:  # REINFORCE++: batch mean and std of the rewards
        mean = sum(REWARDS[i] for i in valid) / len(valid)
        centred = {i: REWARDS[i] - mean for i in valid}
    scale = _pop_std(list(centred.values())) + 1e-4
    expected = [centred[i] / scale if i in centred else 0.0 for i in range(len(REWARDS))]
    output = reinforce_pp_advantages(torch.tensor(REWARDS), torch.tensor(GROUPS), baseline=baseline, eps=1e-4)
    assert output.advantages.tolist() == pytest.approx(expected, abs=1e-6)


def test_advantage_estimators_respect_clip():
    rewards, groups = torch.tensor(REWARDS), torch.tensor(GROUPS)
    assert rloo_advantages(rewards, groups, clip=0.5).advantages.abs().max() == pytest.approx(0.5)
    assert reinforce_pp_advantages(rewards, groups, clip=0.5).advantages.abs().max() == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------------
# entropy of the sampling distribution and the high-entropy threshold
# ------------------------------------------------------------------------------------------------------


def test_token_entropy_matches_the_definition_with_temperature_and_suppression():
    from gen_rl.vlm.rollout import token_log_probs

    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 3, 6, generator=generator, dtype=torch.float64)
    ids = torch.tensor([[0, 2, 2], [5, 4, 0]])
    temperature, suppressed = 0.7, [1, 3]
    log_probs, entropy = token_log_probs(logits, ids, temperature, suppressed, with_entropy=True)
    for n in range(2):
        for c in range(3):
            weights = [
                math.exp(float(logits[n, c, v]) / temperature) if v not in suppressed else 0.0
                for v in range(6)
            ]
            probs = [weight / sum(weights) for weight in weights]
            expected = -sum(p * math.log(p) for p in probs if p > 0)
            assert float(entropy[n, c]) == pytest.approx(expected, abs=1e-6)  # float32 maths
            assert float(log_probs[n, c]) == pytest.approx(math.log(probs[int(ids[n, c])]), abs=1e-5)


@pytest.mark.parametrize("fraction", [0.2, 0.5, 1.0])
def test_entropy_threshold_keeps_the_top_fraction(fraction):
    from gen_rl.vlm.objectives import entropy_threshold

    values = torch.randperm(50, generator=torch.Generator().manual_seed(1)).float()
    threshold = entropy_threshold(values, fraction)
    assert int((values >= threshold).sum()) == math.ceil(fraction * 50)
    assert entropy_threshold(torch.zeros(0), 0.2) == math.inf


# ------------------------------------------------------------------------------------------------------
# config: the new options are declared with the tables the loop looks up, and impossible ones are refused
# ------------------------------------------------------------------------------------------------------


def test_config_names_are_the_tables_names():
    from gen_rl.core.advantages import ADVANTAGE_ESTIMATORS
    from gen_rl.vlm import config
    from gen_rl.vlm.objectives import ADVANTAGE_FUNCTIONS

    assert set(config.LOSS_NAMES) == set(LOSS_MODES)
    assert config.LOSS_AGGREGATIONS == AGGREGATIONS
    assert config.ADVANTAGE_ESTIMATORS == ADVANTAGE_ESTIMATORS == ("grpo", *ADVANTAGE_FUNCTIONS)
    assert config.VLMConfig().sample.mask_truncated is True  # truncated completions are masked by default


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.loss_aggregation=mean"], "algorithm.loss_aggregation"),
        (["reward.advantage_estimator=ppo"], "reward.advantage_estimator"),
        (["reward.advantage_estimator=rloo", "reward.combine=normalize_then_sum"], "reward.combine"),
        (["reward.advantage_estimator=rloo", "reward.std_mode=group"], "reward.std_mode"),
        (["algorithm.dual_clip=0.5"], "algorithm.dual_clip"),
        (["algorithm.dual_clip=3", "algorithm.name=sapo"], "algorithm.dual_clip"),
        (["algorithm.sapo_tau_neg=0"], "sapo_tau"),
        (["algorithm.top_entropy_fraction=0"], "algorithm.top_entropy_fraction"),
    ],
)
def test_impossible_objective_options_are_refused(overrides, message):
    from gen_rl.core.config import ConfigError, load_config
    from gen_rl.vlm.config import VLMConfig

    tiny = Path(__file__).resolve().parent.parent / "configs" / "vlm" / "tiny_colour_cpu.yaml"
    with pytest.raises(ConfigError, match=message):
        load_config(VLMConfig, tiny, overrides).validate()


# ------------------------------------------------------------------------------------------------------
# the trainer wires them: truncation masking, entropy logging, the estimators, the entropy gate
# ------------------------------------------------------------------------------------------------------

TINY = Path(__file__).resolve().parent.parent / "configs" / "vlm" / "tiny_colour_cpu.yaml"
SMALL = (
    "sample.groups_per_step=4", "sample.group_size=4", "train.num_steps=1", "log.progress=false",
    "log.log_completions=0", "reward.terms=[{name: vlm_distributed_worker:character_reward, weight: 1.0}]",
)  # fmt: skip


def _trainer(tmp_path, *overrides):
    from gen_rl.core.config import load_config
    from gen_rl.vlm.config import VLMConfig
    from gen_rl.vlm.trainer import VLMTrainer

    return VLMTrainer(load_config(VLMConfig, TINY, [f"log.output_dir={tmp_path}", *SMALL, *overrides]))


def _weights_after_update(trainer, scored):
    """Weights after one update from the trainer's current weights, which are then restored."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    start = {name: value.detach().clone() for name, value in model.named_parameters()}
    trainer.optimize(0, scored, None, None)
    after = {name: value.detach().clone() for name, value in model.named_parameters()}
    with torch.no_grad():
        for name, value in model.named_parameters():
            value.copy_(start[name])
    trainer.optimizer.state.clear()  # a fresh AdamW for the next call
    return after


def test_truncated_completions_contribute_no_loss(tmp_path):
    """mask_truncated (on by default): the advantages of completions without EOS cannot change the update."""
    trainer = _trainer(tmp_path, "sample.max_new_tokens=8", "sample.mask_truncated=true")
    scored = trainer.dynamic_sample(0)
    truncated = scored.rollout.is_truncated
    assert truncated.any() and not truncated.all()  # both kinds in the batch
    assert not trainer.loss_mask(scored)[truncated].any()
    reference = _weights_after_update(trainer, scored)

    scored.advantages = torch.where(truncated, torch.randn(len(truncated)) * 5, scored.advantages)
    changed_truncated = _weights_after_update(trainer, scored)
    for name, value in reference.items():
        torch.testing.assert_close(changed_truncated[name], value, rtol=0, atol=0)

    scored.advantages = torch.where(~truncated, -scored.advantages, scored.advantages)  # guard: others count
    changed_kept = _weights_after_update(trainer, scored)
    assert any(not torch.equal(changed_kept[name], value) for name, value in reference.items())


def test_entropy_is_logged_every_step_as_the_sampling_entropy(tmp_path):
    """policy/entropy: the mean entropy of the sampling distribution over every completion token."""
    trainer = _trainer(tmp_path, "sample.max_new_tokens=3")
    scored = trainer.dynamic_sample(0)
    _, entropies = trainer._no_grad_log_probs(trainer.model, scored.rollout, with_entropy=True)
    completion = scored.rollout.completion_mask
    expected = float(entropies[completion].mean())
    stats = trainer.update(scored, 0)  # the loop's update phase: its statistics go into the record unchanged
    assert stats["policy/entropy"] == pytest.approx(expected, rel=1e-5)
    vocabulary = trainer.accelerator.unwrap_model(trainer.model).config.get_text_config().vocab_size
    assert 0 < expected < math.log(vocabulary)


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_the_configured_advantage_estimator_reaches_the_batch(tmp_path, estimator):
    from gen_rl.core.advantages import reinforce_pp_advantages, rloo_advantages

    trainer = _trainer(tmp_path, "sample.max_new_tokens=3", f"reward.advantage_estimator={estimator}")
    scored = trainer.dynamic_sample(0)
    rewards, groups = scored.total_reward, scored.rollout.group_ids
    assert len(set(rewards.tolist())) > 1
    expected = {
        "rloo": lambda: rloo_advantages(rewards, groups),
        "reinforce_pp": lambda: reinforce_pp_advantages(rewards, groups, baseline=False),
        "reinforce_pp_baseline": lambda: reinforce_pp_advantages(rewards, groups, baseline=True),
    }[estimator]().advantages
    torch.testing.assert_close(scored.advantages, expected)


def test_entropy_gate_trains_the_top_fraction_of_loss_tokens(tmp_path):
    trainer = _trainer(tmp_path, "algorithm.top_entropy_fraction=0.2")
    entropy = torch.rand(6, 5, generator=torch.Generator().manual_seed(3))
    loss_mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(4)) < 0.7
    gate = trainer._entropy_gate(entropy, loss_mask)
    chosen = sorted(entropy[loss_mask].tolist(), reverse=True)[: math.ceil(0.2 * int(loss_mask.sum()))]
    assert sorted(entropy[gate.bool()].tolist(), reverse=True) == chosen
    assert not gate[~loss_mask].any()
    assert trainer._entropy_gate(None, loss_mask) is None
