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
