"""benchmarks/seeds.py's scheduling (its figures: docs/results.md)."""

import importlib.util
import subprocess
from pathlib import Path

import pytest


def test_the_seeds_benchmark_goes_on_when_one_run_fails(monkeypatch, capsys):
    """A seed whose notebook stops at a check ends that run only: the other runs take all their notebooks, the
    failed one none after it, and ``run_all`` names it."""
    spec = importlib.util.spec_from_file_location("seeds_bench", Path(__file__).resolve().parent.parent / "benchmarks" / "seeds.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ran = []

    def run_notebook(profile, overrides, nb, kernel):
        ran.append((overrides["name"], nb))
        if (overrides["name"], nb) == ("b", "01"):
            raise subprocess.CalledProcessError(1, ["papermill"])

    monkeypatch.setattr(bench, "run_notebook", run_notebook)
    plan = {name: {"seed": i, "name": name} for i, name in enumerate("abc")}
    failed = bench.run_all("micro", plan, ["00", "01", "02"], "k", shared=False)
    assert failed == {"b": "01"}
    assert ran == [("a", "00"), ("b", "00"), ("c", "00"), ("a", "01"), ("b", "01"), ("c", "01"), ("a", "02"), ("c", "02")]
    assert "b: 01 failed" in capsys.readouterr().out


def test_a_notebook_done_with_another_profile_runs_again(monkeypatch, tmp_path):
    """A ``.done`` marker counts only for the profile it was written with; the profile's own run also counts
    as done where ``make demo``'s pipeline would skip the notebook."""
    import json

    from zslib import config, pipeline
    spec = importlib.util.spec_from_file_location("seeds_bench", Path(__file__).resolve().parent.parent / "benchmarks" / "seeds.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ran = []
    monkeypatch.setattr(config, "ROOT", tmp_path)  # outputs/ under tmp_path
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, check: ran.append(Path(cmd[4]).parent.parent.name))
    profile = tmp_path / "edited.yaml"
    profile.write_text("extends: micro\nname: edited\n")
    nb, other = "04_curriculum_rl", {"seed": 5, "name": "seeds-edited-s5"}
    for _ in range(2):
        bench.run_notebook(str(profile), other, nb, "k")
    assert ran == ["seeds-edited-s5"], "run once, then skipped"
    profile.write_text("extends: micro\nname: edited\nrl: {lr: 0.001}\n")
    bench.run_notebook(str(profile), other, nb, "k")
    assert ran == ["seeds-edited-s5"] * 2, "the edited profile runs it again"

    # The profile's own run: make demo's pipeline stamps, current or not.
    P = config.load_profile(profile)
    key = dict((s.name, k) for s, k in pipeline.step_keys(config.to_dict(P), {}))[nb]
    (P.out / "notebooks").mkdir(parents=True)
    (P.out / "notebooks" / f"{nb}.ipynb").write_text("{}")
    (P.out / "pipeline").mkdir()
    (P.out / "pipeline" / f"{nb}.json").write_text(json.dumps({"key": key}))
    bench.run_notebook(str(profile), {"seed": P.seed, "name": "edited"}, nb, "k")
    assert ran == ["seeds-edited-s5"] * 2, "make demo's current run is used"
    (P.out / "pipeline" / f"{nb}.json").write_text(json.dumps({"key": "an older profile's"}))
    bench.run_notebook(str(profile), {"seed": P.seed, "name": "edited"}, nb, "k")
    assert ran[-1] == "edited"


def test_the_tables_rl_bar_reads_the_1_hop_drop_as_notebook_04_does_and_shows_2_hop_apart(monkeypatch, tmp_path):
    """A run that keeps its 1-hop validation but loses its 2-hop one: notebook 04's bar (the 1-hop drop) holds,
    and the table shows the 2-hop drop and the last step's EMs beside it."""
    import json

    from zslib import config
    spec = importlib.util.spec_from_file_location("seeds_bench", Path(__file__).resolve().parent.parent / "benchmarks" / "seeds.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(config, "ROOT", tmp_path)
    overrides = {"name": "seeds-micro-s1", "seed": 1}
    P = config.load_profile("micro", overrides)
    for path, record in ((P.models_dir / "policy-base.eval.json",
                          {"figures": {"em_bm25": 0.6}, "by_relation": {},
                           "settings": {"bm25, T=1": {"em": 0.5}, "bm25, T=0": {"searched_share": 0.7}}}),
                         (P.simulator_dir / "eval.json", {"finetuned": {"useful_contains_answer": 0.8,
                                                                        "noisy_contains_answer": 0.0, "parse_rate": 1.0}}),
                         (P.rl_dir / "eval.json", {"base": {"em": 0.6, "two_hop": {"em": 0.3}},
                                                   "trained": {"em": 0.9, "searched_share": 1.0, "two_hop": {"em": 0.4}}})):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
    steps = [(10, 0.85, 0.55), (20, 0.94, 0.30), (30, 0.92, 0.0)]  # (step, 1-hop, 2-hop validation EM)
    (P.rl_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "val_em": (a + b) / 2, "val_em_1hop": a, "val_em_2hop": b}) + "\n" for s, a, b in steps))
    f = bench.figures("micro", overrides)
    assert f["rl em_gain"] == pytest.approx(0.3) and f["rl best step"] == 10
    assert f["rl val_em_drop"] == pytest.approx(0.94 - 0.92)  # not the mean's 0.70 - 0.46
    assert (f["rl last val_em_1hop"], f["rl last val_em_2hop"]) == (0.92, 0.0)
    assert f["rl val_em_2hop_drop"] == pytest.approx(0.55)
    P.checks.base, P.checks.simulator = {}, {}  # only RL's bars, at the tiny profile's values
    P.checks.rl = {"em_gain": [0.15, None], "val_em_drop": [None, 0.05]}
    monkeypatch.setattr(config, "load_profile", lambda *a, **k: P)
    assert "val_em_drop" not in bench.bars_held("micro", overrides, f)
