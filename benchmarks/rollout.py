"""Multi-turn rollout speed on the tiny policy base: four ways to run the same greedy rollouts.

1. batched: all rows together, generation stops at ``</search>``/``</answer>`` (``zslib.rollout``),
   and each turn encodes only the tokens appended since the last (the KV cache is kept);
2. per-row: the same loop, one row at a time;
3. generate-to-max: batched, but each turn generates to EOS or the token limit and is cut at the
   stop string afterwards, as the original code does;
4. batched without the kept cache: every turn encodes the whole context again.

Greedy decoding makes all four produce the same trajectories (checked), so the ratios compare
cost alone. Ratios come from one run on this machine (each variant's fastest of ``--repeats``). Needs notebook 00's policy base.
Targets (issue 3): batched >= 5x the per-row loop in trajectories/s, and >= 2x fewer generated
tokens than generate-to-max.

    .venv/bin/python benchmarks/rollout.py [--profile tiny] [--outputs bench-tiny] [--questions 128] [--per-row 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from zslib import config, data, models, rollout, search


def run(backend, tokenizer, rows, search_fn, cfg, batch_size):
    start, tokens0, prefill0 = time.time(), backend.generated_tokens, backend.prefilled_tokens
    trajs = []
    for i in range(0, len(rows), batch_size):
        trajs += rollout.rollout(backend, tokenizer, rows[i:i + batch_size], search_fn, cfg, temperature=0.0)
    seconds = time.time() - start
    return trajs, {"seconds": seconds, "traj_per_s": len(rows) / seconds,
                   "generated_tokens": backend.generated_tokens - tokens0,
                   "prefilled_tokens": backend.prefilled_tokens - prefill0, "n": len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--outputs", default=None, help="read models and data from outputs/<this> (default: the profile's)")
    ap.add_argument("--questions", type=int, default=128)
    ap.add_argument("--per-row", type=int, default=32, help="rows for the (slow) per-row loop")
    ap.add_argument("--tokens-per-turn", type=int, default=None,
                    help="override rollout.max_tokens_per_turn (tiny: 48; the original allows 500)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each variant; the fastest counts")
    ap.add_argument("--batch-size", type=int, default=None, help="override rollout.batch_size (rows per batched call)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    P = config.load_profile(args.profile, {"name": args.outputs} if args.outputs else None)
    rows = [r for r in data.load_for_profile(P, P.data.eval_sets[0], "test").to_list() if r.get("hops", 1) == 1]
    rows = rows[:args.questions]
    model, tok = models.load_causal_lm(P.policy_path, P.models.dtype)
    fn = rollout.engine_search_fn(search.make_engine(P.search, P.corpus_path, P.out / "bm25"), P.search.topk)
    cfg = P.rollout
    if args.tokens_per_turn:
        cfg.max_tokens_per_turn = args.tokens_per_turn
    if args.batch_size:
        cfg.batch_size = args.batch_size
    print(f"device: {model.device}, threads: {torch.get_num_threads()}, policy: {P.policy_path}, "
          f"max_turns {cfg.max_turns}, tokens/turn {cfg.max_tokens_per_turn}, batch {cfg.batch_size}")

    variants = {"batched": (dict(), rows, cfg.batch_size), "to_max": (dict(stop_in_generate=False), rows, cfg.batch_size),
                "recoded": (dict(reuse_cache=False), rows, cfg.batch_size), "single": (dict(), rows[:args.per_row], 1)}
    run(rollout.HFBackend(model, tok), tok, rows[:8], fn, cfg, 8)  # warm-up
    best = {}
    for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every variant alike
        for name, (kwargs, some_rows, batch) in variants.items():
            trajs, stats = run(rollout.HFBackend(model, tok, **kwargs), tok, some_rows, fn, cfg, batch)
            if name not in best or stats["seconds"] < best[name][1]["seconds"]:
                best[name] = (trajs, stats)
    (batched, b), (full, m), (recoded, c), (single, s) = (best[k] for k in variants)

    same_max = sum(x.token_ids == y.token_ids for x, y in zip(batched, full))
    same_row = sum(x.token_ids == y.token_ids for x, y in zip(batched, single))
    n_b = b["n"]
    same_recoded = sum(x.token_ids == y.token_ids for x, y in zip(batched, recoded))
    print(f"\n{'method':40s} {'rows':>5s} {'seconds':>8s} {'traj/s':>8s} {'gen tokens/traj':>16s} {'encoded/traj':>13s}")
    for name, r in (("batched, stop strings", b), ("per-row loop, stop strings", s),
                    ("batched, generate to max + cut", m), ("batched, stop strings, no kept cache", c)):
        print(f"{name:40s} {r['n']:5d} {r['seconds']:8.1f} {r['traj_per_s']:8.2f} {r['generated_tokens'] / r['n']:16.1f}"
              f" {r['prefilled_tokens'] / r['n']:13.1f}")
    print(f"\n{'ratio':50s} {'value':>7s} {'target':>7s}")
    print(f"{'batched / per-row (trajectories per second)':50s} {b['traj_per_s'] / s['traj_per_s']:7.2f} {'>= 5':>7s}")
    print(f"{'generate-to-max / batched (generated tokens)':50s} "
          f"{(m['generated_tokens'] / m['n']) / (b['generated_tokens'] / n_b):7.2f} {'>= 2':>7s}")
    print(f"{'batched / generate-to-max (trajectories per second)':50s} {b['traj_per_s'] / m['traj_per_s']:7.2f}")
    print(f"{'kept cache / none (trajectories per second)':50s} {b['traj_per_s'] / c['traj_per_s']:7.2f}")
    print(f"\nidentical trajectories: batched vs generate-to-max {same_max}/{n_b}, "
          f"batched vs per-row {same_row}/{s['n']}, kept cache vs none {same_recoded}/{n_b}")


if __name__ == "__main__":
    main()
