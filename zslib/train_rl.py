"""Step 4 without the notebook: the RL run, in one process or several (one per GPU).

    python -m zslib.train_rl --profile P [-p key=value ...] [--steps N] [--fresh] [--run-dir DIR]
    accelerate launch --multi_gpu --num_processes 8 -m zslib.train_rl --profile P     # or: torchrun --nproc_per_node 8 -m ...

Trains ``RLTrainer`` (resuming from the run's last checkpoint unless ``--fresh``, with the same or
another number of processes), then saves the policy: the best-validated step's with ``rl.keep_best``.
Notebook 04 run afterwards finds the run complete and goes on to its evaluation and plots. With
several processes, each rolls out its share of every step's questions and the main one writes
(``zslib/distributed.py``); the simulator is best shared as a server (``simulator.serve: http``).
"""

from __future__ import annotations

import argparse

from . import distributed
from .config import load_profile
from .pipeline import parse_overrides


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m zslib.train_rl", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="tiny", help="a name in configs/ or a path to a YAML profile")
    ap.add_argument("-p", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a profile override, e.g. -p rl.steps=10 (repeatable)")
    ap.add_argument("--steps", type=int, help="stop after this step (default rl.steps)")
    ap.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    ap.add_argument("--run-dir", help="default outputs/<profile>/rl")
    args = ap.parse_args(argv)
    distributed.init()
    from .trainer import RLTrainer  # after init: each process takes its own GPU before loading models

    T = RLTrainer(load_profile(args.profile, parse_overrides(args.overrides)), args.run_dir)
    T.train(args.steps, resume=not args.fresh)
    best = T.use_best_policy()
    folder = T.save_policy()
    if distributed.is_main():
        print(f"step {T.step_count} of {T.cfg.steps} on {T.world} process(es){', sharded (FSDP)' if T.sharded else ''}; policy "
              f"{'of step ' + str(best['step']) + ' ' if best else ''}saved to {folder}")


if __name__ == "__main__":
    main()
