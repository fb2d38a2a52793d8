"""vLLM against the HF backend on the same work, measured in one run on this machine:

1. greedy rollouts (BM25) of the policy base: trajectories/s and generated tokens/s per batch size;
2. RL steps (GRPO, BM25 engine, no validation): seconds per step and its split, per backend;
3. the fine-tuned simulator: search calls/s served in this process (HF) and by the vLLM server over HTTP.

    .venv/bin/python benchmarks/vllm_vs_hf.py [--profile tiny] [--questions 64] [--batch-sizes 16 64] [--rl-steps 3]
                                              [--parts 1 2 3]

Needs notebooks 00 and 03's outputs (the policy base and the fine-tuned simulator). Engine start-up
(30-40 s each) is reported apart and not counted in any rate. On 2 CPU cores at 3.5M parameters both
backends are bound by per-step overhead; vLLM's advantage is expected on a GPU and at real sizes.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rollouts(P, rows, batch_sizes: list[int]) -> list[dict]:
    from zslib import rollout, search
    from zslib.generation import backends, models
    model, tok = models.load_causal_lm(P.policy_path, "float32")
    fn = rollout.engine_search_fn(search.profile_engine(P), P.search.topk)
    t0 = time.time()
    made = {"hf": backends.make_backend("hf", model, tok), "vllm": backends.make_backend("vllm", model, tok, vllm_cfg=P.vllm)}
    start = time.time() - t0
    for backend in made.values():  # warm-up (vLLM compiles its log-prob op on the first call)
        rollout.rollout(backend, tok, rows[:8], fn, P.rollout, temperature=0.0, enable_thinking=P.thinking.policy)
    out = []
    for size in batch_sizes:
        for name, backend in made.items():
            before, t0 = backend.generated_tokens, time.time()
            trajs = [t for i in range(0, len(rows), size)
                     for t in rollout.rollout(backend, tok, rows[i:i + size], fn, P.rollout, temperature=0.0,
                                              enable_thinking=P.thinking.policy)]
            seconds = time.time() - t0
            out.append({"batch": size, "backend": name, "trajectories_per_s": len(trajs) / seconds,
                        "tokens_per_s": (backend.generated_tokens - before) / seconds})
    out.append({"vllm_start_seconds": start})
    return out


def rl_steps(P, steps: int) -> list[dict]:
    from zslib import config, trainer
    out = []
    for name in ("hf", "vllm"):
        profile = config.load_profile(P.name, {"rollout.backend": name, "rl.engine": "bm25", "rl.validate_every": 0,
                                               "rl.steps": steps, "rl.checkpoint_every": 10 ** 6})
        with tempfile.TemporaryDirectory() as run_dir:
            t = trainer.RLTrainer(profile, run_dir)
            rows = [t.step() for _ in range(steps)][1:]  # the first step warms up
        keys = ["seconds", "rollout_seconds", "logprobs_seconds", "update_seconds", "weight_sync_seconds"]
        out.append({"backend": name, **{k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in keys}})
    return out


def simulator_calls(P, calls: int) -> list[dict]:
    from zslib import config, serve_simulator, simulator
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    http = config.load_profile(P.name, {"simulator.serve": "http", "simulator.url": f"http://127.0.0.1:{port}/v1"})
    triples = [json.loads(line) for line in open(P.sft_path)][:calls]
    queries = [r.get("query", r["prompt"][:40]) for r in triples]
    kwargs = dict(noisy=[i % 2 == 1 for i in range(len(queries))], questions=queries, answers=["x"] * len(queries))
    out = []
    t0 = time.time()
    process = serve_simulator.start(http, log=open(P.out / "vllm-bench-server.log", "w"))
    try:
        serve_simulator.wait_until_ready(http.simulator.url, 300, process)
        started = time.time() - t0
        for name, engine in (("in-process (hf)", simulator.engine_for(P)), ("http (vllm server)", simulator.engine_for(http))):
            engine.search(queries[:8], P.simulator.topk, **{k: v[:8] for k, v in kwargs.items()})  # warm-up
            t0 = time.time()
            engine.search(queries, P.simulator.topk, **kwargs)
            seconds = time.time() - t0
            out.append({"transport": name, "calls_per_s": len(queries) / seconds, "seconds": seconds})
    finally:
        process.terminate()
        process.wait(60)
    out.append({"server_start_seconds": started})
    return out


def main() -> None:
    from zslib import config, evaluate
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--rl-steps", type=int, default=3)
    ap.add_argument("--simulator-calls", type=int, default=128)
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3], help="which of the three measurements to run")
    args = ap.parse_args()
    P = config.load_profile(args.profile)
    rows = evaluate.heldout_questions(P, args.questions)

    if 1 in args.parts:
        part_rollouts(P, rows, args)
    if 2 in args.parts:
        part_rl(P, args)
    if 3 in args.parts:
        part_simulator(P, args)


def part_rollouts(P, rows, args) -> None:
    table = rollouts(P, rows, args.batch_sizes)
    print(f"\n1. greedy rollouts, {len(rows)} held-out questions (vLLM engine start {table[-1]['vllm_start_seconds']:.0f} s)")
    print("| batch | backend | trajectories/s | generated tokens/s |\n|---|---|---|---|")
    for r in table[:-1]:
        print(f"| {r['batch']} | {r['backend']} | {r['trajectories_per_s']:.1f} | {r['tokens_per_s']:.0f} |")
    for size in args.batch_sizes:
        hf, vl = [r for r in table[:-1] if r["batch"] == size]
        print(f"batch {size}: vLLM/HF trajectories/s = {vl['trajectories_per_s'] / hf['trajectories_per_s']:.2f}")


def part_rl(P, args) -> None:
    steps = rl_steps(P, args.rl_steps)
    print(f"\n2. RL steps (GRPO, BM25, {P.rl.questions_per_step}x{P.rl.group_size} rollouts), mean of steps 2-{args.rl_steps}")
    print("| backend | s/step | rollout | log-probs | update | weight sync |\n|---|---|---|---|---|---|")
    for r in steps:
        print(f"| {r['backend']} | {r['seconds']:.2f} | {r['rollout_seconds']:.2f} | {r['logprobs_seconds']:.2f} | "
              f"{r['update_seconds']:.2f} | {r['weight_sync_seconds']:.2f} |")


def part_simulator(P, args) -> None:
    sims = simulator_calls(P, args.simulator_calls)
    print(f"\n3. simulator, {args.simulator_calls} search calls at T={P.simulator.temperature} "
          f"(server start {sims[-1]['server_start_seconds']:.0f} s)")
    print("| transport | calls/s | seconds |\n|---|---|---|")
    for r in sims[:-1]:
        print(f"| {r['transport']} | {r['calls_per_s']:.1f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
