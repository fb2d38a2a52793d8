"""The bars each notebook checks: ranges from the profile, a clear message out of range, and a base
that never searches stopped by notebook 00's check."""

import pytest

from zslib import checks
from zslib.tiny import base_eval, pretraining, recipes
from zslib.config import ChecksConfig, ConfigError, load_profile


def test_in_range_figures_pass_and_none_is_skipped():
    cfg = ChecksConfig(base={"em_bm25": [0.3, None], "em_no_search": [None, 0.1], "margin_memory_relations": [None, -0.5]})
    lines = []
    rows = checks.check("base", {"em_bm25": 0.31, "em_no_search": 0.1, "margin_memory_relations": None}, cfg,
                        out=lines.append)
    assert [(r["name"], r["ok"]) for r in rows] == [("em_bm25", True), ("em_no_search", True)]
    assert lines[2].startswith("skip margin_memory_relations")


def test_out_of_range_names_the_figure_value_range_and_what_to_try():
    cfg = ChecksConfig(base={"em_bm25": [0.3, None], "searched_share_search_relations": [0.9, 1.0]})
    with pytest.raises(checks.CheckFailed) as e:
        checks.check("base", {"em_bm25": 0.5, "searched_share_search_relations": 0.0}, cfg, out=lambda s: None)
    message = str(e.value)
    assert message.startswith("1 base check(s) failed")
    assert "searched_share_search_relations = 0.000, expected in [0.9, 1]" in message
    assert "Try: the decision to search is not learned" in message
    assert "em_bm25" not in message and "checks.strict: false" in message


def test_not_strict_reports_and_continues():
    lines = []
    rows = checks.check("rl", {"em_gain": 0.01}, ChecksConfig(strict=False, rl={"em_gain": [0.15, None]}),
                        out=lines.append)
    assert rows[0]["ok"] is False and lines[0].startswith("FAIL em_gain")
    assert "continuing" in lines[-1] and "em_gain = 0.010, expected >= 0.15" in lines[-1]


def test_a_checked_figure_the_run_did_not_measure_is_an_error():
    with pytest.raises(KeyError, match="parse_rate"):
        checks.check("simulator", {"useful_contains_answer": 1.0}, ChecksConfig(simulator={"parse_rate": [0.9, None]}))


def test_ranges_come_from_the_profile_and_bad_ones_fail_at_load_time():
    p = load_profile("tiny")
    assert p.checks.strict and p.checks.base["em_bm25"] == [0.3, None]
    assert set(p.checks.simulator) == set(checks.FIGURES["simulator"])
    looser = load_profile("tiny", {"checks.base.em_bm25": [0.6, None]})
    assert looser.checks.base["em_bm25"] == [0.6, None] and looser.checks.base["em_no_search"] == [None, 0.1]
    with pytest.raises(checks.CheckFailed, match="em_bm25 = 0.500"):
        checks.check("base", {"em_bm25": 0.5}, ChecksConfig(base={"em_bm25": looser.checks.base["em_bm25"]}),
                     out=lambda s: None)
    for bad, match in (({"checks.base.em_bmx": [0, 1]}, r"checks\.base\.em_bmx: unknown figure"),
                       ({"checks.rl.em_gain": [0.5, 0.1]}, r"checks\.rl\.em_gain: low 0.5 is above high 0.1"),
                       ({"checks.simulator.parse_rate": 0.9}, r"checks\.simulator\.parse_rate: expected \[low, high\]")):
        with pytest.raises(ConfigError, match=match):
            load_profile("tiny", bad)


@pytest.fixture(scope="module")
def never_searches(tokenizer, tiny_world, bm25, tmp_path_factory):
    """A small model trained only on demonstrations that answer from memory: it never searches."""
    from zslib.config import TinyConfig

    cfg = TinyConfig(hidden_size=96, intermediate_size=192, num_layers=2, num_heads=2, num_kv_heads=1,
                     lr=3e-3, warmup_steps=5, batch_tokens=4096, bf16_autocast=False)
    rows = [r for r in tiny_world["splits"]["train"] if r["hops"] == 1][:16]
    by_name = {e["name"]: e for e in tiny_world["entities"]}
    relations = sorted({r["relation"] for r in rows})
    demos = recipes.scripted_demos(tokenizer, rows, bm25, by_name, set(), topk=3, seed=0, per_question=1,
                                memory_relations=relations, memory_demos=2)
    demos = [d for d in demos if "<search>" not in tokenizer.decode([t for t, m in zip(d.ids, d.mask) if m])]
    assert len(demos) == 2 * len(rows), "the memory demonstrations and the no-search ones"
    model = pretraining.build_model(tokenizer, cfg, seed=0)
    pretraining.pretrain(model, demos, 60, cfg, tmp_path_factory.mktemp("never") / "loss.jsonl", seed=0)
    return model.eval(), rows


def _base_report(model, tokenizer, bm25, rows):
    profile = load_profile("tiny", {"rollout.max_turns": 2, "rollout.max_tokens_per_turn": 40,
                                    "rollout.max_obs_tokens": 96})
    return profile, base_eval.evaluate_base(profile, model, tokenizer, bm25, rows)


def test_notebook_00s_check_stops_a_base_that_never_searches(never_searches, tokenizer, bm25):
    model, rows = never_searches
    profile, report = _base_report(model, tokenizer, bm25, rows)
    assert report["settings"]["bm25, T=0"]["searched_share"] == 0.0
    assert report["figures"]["margin_search_relations"] < 0, "the margins see that it answers from memory"
    with pytest.raises(checks.CheckFailed) as e:
        checks.check("base", report["figures"], profile.checks, out=lambda s: None)
    assert "searched_share_search_relations = 0.000, expected >= 0.9" in str(e.value)
    assert "margin_search_relations" in str(e.value) and "em_bm25" in str(e.value)


def test_a_base_that_searches_has_positive_margins(protocol_model, tokenizer, bm25):
    model, rows = protocol_model
    _, report = _base_report(model, tokenizer, bm25, rows)
    assert report["settings"]["bm25, T=0"]["searched_share"] > 0.9
    assert report["figures"]["searched_share_search_relations"] > 0.9
    assert report["figures"]["margin_search_relations"] > 0
    assert sum(r["n"] for r in report["by_relation"].values()) == len(rows)
