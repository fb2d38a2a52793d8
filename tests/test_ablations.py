"""The ablations' plan and statistics against hand computations (the runs themselves: tests/test_pipeline.py)."""

import math

import pytest

from zslib import ablations
from zslib.curriculum import noise_probability


def _result(overrides: dict, seed: int, em: float, em_2hop: float = 0.0, last_em: float | None = None,
            searched: float | None = None) -> dict:
    scores = {"em": em, "two_hop": {"em": em_2hop}, **({} if searched is None else {"searched_share": searched})}
    last = scores if last_em is None else {"em": last_em, "two_hop": {"em": em_2hop}}
    return {"overrides": {**overrides, "seed": seed}, "kept": scores, "last": last}


def _results(table: dict[str, tuple[dict, list[float]]]) -> dict:
    return {f"{ablations.slug(o)}-s{s}": _result(o, s, v) for o, values in table.values() for s, v in enumerate(values)}


def test_the_plan_has_one_reference_per_seed_and_one_run_per_variant_and_seed():
    plan = ablations.plan(["loss mask", "engine during RL"], seeds=[0, 1])
    assert sorted(plan) == sorted(["reference-s0", "reference-s1", "loss_mask=False-s0", "loss_mask=False-s1",
                                   "engine=prompt_only-s0", "engine=prompt_only-s1", "engine=bm25-s0", "engine=bm25-s1"])
    assert plan["engine=bm25-s1"] == {"rl.engine": "bm25", "seed": 1} and plan["reference-s0"] == {"seed": 0}
    assert len(ablations.plan(seeds=[0, 1, 2])) == 3 * (1 + 4 + 1 + 2 + 1 + 2)  # every family: 11 variants + the reference
    with pytest.raises(ValueError, match="unknown ablation family 'masks'"):
        ablations.plan(["masks"])


def test_the_t_interval_is_the_textbook_one():
    # [1, 2, 3]: mean 2, sd 1, standard error 1/sqrt(3), t(0.975, 2 df) = 4.303
    mean, low, high = ablations.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert low == pytest.approx(2 - 4.303 / math.sqrt(3)) and high == pytest.approx(2 + 4.303 / math.sqrt(3))
    assert ablations.t_interval([0.5]) == (0.5, 0.5, 0.5)
    # two values: 1 df, t = 12.706; [0, 1]: sd sqrt(0.5), se 0.5
    assert ablations.t_interval([0.0, 1.0])[2] == pytest.approx(0.5 + 12.706 * 0.5)


def test_each_claim_gets_the_verdict_its_paired_interval_gives():
    fam = ablations.FAMILIES
    results = _results({
        "reference": ({}, [0.6, 0.7, 0.8]),
        "mask off": (fam["loss mask"]["off"], [0.5, 0.55, 0.7]),            # diffs .10 .15 .10: above 0
        "prompt-only": (fam["engine during RL"]["prompt-only simulator"], [0.7, 0.82, 0.91]),  # -.10 -.12 -.11
        "real": (fam["engine during RL"]["real engine"], [0.6, 0.72, 0.79]),  # 0 -.02 +.01: within 5 points
        "none": (fam["curriculum"]["none (all useful)"], [0.5, 0.8, 0.75]),  # +.10 -.10 +.05: both ways
    })
    verdicts = {c["claim"]: c for c in ablations.claims(results)}
    mask = verdicts["the loss mask helps"]
    # diffs .10 .15 .10: mean .11667, sd .028868, half-width 4.303 x .028868 / sqrt(3) = .071717
    assert mask["diff"] == pytest.approx(0.116667, abs=1e-6)
    assert (mask["low"], mask["high"]) == pytest.approx((0.044950, 0.188384), abs=1e-5)
    assert mask["verdict"] == "reproduced" and mask["seeds"] == 3 and mask["ahead"] == 3
    assert verdicts["a fine-tuned simulator trains better than a prompt-only one"]["verdict"] == "not reproduced"
    real = verdicts["a fine-tuned simulator trains as well as the real engine"]
    # diffs 0 -.02 .01: mean -.00333, sd .015275, half-width .037948: low -.0413 above -.05
    assert real["low"] == pytest.approx(-0.041281, abs=1e-5) and real["verdict"] == "reproduced"
    assert verdicts["a curriculum beats none"]["verdict"] == "undecided"
    assert verdicts["a curriculum beats none"]["ahead"] == 2  # +.10 and +.05 of +.10 -.10 +.05
    assert real["ahead"] == 1  # 0 is not ahead
    table = ablations.claims_markdown(list(verdicts.values()))
    assert "| the loss mask helps | 1-hop | 3 | +11.7 [+4.5, +18.8] | 3 of 3 | reproduced |" in table
    assert "| easy-to-hard beats hard-to-easy | 1-hop | 0 |  |  | not run |" in table
    assert verdicts["easy-to-hard beats hard-to-easy"]["verdict"] == "not run"


def test_the_summary_pairs_by_seed_and_transfer_compares_with_the_base():
    off = ablations.FAMILIES["loss mask"]["off"]
    results = _results({"reference": ({}, [0.6, 0.7, 0.8]), "off": (off, [0.5, 0.55])})  # seed 2 unfinished
    rows = {(r["variant"], r["metric"]): r for r in ablations.summary(results, ["loss mask"])}
    ref, variant = rows[("on", "em")], rows[("off", "em")]
    assert ref["reference"] and "diff" not in ref and ref["seeds"] == [0, 1, 2]
    assert ref["mean"] == pytest.approx(0.7) and ref["sd"] == pytest.approx(0.1) and (ref["min"], ref["max"]) == (0.6, 0.8)
    assert variant["paired_seeds"] == 2 and variant["diff"] == pytest.approx(-0.125)  # (-.1 - .15) / 2
    assert "| loss mask | off | 2 | 52.5 |" in ablations.markdown(list(rows.values()))
    # gains over a base of .4: .2 .3 .4, mean .3, sd .1, half-width 4.303 x .1 / sqrt(3) = .24843
    t = ablations.transfer(results, {"em": 0.4, "two_hop": {"em": 0.0}})
    assert t["diff"] == pytest.approx(0.3) and t["low"] == pytest.approx(0.051570, abs=1e-5)
    assert t["verdict"] == "reproduced" and t["ahead"] == 3


def test_the_last_step_is_read_apart_from_the_kept_one():
    results = {"reference-s0": _result({}, 0, em=0.8, last_em=0.6)}
    rows = {r["metric"]: r["mean"] for r in ablations.summary(results, ["reward"]) if r["variant"] == "F1"}
    assert rows["em"] == 0.8 and rows["last_em"] == 0.6


def test_each_run_is_a_point_of_its_family_with_the_share_it_searched():
    ppo = ablations.FAMILIES["algorithm"]["PPO"]
    results = {"reference-s0": _result({}, 0, 0.9, searched=1.0), "reference-s1": _result({}, 1, 0.7, searched=0.8),
               "algorithm=ppo-s1": _result(ppo, 1, 0.6, searched=0.7),
               "lr=0.1-s0": _result({"rl.lr": 0.1}, 0, 0.1)}  # a run of no family, without the share
    points = {p["run"]: p for p in ablations.run_points(results)}
    assert (points["reference-s1"]["family"], points["reference-s1"]["variant"], points["reference-s1"]["seed"]) == ("reference", "reference", 1)
    assert (points["algorithm=ppo-s1"]["family"], points["algorithm=ppo-s1"]["variant"]) == ("algorithm", "PPO")
    assert points["algorithm=ppo-s1"]["searched"] == 0.7 and points["algorithm=ppo-s1"]["em"] == 0.6
    assert (points["lr=0.1-s0"]["family"], points["lr=0.1-s0"]["variant"]) == ("other", "lr=0.1") and "searched" not in points["lr=0.1-s0"]
    rows = {(r["variant"], r["metric"]): r for r in ablations.summary(results, ["algorithm"])}
    assert rows[("GRPO", "searched")]["mean"] == pytest.approx(0.9)  # (1.0 + 0.8) / 2
    assert rows[("PPO", "searched")]["diff"] == pytest.approx(-0.1) and rows[("PPO", "searched")]["paired_seeds"] == 1
    assert "| algorithm | PPO | 1 | 70.0 |" in ablations.markdown(list(rows.values()), "searched")


def test_the_reversed_curriculum_is_the_exponential_run_backwards():
    m, p_end = 4, 0.3
    reversed_ = [noise_probability(i, m, 0.0, p_end, 4.0, "reversed") for i in range(1, m + 1)]
    # step 1: fraction 0.75 of the exponential backwards: (4^0.75 - 1) / 3 x 0.3; the last step: 0
    assert reversed_[0] == pytest.approx((4 ** 0.75 - 1) / 3 * 0.3)
    assert reversed_[-1] == 0.0 and reversed_ == sorted(reversed_, reverse=True)


@pytest.mark.parametrize("engine,finetuned,variant", [("simulator", True, None), ("prompt_only", False, "prompt_only")])
def test_rl_against_the_prompt_only_simulator_gets_the_base_with_that_prompt(monkeypatch, engine, finetuned, variant):
    """``rl.engine: prompt_only`` is the paper's prompt-based baseline: the simulator base, not the fine-tuned
    weights, with the prompt-only prompt; the curriculum's noise applies to it as to the fine-tuned one."""
    from zslib import config, trainer
    built = []
    monkeypatch.setattr(trainer, "engine_for", lambda profile, **kw: built.append(kw) or "simulated")
    P = config.load_profile("micro", {"rl.engine": engine, "rl.validate_every": 0})
    assert P.rl.simulated
    assert trainer.make_engines(P) == ("simulated", None)
    assert built == [{"finetuned": finetuned, "variant": variant, "device": None}]
    assert not config.load_profile("micro", {"rl.engine": "bm25"}).rl.simulated


def test_a_recipe_changed_by_overrides_gets_its_own_folder_and_reference(monkeypatch, tmp_path):
    """``-p rl.lr=...`` is another recipe: its runs go to a folder of their own, its reference at the profile's
    seed is trained there (notebook 04's run is of the profile as it is), and a folder of one recipe is not read
    back as another's."""
    import json

    from zslib import config, evaluate, search, trainer
    trained = []

    class FakeTrainer:
        def __init__(self, P, folder, engine, real_engine):
            trained.append((folder, P.rl.lr))
            self.step_count, self.policy, self.tokenizer = 2, None, None
            self.metrics_path = tmp_path / f"metrics{len(trained)}.jsonl"
            self.metrics_path.write_text('{"seconds": 30}\n')

        def train(self, resume):
            pass

        def use_best_policy(self):
            return None

    monkeypatch.setattr(trainer, "RLTrainer", FakeTrainer)
    monkeypatch.setattr(trainer, "rl_simulator", lambda P: "simulator")
    monkeypatch.setattr(search, "profile_engine", lambda P: "bm25")
    monkeypatch.setattr(evaluate, "heldout_scores", lambda *a, **kw: {"em": 0.5, "two_hop": {"em": 0.25}})
    P = config.load_profile("micro", {})
    assert ablations.results_dir(P.out, {}) == ablations.results_dir(P.out, {"name": P.name}) == P.out / "ablations"
    assert ablations.results_dir(P.out, {"rl.lr": 0.001, "seed": 3}) == P.out / "ablations" / "recipe=lr=0.001"
    assert ablations.results_dir(P.out, {"rl.lr": "1e-3"}) == P.out / "ablations" / "recipe=lr=0.001"  # one recipe

    runs = {"reference-s0": {"seed": P.seed}, "reference-s1": {"seed": P.seed + 1}}
    out = ablations.run_all("micro", {"rl.lr": 0.001}, runs, tmp_path / "recipe", log=lambda s: None)
    assert trained == [(tmp_path / "recipe" / "reference-s0" / "rl", 0.001), (tmp_path / "recipe" / "reference-s1" / "rl", 0.001)]
    saved = json.loads((tmp_path / "recipe" / "reference-s0" / "eval.json").read_text())
    assert saved["recipe"] == {"rl.lr": 0.001} and out["reference-s0"]["train_minutes"] == 0.5
    ablations.run_all("micro", {"rl.lr": "1e-3"}, runs, tmp_path / "recipe", log=lambda s: None)
    assert len(trained) == 2  # read back, not trained again
    with pytest.raises(ValueError, match=rf"reference-s0/eval.json: a run of another recipe \(rl.lr: 0.001 -> {P.rl.lr}\)"):
        ablations.run_all("micro", {}, runs, tmp_path / "recipe", log=lambda s: None)
    # A profile file edited since the runs (no override tells) is caught by the recipe each eval.json stores ...
    edited = tmp_path / "edited.yaml"
    edited.write_text("extends: micro\nrl: {lr: 0.001, kl_coef: 0.5}\n")
    with pytest.raises(ValueError, match=r"a run of another recipe \(rl.kl_coef: 0.1 -> 0.5\)"):
        ablations.run_all(edited, {}, runs, tmp_path / "recipe", log=lambda s: None)
    # ... and, in a file from before it was stored, by the overrides it names.
    del saved["rl_recipe"]
    (tmp_path / "recipe" / "reference-s0" / "eval.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"a run of another recipe \(overrides: \{'rl.lr': 0.001\}\)"):
        ablations.run_all("micro", {}, runs, tmp_path / "recipe", log=lambda s: None)
    del saved["recipe"]  # the oldest files name nothing: the profile as it is
    (tmp_path / "recipe" / "reference-s0" / "eval.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"a run of another recipe \(overrides: \{\}\)"):
        ablations.run_all("micro", {"rl.lr": 0.001}, runs, tmp_path / "recipe", log=lambda s: None)
    # the profile as it is: the reference at its seed is notebook 04's run, the other seed has its own folder
    ablations.run_all("micro", {}, {"reference-s1": {"seed": P.seed + 1}}, tmp_path / "plain", log=lambda s: None)
    ablations.run_all("micro", {}, {"reference-s0": {"seed": P.seed}}, tmp_path / "plain0", log=lambda s: None)
    assert trained[2:] == [(tmp_path / "plain" / "reference-s1" / "rl", P.rl.lr), (P.rl_dir, P.rl.lr)]
