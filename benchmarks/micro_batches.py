"""Peak memory and time of one RL update by micro-batch size (``rl.micro_batch_size``), on a real model:
SmolLM2-135M-Instruct (converted once from its packaged GGUF file; a 49,152-token vocabulary), full fine-tune,
the ``smollm2`` profile's settings (bf16 autocast where the CPU has bf16 kernels). The batch is made up: rows of
random tokens of different lengths, the last third of each under mask 1, GRPO groups of 4 with random rewards.

Each size runs in a process of its own, so the peak resident memory is that size's. The old and reference
log-probs (no gradient) and the update (with gradient, one optimizer step) are timed apart, and every size must
give the gradient norm of one pass over the mini-batch (size 0).

    .venv/bin/python benchmarks/micro_batches.py [--rows 8] [--tokens 768] [--sizes 0 4 2 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def child(model: str, rows: int, tokens: int, micro: int) -> dict:
    from zslib import config, trainer
    P = config.load_profile("smollm2", {"models.policy": model, "warmup.steps": 0, "rl.engine": "bm25",
                                        "rl.validate_every": 0, "rl.mini_batch_size": rows,
                                        "rl.micro_batch_size": micro, "rl.ppo_epochs": 2})  # 2: old log-probs too
    with tempfile.TemporaryDirectory() as run_dir:
        t = trainer.RLTrainer(P, run_dir, engine=object(), questions=[], validation={})
        g = torch.Generator().manual_seed(0)
        vocab = len(t.tokenizer)
        lengths = torch.randint(tokens // 2, tokens + 1, (rows,), generator=g)
        ids = torch.full((rows, tokens), t.tokenizer.pad_token_id)
        mask = torch.zeros(rows, tokens - 1)
        for r, n in enumerate(lengths.tolist()):
            ids[r, :n] = torch.randint(0, vocab, (n,), generator=g)
            mask[r, n - n // 3 - 1:n - 1] = 1
        batch = trainer.Batch(ids, mask, torch.rand(rows, generator=g).round(), torch.arange(rows) // 4,
                              lengths=lengths)
        t.logprobs(batch)  # untimed: the first pass pays for kernel set-up
        t0 = time.perf_counter()
        t.advantages(t.logprobs(batch))
        t1 = time.perf_counter()
        stats = t._optimizer_step(batch)
        t2 = time.perf_counter()
    return {"micro": micro, "logprobs_s": t1 - t0, "update_s": t2 - t1, "grad_norm": stats["grad_norm"],
            "pg_loss": stats["pg_loss"], "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8, help="the mini-batch, in trajectories")
    ap.add_argument("--tokens", type=int, default=768, help="the longest row")
    ap.add_argument("--sizes", type=int, nargs="+", default=[0, 4, 2, 1], help="micro-batch sizes (0: one pass)")
    ap.add_argument("--model", help="a converted SmolLM2 folder (default: convert the packaged GGUF file once)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.model, args.rows, args.tokens, args.child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from zslib.generation.models import convert_gguf
            from zslib.generation.packaged import packaged_path
            model = str(convert_gguf(packaged_path("smollm2-135m-instruct"), Path(tmp) / "model")[0])
        results = []
        for size in args.sizes:
            out = subprocess.run([sys.executable, __file__, "--child", str(size), "--model", model, "--rows",
                                  str(args.rows), "--tokens", str(args.tokens)], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"micro-batch size {size} failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = results[0]
    print(f"one RL update of {args.rows} rows (longest {args.tokens} tokens), SmolLM2-135M-Instruct, full fine-tune, "
          f"{torch.get_num_threads()} threads")
    print("| micro-batch | peak memory GB | vs first | log-probs s | update s | update vs first | grad norm |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['micro'] or 'whole'} | {r['peak_gb']:.1f} | {r['peak_gb'] / base['peak_gb']:.2f} | "
              f"{r['logprobs_s']:.1f} | {r['update_s']:.1f} | {r['update_s'] / base['update_s']:.2f} | "
              f"{r['grad_norm']:.6f} |")
    worst = max(abs(r["grad_norm"] - base["grad_norm"]) / base["grad_norm"] for r in results)
    print(f"largest relative difference in gradient norm from the first row: {worst:.1e}")


if __name__ == "__main__":
    main()
