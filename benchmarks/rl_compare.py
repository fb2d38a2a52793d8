"""Side-by-side RL runs on one profile (issue 4's comparison): each variant trains from the same
policy base with the same seed into ``outputs/<profile>/rl/compare/<name>/`` (resumable: a finished
run is only evaluated again), then all are evaluated greedily on the held-out questions with the
real BM25 engine (1-hop, and 2-hop where the dataset has them). Prints a table and writes
``outputs/<profile>/rl/compare/results.json``.

    .venv/bin/python benchmarks/rl_compare.py [--profile tiny] [--runs grpo ppo reinforce_pp grpo-bm25]

A run name is an algorithm, optionally followed by ``-bm25`` (train against the real engine
instead of the simulator), ``-nomask`` (no loss mask), ``-allhops`` (train on 1-hop and 2-hop
questions: ``rl.max_hops: 0``) and ``-s<N>`` (seed N instead of the profile's). Single runs of one
configuration differ by several EM points from seed to seed, so compare configurations over a few
seeds (``grpo grpo-s1 grpo-s2``): the table ends with each configuration's mean and spread.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from zslib import config, evaluate, search, simulator, trainer
from zslib.files import read_jsonl
from zslib.generation import models


def run_overrides(name: str) -> dict:
    algorithm, *flags = name.split("-")
    out = {"rl.algorithm": algorithm}
    for flag in flags:
        if flag.startswith("s") and flag[1:].isdigit():
            out["seed"] = int(flag[1:])
        else:
            out.update({"bm25": {"rl.engine": "bm25"}, "nomask": {"rl.loss_mask": False},
                        "allhops": {"rl.max_hops": 0}}[flag])
    return out


def seed_spread(results: dict) -> dict[str, tuple[int, float, float]]:
    """(runs, mean EM, sample standard deviation) per configuration: run names without ``-s<N>``."""
    groups: dict[str, list[float]] = {}
    for name, r in results.items():
        if name != "base":
            config_name = "-".join(f for f in name.split("-") if not (f.startswith("s") and f[1:].isdigit()))
            groups.setdefault(config_name, []).append(r["em"])
    return {k: (len(v), statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in groups.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--runs", nargs="+", default=["grpo", "ppo", "reinforce_pp", "grpo-bm25"])
    ap.add_argument("--overrides", default="{}", help="JSON dict of dotted keys applied to every run")
    args = ap.parse_args()
    torch.set_num_threads(2)
    base_profile = config.load_profile(args.profile, json.loads(args.overrides))
    root = base_profile.rl_dir / "compare"
    bm25 = search.profile_engine(base_profile)
    sim = simulator.load_simulator(base_profile)
    n = base_profile.rl.eval_size
    results_path = root / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    model, tok = models.load_causal_lm(base_profile.policy_path, base_profile.models.dtype)
    results["base"] = evaluate.heldout_scores(model, tok, base_profile, bm25, n, desc="base")
    for name in args.runs:
        P = config.load_profile(args.profile, {**json.loads(args.overrides), **run_overrides(name)})
        engine = simulator.engine_for(P, loaded=sim) if P.rl.engine == "simulator" else None
        t = trainer.RLTrainer(P, root / name, engine=engine, real_engine=bm25)
        t.train(resume=True)
        metrics = read_jsonl(t.metrics_path)
        best = t.use_best_policy()  # as notebook 04: the best-validated weights when the profile validates
        results[name] = {**evaluate.heldout_scores(t.policy, t.tokenizer, P, bm25, n, desc=name),
                         "policy_step": best["step"] if best else len(metrics),
                         "train_minutes": sum(m["seconds"] for m in metrics) / 60,
                         "last_reward": sum(m["reward_mean"] for m in metrics[-10:]) / len(metrics[-10:]),
                         "searched_again_after_noisy": _late_mean(metrics, "searched_again_after_noisy")}
        root.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))
    print("| run | EM | F1 | cover-EM | searches/q | 2-hop EM | 2-hop searches/q | policy step | train min | "
          "reward (last 10 steps) | searched again after noisy |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        again, two = r.get("searched_again_after_noisy"), r.get("two_hop")
        print(f"| {name} | {r['em']:.3f} | {r['f1']:.3f} | {r['cover_em']:.3f} | {r['searches_per_question']:.2f} | "
              f"{two['em'] if two else float('nan'):.3f} | {two['searches_per_question'] if two else float('nan'):.2f} | "
              f"{r.get('policy_step', '')} | {r.get('train_minutes', 0):.1f} | {r.get('last_reward', float('nan')):.3f} | "
              f"{'' if again is None else f'{again:.2f}'} |")
    spread = seed_spread(results)
    if any(n > 1 for n, _, _ in spread.values()):
        print("\n| configuration | seeds | mean EM | sd |\n|---|---|---|---|")
        for name, (n, mean, sd) in spread.items():
            print(f"| {name} | {n} | {mean:.3f} | {sd:.3f} |")


def _late_mean(metrics: list[dict], key: str) -> float | None:
    """Mean of a metric over the second half of training, skipping steps where it is undefined."""
    values = [m[key] for m in metrics[len(metrics) // 2:] if m.get(key) is not None]
    return sum(values) / len(values) if values else None


if __name__ == "__main__":
    main()
