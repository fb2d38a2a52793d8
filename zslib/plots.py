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
        avg = [sum(loss[max(0, i - smooth + 1):i + 1]) / len(loss[max(0, i - smooth + 1):i + 1]) for i in range(len(loss))]
        line, = ax.plot(steps, avg, label=name)
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
