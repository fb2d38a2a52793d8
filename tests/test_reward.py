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
