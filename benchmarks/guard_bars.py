"""The collapse guard's bars against measured runs (issue 28): how close healthy runs came to each bar, and how
soon an induced collapse passed them.

    .venv/bin/python benchmarks/guard_bars.py [--profile tiny] [--lr-times 100] [--steps 10] [--no-collapse]

Healthy runs: notebook 04's (``outputs/<profile>/rl/``) and every ablation run's
(``outputs/<profile>/ablations/*/rl/``) that the guard only watched (``guard.action`` off or warn). The induced
collapse: notebook 04's recipe with the learning rate times ``--lr-times`` for ``--steps`` steps, the guard
warning only, in ``outputs/<profile>/guard/collapse/`` (resumable). Each figure is checked after every step as
the trainer does (``guard.peaks``). Writes ``outputs/<profile>/guard/bars.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zslib import config, guard  # noqa: E402
from zslib.pipeline import parse_overrides  # noqa: E402
from zslib.files import read_jsonl  # noqa: E402

NAMES = {bar: name for _, name, bar, _ in guard.WATCHED} | {"val_drop": "validation EM drop"}


def healthy_runs(out: Path) -> dict[str, list[dict]]:
    """Finished runs the guard only watched, by name: notebook 04's and the ablations'."""
    paths = {"notebook 04": out / "rl" / "metrics.jsonl"}
    paths |= {p.parent.parent.name: p for p in sorted((out / "ablations").glob("*/rl/metrics.jsonl"))
              if (p.parent.parent / "eval.json").exists()}
    runs = {}
    for name, path in paths.items():
        metrics = read_jsonl(path) if path.exists() else []
        if metrics and not any(m.get("guard_action") in ("stop", "rollback") for m in metrics):
            runs[name] = metrics
    return runs


def induced_collapse(profile: str, overrides: dict, lr_times: float, steps: int) -> list[dict]:
    from zslib import trainer

    P0 = config.load_profile(profile, overrides)
    P = config.load_profile(profile, {**overrides, "rl.lr": P0.rl.lr * lr_times, "rl.steps": steps,
                                      "guard.action": "warn"})
    T = trainer.RLTrainer(P, P.out / "guard" / "collapse")
    T.train(resume=True)
    return read_jsonl(T.metrics_path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--lr-times", type=float, default=100.0, help="the induced collapse's learning rate, times the profile's")
    ap.add_argument("--steps", type=int, default=10, help="the induced collapse's steps")
    ap.add_argument("--no-collapse", action="store_true", help="healthy runs only")
    ap.add_argument("-p", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    P = config.load_profile(args.profile, overrides)
    cfg = P.guard
    healthy = {name: guard.peaks(m, cfg) for name, m in healthy_runs(P.out).items()}
    collapse = None if args.no_collapse else guard.peaks(
        induced_collapse(args.profile, overrides, args.lr_times, args.steps), cfg)

    print(f"{len(healthy)} healthy runs ({', '.join(healthy)}); window {cfg.window}"
          + ("" if collapse is None else f"; collapse: learning rate x{args.lr_times:g}, {args.steps} steps"))
    print("\n| sign | bar (guard:) | healthy: largest (run, step) | healthy runs over the bar | collapse: largest | collapse: first step over |")
    print("|---|---|---|---|---|---|")
    rows = []
    for bar, name in NAMES.items():
        seen = [(p[bar]["peak"], run, p[bar]["at"]) for run, p in healthy.items() if bar in p]
        top = max(seen) if seen else None
        over = sum(p[bar]["over"] is not None for p in healthy.values() if bar in p)
        c = (collapse or {}).get(bar)
        rows.append({"sign": name, "field": bar, "bar": getattr(cfg, bar), "healthy_peak": top and top[0], "healthy_run": top and top[1],
                     "healthy_step": top and top[2], "healthy_over": over, "healthy_runs": len(seen),
                     "collapse_peak": c and c["peak"], "collapse_over": c and c["over"]})
        print(f"| {name} | {bar} {getattr(cfg, bar):g} | " + (f"{top[0]:.3f} ({top[1]}, {top[2]})" if top else "-")
              + f" | {over} of {len(seen)} | " + (f"{c['peak']:.3f} | {c['over'] or 'never'}" if c else "- | -") + " |")
    out = {"profile": args.profile, "window": cfg.window, "lr_times": args.lr_times, "steps": args.steps, "rows": rows}
    path = P.out / "guard" / "bars.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
