"""The pipeline CLI: all seven notebooks end to end on the micro profile, failures named by cell, skip and --force."""

import json
import shutil

import pytest

from zslib import config, pipeline
from zslib.config import ConfigError


def _notebook(path, *sources):
    """A notebook with a ``parameters`` cell and the given code cells."""
    cells = [{"cell_type": "code", "execution_count": None, "id": "p0", "metadata": {"tags": ["parameters"]},
              "outputs": [], "source": 'profile = "micro"\noverrides = {}'}]
    cells += [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [], "source": s}
              for i, s in enumerate(sources)]
    path.write_text(json.dumps({"cells": cells, "metadata": {"kernelspec": {"name": "zerosearch", "language": "python",
                                                                             "display_name": "zerosearch"}},
                                "nbformat": 4, "nbformat_minor": 5}))


@pytest.fixture
def scratch_profile():
    """A profile name of the test's own under outputs/, removed before and after."""
    name = "pytest-pipeline"
    out = config.load_profile("micro", {"name": name}).out
    shutil.rmtree(out, ignore_errors=True)
    yield name
    shutil.rmtree(out, ignore_errors=True)


def test_overrides_are_read_as_yaml_and_bad_ones_are_named():
    assert pipeline.parse_overrides(["rl.steps=10", "data.eval_sets=[nq, hotpotqa]", "checks.strict=false"]) == \
        {"rl.steps": 10, "data.eval_sets": ["nq", "hotpotqa"], "checks.strict": False}
    with pytest.raises(ConfigError, match="'rl.steps': expected key=value"):
        pipeline.parse_overrides(["rl.steps"])
    with pytest.raises(ConfigError, match="--from 09: no such notebook"):
        pipeline.run("micro", start="09", out=lambda s: None)


def test_a_failing_notebook_is_reported_with_its_cell_and_stops_the_run(tmp_path, scratch_profile):
    marker = tmp_path / "after.txt"
    _notebook(tmp_path / "00_ok.ipynb", "x = 1")
    _notebook(tmp_path / "01_fails.ipynb", "y = 2", "values = [1, 2]\nraise ValueError(f'boom {len(values)}')")
    _notebook(tmp_path / "02_after.ipynb", f"open({str(marker)!r}, 'w').write('ran')")
    overrides = {"name": scratch_profile}
    with pytest.raises(pipeline.StepFailed) as failed:
        pipeline.run("micro", overrides=overrides, notebook_dir=tmp_path, out=lambda s: None)
    message = str(failed.value)
    # the third cell as written (papermill's copy has a cell of injected parameters more)
    assert "notebook 01_fails failed at cell 3 (In [" in message and "ValueError: boom 2" in message
    assert "values = [1, 2]" in message, "the failing cell's first lines"
    assert not marker.exists(), "nothing runs after the failing notebook"
    out = config.load_profile("micro", overrides).out
    assert (out / "pipeline" / "00_ok.json").exists() and not (out / "pipeline" / "01_fails.json").exists()


def test_current_steps_are_skipped_until_an_input_changes_or_force(tmp_path, scratch_profile):
    for i in range(3):
        _notebook(tmp_path / f"0{i}_step.ipynb", f"n = {i}")
    log = []
    ran = lambda records: [r["step"] for r in records if not r["skipped"]]  # noqa: E731
    first = pipeline.run("micro", overrides={"name": scratch_profile}, notebook_dir=tmp_path, out=log.append)
    assert ran(first) == ["00_step", "01_step", "02_step"]
    again = pipeline.run("micro", overrides={"name": scratch_profile}, notebook_dir=tmp_path, out=log.append)
    assert ran(again) == [] and "00_step: current, skipped (--force to run it again)" in log
    # A changed notebook runs again, and so does every step after it; the one before stays current.
    _notebook(tmp_path / "01_step.ipynb", "n = 'changed'")
    changed = pipeline.run("micro", overrides={"name": scratch_profile}, notebook_dir=tmp_path, out=log.append)
    assert ran(changed) == ["01_step", "02_step"]
    # A changed override changes the resolved profile: everything runs again.
    other = pipeline.run("micro", overrides={"name": scratch_profile, "rl.steps": 3}, notebook_dir=tmp_path,
                         out=log.append)
    assert ran(other) == ["00_step", "01_step", "02_step"]
    forced = pipeline.run("micro", start="01", stop="01", overrides={"name": scratch_profile, "rl.steps": 3},
                          force=True, notebook_dir=tmp_path, out=log.append)
    assert ran(forced) == ["01_step"] and [r["step"] for r in forced] == ["01_step"]


def test_the_whole_pipeline_runs_all_seven_notebooks_on_the_micro_profile(scratch_profile):
    """Every numbered notebook, in order, from nothing: world, bases, collection, labels, simulator,
    RL, evaluation (a few steps each) and ablations (none run yet), then a second run that skips them all;
    then ablation runs on that run, and notebook 06 again."""
    overrides = {"name": scratch_profile}
    records = pipeline.run("micro", overrides=overrides, out=lambda s: None)
    assert [r["step"] for r in records] == [s.name for s in pipeline.steps()] and len(records) == 7
    assert not any(r["skipped"] for r in records)
    P = config.load_profile("micro", overrides)
    for step in pipeline.steps():
        cells = json.loads((P.out / "notebooks" / step.path.name).read_text())["cells"]
        assert all(o.get("output_type") != "error" for c in cells for o in c.get("outputs", []))
    # Notebook 04's step by hand ran: its rollouts, the table of rewards and advantages, one loss, one update.
    lesson = json.loads((P.out / "notebooks" / "04_curriculum_rl.ipynb").read_text())["cells"]
    shown = "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/markdown", ""))
                    for c in lesson for o in c.get("outputs", []))
    assert "step 1 of 2: each search is noisy with probability" in shown
    assert "| question | answer | searches | reward | advantage | Δ log-prob |" in shown
    assert "= policy gradient" in shown and "gradient norm" in shown
    assert "with a positive advantage became more likely" in shown or "had an advantage of 0" in shown
    results = json.loads((P.out / "eval" / "results.json").read_text())["rows"]
    methods = {r["method"] for r in results}
    assert {"direct", "rag", "base", f"rl ({P.rl.algorithm})"} <= methods
    assert {r["dataset"] for r in results} == {"tiny 1-hop", "tiny 2-hop"}
    predictions = (P.out / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == sum(r["n"] for r in results)
    # every searching method with the simulator too, side by side with BM25 (the simulator-to-real gap)
    gaps = json.loads((P.out / "eval" / "engine_gaps.json").read_text())
    assert gaps["real"] == "bm25"
    assert {(g["method"], g["dataset"]) for g in gaps["gaps"]} == {
        (m, d) for m in ("base", f"rl ({P.rl.algorithm})") for d in ("tiny 1-hop", "tiny 2-hop")}
    assert {g["engine"] for g in gaps["gaps"]} == {"simulator (useful)"}
    figures = {p.name for p in (P.out / "figures").glob("*.png")}
    assert {"00_loss_curves.png", "04_collapse_signs.png", "05_results_bars.png", "05_cost_panel.png"} <= figures
    shown = _outputs(P.out / "notebooks" / "06_ablations.ipynb")
    assert "0 of 33 runs finished" in shown and "no ablation run has finished" in shown
    again = pipeline.run("micro", overrides=overrides, out=lambda s: None)
    assert all(r["skipped"] for r in again)
    assert "results (" in pipeline.summary("micro", overrides)
    assert "| base | tiny 1-hop | simulator (useful) (vs bm25) |" in pipeline.summary("micro", overrides)
    _check_ablations(scratch_profile, P)


def _outputs(path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/markdown", ""))
                   for c in cells for o in c.get("outputs", []))


def _check_ablations(scratch_profile: str, P) -> None:
    """Two seeds of one family on the finished micro run: the reference at the profile's seed is notebook 04's
    run, the others get folders of their own; a second call trains nothing; notebook 06 shows the tables."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("ablations_bench", pipeline.ROOT / "benchmarks" / "ablations.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    overrides = {"name": scratch_profile}
    args = ["--profile", "micro", "-p", f"name={scratch_profile}", "--families", "loss mask", "--seeds", "0", "1"]
    out = bench.main(args)
    root = P.out / "ablations"
    assert sorted(p.parent.name for p in root.glob("*/eval.json")) == [
        "loss_mask=False-s0", "loss_mask=False-s1", "reference-s0", "reference-s1"]
    assert not (root / "reference-s0" / "rl").exists()  # notebook 04's run, not trained again
    assert (root / "reference-s1" / "rl" / "metrics.jsonl").exists() and not (root / "reference-s1" / "rl" / "checkpoints").exists()
    masked = [r for r in out["summary"] if r["variant"] == "off" and r["metric"] == "em"][0]
    assert masked["seeds"] == [0, 1] and masked["paired_seeds"] == 2
    mask_claims = [c for c in out["claims"] if c["claim"] == "the loss mask helps"]
    assert [c["seeds"] for c in mask_claims] == [2, 2] and out["missing"] == []
    stamp = (root / "reference-s1" / "eval.json").stat().st_mtime_ns
    again = bench.main(args)  # finished runs are read back, not trained again
    assert (root / "reference-s1" / "eval.json").stat().st_mtime_ns == stamp and again["summary"] == out["summary"]
    pipeline.run("micro", overrides={**overrides}, start="06", force=True, out=lambda s: None)
    # the notebook's own plan is every family: the 4 runs of this one are found
    shown = _outputs(P.out / "notebooks" / "06_ablations.ipynb")
    assert "4 of 33 runs finished" in shown and "| loss mask | off | 2 |" in shown
    assert "the loss mask helps" in shown
    assert (P.out / "figures" / "06_ablation_runs.png").exists()  # every run's EM against the share searched
