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
