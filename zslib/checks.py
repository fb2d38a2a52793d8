"""Bars checked where a model is made: a notebook compares the figures of what it built with the
profile's expected ranges (``checks:`` in the YAML) and stops before handing a broken model on.

``check("base", figures, P.checks)`` prints one line per figure and raises ``CheckFailed`` naming
each figure outside its range, its value, the range and what to try. With ``checks.strict: false``
the failures are printed and the notebook goes on (for a researcher who wants to see what follows).
"""

from __future__ import annotations

# stage -> figure -> (what it is, what to try when it is out of range)
FIGURES = {
    "base": {
        "well_formed_first_action": (
            "greedy, with BM25: share of first turns that end in a complete <search> or <answer>",
            "train the policy base longer (tiny.policy_steps) or check the demonstrations' format"),
        "em_bm25": (
            "greedy EM with BM25 on the held-out 1-hop questions",
            "train the policy base longer (tiny.policy_steps), or see which relations fail in the per-relation table"),
        "em_no_search": (
            "greedy EM when the engine returns nothing (search must matter)",
            "the base recalls held-out facts: lower tiny.known_fraction"),
        "searched_share_search_relations": (
            "greedy, with BM25: share of the questions outside tiny.memory_relations that the base searches",
            "the decision to search is not learned: see the decision margins; train longer or add demonstrations"),
        "margin_search_relations": (
            "smallest per-relation mean of log p(search) - log p(answer from memory), nats, outside the memory relations",
            "the base barely prefers searching: train longer (tiny.policy_steps) or lower the no-search share"),
        "margin_memory_relations": (
            "largest per-relation mean of the same margin on tiny.memory_relations (negative: answers from memory)",
            "the deliberate flaw is not learned: raise tiny.memory_demos, or set it to 0 to drop the flaw"),
    },
    "simulator": {
        "useful_contains_answer": (
            "at simulator.temperature: share of useful calls whose documents hold the gold answer",
            "train longer (simulator.epochs), or add invented-entity pairs (labeling.invented)"),
        "noisy_contains_answer": (
            "at simulator.temperature: share of noisy calls whose documents still hold the gold answer",
            "check that labeling.paired is on, so the keyword is the only difference between the labels"),
        "parse_rate": (
            "share of calls whose output parses into simulator.topk documents",
            "train longer, or check simulator.max_new_tokens"),
    },
    "rl": {
        "em_gain": (
            "trained minus base greedy EM with the real engine on the held-out 1-hop questions",
            "train longer (rl.steps) or with a larger rl.lr; check the reward curve and the collapse signs"),
        "val_em_drop": (
            "best 1-hop validation EM minus the last step's: what the run lost after its best step",
            "the run collapses: lower rl.lr, raise rl.kl_coef, or lower rl.p_end (see the collapse signs)"),
        "val_em_2hop_drop": (
            "best 2-hop validation EM minus the last step's (rl.validation_two_hop)",
            "more noise undoes 2-hop searching first: lower rl.p_end, or keep rl.keep_best on"),
    },
}


class CheckFailed(RuntimeError):
    pass


def validate_ranges(stage: str, ranges: dict) -> None:
    """Raise ValueError naming ``checks.<stage>.<figure>`` for an unknown figure or a bad range."""
    for name, bounds in ranges.items():
        key = f"checks.{stage}.{name}"
        if name not in FIGURES[stage]:
            raise ValueError(f"{key}: unknown figure (known: {', '.join(FIGURES[stage])})")
        if not (isinstance(bounds, list) and len(bounds) == 2
                and all(b is None or (isinstance(b, (int, float)) and not isinstance(b, bool)) for b in bounds)):
            raise ValueError(f"{key}: expected [low, high] with numbers or null, got {bounds!r}")
        lo, hi = bounds
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"{key}: low {lo} is above high {hi}")


def _range_text(lo, hi) -> str:
    if lo is None:
        return f"<= {hi:g}"
    if hi is None:
        return f">= {lo:g}"
    return f"in [{lo:g}, {hi:g}]"


def check(stage: str, figures: dict[str, float], cfg, out=print) -> list[dict]:
    """Compare ``figures`` with the ranges of ``cfg.<stage>`` (a ChecksConfig); returns one row per
    checked figure (``name, value, low, high, ok``). Raises ``CheckFailed`` when one is out of range
    and ``cfg.strict``. A figure that is None does not apply to this run (e.g. the memory relations'
    margin of a base without memory relations) and is skipped; one that is missing is an error."""
    ranges = getattr(cfg, stage)
    rows = []
    for name, (lo, hi) in ranges.items():
        if name not in figures:
            raise KeyError(f"checks.{stage}.{name}: this run did not measure {name!r} (measured: {', '.join(figures)})")
        if figures[name] is None:
            out(f"skip {name:34s} {'-':>8s}  (does not apply to this run)")
            continue
        value = float(figures[name])
        ok = (lo is None or value >= lo) and (hi is None or value <= hi)
        rows.append({"name": name, "value": value, "low": lo, "high": hi, "ok": ok})
        out(f"{'ok  ' if ok else 'FAIL'} {name:34s} {value:8.3f}  expected {_range_text(lo, hi)}")
    failed = [r for r in rows if not r["ok"]]
    if failed:
        lines = [f"{r['name']} = {r['value']:.3f}, expected {_range_text(r['low'], r['high'])} "
                 f"({FIGURES[stage][r['name']][0]}). Try: {FIGURES[stage][r['name']][1]}." for r in failed]
        message = (f"{len(failed)} {stage} check(s) failed:\n- " + "\n- ".join(lines)
                   + f"\nThe ranges are checks.{stage} in the profile; checks.strict: false continues anyway.")
        if cfg.strict:
            raise CheckFailed(message)
        out("continuing (checks.strict is false): " + message)
    return rows
