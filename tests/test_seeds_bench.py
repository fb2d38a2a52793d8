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
