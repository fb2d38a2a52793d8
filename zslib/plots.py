"""Matplotlib figures the notebooks show; each reads plain dicts or JSONL logs.

``save_to(folder, prefix)`` (each notebook calls it once) makes every figure drawn afterwards also
a PNG, ``<folder>/<prefix>_<plot>.png``: ``outputs/<profile>/figures/00_loss_curves.png`` and so on.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt

_SINK: dict = {}
LABEL_SIZE = 8  # the smallest text on any figure: tick labels, legends, values on bars


def save_to(folder: str | Path | None, prefix: str = "") -> None:
    """Save every figure drawn from now on as ``<folder>/<prefix>_<plot>.png`` (None: stop saving)."""
    _SINK.clear()
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        _SINK.update(folder=Path(folder), prefix=prefix, used=Counter())


def _done(fig, name: str):
    """Lay out, save when a folder is set (a second figure of the same plot gets ``_2``), return it."""
    fig.tight_layout()
    if _SINK:
        _SINK["used"][name] += 1
        n = _SINK["used"][name]
        stem = f"{_SINK['prefix']}_{name}" if _SINK["prefix"] else name
        fig.savefig(_SINK["folder"] / f"{stem}{'' if n == 1 else f'_{n}'}.png", dpi=110, bbox_inches="tight")
    return fig


def loss_curves(logs: dict[str, list[dict]], smooth: int = 20, title: str | None = None):
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
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats per token, log scale)")
    ax.set_yscale("log")
    ax.set_title(title or "Training loss (dotted: a new phase begins)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _done(fig, "loss_curves")


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
    ax.set_title("Questions per split, by relation (1-hop) and 2-hop", fontsize=10)
    ax.legend(fontsize=LABEL_SIZE, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, not on them
    return _done(fig, "question_stats")


def score_bars(results: dict[str, dict], metrics=("em", "f1", "well_formed_first_action"), *, title: str):
    """Grouped bars: one group per setting, one bar per metric (fractions in 0..1), each bar labelled
    with its value (so a zero bar reads as 0, not as missing). ``title`` says what is compared."""
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(results) * len(metrics) / 2), 3.8))
    width = 0.8 / len(metrics)
    for j, m in enumerate(metrics):
        xs = [i + j * width for i in range(len(results))]
        values = [r[m] for r in results.values()]
        bars = ax.bar(xs, values, width, label=m.replace("_", " "))
        ax.bar_label(bars, [f"{v:.2f}" for v in values], fontsize=LABEL_SIZE, padding=1)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(results))], list(results), fontsize=LABEL_SIZE)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("share (0-1)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _done(fig, "score_bars")


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
    ax.set_title("Collected trajectories by number of searches", fontsize=10)
    ax.legend(fontsize=8)
    return _done(fig, "collection_summary")


def label_stats(stats: dict):
    """Pairs per source and label, from ``labeling.statistics``."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    items = stats["by_source"]
    colors = ["tab:green" if key.endswith("/useful") else "tab:red" for key in items]
    bars = ax.barh(list(items), list(items.values()), color=colors)
    ax.bar_label(bars, fontsize=LABEL_SIZE, padding=2)
    ax.set_xlabel("(query, documents) pairs")
    ax.set_title("SFT pairs by source (green: useful, red: noisy)", fontsize=10)
    ax.invert_yaxis()
    return _done(fig, "label_stats")


def _moving_average(values: list[float], window: int, centered: bool = False) -> list[float]:
    """Mean over the last ``window`` values, or over a window centred on each value (no lag)."""
    back = window // 2 if centered else window - 1
    ahead = window - 1 - back if centered else 0
    return [sum(values[max(0, i - back):i + ahead + 1]) / len(values[max(0, i - back):i + ahead + 1])
            for i in range(len(values))]


def noise_schedule(metrics: list[dict], scheduled, smooth: int = 10, title: str | None = None):
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
    ax.set_ylabel("share of noisy search calls")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or "Noise curriculum: planned probability and realised share", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _done(fig, "noise_schedule")


RL_PANELS = {("reward_mean", "em", "f1"): "training rollouts: reward, EM and F1",
             ("val_em", "val_em_1hop", "val_em_2hop"): "validation EM (greedy, real engine)",
             ("searches_per_answer",): "searches per training rollout",
             ("kl",): "KL to the reference (nats per policy token)"}
KEY_NAMES = {"reward_mean": "reward", "em": "EM", "f1": "F1", "val_em": "validation EM", "val_em_1hop": "1-hop",
             "val_em_2hop": "2-hop", "kl": "KL",
             "entropy": "entropy", "searches_per_answer": "searches", "invalid_action_rate": "invalid actions",
             "response_tokens": "tokens", "equal_reward_groups": "equal groups"}


def _grid(n: int, width: float = 4.4, height: float = 3.3):
    """A figure of ``n`` panels, at most three to a row (two rows of two for four), and its axes in order;
    panels left over are hidden."""
    cols = 2 if n == 4 else min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        fig.delaxes(ax)
    return fig, flat[:n]


def rl_curves(runs: dict[str, list[dict]], panels=tuple(RL_PANELS), smooth: int = 10, titles: dict | None = None,
              name: str = "rl_curves"):
    """One panel per group of metric keys, one line per (run, key): moving averages over steps for
    keys logged every step (the title says so), raw points for keys logged every few steps
    (validation). A key whose values equal another's in the same panel (the reward when it is F1) is
    drawn once, labelled with both (equal to 1e-6: the reward is a float32 mean, F1 a float64 one).
    Panels whose keys no run logged are left out. ``titles`` maps a panel's keys (a tuple) to its title
    (default: ``RL_PANELS``'s, else the keys)."""
    titles = {**RL_PANELS, **(titles or {})}
    panels = [keys for keys in panels if any(key in m for metrics in runs.values() for m in metrics for key in keys)]
    fig, axes = _grid(len(panels))
    for ax, keys in zip(axes, panels):
        smoothed = False
        for run, metrics in runs.items():
            drawn: list[tuple[tuple, tuple, list[str]]] = []  # (steps, values, the keys that have them)
            for key in keys:
                logged = [m for m in metrics if key in m and m[key] is not None]
                if not logged:
                    continue
                steps, values = tuple(m["step"] for m in logged), tuple(m[key] for m in logged)
                same = next((d for d in drawn if d[0] == steps and all(abs(a - b) <= 1e-6 for a, b in zip(d[1], values))),
                            None)
                if same:
                    same[2].append(KEY_NAMES.get(key, key))
                else:
                    drawn.append((steps, values, [KEY_NAMES.get(key, key)]))
            for steps, values, names in drawn:
                label = " = ".join(names) if len(runs) == 1 else f"{run}: {' = '.join(names)}"
                every_step = len(steps) == len(metrics)
                smoothed |= every_step and smooth > 1
                ax.plot(steps, _moving_average(list(values), smooth) if every_step else values,
                        label=label, marker=None if every_step else "o", markersize=3)
        ax.set_xlabel("RL step", fontsize=LABEL_SIZE + 1)
        ax.set_ylabel(", ".join(KEY_NAMES.get(k, k) for k in keys), fontsize=LABEL_SIZE + 1)
        title = titles.get(tuple(keys), ", ".join(keys))
        ax.set_title(title + (f"\n({smooth}-step moving mean)" if smoothed else ""), fontsize=LABEL_SIZE + 2)
        ax.tick_params(labelsize=LABEL_SIZE)
        ax.legend(fontsize=LABEL_SIZE)
        ax.grid(alpha=0.3)
    return _done(fig, name)


COLLAPSE_PANELS = {("entropy",): "entropy (nats per policy token)", ("kl",): "KL to the reference",
                   ("invalid_action_rate",): "invalid actions per turn", ("response_tokens",): "response tokens",
                   ("equal_reward_groups",): "groups with all rewards equal"}


def collapse_signs(runs: dict[str, list[dict]], smooth: int = 5):
    """The signs of a collapsing RL run, one panel each: entropy, KL, invalid-action rate, response
    length and the share of groups whose rollouts all scored the same (no GRPO signal)."""
    return rl_curves(runs, panels=tuple(COLLAPSE_PANELS), smooth=smooth, titles=COLLAPSE_PANELS, name="collapse_signs")


def question_start(tokenizer, token_ids: list[int], prompt_len: int) -> int:
    """The position of the prompt's last ``Question:``: where a trajectory is worth reading from (the
    instruction before it is the same for every question)."""
    for i in range(prompt_len - 1, -1, -1):
        if "Question:" in tokenizer.decode(token_ids[i:prompt_len]):
            return i
    return 0


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
    """The policy base's first decision per relation (``tiny.base_eval.evaluate_base``): mean margin
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
    return _done(fig, "decision_margins")


def results_bars(rows: list[dict], engine: str | None = None, metric: str = "em"):
    """Notebook 05: one group per dataset, one bar per method, with the 95% bootstrap interval of EM
    as error bars and each bar's value written on it (rows of ``evaluate.evaluate_all``)."""
    engine = engine or rows[0]["engine"]
    rows = [r for r in rows if r["engine"] == engine]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["dataset"]): r for r in rows}
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 + 0.5 * len(methods) * len(datasets)), 3.8))
    for j, method in enumerate(methods):
        found = [(i, by[(method, d)]) for i, d in enumerate(datasets) if (method, d) in by]
        xs = [i + j * width for i, _ in found]
        values = [r[metric] for _, r in found]
        errors = ([[r[metric] - r["em_ci"][0] for _, r in found], [r["em_ci"][1] - r[metric] for _, r in found]]
                  if metric == "em" else None)
        bars = ax.bar(xs, values, width, yerr=errors, capsize=3, label=method, color=plt.cm.tab10(j % 10))
        ax.bar_label(bars, [f"{v:.2f}" for v in values], fontsize=LABEL_SIZE, padding=2, label_type="edge")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(datasets))], datasets)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"{metric.upper()} (share of questions)")
    ax.set_title(f"Greedy {metric.upper()} by dataset and method, engine {engine}"
                 + (" (bars: 95% bootstrap interval)" if metric == "em" else ""), fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    return _done(fig, "results_bars")


def cost_panel(cost: dict):
    """Notebook 05: what RL's searches would have cost through a paid API against what simulating
    them cost (``evaluate.cost_summary``), and every real-engine call the run made."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    calls = {"collection\n(real engine)": cost["collection_calls"], "validation\n(real engine)": cost["validation_calls"],
             "RL\n(simulator)": cost["rl_simulator_calls"]}
    bars = left.bar(list(calls), list(calls.values()), color=["tab:gray", "tab:gray", "tab:blue"])
    left.bar_label(bars, [f"{v:,}" for v in calls.values()], fontsize=8, padding=2)
    left.set_ylim(0, 1.15 * max(1, *calls.values()))
    left.set_ylabel("search calls")
    left.set_title("Search calls made by the run", fontsize=10)
    dollars = {f"RL's calls via an API\n(${cost['api_price_per_1000']:g} / 1,000)": cost["rl_api_dollars"],
               f"simulating them\n(${cost['gpu_price_per_hour']:g} / GPU-hour)": cost["rl_simulator_dollars"]}
    bars = right.bar(list(dollars), list(dollars.values()), color=["tab:red", "tab:blue"])
    right.bar_label(bars, [f"${v:,.4f}" if v < 1 else f"${v:,.2f}" for v in dollars.values()], fontsize=8, padding=2)
    right.set_ylim(0, 1.15 * max(0.01, *dollars.values()))
    right.set_ylabel("US dollars")
    tokens = cost["rl_simulator_tokens"]  # None: a run from before the trainer logged them
    right.set_title(f"RL's searches: paid API against the simulator ({cost['rl_simulator_seconds']:.0f} s, "
                    + (f"{tokens:,} tokens)" if tokens is not None else "tokens not logged)"), fontsize=9)
    return _done(fig, "cost_panel")


def ablation_family(rows: list[dict], family: str, base: dict | None = None):
    """Notebook 06: one family's variants (rows of ``ablations.summary``), held-out 1-hop and 2-hop EM of the
    kept policy: a bar at the mean over seeds, each seed's run as a dot, the base's EM as a dashed line."""
    panels = [("em", "1-hop"), ("em_2hop", "2-hop")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (metric, kind) in zip(axes, panels):
        found = [r for r in rows if r["family"] == family and r["metric"] == metric]
        xs = range(len(found))
        bars = ax.bar(xs, [r["mean"] for r in found], 0.6, color=[plt.cm.tab10(i % 10) for i in xs], alpha=0.75)
        ax.bar_label(bars, [f"{r['mean']:.2f}" for r in found], fontsize=LABEL_SIZE, padding=2)
        for i, r in zip(xs, found):
            values = r.get("values") or []
            ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
        if base is not None:
            value = base["em"] if metric == "em" else base.get("two_hop", {}).get("em")
            if value is not None:
                ax.axhline(value, color="gray", linestyle="--", linewidth=1, label=f"base {value:.2f}")
                ax.legend(fontsize=LABEL_SIZE, loc="upper right")
        ax.set_xticks(list(xs), [r["variant"] + f"\n({len(r['seeds'])} seeds)" for r in found], fontsize=LABEL_SIZE)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("EM (share of questions)")
        ax.set_title(f"{family}: held-out {kind} EM, real engine", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    return _done(fig, "ablation_family")


def ablation_runs(points: list[dict], base: dict | None = None):
    """Notebook 06: every finished run (``ablations.run_points``) as a dot, its held-out 1-hop EM against the
    share of those questions it searched for, coloured by family (the reference in black); the base as a cross."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    families = sorted({p["family"] for p in points} - {"reference"})
    for i, family in enumerate(["reference"] + families):
        found = [p for p in points if p["family"] == family and "searched" in p]
        if found:
            ax.scatter([p["searched"] for p in found], [p["em"] for p in found], s=28, alpha=0.8, label=family,
                       color="black" if family == "reference" else plt.cm.tab10(i % 10))
    if base is not None and "searched_share" in base:
        ax.scatter([base["searched_share"]], [base["em"]], marker="x", s=80, color="gray", label="base")
    ax.set_xlabel("share of held-out 1-hop questions searched")
    ax.set_ylabel("held-out 1-hop EM")
    ax.set_title("every ablation run: EM against searching (kept policy, real engine)", fontsize=10)
    ax.legend(fontsize=LABEL_SIZE, loc="upper left")
    ax.grid(alpha=0.3)
    return _done(fig, "ablation_runs")
