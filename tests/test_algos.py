"""Every expected number here is computed by hand (or with plain Python / torch.distributions)."""
import math

import pytest
import torch

from zslib import algos

T = lambda rows: torch.tensor(rows, dtype=torch.float64)


def whiten_by_hand(xs):
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return [(x - mean) / math.sqrt(var + 1e-8) for x in xs]


def test_aggregations():
    values, mask = T([[1, 2, 3], [4, 5, 6]]), T([[1, 1, 0], [1, 0, 0]])
    assert algos.agg_loss(values, mask, "token-mean").item() == pytest.approx(7 / 3)
    assert algos.agg_loss(values, mask, "seq-mean-token-sum").item() == pytest.approx((3 + 4) / 2)
    assert algos.agg_loss(values, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4) / 2)
    with pytest.raises(ValueError, match="agg"):
        algos.agg_loss(values, mask, "sum")


def test_micro_batches_divided_by_the_mini_batch_counts_add_up_to_the_mini_batch():
    """Rows split into micro-batches, each total divided by the whole mini-batch's count: the parts
    add up to the mini-batch's aggregate (not a mean of the parts' own aggregates)."""
    values, mask = T([[1, 2, 3], [4, 5, 6]]), T([[1, 1, 0], [1, 0, 0]])
    for mode, parts, whole in [("token-mean", (3 / 3, 4 / 3), 7 / 3),           # 3 mask-1 tokens
                               ("seq-mean-token-sum", (3 / 2, 4 / 2), 7 / 2),   # 2 rows
                               ("seq-mean-token-mean", (1.5 / 2, 4 / 2), 5.5 / 2)]:
        counts = algos.Counts.of(mask, mode)
        got = [algos.agg_loss(values[i:i + 1], mask[i:i + 1], mode, counts.loss).item() for i in (0, 1)]
        assert got == pytest.approx(parts) and sum(got) == pytest.approx(whole)
    assert algos.Counts.of(mask, "seq-mean-token-sum") == algos.Counts(loss=2, tokens=3)


def test_last_token_scores():
    mask = T([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
    rewards = algos.last_token_scores(T([2, 3, 4]), mask)
    assert rewards.tolist() == [[0, 0, 0, 2, 0], [0, 0, 0, 0, 0], [4, 0, 0, 0, 0]]


def test_grpo_groups_single_rows_equal_scores_and_masked_turns():
    scores = T([1, 0, 1, 1, 0.5, 0.5])
    groups = torch.tensor([0, 0, 1, 2, 3, 3])
    mask = T([[1, 0, 1]] * 6)  # the middle token is an <information> token between two turns
    adv = algos.grpo_advantages(scores, groups, mask)
    s = math.sqrt(0.5)  # unbiased std of {1, 0}
    expected = [0.5 / (s + 1e-6), -0.5 / (s + 1e-6), 1 / (1 + 1e-6), 1 / (1 + 1e-6), 0.0, 0.0]
    for row, e in zip(adv.tolist(), expected):
        assert row == pytest.approx([e, 0.0, e])
    no_std = algos.grpo_advantages(scores, groups, mask, norm_by_std=False)
    assert no_std[:, 0].tolist() == pytest.approx([0.5, -0.5, 1, 1, 0, 0])


def test_discounted_returns_pass_through_masked_tokens():
    rewards, mask = T([[0, 0, 0, 0, 1]]), T([[1, 1, 0, 0, 1]])
    assert algos.discounted_returns(rewards, mask, gamma=0.5).tolist() == [[0.25, 0.5, 0, 0, 1]]
    assert algos.discounted_returns(rewards, mask, gamma=1.0).tolist() == [[1, 1, 0, 0, 1]]


def test_reinforce_pp_whitens_over_the_batch_mask():
    rewards = T([[0, 0, 0, 0, 1], [0, 2, 0, 0, 0]])
    mask = T([[1, 1, 0, 0, 1], [1, 1, 0, 0, 0]])
    adv = algos.reinforce_pp_advantages(rewards, mask, gamma=0.5)
    w = whiten_by_hand([0.25, 0.5, 1, 1, 2])  # returns on mask-1 tokens, row by row
    assert adv.tolist()[0] == pytest.approx([w[0], w[1], 0, 0, w[2]])
    assert adv.tolist()[1] == pytest.approx([w[3], w[4], 0, 0, 0])


def test_reinforce_pp_baseline():
    adv = algos.reinforce_pp_baseline_advantages(T([1, 0]), torch.tensor([0, 0]), T([[1, 1], [1, 0]]))
    w = whiten_by_hand([0.5, 0.5, -0.5])
    assert adv.flatten().tolist() == pytest.approx([w[0], w[1], w[2], 0])


def test_gae_skips_observation_tokens():
    values, mask, rewards = T([[0.5, 0.2, 0.9, 0.4]]), T([[1, 0, 0, 1]]), T([[0, 0, 0, 1]])
    adv, returns = algos.gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    # t=3: delta = 1 - 0.4 = 0.6; t=0: delta = 0.4 - 0.5 = -0.1, gae = -0.1 + 0.6 = 0.5
    assert returns[0].tolist() == pytest.approx([1.0, 0, 0, 1.0])
    w = whiten_by_hand([0.5, 0.6])
    assert adv[0].tolist() == pytest.approx([w[0], 0, 0, w[1]])
    _, returns = algos.gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=0: delta = 0.9 * 0.4 - 0.5 = -0.14, gae = -0.14 + 0.72 * 0.6 = 0.292, return = 0.292 + 0.5
    assert returns[0].tolist() == pytest.approx([0.792, 0, 0, 1.0])


def test_policy_loss_clip_and_dual_clip():
    old = T([[0.0, 0.0, 0.0, 0.0]])
    logprobs = T([[0.5, 1.5, -0.5, 3.0]])
    adv = T([[1.0, -1.0, -2.0, 5.0]])
    mask = T([[1, 1, 1, 0]])
    loss, stats = algos.policy_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2, clip_c=3.0)
    # a: max(-e^0.5, -1.2) = -1.2 (clipped); b: max(e^1.5, 1.2) = 4.48 -> dual clip 3;
    # c: max(2 e^-0.5, 2 * 0.8) = 1.6 (clipped), below the dual bound 6
    assert loss.item() == pytest.approx((-1.2 + 3.0 + 1.6) / 3)
    assert stats["clip_frac"] == pytest.approx(2 / 3)
    assert stats["approx_kl"] == pytest.approx(-(0.5 + 1.5 - 0.5) / 3)
    loss_hi, _ = algos.policy_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert loss_hi.item() == pytest.approx((-1.28 + 3.0 + 1.6) / 3)


def test_masked_tokens_get_no_gradient():
    torch.manual_seed(0)
    logprobs = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    old, ref, adv = torch.randn(2, 6).double(), torch.randn(2, 6).double(), torch.randn(2, 6).double()
    mask = T([[1, 1, 0, 0, 1, 1], [1, 0, 0, 1, 1, 0]])  # zeros: an <information> block, padding
    def total(lp):
        pg, _ = algos.policy_loss(lp, old, adv, mask)
        return pg + 0.1 * algos.agg_loss(algos.kl_penalty(lp, ref, "low_var_kl"), mask)
    total(logprobs).backward()
    grad = logprobs.grad.clone()
    assert torch.all(grad[mask == 0] == 0) and torch.any(grad[mask == 1] != 0)
    perturbed = logprobs.detach().clone()
    perturbed[mask == 0] += 7.0  # what the policy "thinks" of the documents must not matter
    perturbed.requires_grad_(True)
    total(perturbed).backward()
    assert torch.equal(perturbed.grad, grad)


def test_value_loss_clip():
    values, old, returns, mask = T([[0.5, 2.0, 9.0]]), T([[0.0, 0.0, 0.0]]), T([[1.0, 1.0, 0.0]]), T([[1, 1, 0]])
    # token 1: both 0.25 -> 0.125; token 2: max((2-1)^2, (0.5-1)^2) = 1 -> 0.5
    assert algos.value_loss(values, old, returns, mask, clip=0.5).item() == pytest.approx((0.125 + 0.5) / 2)


def test_rloo_baseline_is_the_mean_of_the_other_rollouts_of_the_group():
    scores = T([1.0, 0.0, 0.0, 1.0, 0.5, 2.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    mask = T([[1, 1, 0]] * 6)
    adv = algos.rloo_advantages(scores, groups, mask)
    # group 0: 1 - (0 + 0)/2 = 1, 0 - (1 + 0)/2 = -0.5 twice; group 1: 1 - 0.5, 0.5 - 1; a group of one: baseline 0
    expected = T([1.0, -0.5, -0.5, 0.5, -0.5, 2.0])
    assert torch.allclose(adv, expected[:, None] * mask)
    advantages, returns = algos.ALGORITHMS["rloo"].advantages(scores, groups, mask, None, None)
    assert torch.equal(advantages, adv) and returns is None and not algos.ALGORITHMS["rloo"].needs_critic


def test_kl_estimators():
    lp, ref = T([math.log(0.5)]), T([math.log(0.25)])
    d = math.log(2)
    assert algos.kl_penalty(lp, ref, "k1").item() == pytest.approx(d)
    assert algos.kl_penalty(ref, lp, "abs").item() == pytest.approx(d)
    assert algos.kl_penalty(lp, ref, "k2").item() == pytest.approx(0.5 * d * d)
    assert algos.kl_penalty(lp, ref, "k3").item() == pytest.approx(0.5 + d - 1)
    assert algos.kl_penalty(T([0.0]), T([-30.0]), "low_var_kl").item() == 10.0  # clamps: e^-20 + 20 - 1 -> 10
    with pytest.raises(ValueError, match="rl.kl_kind must be one of k1, abs, k2, k3, low_var_kl, not .k4."):
        algos.kl_penalty(lp, ref, "k4")


def test_entropy_matches_torch_distributions():
    logits = torch.randn(3, 5, 11, dtype=torch.float64)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.allclose(algos.entropy_from_logits(logits), expected)
    assert algos.entropy_from_logits(torch.zeros(1, 4)).item() == pytest.approx(math.log(4))


def test_truncated_importance_weights_by_hand():
    """w = min(pi_old / pi_rollout, cap); a token the engine did not sample (NaN) keeps weight 1."""
    old = torch.log(torch.tensor([[0.3, 0.1, 0.4]]))
    rollout = torch.log(torch.tensor([[0.1, 0.2, float("nan")]]))
    w = algos.truncated_is_weights(old, rollout, cap=2.0)
    assert w[0].tolist() == pytest.approx([2.0, 0.5, 1.0])  # 0.3/0.1 = 3 capped at 2; 0.1/0.2; unknown
    adv, mask = torch.ones(1, 3), torch.ones(1, 3)
    plain, _ = algos.policy_loss(old, old, adv, mask)  # ratio 1: L = -A = -1 per token
    weighted, _ = algos.policy_loss(old, old, adv, mask, weights=w)
    assert plain.item() == pytest.approx(-1.0) and weighted.item() == pytest.approx(-(2.0 + 0.5 + 1.0) / 3)
