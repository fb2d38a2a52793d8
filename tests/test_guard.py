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


def test_the_notebook_lines_say_what_the_guard_did():
    from zslib.reports import guard_lines

    metrics = [{"step": 1}, {"step": 2, "guard_action": "warn", "guard_signs": ["token entropy rose"]},
               {"step": 3, "guard_action": "rollback", "guard_signs": ["validation EM fell"], "guard_rollback_to": 1,
                "guard_lr": 5e-5}]
    assert guard_lines(metrics, "rollback") == [
        "step 2: logged: token entropy rose",
        "step 3: rolled back to step 1's weights, learning rate now 5.00e-05: validation EM fell"]
    assert guard_lines(metrics[:1], "warn") == ["The collapse guard (guard.action: warn) found no sign in any step."]
    assert guard_lines(metrics, "off") == ["The collapse guard is off (guard.action: off)."]
