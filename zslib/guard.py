"""The collapse guard: the signs that come before a GRPO collapse, read from the metrics after every step.

Users of the original report the same sequence before a run collapses: the policy's token entropy climbs,
responses grow, more of them leave the protocol's format, more groups score all alike (so carry no
gradient), the KL to the reference runs away, and validation EM falls from its best. ``signs`` checks each
against the profile's ``guard:`` bars; the trainer logs what it finds and, by ``guard.action``, stops or
goes back to the best-validated weights with a lower learning rate (``Trainer.step``).
"""

from __future__ import annotations

# (metric, what it is, the bar's field in guard:, "relative" or "absolute" rise, or "level")
WATCHED = (("entropy", "token entropy", "entropy_rise", "relative"),
           ("response_tokens", "response length", "length_rise", "relative"),
           ("invalid_action_rate", "invalid actions per turn", "invalid_rise", "absolute"),
           ("equal_reward_groups", "share of all-equal groups", "equal_groups_rise", "absolute"),
           ("kl", "KL to the reference", "kl_max", "level"))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def signs(metrics: list[dict], cfg) -> list[str]:
    """The signs of collapse in ``metrics`` (the steps since the run began or was last rolled back, oldest
    first), one sentence each; empty when none. A rise compares the mean of the last ``cfg.window`` steps
    with the first ``cfg.window`` (there must be both, not overlapping); a level, the last window's mean.
    Validation: the last validation EM against the best of those steps."""
    found = []
    w = cfg.window
    for key, name, bar_name, kind in WATCHED:
        values = [m[key] for m in metrics if m.get(key) is not None]
        bar = getattr(cfg, bar_name)
        if kind == "level":
            if len(values) >= w and _mean(values[-w:]) > bar:
                found.append(f"{name} {_mean(values[-w:]):.3f} over the last {w} steps, above {bar:g}")
            continue
        if len(values) < 2 * w:
            continue
        first, last = _mean(values[:w]), _mean(values[-w:])
        rise = (last - first) / max(abs(first), 1e-9) if kind == "relative" else last - first
        if rise > bar:
            by = f"{rise:+.0%}" if kind == "relative" else f"{rise:+.3f}"
            found.append(f"{name} rose from {first:.3f} to {last:.3f} ({by}; bar {bar:g})")
    validated = [(m["val_em"], m["step"]) for m in metrics if m.get("val_em") is not None]
    if validated:
        best, at = max(validated, key=lambda v: (v[0], -v[1]))
        drop = best - validated[-1][0]
        if drop > cfg.val_drop:
            found.append(f"validation EM {validated[-1][0]:.3f} at step {validated[-1][1]}, {drop:.3f} below its best "
                         f"{best:.3f} at step {at} (bar {cfg.val_drop:g})")
    return found


def decide(found: list[str], cfg, rollbacks: int) -> str:
    """What the trainer does about ``found``: ``none``, ``warn``, ``stop`` or ``rollback`` (a rollback past
    ``cfg.max_rollbacks`` becomes a stop)."""
    if not found or cfg.action == "off":
        return "none"
    if cfg.action == "rollback" and rollbacks >= cfg.max_rollbacks:
        return "stop"
    return cfg.action
