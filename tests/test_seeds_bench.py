"""benchmarks/seeds.py's scheduling (its figures: docs/results.md)."""

import importlib.util
import subprocess
from pathlib import Path


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
