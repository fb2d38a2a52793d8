import pytest

from zslib.reward import cover_exact_match, exact_match, extract_answer, f1_score, normalize_answer


def test_normalisation():
    assert normalize_answer("  The  Eiffel-Tower, in an Old city!") == "eiffeltower in old city"


def test_last_answer_block_counts():
    assert extract_answer("<answer> a </answer> then <answer>Belmora</answer>") == "Belmora"
    assert extract_answer("no answer here") is None
    assert extract_answer(None) is None


def test_scores_with_several_golds():
    golds = ["Belmora", "the city of Belmora"]
    assert exact_match("belmora.", golds) == 1.0
    assert exact_match("Belmora city", golds) == 0.0
    assert cover_exact_match("it is Belmora city", golds) == 1.0
    # "belmora city" vs gold "city of belmora" -> tokens {city, of, belmora}: P=1, R=2/3
    assert f1_score("Belmora city", golds) == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))


def test_no_answer_scores_zero():
    for fn in (exact_match, cover_exact_match, f1_score):
        assert fn(None, ["x"]) == 0.0


GOOD = ("<think> need it </think>\n<search> Xo born </search>\n\n<information>Doc 1(Title: Xo) Xo was born in Tavin."
        "</information>\n\n<think> found </think>\n<answer> Tavin </answer>")


def test_format_validity():
    from zslib.reward import valid_format
    assert valid_format(GOOD)
    assert valid_format("<answer> Tavin </answer>") and valid_format("<think> x </think> <answer> y </answer>")
    assert not valid_format(GOOD.replace("<think> found </think>\n", "I guess "))       # text outside blocks
    assert not valid_format("<search> q </search><answer> a </answer>")                 # search without results
    assert not valid_format("<think> a </think>")                                          # no answer
    assert not valid_format("<answer> a </answer><think> late </think>")
    assert not valid_format(None)


def test_format_reward_levels():
    from zslib.reward import format_reward
    assert format_reward(GOOD, ["Tavin"]) == 1.0
    assert format_reward("so " + GOOD, ["Tavin"]) == 0.8
    assert format_reward(GOOD, ["Mern"]) == 0.2
    assert format_reward("so " + GOOD, ["Mern"]) == 0.1
    assert format_reward("<think> hm </think>", ["Tavin"]) == 0.0
    # several answer blocks: the last one counts
    assert format_reward("<answer> Mern </answer> <answer> Tavin </answer>", ["Tavin"]) == 0.8
