"""Matplotlib figures the notebooks show; each reads plain dicts or JSONL logs."""

from __future__ import annotations

from collections import Counter

import matplotlib.pyplot as plt


def loss_curves(logs: dict[str, list[dict]], smooth: int = 20):
    """Pretraining loss per step (moving average over ``smooth`` steps), one line per model;
    dotted lines mark where a phase begins."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, rows in logs.items():
        steps = [r["step"] for r in rows]
        loss = [r["loss"] for r in rows]
        line, = ax.plot(steps, _moving_average(loss, smooth), label=name)
        starts = [r["step"] for prev, r in zip(rows, rows[1:]) if r.get("phase") != prev.get("phase")]
        for x in starts:  # where a new pretraining phase begins (e.g. after the copy warm-up)
            ax.axvline(x, color=line.get_color(), linestyle=":", alpha=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def question_stats(splits: dict[str, list[dict]]):
    """Questions per split, stacked by relation (1-hop) and 2-hop."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    kinds = sorted({r["relation"] if r["hops"] == 1 else "2-hop" for rows in splits.values() for r in rows})
    bottom = [0] * len(splits)
    for i, kind in enumerate(kinds):
        counts = [Counter(r["relation"] if r["hops"] == 1 else "2-hop" for r in rows)[kind] for rows in splits.values()]
        ax.bar(list(splits), counts, bottom=bottom, label=kind, color=plt.cm.tab20(i % 20))
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_ylabel("questions")
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    return fig


def score_bars(results: dict[str, dict], metrics=("em", "f1", "well_formed_first_action")):
    """Grouped bars: one group per setting, one bar per metric (fractions in 0..1)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(metrics)
    for j, m in enumerate(metrics):
        ax.bar([i + j * width for i in range(len(results))], [r[m] for r in results.values()], width, label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(results))], list(results), fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    return fig


def collection_summary(records: list[dict]):
    """Trajectories by number of searches, split into right (F1 >= 0.5) and wrong answers."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    most = max((len(r["calls"]) for r in records), default=0)
    searches = list(range(most + 1))
    right = [sum(len(r["calls"]) == n and r["f1"] >= 0.5 for r in records) for n in searches]
    wrong = [sum(len(r["calls"]) == n and r["f1"] < 0.5 for r in records) for n in searches]
    ax.bar(searches, right, label="right (F1 >= 0.5)", color="tab:green")
    ax.bar(searches, wrong, bottom=right, label="wrong", color="tab:red")
    ax.set_xlabel("searches in the trajectory")
    ax.set_ylabel("trajectories")
    ax.set_xticks(searches)
    ax.legend()
    fig.tight_layout()
    return fig


def label_stats(stats: dict):
    """Pairs per source and label, from ``labeling.statistics``."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    items = stats["by_source"]
    colors = ["tab:green" if key.endswith("/useful") else "tab:red" for key in items]
    ax.barh(list(items), list(items.values()), color=colors)
    ax.set_xlabel("pairs")
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


def _moving_average(values: list[float], window: int, centered: bool = False) -> list[float]:
    """Mean over the last ``window`` values, or over a window centred on each value (no lag)."""
    back = window // 2 if centered else window - 1
    ahead = window - 1 - back if centered else 0
    return [sum(values[max(0, i - back):i + ahead + 1]) / len(values[max(0, i - back):i + ahead + 1])
            for i in range(len(values))]


def noise_schedule(metrics: list[dict], scheduled, smooth: int = 10):
    """The curriculum's noise probability per step (``scheduled(step)`` over the whole run) with
    the realised share of noisy search calls on top (moving average over ``smooth`` steps)."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    total = max((m["step"] for m in metrics), default=1)
    steps = list(range(1, total + 1))
    ax.plot(steps, [scheduled(s) for s in steps], label="scheduled p(step)", color="black")
    steps_run, shares = [m["step"] for m in metrics], [m["noisy_share"] for m in metrics]
    ax.scatter(steps_run, shares, s=8, color="tab:red", alpha=0.35, label="realised noisy share per step")
    ax.plot(steps_run, _moving_average(shares, smooth, centered=True),
            label=f"realised, centred {smooth}-step mean", color="tab:red")
    ax.set_xlabel("RL step")
    ax.set_ylabel("share of noisy calls")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def rl_curves(runs: dict[str, list[dict]], panels=(("reward_mean", "em", "f1"), ("val_em",), ("searches_per_answer",),
                                                   ("kl", "entropy")), smooth: int = 10, titles: dict | None = None):
    """One panel per group of metric keys, one line per (run, key): moving averages over steps for
    keys logged every step, raw points for keys logged every few steps (validation). Panels whose
    keys no run logged are left out. ``titles`` maps a panel's keys (a tuple) to its title; the
    default title is the keys."""
    panels = [keys for keys in panels if any(key in m for metrics in runs.values() for m in metrics for key in keys)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, keys in zip(axes[0], panels):
        for name, metrics in runs.items():
            for key in keys:
                logged = [m for m in metrics if key in m]
                if not logged:
                    continue
                label = key if len(runs) == 1 else f"{name}: {key}"
                values = [m[key] for m in logged]
                every_step = len(logged) == len(metrics)
                ax.plot([m["step"] for m in logged], _moving_average(values, smooth) if every_step else values,
                        label=label, marker=None if every_step else "o")
        ax.set_xlabel("RL step")
        ax.set_title((titles or {}).get(tuple(keys), ", ".join(keys)), fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


COLLAPSE_PANELS = {("entropy",): "entropy (nats per policy token)", ("kl",): "KL to the reference",
                   ("invalid_action_rate",): "invalid actions per turn", ("response_tokens",): "response tokens",
                   ("equal_reward_groups",): "groups with all rewards equal"}


def collapse_signs(runs: dict[str, list[dict]], smooth: int = 5):
    """The signs of a collapsing RL run, one panel each: entropy, KL, invalid-action rate, response
    length and the share of groups whose rollouts all scored the same (no GRPO signal)."""
    return rl_curves(runs, panels=tuple(COLLAPSE_PANELS), smooth=smooth, titles=COLLAPSE_PANELS)


def masked_tokens_html(tokenizer, token_ids: list[int], loss_mask: list[int]) -> str:
    """A trajectory as HTML: tokens with loss (the policy's own) in black, mask-0 tokens (prompt,
    <information> blocks, invalid-action messages) greyed out."""
    import html

    spans, start = [], 0
    for i in range(1, len(token_ids) + 1):  # decode runs of equal mask, so multi-byte characters stay whole
        if i == len(token_ids) or loss_mask[i] != loss_mask[start]:
            text = html.escape(tokenizer.decode(token_ids[start:i]))
            style = "color:#000;font-weight:600" if loss_mask[start] else "color:#aaa"
            spans.append(f'<span style="{style}">{text}</span>')
            start = i
    return '<pre style="white-space:pre-wrap;font-size:11px">' + "".join(spans) + "</pre>"


def decision_margins(by_relation: dict[str, dict]):
    """The policy base's first decision per relation (``tiny.evaluate_base``): mean margin
    log p(search) - log p(answer from memory) in nats, memory relations in orange, with the range
    of single questions as a line; the greedy searched share is in each relation's label."""
    names = list(by_relation)
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(names) + 1.4))
    for i, name in enumerate(names):
        r = by_relation[name]
        color = "tab:orange" if r["memory"] else "tab:blue"
        ax.barh(i, r["margin_mean"], color=color)
        ax.plot([r["margin_min"], r["margin_mean"]], [i, i], color="black", linewidth=0.8)
    labels = [f"{name} (searched {by_relation[name]['searched_share']:.0%})" for name in names]
    ax.set_yticks(range(len(names)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("decision margin, nats: log p(search) - log p(answer from memory)")
    ax.set_title("Policy base, first decision per relation: mean (bar) and smallest (line); orange: memory relations",
                 fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
