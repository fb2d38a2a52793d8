"""Multi-turn rollout speed on the tiny policy base: seven ways to run the same greedy rollouts.

1. batched: all rows together, generation stops at ``</search>``/``</answer>`` (``zslib.rollout``),
   the prompts' shared instruction is encoded once, each turn encodes only the tokens appended
   since the last (the KV cache is kept), and rows of similar length are encoded together;
2. per-row: the same loop, one row at a time;
3. generate-to-max: batched, but each turn generates to EOS or the token limit and is cut at the
   stop string afterwards, as the original code does;
4. batched without the kept cache: every turn encodes the whole context again;
5. batched without the shared prefix: each row encodes the instruction itself;
6. generate-to-max at the original's limit of 500 tokens per turn (docs/method.md §3) instead of the
   profile's (tiny: 48). Generate-to-max wastes at most the limit minus the turn's length, so the
   token ratio depends on the limit: both are reported;
7. batched with one prefill call per turn: every row's new tokens padded to the longest row's.

Greedy decoding makes all seven produce the same trajectories (checked; the 500-token variant
differs where a turn runs past the profile's limit), so the ratios compare cost alone. Ratios come
from one run on this machine (each variant's fastest of ``--repeats``). Needs notebook 00's policy
base.
Targets (issue 3): batched >= 5x the per-row loop in trajectories/s, and >= 2x fewer generated
tokens than generate-to-max.

    .venv/bin/python benchmarks/rollout.py [--profile tiny] [--outputs bench-tiny] [--questions 128] [--per-row N]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from zslib import config, data, rollout, search
from zslib.generation import hf_backend, models


def run(backend, tokenizer, rows, search_fn, cfg, batch_size):
    start, tokens0, prefill0 = time.time(), backend.generated_tokens, backend.prefilled_tokens
    positions0 = backend.prefill_positions
    trajs = []
    for i in range(0, len(rows), batch_size):
        trajs += rollout.rollout(backend, tokenizer, rows[i:i + batch_size], search_fn, cfg, temperature=0.0)
    seconds = time.time() - start
    return trajs, {"seconds": seconds, "traj_per_s": len(rows) / seconds,
                   "generated_tokens": backend.generated_tokens - tokens0,
                   "prefilled_tokens": backend.prefilled_tokens - prefill0,
                   "prefill_positions": backend.prefill_positions - positions0, "n": len(rows)}


ORIGINAL_TOKENS_PER_TURN = 500

VARIANTS = {  # name: (label, HFBackend options, per-row?, the original's token limit?)
    "batched": ("batched, stop strings", dict(), False, False),
    "single": ("per-row loop, stop strings", dict(), True, False),
    "to_max": ("batched, generate to max + cut", dict(stop_in_generate=False), False, False),
    "to_max_500": (f"  same, {ORIGINAL_TOKENS_PER_TURN} tokens/turn as the original", dict(stop_in_generate=False),
                   False, True),
    "recoded": ("batched, stop strings, no kept cache", dict(reuse_cache=False), False, False),
    "unshared": ("batched, stop strings, no shared prefix", dict(share_prefix=False), False, False),
    "one_prefill": ("batched, stop strings, one padded prefill", dict(prefill_groups=1), False, False),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--outputs", default=None, help="read models and data from outputs/<this> (default: the profile's)")
    ap.add_argument("--questions", type=int, default=128)
    ap.add_argument("--per-row", type=int, default=None,
                    help="rows for the (slow) per-row loop (default: all; fewer rows differ in length, which biases the ratio)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each variant; the fastest counts")
    ap.add_argument("--batch-size", type=int, default=None, help="override rollout.batch_size (rows per batched call)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    P = config.load_profile(args.profile, {"name": args.outputs} if args.outputs else None)
    rows = [r for r in data.load_for_profile(P, P.data.eval_sets[0], "test").to_list() if r.get("hops", 1) == 1]
    rows = rows[:args.questions]
    model, tok = models.load_causal_lm(P.policy_path, P.models.dtype)
    fn = rollout.engine_search_fn(search.profile_engine(P), P.search.topk)
    cfg = P.rollout
    if args.batch_size:
        cfg.batch_size = args.batch_size
    original_cfg = dataclasses.replace(cfg, max_tokens_per_turn=ORIGINAL_TOKENS_PER_TURN)
    print(f"device: {model.device}, threads: {torch.get_num_threads()}, policy: {P.policy_path}, "
          f"max_turns {cfg.max_turns}, tokens/turn {cfg.max_tokens_per_turn}, batch {cfg.batch_size}")

    run(hf_backend.HFBackend(model, tok), tok, rows[:8], fn, cfg, 8)  # warm-up
    best = {}
    for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every variant alike
        for name, (_, options, per_row, original_limit) in VARIANTS.items():
            trajs, stats = run(hf_backend.HFBackend(model, tok, **options), tok, rows[:args.per_row] if per_row else rows,
                               fn, original_cfg if original_limit else cfg, 1 if per_row else cfg.batch_size)
            if name not in best or stats["seconds"] < best[name][1]["seconds"]:
                best[name] = (trajs, stats)

    print(f"\n{'method':45s} {'rows':>5s} {'seconds':>8s} {'traj/s':>8s} {'gen tokens/traj':>16s} {'encoded/traj':>13s} "
          f"{'prefill positions/traj':>23s}")
    for name, (label, *_) in VARIANTS.items():
        r = best[name][1]
        print(f"{label:45s} {r['n']:5d} {r['seconds']:8.1f} {r['traj_per_s']:8.2f} "
              f"{r['generated_tokens'] / r['n']:16.1f} {r['prefilled_tokens'] / r['n']:13.1f} "
              f"{r['prefill_positions'] / r['n']:23.1f}")
    speed = {name: stats["traj_per_s"] for name, (_, stats) in best.items()}
    tokens = {name: stats["generated_tokens"] / stats["n"] for name, (_, stats) in best.items()}
    print(f"\n{'ratio':66s} {'value':>7s} {'target':>7s}")
    for label, value, target in (
            ("batched / per-row (trajectories per second)", speed["batched"] / speed["single"], ">= 5"),
            (f"generate-to-max / batched (generated tokens), {cfg.max_tokens_per_turn} tokens/turn",
             tokens["to_max"] / tokens["batched"], ">= 2"),
            (f"  the same, generate-to-max at the original's {ORIGINAL_TOKENS_PER_TURN}",
             tokens["to_max_500"] / tokens["batched"], ">= 2"),
            ("batched / generate-to-max (trajectories per second)", speed["batched"] / speed["to_max"], ""),
            (f"  the same, generate-to-max at the original's {ORIGINAL_TOKENS_PER_TURN}",
             speed["batched"] / speed["to_max_500"], ""),
            ("kept cache / none (trajectories per second)", speed["batched"] / speed["recoded"], ""),
            ("shared prefix / none (trajectories per second)", speed["batched"] / speed["unshared"], ""),
            ("prefill by length / one padded prefill (trajectories per second)",
             speed["batched"] / speed["one_prefill"], "")):
        print(f"{label:66s} {value:7.2f} {target:>7s}")
    reference = best["batched"][0]
    same = {name: f"{sum(x.token_ids == y.token_ids for x, y in zip(reference, trajs))}/{len(trajs)}"
            for name, (trajs, _) in best.items() if name != "batched"}
    print("\nidentical trajectories to batched: " + ", ".join(f"{name} {count}" for name, count in same.items()))


if __name__ == "__main__":
    main()
