"""Does the tiny pipeline tell the same story on every seed and without bf16? Runs notebooks 00-04
for several seeds of a profile, and once more with bf16 autocast off, then prints one table of every
headline figure per run with its spread and whether each run's bars (``checks:``) held.

    .venv/bin/python benchmarks/seeds.py [--profile tiny] [--seeds 0 1 2] [--no-fp32] [--own-simulators]
                                         [--notebooks 00_prepare ...] [--table-only]

Each run is a profile of its own, ``outputs/seeds-<profile>-s<N>/`` (``-s0-fp32`` for bf16 off), with its
world the profile's (``world.seed`` stays) and everything else built from its seed. Two things are reused:

- **the profile's own run is seed 0** when the seed is the profile's: ``make demo`` writes exactly what
  ``seeds-tiny-s0`` would (same profile, same seed, same machine: byte-identical bases), so when
  ``outputs/<profile>/`` holds a finished run it is used as it is, and is run (as ``outputs/<profile>/``)
  otherwise;
- **one simulator for every run** (unless ``--own-simulators``): the other runs link seed 0's simulator base
  and fine-tuned simulator and skip notebooks 01-03. The simulator is one model that every policy trains
  against, its bars are checked once, and sharing it saves about 30 of the 60 minutes of a run on 2 cores.
  The table marks its figures "shared". The bf16-off run then differs from seed 0 in its policy base
  (``tiny.bf16_autocast``) and its RL (``rl.bf16_autocast``), both in fp32.

Notebooks run breadth-first (00 of every run, then 01, ...), so a shared simulator exists before the first RL
run needs it. Resumable: a notebook that finished writes ``outputs/<run>/seeds/<notebook>.done``, which holds
the resolved profile it ran with, and is skipped the next time while the profile is unchanged (for the profile's
own run, a notebook also counts as done when ``make demo``'s pipeline would skip it); an interrupted notebook is
run again and carries on from what it had saved (bases, the trajectory file and RL checkpoints are kept). After
an edit to a setting that a kept product records (a base, the fine-tuned simulator, an RL run: its
``recipe.json``), the notebook refuses the old folder: move it aside.
A notebook that fails, a check that stops it included, ends that run only: the others go on, the table shows
every run, and the exit status says which failed. The table is also written to
``outputs/seeds-<profile>/seeds.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zslib import checks, config, pipeline, trainer  # noqa: E402
from zslib.files import read_jsonl  # noqa: E402

NOTEBOOKS = ["00_prepare", "01_collect_trajectories", "02_label", "03_simulator_sft", "04_curriculum_rl"]


SIMULATOR = {"01_collect_trajectories", "02_label", "03_simulator_sft"}  # what a shared simulator skips


def runs(profile: str, seeds: list[int], fp32: bool) -> dict[str, dict]:
    """Run name -> overrides; the first run is seed 0 (the profile's own run when its seed is the profile's)."""
    own = config.load_profile(profile)
    out = {}
    for s in seeds:
        out[own.name if s == own.seed else f"seeds-{profile}-s{s}"] = {"seed": s}
    if fp32:
        out[f"seeds-{profile}-s{seeds[0]}-fp32"] = {"seed": seeds[0], "tiny.bf16_autocast": False,
                                                    "simulator.bf16": False, "rl.bf16_autocast": False}
    return {name: {**o, "name": name} for name, o in out.items()}


def profile_key(P) -> str:
    """A notebook's ``.done`` marker holds the resolved profile it ran with: an edited profile runs it again."""
    return hashlib.sha256(json.dumps(config.to_dict(P), sort_keys=True, default=str).encode()).hexdigest()


def share_simulator(source, P) -> None:
    """Link the source run's simulator base and fine-tuned simulator into run ``P``."""
    if not (Path(source.simulator_path) / "tokenizer.json").exists():  # the last file pretraining.build_bases saves
        # (a link to a base still being built would make notebook 00 build it again, into the source's folder)
        raise SystemExit(f"{P.name}: the shared simulator base {source.simulator_path} is not built yet: "
                         f"run {source.name}'s notebook 00 first")
    log = "simulator-base.loss.jsonl"  # notebook 00 plots it
    for ours, theirs in ((Path(P.simulator_path), Path(source.simulator_path)), (P.simulator_dir, source.simulator_dir),
                         (P.models_dir / log, source.models_dir / log)):
        ours.parent.mkdir(parents=True, exist_ok=True)
        if not ours.is_symlink():
            if ours.exists():
                raise SystemExit(f"{ours} exists and is not a link to {theirs}: remove it, or use --own-simulators")
            ours.symlink_to(theirs.resolve(), target_is_directory=theirs.is_dir())


def run_notebook(profile: str, overrides: dict, nb: str, kernel: str) -> None:
    P = config.load_profile(profile, overrides)
    done_dir, executed = P.out / "seeds", P.out / "notebooks"
    marker, key = done_dir / f"{nb}.done", profile_key(P)
    own = config.load_profile(profile)
    if (marker.exists() and marker.read_text() == key) or \
            (config.to_dict(P) == config.to_dict(own) and nb in pipeline.current_steps(profile)):  # make demo's run
        print(f"{P.name}: {nb} done before with this profile, skipped")
        return
    done_dir.mkdir(parents=True, exist_ok=True)
    executed.mkdir(parents=True, exist_ok=True)
    params = json.dumps({"profile": profile, "overrides": overrides})
    print(f"{P.name}: running {nb}", flush=True)
    subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "notebooks" / f"{nb}.ipynb"),
                    str(executed / f"{nb}.ipynb"), "-k", kernel, "-y", params, "--cwd", str(ROOT / "notebooks"),
                    "--no-progress-bar"], check=True)
    marker.write_text(key)


def run_all(profile: str, plan: dict[str, dict], notebooks: list[str], kernel: str, shared: bool,
            only: list[str] | None = None) -> dict[str, str]:
    """Every notebook of every run, breadth-first. A notebook that fails (an error, or a check that stops it)
    ends its own run, not the others'; returns run -> the notebook that failed."""
    first = next(iter(plan))
    source = config.load_profile(profile, plan[first])
    failed: dict[str, str] = {}
    for nb in notebooks:
        for name, overrides in plan.items():
            if (only and name not in only) or name in failed:
                continue
            if shared and name != first:
                if nb in SIMULATOR:
                    continue
                P = config.load_profile(profile, overrides)
                if nb == "00_prepare":
                    share_simulator(source, P)  # before 00, so it builds only the policy base
                elif not (source.simulator_dir / "eval.json").exists():
                    raise SystemExit(f"{name}: {nb} needs the shared simulator, and {source.simulator_dir} has "
                                     f"none yet: run {first}'s notebooks 01-03 first")
            try:
                run_notebook(profile, overrides, nb, kernel)
            except subprocess.CalledProcessError:
                failed[name] = nb
                print(f"{name}: {nb} failed (its executed copy under outputs/{name}/notebooks/ names the cell); "
                      "its later notebooks are skipped", flush=True)
    return failed


def figures(profile: str, overrides: dict) -> dict | None:
    """The headline figures of one finished run (None if it has not finished)."""
    P = config.load_profile(profile, overrides)
    paths = [P.models_dir / "policy-base.eval.json", P.simulator_dir / "eval.json", P.rl_dir / "eval.json"]
    if not all(p.exists() for p in paths):
        return None
    base, sim, rl = (json.loads(p.read_text()) for p in paths)
    metrics = read_jsonl(P.rl_dir / "metrics.jsonl")
    validated = [m for m in metrics if "val_em" in m]
    best = max(validated, key=lambda m: (m["val_em"], -m["step"]))
    checked = trainer.run_figures(metrics, rl["base"]["em"], rl["trained"]["em"])  # as notebook 04 checks them
    by_rel = base["by_relation"]
    return {
        **{f"base {k}": v for k, v in base["figures"].items()},
        "base em_bm25 T=1": base["settings"]["bm25, T=1"]["em"],
        "base searched_share": base["settings"]["bm25, T=0"]["searched_share"],
        "base 2-hop em": rl["base"]["two_hop"]["em"],
        **{f"margin {k}": r["margin_mean"] for k, r in by_rel.items()},
        **{f"simulator {k}": sim["finetuned"][k] for k in ("useful_contains_answer", "noisy_contains_answer", "parse_rate")},
        "trained 1-hop em": rl["trained"]["em"],
        "trained searched_share": rl["trained"]["searched_share"],
        "trained 2-hop em": rl["trained"]["two_hop"]["em"],
        "rl em_gain": checked["em_gain"],
        "rl best step": best["step"],
        "rl best val_em": best["val_em"],
        "rl last val_em": validated[-1]["val_em"],
        # the bar's drop is the 1-hop validation's, as in notebook 04; the 2-hop one is reported beside it
        "rl val_em_drop": checked["val_em_drop"],
        **({"rl last val_em_1hop": validated[-1]["val_em_1hop"], "rl last val_em_2hop": validated[-1]["val_em_2hop"],
            "rl val_em_2hop_drop": checked["val_em_2hop_drop"]} if "val_em_2hop" in validated[-1] else {}),
    }


def bars_held(profile: str, overrides: dict, f: dict) -> list[str]:
    """The names of the figures outside the profile's ranges."""
    P = config.load_profile(profile, overrides)
    stage_figures = {"base": {k[5:]: v for k, v in f.items() if k.startswith("base ")},
                     "simulator": {k[10:]: v for k, v in f.items() if k.startswith("simulator ")},
                     "rl": {"em_gain": f["rl em_gain"], "val_em_drop": f["rl val_em_drop"]}}
    lenient = config.ChecksConfig(strict=False, base=P.checks.base, simulator=P.checks.simulator, rl=P.checks.rl)
    failed = []
    for stage, values in stage_figures.items():
        failed += [r["name"] for r in checks.check(stage, values, lenient, out=lambda s: None) if not r["ok"]]
    return failed


def table(profile: str, plan: dict[str, dict], shared: bool) -> dict:
    found = {name: figures(profile, o) for name, o in plan.items()}
    done = {k: v for k, v in found.items() if v}
    if not done:
        print("no run has finished yet")
        return {}
    seeds = [k for k in done if not k.endswith("-fp32")]
    keys = list(next(iter(done.values())))
    first = next(iter(plan))
    short = {k: "s0 (" + k + ")" if k == first and not k.startswith("seeds-") else k.replace(f"seeds-{profile}-", "")
             for k in done}
    print("\n| figure | " + " | ".join(short.values()) + " | spread over seeds (max - min) |")
    print("|---|" + "---|" * len(done) + "---|")
    for key in keys:
        values = [done[k].get(key) for k in done]
        seed_values = [done[k][key] for k in seeds if done[k].get(key) is not None]
        spread = f"{max(seed_values) - min(seed_values):.3f}" if len(seed_values) > 1 else ""
        cells = ["" if v is None else (f"{v:d}" if isinstance(v, int) else f"{v:.3f}") for v in values]
        if shared and key.startswith("simulator "):  # one simulator for every run: its figures are seed 0's
            cells = [c if k == first else "shared" for k, c in zip(done, cells)]
            spread = ""
        print(f"| {key} | " + " | ".join(cells) + f" | {spread} |")
    failed = {k: bars_held(profile, plan[k], done[k]) for k in done}
    print("| bars held | " + " | ".join("yes" if not f else "no: " + ", ".join(f) for f in failed.values()) + " | |")
    missing = [k for k in plan if k not in done]
    if missing:
        print(f"\nnot finished: {', '.join(missing)}")
    out = {"runs": done, "failed_bars": failed, "shared_simulator": first if shared else None}
    path = ROOT / "outputs" / f"seeds-{profile}" / "seeds.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-fp32", action="store_true", help="skip the run with bf16 autocast off")
    ap.add_argument("--own-simulators", action="store_true", help="every run builds its own simulator (01-03)")
    ap.add_argument("--notebooks", nargs="+", default=NOTEBOOKS, choices=NOTEBOOKS, help="run only these")
    ap.add_argument("--runs", nargs="+", help="run only these runs (names as in the table), e.g. to split the "
                                              "work over two processes; the table still shows every finished run")
    ap.add_argument("--table-only", action="store_true", help="print the table of the runs finished so far")
    ap.add_argument("--kernel", default="zerosearch")
    args = ap.parse_args()
    plan = runs(args.profile, args.seeds, not args.no_fp32)
    shared = not args.own_simulators
    failed = {} if args.table_only else \
        run_all(args.profile, plan, [nb for nb in NOTEBOOKS if nb in args.notebooks], args.kernel, shared, args.runs)
    table(args.profile, plan, shared)
    if failed:
        raise SystemExit("failed: " + ", ".join(f"{name} at {nb}" for name, nb in failed.items()))


if __name__ == "__main__":
    main()
