"""The noise curriculum (docs/method.md §7): the share of search calls served noisy documents rises
over training, from easy (mostly useful documents) to hard.

    p_i = p_s + (b^(i/m) - 1) / (b - 1) * (p_e - p_s),   i = 1..m

``b`` above 1 keeps p low for longer and rises late; ``b == 1`` is the linear limit. A constant
schedule (always ``p_end``) and a reversed one (the exponential backwards: noisy first) are there for
ablations.
"""

from __future__ import annotations

import torch

from .registry import Registry

def _linear(fraction: float, p_start: float, p_end: float, base: float) -> float:
    return p_start + fraction * (p_end - p_start)


def _exponential(fraction: float, p_start: float, p_end: float, base: float) -> float:
    if base == 1:  # the formula's limit
        return _linear(fraction, p_start, p_end, base)
    return p_start + (base ** fraction - 1) / (base - 1) * (p_end - p_start)


# ``rl.curriculum``: the noise probability at ``fraction`` = step / total of the run, from
# ``(fraction, p_start, p_end, base)``.
SCHEDULES = Registry("rl.curriculum", {
    "exp": _exponential,
    "linear": _linear,
    "constant": lambda fraction, p_start, p_end, base: p_end,
    # the exponential run backwards: noisy first, easing to p_start (an ablation: hard-to-easy)
    "reversed": lambda fraction, p_start, p_end, base: _exponential(1 - fraction, p_start, p_end, base),
})


def noise_probability(step: int, total_steps: int, p_start: float = 0.0, p_end: float = 0.5,
                      base: float = 4.0, schedule: str = "exp") -> float:
    """The probability that a search call at ``step`` (counted from 1) gets noisy documents."""
    if not 1 <= step <= total_steps:
        raise ValueError(f"step must be in 1..{total_steps} (it counts from 1), got {step}")
    if base <= 0:
        raise ValueError(f"rl.base must be above 0, not {base}")
    return SCHEDULES[schedule](step / total_steps, p_start, p_end, base)


def draw_noisy(n_calls: int, probability: float, generator: torch.Generator) -> list[bool]:
    """One independent draw per search call; all documents of a call share its quality."""
    return (torch.rand(n_calls, generator=generator) < probability).tolist()
