import math

import pytest
import torch

from zslib.curriculum import draw_noisy, noise_probability


def test_exponential_schedule_against_hand_values():
    # p_s=0, p_e=0.5, b=4: midpoint (4^0.5 - 1) / 3 * 0.5 = 1/6; end (4 - 1) / 3 * 0.5 = 0.5
    assert noise_probability(100, 200) == pytest.approx(1 / 6)
    assert noise_probability(200, 200) == pytest.approx(0.5)
    assert noise_probability(1, 200) == pytest.approx((4 ** (1 / 200) - 1) / 3 * 0.5)
    assert noise_probability(50, 200, p_start=0.1, p_end=0.7, base=9) == pytest.approx(0.1 + (math.sqrt(3) - 1) / 8 * 0.6)


def test_schedule_is_increasing_and_stays_below_linear():
    values = [noise_probability(i, 50) for i in range(1, 51)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert all(v <= 0.5 * i / 50 + 1e-12 for i, v in zip(range(1, 51), values))


def test_linear_and_constant_schedules():
    assert noise_probability(25, 100, base=1.0) == pytest.approx(0.125)
    assert noise_probability(25, 100, schedule="linear") == pytest.approx(0.125)
    assert noise_probability(3, 100, p_end=0.3, schedule="constant") == 0.3


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="counts from 1"):
        noise_probability(0, 10)
    with pytest.raises(ValueError, match="counts from 1"):
        noise_probability(11, 10)
    with pytest.raises(ValueError, match="rl.curriculum must be one of exp, linear, constant, reversed, not .cosine."):
        noise_probability(1, 10, schedule="cosine")


def test_draws_are_seeded_and_match_the_probability():
    a = draw_noisy(20000, 0.3, torch.Generator().manual_seed(0))
    b = draw_noisy(20000, 0.3, torch.Generator().manual_seed(0))
    assert a == b and abs(sum(a) / len(a) - 0.3) < 0.015
    assert not any(draw_noisy(100, 0.0, torch.Generator().manual_seed(1)))
    assert all(draw_noisy(100, 1.0, torch.Generator().manual_seed(1)))
