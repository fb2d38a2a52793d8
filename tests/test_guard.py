"""The collapse guard: each sign against a hand computation, and what the trainer does about them."""

import pytest

from zslib import guard
from zslib.config import ConfigError, GuardConfig, load_profile


def _steps(**series):
    n = len(next(iter(series.values())))
    return [{"step": i + 1, **{k: v[i] for k, v in series.items() if v[i] is not None}} for i in range(n)]


def test_a_healthy_run_shows_no_sign():
    cfg = GuardConfig(window=2)
    healthy = _steps(entropy=[1.0, 1.1, 1.2, 1.3, 1.1, 1.2], response_tokens=[40, 42, 50, 60, 55, 58],
                     invalid_action_rate=[0.1, 0.1, 0.2, 0.15, 0.2, 0.1], equal_reward_groups=[0.5, 0.5, 0.6, 0.7, 0.6, 0.7],
                     kl=[0.0, 0.01, 0.05, 0.1, 0.2, 0.3], val_em=[None, 0.5, None, 0.6, None, 0.55])
    assert guard.signs(healthy, cfg) == []
    assert guard.decide([], GuardConfig(action="rollback"), 0) == "none"


def test_each_sign_against_its_bar():
    cfg = GuardConfig(window=2, entropy_rise=1.0, length_rise=1.0, invalid_rise=0.25, equal_groups_rise=0.5,
                      kl_max=1.0, val_drop=0.2)
    # entropy: first window mean 1.0, last 2.05: +105% > 100%; the same run's other figures stay within their bars
    found = guard.signs(_steps(entropy=[1.0, 1.0, 1.5, 2.0, 2.1]), cfg)
    assert found == ["token entropy rose from 1.000 to 2.050 (+105%; bar 1)"]
    assert guard.signs(_steps(entropy=[1.0, 1.0, 1.5, 2.0, 2.0]), cfg) == []  # exactly doubled: not above the bar
    assert guard.signs(_steps(response_tokens=[50, 50, 101, 101]), cfg)[0].startswith("response length rose")
    assert guard.signs(_steps(invalid_action_rate=[0.1, 0.1, 0.3, 0.3]), cfg) == []  # +0.2: within the bar
    assert guard.signs(_steps(invalid_action_rate=[0.1, 0.1, 0.3, 0.5]), cfg) == [
        "invalid actions per turn rose from 0.100 to 0.400 (+0.300; bar 0.25)"]
    assert guard.signs(_steps(equal_reward_groups=[0.2, 0.3, 0.9, 0.9]), cfg) == [
        "share of all-equal groups rose from 0.250 to 0.900 (+0.650; bar 0.5)"]
    assert guard.signs(_steps(kl=[0.1, 0.9, 1.2]), cfg) == ["KL to the reference 1.050 over the last 2 steps, above 1"]
    assert guard.signs(_steps(val_em=[0.4, 0.7, 0.45]), cfg) == [
        "validation EM 0.450 at step 3, 0.250 below its best 0.700 at step 2 (bar 0.2)"]
    # too few steps for a rise: the first and last windows may not overlap
    assert guard.signs(_steps(entropy=[1.0, 1.0, 9.0]), cfg) == []
    # a collapse within the first window: the entropy falls to nothing, most turns leave the format at once
    assert guard.signs(_steps(entropy=[1.0, 1.0, 0.2, 0.05]), cfg) == []  # fell by 87.5%: within the bar of 0.9
    assert guard.signs(_steps(entropy=[1.0, 1.0, 0.1, 0.02]), cfg) == [
        "token entropy fell from 1.000 to 0.060 (-94%; bar 0.9)"]
    assert guard.signs(_steps(invalid_action_rate=[0.6, 0.7]), cfg) == [
        "invalid actions per turn 0.650 over the last 2 steps, above 0.5"]


def test_peaks_say_how_close_a_run_came_to_each_bar_and_when_it_passed():
    cfg = GuardConfig(window=2, entropy_rise=1.0, kl_max=1.0, val_drop=0.2)
    run = _steps(entropy=[1.0, 1.0, 1.5, 2.0, 2.1], kl=[0.1, 0.9, 1.2, 0.2, 0.2],
                 val_em=[None, 0.4, 0.7, None, 0.45])
    p = guard.peaks(run, cfg)
    # entropy by step: no rise before step 4 (two windows of 2); 1.75/1.0 - 1 = 0.75 at 4, 2.05/1.0 - 1 = 1.05 at 5
    assert p["entropy_rise"]["peak"] == pytest.approx(1.05) and p["entropy_rise"]["at"] == 5
    assert p["entropy_rise"]["over"] == 5
    # KL, the last two steps' mean: 0.5, 1.05, 0.7, 0.2 at steps 2-5: over the bar at step 3 only
    assert p["kl_max"]["peak"] == pytest.approx(1.05) and (p["kl_max"]["at"], p["kl_max"]["over"]) == (3, 3)
    # validation: best 0.7 at step 3, then 0.45 at step 5: a drop of 0.25
    assert p["val_drop"]["peak"] == pytest.approx(0.25) and p["val_drop"]["over"] == 5
    # figures that never pass their bar: the peak, and no step
    calm = guard.peaks(_steps(entropy=[1.0, 1.0, 1.2, 1.4]), cfg)["entropy_rise"]
    assert calm["peak"] == pytest.approx(0.3) and (calm["at"], calm["over"]) == (4, None)
    assert "length_rise" not in p  # no response lengths in these metrics


def test_what_the_trainer_does_by_the_switch():
    found = ["token entropy rose"]
    assert guard.decide(found, GuardConfig(action="off"), 0) == "none"
    assert guard.decide(found, GuardConfig(action="warn"), 0) == "warn"
    assert guard.decide(found, GuardConfig(action="stop"), 0) == "stop"
    assert guard.decide(found, GuardConfig(action="rollback", max_rollbacks=2), 1) == "rollback"
    assert guard.decide(found, GuardConfig(action="rollback", max_rollbacks=2), 2) == "stop"
    with pytest.raises(ConfigError, match="guard.action: rollback goes back to the best-validated weights"):
        load_profile("micro", {"guard": {"action": "rollback"}, "rl": {"validate_every": 0}})
    with pytest.raises(ConfigError, match="guard.lr_factor"):
        GuardConfig(lr_factor=1.5)
    with pytest.raises(ConfigError, match="guard.entropy_fall"):
        GuardConfig(entropy_fall=1.5)  # a fall is a share of the first window's entropy


def test_the_notebook_lines_say_what_the_guard_did():
    from zslib.reports import guard_lines

    metrics = [{"step": 1}, {"step": 2, "guard_action": "warn", "guard_signs": ["token entropy rose"]},
               {"step": 3, "guard_action": "rollback", "guard_signs": ["validation EM fell"], "guard_rollback_to": 1,
                "guard_lr": 5e-5}]
    assert guard_lines(metrics, GuardConfig(action="rollback")) == [
        "step 2: logged: token entropy rose",
        "step 3: rolled back to step 1's weights, learning rate now 5.00e-05: validation EM fell"]
    assert guard_lines(metrics[:1], GuardConfig()) == ["The collapse guard (guard.action: warn) found no sign in any step."]
    assert guard_lines(metrics, GuardConfig(action="off")) == ["The collapse guard is off (guard.action: off)."]
    # a quiet run: the figure nearest its bar. KL means over 1 step: 0.2, 0.4, 0.1 (bar 1); entropy rises
    # 0% and -10% (bar 1); validation 0.5 then 0.45: a drop of 0.05 (bar 0.2), 25% of it
    quiet = [{"step": 1, "kl": 0.2, "entropy": 1.0, "val_em": 0.5}, {"step": 2, "kl": 0.4, "entropy": 1.0},
             {"step": 3, "kl": 0.1, "entropy": 0.9, "val_em": 0.45}]
    assert guard_lines(quiet, GuardConfig(window=1)) == [
        "The collapse guard (guard.action: warn) found no sign in any step.",
        "Closest to a bar: kl_max 0.400 at step 2, 40% of its bar 1."]
