"""RL algorithms as pure tensor functions (docs/method.md §9, verl's conventions).

Shapes are ``[batch, tokens]`` over the response, with ``mask`` (the loss mask) of the same shape:
1 on tokens the policy generated, 0 on everything else (``<information>`` blocks, invalid-action
messages, padding). A sequence's score sits on its last mask-1 token.

Each choice a profile makes here is a registry, name -> implementation, checked when the profile
loads: ``ALGORITHMS`` (``rl.algorithm``), ``AGGREGATIONS`` (``rl.agg``) and ``KL_KINDS``
(``rl.kl_kind``). A new algorithm is a function of scores and an entry in ``ALGORITHMS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .registry import Registry


class Aggregation(NamedTuple):
    """How per-token losses become one number: ``total(values, mask) / count(mask)``. Kept apart so
    that a micro-batch divides its total by its whole mini-batch's count: the micro-batches' losses
    then add up to the mini-batch's exactly, whatever the mode."""
    total: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    count: Callable[[torch.Tensor], float]


AGGREGATIONS = Registry("rl.agg", {
    "token-mean": Aggregation(lambda v, m: (v * m).sum(), lambda m: m.sum().item()),
    "seq-mean-token-sum": Aggregation(lambda v, m: (v * m).sum(), lambda m: m.shape[0]),
    "seq-mean-token-mean": Aggregation(lambda v, m: ((v * m).sum(-1) / m.sum(-1).clamp(min=1)).sum(),
                                       lambda m: m.shape[0]),
})


def agg_loss(values: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
             count: float | None = None) -> torch.Tensor:
    """Reduce per-token losses to a scalar over mask-1 tokens (``AGGREGATIONS``). ``count``: the
    denominator of the whole mini-batch (``Counts``) when ``values`` are one micro-batch of it."""
    agg, mask = AGGREGATIONS[mode], mask.to(values.dtype)
    return agg.total(values, mask) / max(agg.count(mask) if count is None else count, 1)


@dataclass(frozen=True)
class Counts:
    """A mini-batch's denominators: ``loss`` for the profile's aggregation, ``tokens`` (its mask-1
    tokens) for the token-mean statistics."""
    loss: float
    tokens: float

    @staticmethod
    def of(mask: torch.Tensor, mode: str) -> "Counts":
        mask = mask.float()
        return Counts(AGGREGATIONS[mode].count(mask), mask.sum().item())


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over mask-1 entries (unbiased variance); 0 elsewhere."""
    mask = mask.to(values.dtype)
    n = mask.sum()
    mean = (values * mask).sum() / n
    var = (((values - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def last_token_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token rewards: each sequence's score on its last mask-1 token, 0 elsewhere."""
    rewards = torch.zeros_like(mask, dtype=scores.dtype)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).max(-1).values
    rows = torch.nonzero(last >= 0).squeeze(-1)
    rewards[rows, last[rows]] = scores[rows]
    return rewards


def _group_stats(scores: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, its group's mean and unbiased std; a group of one has mean 0 and std 1."""
    mean, std = torch.zeros_like(scores), torch.ones_like(scores)
    for g in torch.unique(group_ids):
        rows = group_ids == g
        if rows.sum() > 1:
            mean[rows] = scores[rows].mean()
            std[rows] = scores[rows].std()
    return mean, std


def grpo_advantages(scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor,
                    norm_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (s_i - mean_g) / (std_g + eps), the same on every mask-1 token of sequence i."""
    mean, std = _group_stats(scores, group_ids)
    adv = scores - mean
    if norm_by_std:
        adv = adv / (std + eps)
    return adv.unsqueeze(-1) * mask.to(scores.dtype)


def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RLOO: A_i = s_i - (sum of the other scores of its group) / (n_g - 1), the same on every mask-1
    token of sequence i; each rollout's baseline is its group without it. A group of one has baseline 0."""
    adv = scores.clone()
    for g in torch.unique(group_ids):
        rows = group_ids == g
        n = int(rows.sum())
        if n > 1:
            adv[rows] = scores[rows] - (scores[rows].sum() - scores[rows]) / (n - 1)
    return adv.unsqueeze(-1) * mask.to(scores.dtype)


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Returns scanned backwards over mask-1 tokens; a mask-0 token stores 0 and passes the
    running return through unchanged (resetting it there was a bug in older verl)."""
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    m = mask.to(token_rewards.dtype)
    for t in reversed(range(token_rewards.shape[1])):
        updated = token_rewards[:, t] + gamma * running
        running = m[:, t] * updated + (1 - m[:, t]) * running
        returns[:, t] = running * m[:, t]
    return returns


def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++: discounted returns, whitened over every mask-1 token of the batch."""
    return masked_whiten(discounted_returns(token_rewards, mask, gamma), mask)


def reinforce_pp_baseline_advantages(scores: torch.Tensor, group_ids: torch.Tensor,
                                     mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE++-baseline: s_i - mean_g on every mask-1 token, then batch whitening."""
    mean, _ = _group_stats(scores, group_ids)
    return masked_whiten((scores - mean).unsqueeze(-1) * mask.to(scores.dtype), mask)


def gae_advantages(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                   gamma: float = 1.0, lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation that steps over mask-0 tokens (their value and advantage
    are skipped, not reset). Returns (whitened advantages, returns = raw advantages + values)."""
    m = mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])
    last_gae = torch.zeros_like(values[:, 0])
    raw = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        gae = delta + gamma * lam * last_gae
        next_value = m[:, t] * values[:, t] + (1 - m[:, t]) * next_value
        last_gae = m[:, t] * gae + (1 - m[:, t]) * last_gae
        raw[:, t] = last_gae
    returns = (raw + values) * m
    return masked_whiten(raw, mask), returns


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2, clip_c: float = 3.0,
                agg: str = "token-mean", counts: Counts | None = None,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate with the dual clip for negative advantages.

    L = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)); for A < 0, L = min(L, -A c).
    Returns (loss, {"clip_frac", "approx_kl"}) with the statistics over mask-1 tokens; ``counts``:
    the mini-batch's, when these rows are one micro-batch of it; ``weights``: per-token factors on L
    (``truncated_is_weights``), without gradient.
    """
    counts = counts or Counts.of(mask, agg)
    log_ratio = torch.clamp(logprobs - old_logprobs, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * clip_c), loss)
    if weights is not None:
        loss = loss * weights
    stats = {"clip_frac": agg_loss((clipped > unclipped).float(), mask, count=counts.tokens).item(),
             "approx_kl": agg_loss(-log_ratio, mask, count=counts.tokens).item()}
    return agg_loss(loss, mask, agg, counts.loss), stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.5, agg: str = "token-mean", counts: Counts | None = None) -> torch.Tensor:
    """½ max((v - R)², (clip(v, v_old ± clip) - R)²), aggregated over mask-1 tokens."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return agg_loss(loss, mask, agg, None if counts is None else counts.loss)


def truncated_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling for the rollout/trainer mismatch: the inference engine sampled
    from pi_rollout, whose numbers differ from the trainer's pi_old (other kernels, precision), so each
    token's loss is weighted by w = min(pi_old / pi_rollout, cap). NaN rollout log-probs (tokens the
    engine did not sample) get weight 1."""
    w = torch.clamp(torch.exp(torch.clamp(old_logprobs - rollout_logprobs, -20.0, 20.0)), max=cap)
    return torch.where(torch.isnan(rollout_logprobs), torch.ones_like(w), w).detach()


def _low_var_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    x = torch.clamp(ref_logprobs - logprobs, -20.0, 20.0)
    return torch.clamp(torch.exp(x) - x - 1, -10.0, 10.0)


# Per-token KL estimates to the reference: ``(logprobs, ref_logprobs) -> [batch, tokens]``.
KL_KINDS = Registry("rl.kl_kind", {
    "k1": lambda lp, ref: lp - ref,
    "abs": lambda lp, ref: (lp - ref).abs(),
    "k2": lambda lp, ref: 0.5 * (lp - ref) ** 2,
    "k3": _low_var_kl,
    "low_var_kl": _low_var_kl,
})


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "low_var_kl") -> torch.Tensor:
    """Per-token KL estimate to the reference (added to the loss with a plus sign), by ``KL_KINDS``."""
    return KL_KINDS[kind](logprobs, ref_logprobs)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) z, per position."""
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


# ---------------------------------------------------------------- the algorithms

@dataclass(frozen=True)
class Algorithm:
    """An RL algorithm as the trainer runs it: ``advantages(scores, group_ids, mask, values, cfg)``
    returns ``(advantages [batch, tokens], returns or None)``, where ``values`` are the critic's (None
    without one) and ``cfg`` is the profile's ``rl`` section; ``needs_critic``: the trainer builds a
    value model and trains it on the returns."""
    advantages: Callable[..., tuple]
    needs_critic: bool = False


ALGORITHMS = Registry("rl.algorithm", {
    "grpo": Algorithm(lambda scores, groups, mask, values, cfg:
                      (grpo_advantages(scores, groups, mask, norm_by_std=cfg.norm_by_std), None)),
    "rloo": Algorithm(lambda scores, groups, mask, values, cfg: (rloo_advantages(scores, groups, mask), None)),
    "reinforce_pp": Algorithm(lambda scores, groups, mask, values, cfg:
                              (reinforce_pp_advantages(last_token_scores(scores, mask), mask, cfg.gamma), None)),
    "reinforce_pp_baseline": Algorithm(lambda scores, groups, mask, values, cfg:
                                       (reinforce_pp_baseline_advantages(scores, groups, mask), None)),
    "ppo": Algorithm(lambda scores, groups, mask, values, cfg:
                     gae_advantages(last_token_scores(scores, mask), values, mask, cfg.gamma, cfg.lam),
                     needs_critic=True),
})
