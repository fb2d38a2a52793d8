"""The paper's ablations, one switch each, over several seeds (issue 28; docs/method.md §14).

A *family* is one design choice and its *variants* (profile overrides); each family's first variant is the
profile's own setting, the reference, so one reference run per seed serves every family. A run is one
(variant, seed): RL from the profile's policy base, against its simulator (both shared by every run), then
the held-out 1-hop and 2-hop questions, greedy, with the real engine (``evaluate.heldout_scores``, as notebook
04 evaluates), for the policy kept (the best-validated step's) and, when that is not the last, the last step's.

``run_all`` trains and evaluates what is missing, one folder per run (``outputs/<profile>/ablations/<run>/``,
resumable: RL from its last checkpoint, a finished run's ``eval.json`` is kept). A recipe changed by overrides
(``-p rl.lr=4e-4``) gets a folder of its own, ``ablations/recipe=<overrides>/``, reference included.
``summary`` and ``claims`` read those files back for notebook 06: the mean and spread over seeds, and each
variant's difference from the reference paired by seed with a t interval.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

from .files import read_jsonl, recipe_changes

FAMILIES: dict[str, dict[str, dict]] = {
    "curriculum": {"exponential": {}, "linear": {"rl.curriculum": "linear"},
                   "constant at p_end": {"rl.curriculum": "constant"}, "none (all useful)": {"rl.p_end": 0.0},
                   "reversed (noisy first)": {"rl.curriculum": "reversed"}},
    "loss mask": {"on": {}, "off": {"rl.loss_mask": False}},
    "engine during RL": {"fine-tuned simulator": {}, "prompt-only simulator": {"rl.engine": "prompt_only"},
                         "real engine": {"rl.engine": "bm25"}},
    "reward": {"F1": {}, "EM": {"rl.reward": "em"}},
    "algorithm": {"GRPO": {}, "PPO": {"rl.algorithm": "ppo"}, "REINFORCE++": {"rl.algorithm": "reinforce_pp"}},
}
METRICS = ("em", "em_2hop")  # held-out 1-hop and 2-hop EM of the kept policy; "last_" for the last step's

# The paper's claims as (what it says, family, better variant, other variant, kind): "beats" holds when the
# paired difference's interval lies above 0; "matches" when it lies above -MATCH (the other may be better).
MATCH = 0.05
CLAIMS = [
    ("a curriculum beats none", "curriculum", "exponential", "none (all useful)", "beats"),
    ("easy-to-hard beats hard-to-easy", "curriculum", "exponential", "reversed (noisy first)", "beats"),
    ("the loss mask helps", "loss mask", "on", "off", "beats"),
    ("a fine-tuned simulator trains as well as the real engine", "engine during RL", "fine-tuned simulator",
     "real engine", "matches"),
    ("a fine-tuned simulator trains better than a prompt-only one", "engine during RL", "fine-tuned simulator",
     "prompt-only simulator", "beats"),
]

# Two-sided 95% quantiles of Student's t by degrees of freedom (above 30: the normal's).
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def slug(overrides: dict) -> str:
    """A run folder's name for a variant: ``reference`` for the profile's own settings."""
    return "reference" if not overrides else "+".join(f"{k.removeprefix('rl.')}={v}" for k, v in sorted(overrides.items()))


def recipe(overrides: dict) -> dict:
    """The overrides that change what a run trains: all but the profile's ``name`` (where it writes) and
    ``seed`` (each run sets its own); ``4e-4`` read as the number, so both spellings are one recipe."""
    from .config import yaml_number
    return {k: yaml_number(v) for k, v in overrides.items() if k not in ("name", "seed")}


def results_dir(out: str | Path, overrides: dict) -> Path:
    """Where a recipe's runs go: ``<out>/ablations`` for the profile as it is, ``<out>/ablations/recipe=<slug>``
    for one changed by overrides (``-p rl.lr=4e-4``), so runs of different recipes are never read as one."""
    changed = recipe(overrides)
    return Path(out) / "ablations" / (f"recipe={slug(changed)}" if changed else "")


def plan(families: list[str] | None = None, seeds: list[int] = (0, 1, 2)) -> dict[str, dict]:
    """Run name -> overrides (``seed`` included) for the families asked, each distinct run once."""
    out = {}
    for family in families or list(FAMILIES):
        if family not in FAMILIES:
            raise ValueError(f"unknown ablation family {family!r}: one of {', '.join(FAMILIES)}")
        for overrides in FAMILIES[family].values():
            for seed in seeds:
                out[f"{slug(overrides)}-s{seed}"] = {**overrides, "seed": seed}
    return out


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` with its 95% Student-t interval (low = high = mean for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = (_T95[len(values) - 2] if len(values) - 1 <= len(_T95) else 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


# ---------------------------------------------------------------- running

def run_all(profile_name: str, overrides: dict, runs: dict[str, dict], root: str | Path | None = None,
            keep_weights: bool = False, log=print) -> dict[str, dict]:
    """Train and evaluate every run of ``runs`` (from ``plan``) not finished yet; returns each run's results.

    The policy base, the fine-tuned simulator, the prompt-only one and the real engine are built once and
    shared. The reference run at the profile's seed is notebook 04's (``outputs/<profile>/rl/``, used or
    resumed there). Another finished run's weights are deleted unless ``keep_weights`` (its metrics, samples
    and ``eval.json`` stay).
    """
    from . import config, trainer
    from .evaluate import heldout_scores
    from .search import profile_engine

    P0 = config.load_profile(profile_name, overrides)
    root = Path(root or results_dir(P0.out, overrides))
    changed = recipe(overrides)
    real = profile_engine(P0)
    engines: dict[str, object] = {"bm25": real}
    results = {}
    for name, run in runs.items():
        folder = root / name
        P = config.load_profile(profile_name, {**overrides, **run})
        if (folder / "eval.json").exists():
            stored = results[name] = json.loads((folder / "eval.json").read_text())
            if "rl_recipe" in stored:  # the whole recipe it trained with: the profile file may have been edited since
                changes = recipe_changes(stored["rl_recipe"], trainer.run_recipe(P))
            else:  # written before that was stored: its overrides only (none in the oldest files)
                theirs = stored.get("recipe", {})
                changes = [] if recipe(theirs) == changed else [f"overrides: {theirs}"]
            if changes:
                raise ValueError(f"{folder / 'eval.json'}: a run of another recipe ({'; '.join(changes)}); "
                                 "give each recipe its own folder (results_dir)")
            continue
        if P.rl.engine not in engines:  # built when a run first needs it
            engines[P.rl.engine] = trainer.rl_simulator(P)
        # The reference at the profile's own seed is notebook 04's run (trained or resumed there), unless the
        # overrides change the recipe: notebook 04's folder need not hold a run of it.
        own = not changed and all(k == "seed" for k in run) and run.get("seed", P0.seed) == P0.seed
        log(f"{name}: training ({', '.join(f'{k}={v}' for k, v in run.items())})"
            + (f" in notebook 04's run folder {P.rl_dir}" if own else ""))
        T = trainer.RLTrainer(P, P.rl_dir if own else folder / "rl", engine=engines[P.rl.engine], real_engine=real)
        T.train(resume=True)
        metrics = read_jsonl(T.metrics_path)
        n = P.rl.eval_size
        last = heldout_scores(T.policy, T.tokenizer, P, real, n, desc=f"{name}, last step")
        best = T.use_best_policy()
        kept = last if best is None or best["step"] == T.step_count else \
            heldout_scores(T.policy, T.tokenizer, P, real, n, desc=f"{name}, kept step")
        out = {"run": name, "overrides": run, "recipe": changed, "rl_recipe": trainer.run_recipe(P), "steps": T.step_count,
               "kept_step": best["step"] if best else T.step_count,
               "kept": kept, "last": last, "train_minutes": sum(m["seconds"] for m in metrics) / 60,
               "guard": sorted({m["guard_action"] for m in metrics if m.get("guard_action")})}
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "eval.json.tmp"
        tmp.write_text(json.dumps(out, indent=1))
        tmp.rename(folder / "eval.json")
        if not (keep_weights or own):
            for d in ("checkpoints", "best", "policy"):
                shutil.rmtree(folder / "rl" / d, ignore_errors=True)
        results[name] = out
        del T
    return results


def base_scores(profile_name: str, overrides: dict, root: str | Path | None = None) -> dict:
    """The policy base's held-out scores (the same harness), cached in ``<root>/base.json``."""
    from . import config
    from .evaluate import heldout_scores
    from .generation.models import load_causal_lm
    from .search import profile_engine

    P = config.load_profile(profile_name, overrides)
    path = Path(root or results_dir(P.out, overrides)) / "base.json"
    if not path.exists():
        model, tok = load_causal_lm(P.policy_path, P.models.dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(heldout_scores(model, tok, P, profile_engine(P), P.rl.eval_size, desc="base"), indent=1))
    return json.loads(path.read_text())


def read_results(root: str | Path) -> dict[str, dict]:
    """Every finished run's ``eval.json`` under ``root``, by run name."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(root).glob("*/eval.json"))}


# ---------------------------------------------------------------- reading

def run_figures(result: dict) -> dict[str, float]:
    """The figures of one run: held-out 1-hop and 2-hop EM of the kept and of the last step's policy, and
    ``searched``: the kept policy's share of 1-hop questions it searched for (what RL changes on this world)."""
    out = {}
    for which, prefix in (("kept", ""), ("last", "last_")):
        scores = result[which]
        out[prefix + "em"] = scores["em"]
        if "two_hop" in scores:
            out[prefix + "em_2hop"] = scores["two_hop"]["em"]
    if "searched_share" in result["kept"]:
        out["searched"] = result["kept"]["searched_share"]
    return out


def variant_of(result: dict) -> tuple[str, str]:
    """(family, variant) of a run from its overrides: ("reference", "reference") for the profile's own
    settings, ("other", its folder's name) for overrides no family holds."""
    run = slug({k: v for k, v in result["overrides"].items() if k != "seed"})
    if run == "reference":
        return "reference", "reference"
    return next(((family, variant) for family, variants in FAMILIES.items()
                 for variant, overrides in variants.items() if overrides and slug(overrides) == run), ("other", run))


def run_points(results: dict[str, dict]) -> list[dict]:
    """One point per finished run: its family, variant and seed with ``run_figures`` (notebook 06's figure of
    every run's EM against how often it searched)."""
    return [{"run": name, **dict(zip(("family", "variant"), variant_of(r))), "seed": r["overrides"]["seed"],
             **run_figures(r)} for name, r in sorted(results.items())]


def summary(results: dict[str, dict], families: list[str] | None = None) -> list[dict]:
    """One row per (family, variant, metric of ``run_figures``): the seeds found, the mean, sample sd, min and
    max over them, and the difference from the family's reference paired by seed (mean and 95% t interval;
    seeds without both runs are left out of the pairing)."""
    by_slug: dict[str, dict[int, dict]] = {}
    for r in results.values():
        seed = r["overrides"]["seed"]
        by_slug.setdefault(slug({k: v for k, v in r["overrides"].items() if k != "seed"}), {})[seed] = run_figures(r)
    rows = []
    for family in families or list(FAMILIES):
        variants = FAMILIES[family]
        ref = by_slug.get(slug(next(iter(variants.values()))), {})
        for variant, overrides in variants.items():
            runs = by_slug.get(slug(overrides), {})
            for metric in ("em", "em_2hop", "last_em", "last_em_2hop", "searched"):
                values = {s: f[metric] for s, f in runs.items() if metric in f}
                if not values:
                    continue
                row = {"family": family, "variant": variant, "metric": metric, "seeds": sorted(values),
                       "values": [values[s] for s in sorted(values)],
                       "mean": statistics.fmean(values.values()),
                       "sd": statistics.stdev(values.values()) if len(values) > 1 else 0.0,
                       "min": min(values.values()), "max": max(values.values()), "reference": not overrides}
                paired = [values[s] - ref[s][metric] for s in sorted(values) if s in ref and metric in ref[s]]
                if paired and overrides:
                    row["diff"], row["diff_low"], row["diff_high"] = t_interval(paired)
                    row["paired_seeds"] = len(paired)
                rows.append(row)
    return rows


def claims(results: dict[str, dict], metric: str = "em") -> list[dict]:
    """Each of the paper's claims (``CLAIMS``) on ``metric``: the paired difference (better minus other) with
    its interval, the seeds on which it is positive (``ahead``: with few seeds the interval is wide, and
    "ahead on 3 of 3" is what can still be said), and a verdict: ``reproduced``, ``not reproduced`` (the
    interval says otherwise), ``undecided`` (the interval holds both) or ``not run``."""
    rows = []
    for text, family, better, other, kind in CLAIMS:
        a, b = (_by_seed(results, FAMILIES[family][v], metric) for v in (better, other))
        paired = [a[s] - b[s] for s in sorted(a) if s in b]
        row = {"claim": text, "metric": metric, "better": better, "other": other, "seeds": len(paired)}
        if not paired:
            rows.append({**row, "verdict": "not run"})
            continue
        mean, low, high = t_interval(paired)
        bar = 0.0 if kind == "beats" else -MATCH
        if len(paired) < 2:
            verdict = "undecided"  # one seed has no interval
        elif low > bar:
            verdict = "reproduced"
        elif high < bar or (kind == "beats" and high <= 0):
            verdict = "not reproduced"
        else:
            verdict = "undecided"
        rows.append({**row, "diff": mean, "low": low, "high": high, "ahead": sum(d > 0 for d in paired),
                     "verdict": verdict})
    return rows


def transfer(results: dict[str, dict], base: dict, metric: str = "em") -> dict:
    """The claim that a policy trained against the simulator transfers to the real engine: the reference
    runs' held-out ``metric`` (real engine) minus the base's, over seeds."""
    ref = _by_seed(results, {}, metric)
    base_value = base["em"] if metric == "em" else base["two_hop"]["em"]
    gains = [v - base_value for _, v in sorted(ref.items())]
    if not gains:
        return {"claim": "the simulator-trained policy transfers to the real engine", "metric": metric, "verdict": "not run"}
    mean, low, high = t_interval(gains)
    verdict = "undecided" if len(gains) < 2 else "reproduced" if low > 0 else "not reproduced" if high <= 0 else "undecided"
    return {"claim": "the simulator-trained policy transfers to the real engine", "metric": metric, "seeds": len(gains),
            "base": base_value, "diff": mean, "low": low, "high": high, "ahead": sum(g > 0 for g in gains),
            "verdict": verdict}


def _by_seed(results: dict[str, dict], overrides: dict, metric: str) -> dict[int, float]:
    want = slug(overrides)
    out = {}
    for r in results.values():
        run = {k: v for k, v in r["overrides"].items() if k != "seed"}
        figures = run_figures(r)
        if slug(run) == want and metric in figures:
            out[r["overrides"]["seed"]] = figures[metric]
    return out


def markdown(rows: list[dict], metric: str = "em") -> str:
    """The summary's rows for one metric as a markdown table, in points."""
    lines = ["| family | variant | seeds | mean | sd | min-max | vs reference (paired, 95% t) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["metric"] != metric:
            continue
        diff = "reference" if r["reference"] else (
            f"{100 * r['diff']:+.1f} [{100 * r['diff_low']:+.1f}, {100 * r['diff_high']:+.1f}]" if "diff" in r else "")
        lines.append(f"| {r['family']} | {r['variant']} | {len(r['seeds'])} | {100 * r['mean']:.1f} | {100 * r['sd']:.1f} | "
                     f"{100 * r['min']:.1f}-{100 * r['max']:.1f} | {diff} |")
    return "\n".join(lines)


def claims_markdown(verdicts: list[dict]) -> str:
    """``claims`` and ``transfer`` rows as a markdown table, differences in points."""
    lines = ["| claim | EM | seeds | difference, points [95% t] | ahead on | verdict |", "|---|---|---|---|---|---|"]
    for c in verdicts:
        diff = f"{100 * c['diff']:+.1f} [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]" if "diff" in c else ""
        kind = "2-hop" if c.get("metric") == "em_2hop" else "1-hop"
        ahead = f"{c['ahead']} of {c['seeds']}" if "ahead" in c else ""
        lines.append(f"| {c['claim']} | {kind} | {c.get('seeds', 0)} | {diff} | {ahead} | {c['verdict']} |")
    return "\n".join(lines)


def all_claims(results: dict[str, dict], base: dict) -> list[dict]:
    """Every claim on 1-hop and 2-hop EM, the transfer to the real engine included."""
    return [c for metric in METRICS for c in claims(results, metric) + [transfer(results, base, metric)]]
