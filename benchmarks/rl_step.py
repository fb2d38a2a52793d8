"""Seconds per RL step on the tiny profile, split into rollout (policy generation), simulator
(writing documents), log-probs (old, reference, values) and update, with the process's peak memory,
and the projected time of the notebook's whole training run, validations included (target, issue 4:
at most 10 minutes on 2 cores). Needs notebooks 00-03's models.

    .venv/bin/python benchmarks/rl_step.py [--profile tiny] [--steps 10] [--algorithm grpo] [--engine simulator]
                                           [-p key=value ...]   # e.g. -p rl.bf16_autocast=true
"""

from __future__ import annotations

import argparse
import math
import resource
import tempfile

import torch

from zslib import config, trainer
from zslib.pipeline import parse_overrides


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--algorithm", default=None, help="override rl.algorithm")
    ap.add_argument("--engine", default=None, help="override rl.engine")
    ap.add_argument("-p", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a profile override, as in the pipeline CLI")
    args = ap.parse_args()
    torch.set_num_threads(2)
    overrides = {f"rl.{k}": v for k, v in (("algorithm", args.algorithm), ("engine", args.engine)) if v}
    overrides.update(parse_overrides(args.overrides))
    P = config.load_profile(args.profile, overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        t = trainer.RLTrainer(P, run_dir)
        metrics = t.train(steps=args.steps, resume=False)
    # The first step pays for one-off warm-up (kernels, caches): leave it out of the averages.
    timed = metrics[1:] or metrics
    for m in timed:  # validation runs every few steps only: timed apart, added to the projection
        m["seconds"] -= m.get("validation_seconds", 0.0)
    mean = {k: sum(m[k] for m in timed) / len(timed)
            for k in ("seconds", "rollout_seconds", "simulator_seconds", "logprobs_seconds", "update_seconds",
                      "response_tokens", "searches_per_answer", "tokens_per_s")}
    validations = [m["validation_seconds"] for m in metrics if "validation_seconds" in m]
    every = P.rl.validate_every
    n_validations = math.ceil(P.rl.steps / every) if every > 0 else 0  # every-th step and the last
    validation_s = sum(validations) / len(validations) if validations else 0.0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    rollouts = P.rl.questions_per_step * P.rl.group_size
    print(f"\n{P.rl.algorithm}, engine {P.rl.engine}, {rollouts} rollouts/step "
          f"({P.rl.questions_per_step} questions x {P.rl.group_size}), {len(timed)} timed steps, "
          f"{torch.get_num_threads()} threads")
    print("| what | value |\n|---|---|")
    print(f"| seconds per step | {mean['seconds']:.2f} |")
    for part in ("rollout", "simulator", "logprobs", "update"):
        print(f"| {part} | {mean[part + '_seconds']:.2f} s ({mean[part + '_seconds'] / mean['seconds']:.0%}) |")
    print(f"| response tokens per trajectory | {mean['response_tokens']:.1f} |")
    print(f"| searches per trajectory | {mean['searches_per_answer']:.2f} |")
    print(f"| response tokens per second | {mean['tokens_per_s']:.0f} |")
    if n_validations:
        print(f"| validation ({P.rl.validation_size} questions, every {every} steps) | {validation_s:.2f} s |")
    print(f"| peak memory (process RSS) | {peak_gb:.2f} GB |")
    projected = P.rl.steps * mean["seconds"] + n_validations * validation_s
    print(f"| projected training run ({P.rl.steps} steps, {n_validations} validations) | "
          f"{projected / 60:.1f} min (target <= 10) |")


if __name__ == "__main__":
    main()
