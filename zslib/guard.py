"""The collapse guard: the signs that come before a GRPO collapse, read from the metrics after every step.

Users of the original report the same sequence before a run collapses: the policy's token entropy climbs,
responses grow, more of them leave the protocol's format, more groups score all alike (so carry no
gradient), the KL to the reference runs away, and validation EM falls from its best. A collapse within the
first steps looks different (the tiny profile at 100 times its learning rate): the entropy falls to nothing,
most turns leave the format at once, and the KL runs away. ``signs`` checks each
against the profile's ``guard:`` bars; the trainer logs what it finds and, by ``guard.action``, stops or
goes back to the best-validated weights with a lower learning rate (``Trainer.step``).
"""

from __future__ import annotations

# (metric, what it is, the bar's field in guard:, "relative" or "absolute" rise, relative "fall", or "level").
# The levels and the fall catch a collapse within the first window, which no rise can show (docs/results.md,
# issue 28: the tiny profile at 100 times its learning rate).
WATCHED = (("entropy", "token entropy", "entropy_rise", "relative"),
           ("entropy", "token entropy", "entropy_fall", "fall"),
           ("response_tokens", "response length", "length_rise", "relative"),
           ("invalid_action_rate", "invalid actions per turn", "invalid_rise", "absolute"),
           ("invalid_action_rate", "invalid actions per turn", "invalid_max", "level"),
           ("equal_reward_groups", "share of all-equal groups", "equal_groups_rise", "absolute"),
           ("kl", "KL to the reference", "kl_max", "level"))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def statistics(metrics: list[dict], cfg) -> dict[str, tuple[float, str]]:
    """What each bar is compared with, on ``metrics`` as they stand (the steps since the run began or was last
    rolled back, oldest first): ``{bar field: (value, the sentence a sign prints)}``; a figure without enough
    steps yet is absent. A rise or a fall compares the mean of the last ``cfg.window`` steps with the first
    ``cfg.window`` (there must be both, not overlapping); a level is the last window's mean. Validation: the last
    validation EM against the best of those steps."""
    out = {}
    w = cfg.window
    for key, name, bar_name, kind in WATCHED:
        values = [m[key] for m in metrics if m.get(key) is not None]
        bar = getattr(cfg, bar_name)
        if kind == "level":
            if len(values) >= w:
                level = _mean(values[-w:])
                out[bar_name] = (level, f"{name} {level:.3f} over the last {w} steps, above {bar:g}")
            continue
        if len(values) < 2 * w:
            continue
        first, last = _mean(values[:w]), _mean(values[-w:])
        if kind == "fall":
            fall = (first - last) / max(abs(first), 1e-9)
            out[bar_name] = (fall, f"{name} fell from {first:.3f} to {last:.3f} ({-fall:+.0%}; bar {bar:g})")
            continue
        rise = (last - first) / max(abs(first), 1e-9) if kind == "relative" else last - first
        by = f"{rise:+.0%}" if kind == "relative" else f"{rise:+.3f}"
        out[bar_name] = (rise, f"{name} rose from {first:.3f} to {last:.3f} ({by}; bar {bar:g})")
    validated = [(m["val_em"], m["step"]) for m in metrics if m.get("val_em") is not None]
    if validated:
        best, at = max(validated, key=lambda v: (v[0], -v[1]))
        drop = best - validated[-1][0]
        out["val_drop"] = (drop, f"validation EM {validated[-1][0]:.3f} at step {validated[-1][1]}, {drop:.3f} below "
                                 f"its best {best:.3f} at step {at} (bar {cfg.val_drop:g})")
    return out


def signs(metrics: list[dict], cfg) -> list[str]:
    """The signs of collapse in ``metrics`` (as ``statistics`` reads them), one sentence each; empty when none."""
    return [text for bar_name, (value, text) in statistics(metrics, cfg).items() if value > getattr(cfg, bar_name)]


def peaks(metrics: list[dict], cfg) -> dict[str, dict]:
    """How close a run came to each bar: checked after every step as the trainer does, each figure's largest
    value (``peak``, at step ``at``) and the first step it passed its bar (``over``, None if never).
    ``metrics`` is one watch: a run with guard.action off or warn, or the steps after its last rollback."""
    out: dict[str, dict] = {}
    for i in range(1, len(metrics) + 1):
        step = metrics[i - 1]["step"]
        for bar_name, (value, _) in statistics(metrics[:i], cfg).items():
            p = out.setdefault(bar_name, {"peak": value, "at": step, "over": None})
            if value > p["peak"]:
                p.update(peak=value, at=step)
            if p["over"] is None and value > getattr(cfg, bar_name):
                p["over"] = step
    return out


def decide(found: list[str], cfg, rollbacks: int) -> str:
    """What the trainer does about ``found``: ``none``, ``warn``, ``stop`` or ``rollback`` (a rollback past
    ``cfg.max_rollbacks`` becomes a stop)."""
    if not found or cfg.action == "off":
        return "none"
    if cfg.action == "rollback" and rollbacks >= cfg.max_rollbacks:
        return "stop"
    return cfg.action
