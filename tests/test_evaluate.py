import json

import pytest

from zslib.evaluate import score_trajectories
from zslib.rollout import Trajectory


def _traj(answer, n_searches, gold="Paris"):
    calls = [{"query": f"q{i}", "docs": [], "noisy": None} for i in range(n_searches)]
    return Trajectory(question="Where?", golden_answers=[gold], calls=calls, answer=answer,
                      first_action="search" if n_searches else "answer")


def test_scores_split_exact_match_by_number_of_searches():
    trajs = [_traj("Paris", 1), _traj("Lyon", 1), _traj("Paris", 1), _traj("Nice", 2),
             _traj("the Paris", 3), _traj(None, 0)]
    s = score_trajectories(trajs)
    assert s["n"] == 6
    assert s["em"] == 3 / 6  # "the Paris" normalises to "paris"
    assert s["searches_per_question"] == (1 + 1 + 1 + 2 + 3 + 0) / 6
    assert s["searched_share"] == 5 / 6
    assert s["em_by_searches"] == {"0": {"n": 1, "em": 0.0}, "1": {"n": 3, "em": 2 / 3},
                                   "2+": {"n": 2, "em": 0.5}}
    assert s["answered"] == 5 / 6


def test_validation_questions_are_the_held_out_splits_last_and_never_evaluated(tiny_world, monkeypatch):
    import datasets
    import pytest

    from zslib import data
    from zslib.config import load_profile
    from zslib.evaluate import heldout_questions, validation_questions

    test_rows = tiny_world["splits"]["test"]
    monkeypatch.setattr(data, "load_for_profile", lambda profile, name, split: datasets.Dataset.from_list(
        test_rows if split == "test" else []))
    profile = load_profile("tiny")
    one_hop = [r["id"] for r in test_rows if r["hops"] == 1]
    evaluated = [r["id"] for r in heldout_questions(profile, 300)]
    validation = [r["id"] for r in validation_questions(profile, 200, 300)]
    assert evaluated == one_hop[:300] and validation == one_hop[-200:]
    assert not set(evaluated) & set(validation)
    two_hop = [r["id"] for r in test_rows if r["hops"] == 2]
    assert 0 < len(two_hop) < 300 and [r["id"] for r in heldout_questions(profile, 300, hops=2)] == two_hop
    with pytest.raises(ValueError, match=rf"rl.validation_size {len(one_hop)} \+ rl.eval_size 300 .* 'tiny'"):
        validation_questions(profile, len(one_hop), 300)
    with pytest.raises(ValueError, match="rl.validation_size must be at least 1"):
        validation_questions(profile, 0, 300)  # rows[-0:] would be every question


def test_two_hop_validation_questions_are_the_dev_splits_2_hop_ones(tiny_world, monkeypatch):
    import datasets

    from zslib import data
    from zslib.config import load_profile
    from zslib.evaluate import two_hop_validation_questions

    splits = tiny_world["splits"]
    asked = []
    monkeypatch.setattr(data, "load_for_profile", lambda profile, name, split: asked.append(split) or
                        datasets.Dataset.from_list(splits[split]))
    rows = two_hop_validation_questions(load_profile("tiny"))
    assert asked == ["dev"]
    assert [r["id"] for r in rows] == [r["id"] for r in splits["dev"] if r["hops"] == 2] and rows
    assert splits["test"] and not {r["question"] for r in rows} & {r["question"] for r in splits["test"]}


def test_heldout_scores_add_the_two_hop_questions_only_where_the_dataset_has_them(tiny_world, monkeypatch):
    import datasets

    from zslib import data, evaluate
    from zslib.config import load_profile

    seen = []
    monkeypatch.setattr(evaluate, "greedy_with_engine",
                        lambda model, tok, rows, engine, profile, desc: seen.append(rows) or {"n": len(rows)})
    profile = load_profile("tiny")
    test_rows = tiny_world["splits"]["test"]
    for rows, has_two_hop in ((test_rows, True), ([r for r in test_rows if r["hops"] == 1], False)):
        monkeypatch.setattr(data, "load_for_profile", lambda p, name, split, rows=rows: datasets.Dataset.from_list(rows))
        seen.clear()
        scores = evaluate.heldout_scores(None, None, profile, None, 50)
        assert {r["hops"] for r in seen[0]} == {1} and scores["n"] == 50
        assert ("two_hop" in scores) == has_two_hop
        if has_two_hop:
            assert {r["hops"] for r in seen[1]} == {2} and scores["two_hop"]["n"] == len(seen[1]) > 0


# ---------------------------------------------------------------- the harness of notebook 05

class _WordTokenizer:
    """One token per whitespace-separated word, enough for ``evaluate.score``."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text.split())))}

    def decode(self, ids, skip_special_tokens=True):
        return self.texts[tuple(ids)]


def _scored(cases):
    """Trajectories whose responses are given texts (response ids are looked up by the tokenizer)."""
    tok, trajs = _WordTokenizer(), []
    tok.texts = {}
    for i, (response, answer, golds, searches) in enumerate(cases):
        t = Trajectory("Q?", golds, token_ids=[-1, i], prompt_len=1, answer=answer,
                       calls=[{"query": "q", "docs": [], "noisy": None}] * searches)
        tok.texts[(i,)] = response
        trajs.append(t)
    return trajs, tok


def test_score_on_hand_made_predictions():
    from zslib.evaluate import score

    trajs, tok = _scored([
        ("<think> x </think><answer> Paris </answer>", "Paris", ["Paris"], 0),                    # EM 1
        ("<search> a </search><information> d </information><answer> the Big Apple </answer>",
         "the Big Apple", ["New York", "Big Apple"], 1),                                          # second gold: EM 1
        ("<search> b </search><information> d </information><answer> Paris Texas </answer>",
         "Paris Texas", ["Paris"], 1),                                                            # cover-EM 1, F1 2/3
        ("I do not know", None, ["Rome"], 0),                                                     # no answer, invalid
        ("<answer> Lyon </answer> trailing words", "Lyon", ["Nice"], 2),                          # wrong and invalid
    ])
    s = score(trajs, tok)
    assert s["n"] == 5
    assert s["em"] == pytest.approx(2 / 5)
    assert s["cover_em"] == pytest.approx(3 / 5)
    assert s["f1"] == pytest.approx((1 + 1 + 2 / 3 + 0 + 0) / 5)  # "paris texas" vs "paris": P 1/2, R 1
    assert s["searches_per_question"] == pytest.approx(4 / 5) and s["searched_share"] == pytest.approx(3 / 5)
    assert s["invalid_rate"] == pytest.approx(2 / 5)
    assert s["answer_tokens"] == pytest.approx((1 + 3 + 2 + 0 + 1) / 5)  # no answer counts 0
    lo, hi = s["em_ci"]
    assert 0 <= lo < 0.4 < hi <= 1


def test_bootstrap_interval_on_known_cases():
    import math

    from zslib.evaluate import bootstrap_ci

    assert bootstrap_ci([1.0] * 50) == [1.0, 1.0] and bootstrap_ci([0.0] * 50) == [0.0, 0.0]
    values = [1.0] * 200 + [0.0] * 200
    lo, hi = bootstrap_ci(values, seed=3)
    half = 1.96 * math.sqrt(0.25 / 400)  # the normal approximation: ±0.049
    assert lo == pytest.approx(0.5 - half, abs=0.01) and hi == pytest.approx(0.5 + half, abs=0.01)
    assert bootstrap_ci(values, seed=3) == [lo, hi], "seeded: the same interval every time"
    lo90, hi90 = bootstrap_ci(values, level=0.90, seed=3)
    assert lo < lo90 < hi90 < hi


def test_results_agree_with_predictions_and_baselines_mean_what_they_say(protocol_model, tokenizer, bm25, tmp_path):
    from zslib import config, evaluate
    from zslib.reward import exact_match
    from zslib.rollout import engine_search_fn

    model, rows = protocol_model
    profile = config.load_profile("tiny")
    methods = evaluate.baselines(model, tokenizer)
    sets = {"one": rows[:10], "two": rows[10:16]}
    results, preds = evaluate.evaluate_all(profile, methods, sets, {"bm25": engine_search_fn(bm25, 3)})
    assert [(r["method"], r["dataset"]) for r in results] == [(m, d) for m in ("direct", "rag", "base") for d in sets]
    paths = evaluate.write_results(tmp_path, results, preds)
    saved = json.loads(paths["json"].read_text())["rows"]
    lines = [json.loads(line) for line in paths["predictions"].read_text().splitlines()]
    assert len(lines) == 3 * 16
    for r in saved:
        mine = [p for p in lines if (p["method"], p["dataset"], p["engine"]) == (r["method"], r["dataset"], r["engine"])]
        assert r["n"] == len(mine) == len(sets[r["dataset"]])
        assert r["em"] == pytest.approx(sum(exact_match(p["prediction"], p["golden_answers"]) for p in mine) / len(mine))
        assert r["searched_share"] == pytest.approx(sum(p["searches"] > 0 for p in mine) / len(mine))
        assert set(r) == set(evaluate.RESULT_KEYS)
    by = {(r["method"], r["dataset"]): r for r in saved}
    assert by[("base", "one")]["searched_share"] > 0.5, "the protocol model searches"
    assert by[("rag", "one")]["searches_per_question"] == 0, "rag answers in one turn, from documents it was given"
    direct = [p for p in lines if p["method"] == "direct"]
    assert all("<information></information>" in p["response"].replace("\n", "") or p["searches"] == 0 for p in direct)
    assert "| base | one | bm25 |" in paths["md"].read_text()


def test_rag_puts_the_questions_documents_before_the_first_turn(tokenizer, bm25, tiny_world):
    from zslib import evaluate
    from zslib.rollout import engine_search_fn
    from zslib.search import format_docs

    rows = tiny_world["splits"]["test"][:2]
    rag = evaluate.Method("rag", None, tokenizer, "rag")
    prompts, _, turns = evaluate.method_prompts(rag, rows, engine_search_fn(bm25, 3), 3, tiny=True)
    assert turns == 0
    for r, p in zip(rows, prompts):
        assert p.endswith(f"<information>{format_docs(bm25.search([r['question']], 3)[0])}</information>\n\n")
    direct = evaluate.Method("direct", None, tokenizer, "direct")
    prompts, hook, turns = evaluate.method_prompts(direct, rows, engine_search_fn(bm25, 3), 3, tiny=True)
    assert prompts is None and turns is None and hook(["anything"], [None]) == ([[]], [None])
    prompts, _, turns = evaluate.method_prompts(direct, rows, engine_search_fn(bm25, 3), 3, tiny=False)
    assert turns == 0 and "without searching" in prompts[0] and rows[0]["question"] in prompts[0]
    with pytest.raises(ValueError, match="style must be"):
        evaluate.Method("x", None, tokenizer, "oracle")


def test_compare_says_ahead_behind_or_level_and_whether_the_intervals_overlap():
    from zslib.evaluate import compare

    row = lambda m, em, lo, hi: {"method": m, "dataset": "d", "engine": "e", "em": em, "em_ci": [lo, hi]}  # noqa: E731
    rows = [row("rl", 0.70, 0.65, 0.75), row("base", 0.52, 0.46, 0.58), row("rag", 0.68, 0.62, 0.74),
            row("direct", 0.70, 0.64, 0.76)]
    lines = compare(rows, "rl", ["base", "rag", "direct", "missing"], "d", "e")
    assert lines == ["rl EM 0.700 against base 0.520 on d (+0.180): ahead, intervals apart.",
                     "rl EM 0.700 against rag 0.680 on d (+0.020): ahead, but the intervals overlap.",
                     "rl EM 0.700 against direct 0.700 on d (+0.000): level, and the intervals overlap."]
    assert compare(rows, "ppo", ["base"], "d", "e") == ["ppo was not evaluated on d with e."]


def test_engine_gaps_pair_the_questions_and_match_a_hand_computation():
    from zslib.evaluate import engine_gaps, engine_gaps_markdown

    def pred(engine, qid, right, searches):
        return {"method": "m", "dataset": "d", "engine": engine, "id": qid, "question": f"q{qid}",
                "golden_answers": ["yes"], "prediction": "yes" if right else "no", "searches": searches}

    preds = [pred("bm25", i, r, s) for i, r, s in [(0, 1, 1), (1, 0, 1), (2, 0, 2), (3, 1, 0)]]
    preds += [pred("sim", i, 1, 1) for i in (3, 2, 1, 0)]  # another order: paired by id
    preds += [{**pred("sim", 9, 1, 1), "method": "only-sim"}]  # no real-engine row: no gap
    (gap,) = engine_gaps(preds, "bm25")
    assert (gap["method"], gap["engine"], gap["n"]) == ("m", "sim", 4)
    assert gap["em_real"] == 0.5 and gap["em_engine"] == 1.0 and gap["gap"] == 0.5
    assert gap["searches_real"] == 1.0 and gap["searches_engine"] == 1.0  # (1 + 1 + 2 + 0) / 4
    lo, hi = gap["gap_ci"]  # differences 0, +1, +1, 0: resampled means lie in 0..1
    assert 0.0 <= lo < 0.5 < hi <= 1.0
    # every question gained: the interval is exactly +1
    all_gain = [pred("bm25", i, 0, 1) for i in range(5)] + [pred("sim", i, 1, 1) for i in range(5)]
    (gain,) = engine_gaps(all_gain, "bm25")
    assert gain["gap"] == 1.0 and gain["gap_ci"] == [1.0, 1.0]
    assert "| m | d | sim (vs bm25) | 0.500 | 1.000 | +0.500 |" in engine_gaps_markdown([gap])


def test_a_second_engine_gives_the_searching_policies_a_gap_row(protocol_model, tokenizer, bm25):
    from zslib import config, evaluate
    from zslib.rollout import engine_search_fn
    from zslib.search import NullEngine

    model, rows = protocol_model
    profile = config.load_profile("tiny")
    engines = {"bm25": engine_search_fn(bm25, 3), "none": engine_search_fn(NullEngine(), 3)}
    results, preds = evaluate.evaluate_all(profile, evaluate.baselines(model, tokenizer), {"one": rows[:12]}, engines)
    assert [(r["method"], r["engine"]) for r in results] == [("direct", "bm25"), ("rag", "bm25"), ("base", "bm25"),
                                                             ("base", "none")]
    gaps = {g["method"]: g for g in evaluate.engine_gaps(preds, "bm25")}
    assert set(gaps) == {"base"}
    by = {(r["method"], r["engine"]): r for r in results}
    for method, g in gaps.items():
        assert g["em_real"] == pytest.approx(by[(method, "bm25")]["em"])
        assert g["em_engine"] == pytest.approx(by[(method, "none")]["em"])
    # the protocol model answers from what it finds: with nothing found it loses most of its EM
    assert gaps["base"]["em_real"] > 0.5 and gaps["base"]["gap_ci"][1] < 0
