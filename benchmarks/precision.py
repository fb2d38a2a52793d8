"""fp32 against bf16 autocast on this machine: one training step of the tiny profile's model (forward,
backward, AdamW) at its batch size, and what the ``auto`` setting of ``tiny.bf16_autocast``,
``simulator.bf16`` and ``rl.bf16_autocast`` picks here (``models.fast_bf16``).

    .venv/bin/python benchmarks/precision.py [--profile tiny] [--steps 5] [--width 256]

Needs nothing built: the model is initialised at random with a stand-in vocabulary of the size the
tiny tokenizer gets. Ratios come from one run; the first step of each precision is a warm-up.
"""

from __future__ import annotations

import argparse
import time

import torch

from zslib import config
from zslib.generation import models


def step_seconds(cfg, vocab: int, width: int, steps: int, bf16: bool, device: str) -> float:
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=vocab, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads, tie_word_embeddings=True)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, vocab, (max(1, cfg.batch_tokens // width), width), device=device)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--width", type=int, default=256, help="tokens per row")
    ap.add_argument("--vocab", type=int, default=1267, help="stand-in vocabulary size (the tiny tokenizer has 1,267)")
    args = ap.parse_args()
    P = config.load_profile(args.profile)
    device = models.default_device()
    fp32 = step_seconds(P.tiny, args.vocab, args.width, args.steps, False, device)
    bf16 = step_seconds(P.tiny, args.vocab, args.width, args.steps, True, device)
    print(f"device {device}, {torch.get_num_threads()} threads; {models.fast_bf16(device)[1]}")
    print(f"one training step, {P.tiny.batch_tokens // args.width} rows x {args.width} tokens, mean of {args.steps}")
    print("| precision | s/step | vs fp32 |\n|---|---|---|")
    print(f"| fp32 | {fp32:.3f} | 1.00 |")
    print(f"| bf16 autocast | {bf16:.3f} | {bf16 / fp32:.2f} |")
    print(f"auto picks: tiny.bf16_autocast={P.tiny.bf16_autocast}, simulator.bf16={P.simulator.bf16}, "
          f"rl.bf16_autocast={P.rl.bf16_autocast} (profile {P.name!r})")


if __name__ == "__main__":
    main()
