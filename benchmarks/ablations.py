"""The paper's ablations on a profile, over seeds (issue 28): trains and evaluates every run missing, then prints
the tables notebook 06 shows (``zslib/ablations.py`` has the families, the runs and the statistics).

    .venv/bin/python benchmarks/ablations.py [--profile tiny] [--families curriculum "loss mask" ...]
        [--seeds 0 1 2] [--runs NAME ...] [-p key=value ...] [--keep-weights] [--table-only]

Needs notebooks 00-03 run on the profile (the policy base and the fine-tuned simulator every run shares).
Resumable: one folder per run, ``outputs/<profile>/ablations/<run>/`` (``reference-s1``,
``curriculum=linear-s0``, ...); an interrupted run resumes from its last checkpoint, a finished one is read
back. The reference at the profile's seed is notebook 04's own run. ``--runs`` splits the work between
machines or processes; the tables show every run finished so far and go to
``outputs/<profile>/ablations/summary.json``. Each tiny run is one notebook-04 run (``rl.steps`` steps) plus
two or three evaluations: on 2 cores with bf16 kernels about 10 minutes (docs/results.md has the figures).
``-p`` overrides make another recipe, whose runs (its reference included) go to
``outputs/<profile>/ablations/recipe=<overrides>/``: ``--runs reference-s0 reference-s1 reference-s2
-p rl.lr=4e-4`` measures a recipe over 3 seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zslib import ablations, config  # noqa: E402
from zslib.pipeline import parse_overrides  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--families", nargs="+", default=list(ablations.FAMILIES), choices=list(ablations.FAMILIES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", nargs="+", help="only these runs (names as the plan prints them)")
    ap.add_argument("-p", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for every run, e.g. -p rl.steps=20 (repeatable)")
    ap.add_argument("--keep-weights", action="store_true", help="keep each finished run's checkpoints and policy")
    ap.add_argument("--table-only", action="store_true", help="print the tables of the runs finished so far")
    args = ap.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    P = config.load_profile(args.profile, overrides)
    root = ablations.results_dir(P.out, overrides)
    plan = ablations.plan(args.families, args.seeds)
    unknown = set(args.runs or []) - set(plan)
    if unknown:
        raise SystemExit(f"not in the plan: {', '.join(sorted(unknown))} (the plan: {', '.join(plan)})")
    print(f"{len(plan)} runs: {', '.join(plan)}")
    if not args.table_only:
        todo = {k: v for k, v in plan.items() if not args.runs or k in args.runs}
        ablations.run_all(args.profile, overrides, todo, root, keep_weights=args.keep_weights)
    base = ablations.base_scores(args.profile, overrides, root)
    results = {k: v for k, v in ablations.read_results(root).items() if k in plan}
    rows = ablations.summary(results, args.families)
    for metric, what in (("em", "1-hop EM, kept policy"), ("em_2hop", "2-hop EM, kept policy"),
                         ("last_em", "1-hop EM, last step"), ("last_em_2hop", "2-hop EM, last step"),
                         ("searched", "1-hop questions searched, kept policy")):
        value = (base.get("searched_share", 0.0) if metric == "searched"
                 else base["two_hop"]["em"] if "2hop" in metric else base["em"])
        print(f"\n{what} (points; base {100 * value:.1f})\n")
        print(ablations.markdown(rows, metric))
    verdicts = ablations.all_claims(results, base)
    print("\n" + ablations.claims_markdown(verdicts))
    out = {"plan": plan, "base": base, "summary": rows, "claims": verdicts,
           "missing": [k for k in plan if k not in results]}
    (root / "summary.json").write_text(json.dumps(out, indent=1))
    if out["missing"]:
        print(f"\nnot finished: {', '.join(out['missing'])}")
    return out


if __name__ == "__main__":
    main()
