import matplotlib

matplotlib.use("Agg")

from zslib import plots  # noqa: E402


def _metrics(with_validation: bool) -> list[dict]:
    rows = [{"step": i, "reward_mean": float(i), "em": 0.0, "f1": 0.0, "searches_per_answer": 1.0,
             "kl": 0.0, "entropy": 0.0} for i in range(1, 11)]
    if with_validation:
        for m in rows[4::5]:  # logged at steps 5 and 10 only
            m["val_em"] = m["step"] / 10
    return rows


def test_rl_curves_smooth_per_step_keys_draw_validation_raw_and_drop_empty_panels():
    fig = plots.rl_curves({"grpo": _metrics(True)}, smooth=3)
    assert [ax.get_title() for ax in fig.axes] == ["reward_mean, em, f1", "val_em", "searches_per_answer", "kl, entropy"]
    validation = fig.axes[1].lines[0]
    assert list(validation.get_xdata()) == [5, 10] and list(validation.get_ydata()) == [0.5, 1.0]
    # trailing mean over 3 of 1, 2, 3, 4: 1, 1.5, 2, 3
    assert list(fig.axes[0].lines[0].get_ydata()[:4]) == [1.0, 1.5, 2.0, 3.0]
    without = plots.rl_curves({"grpo": _metrics(False)})
    assert "val_em" not in [ax.get_title() for ax in without.axes]


def test_collapse_signs_draw_one_titled_panel_per_sign():
    rows = [{"step": i, "entropy": 0.1 * i, "kl": 0.0, "invalid_action_rate": 0.0, "response_tokens": 40.0,
             "equal_reward_groups": 0.5} for i in range(1, 7)]
    fig = plots.collapse_signs({"grpo": rows}, smooth=2)
    assert [ax.get_title() for ax in fig.axes] == list(plots.COLLAPSE_PANELS.values())
    # trailing mean over 2 of 0.1, 0.2, 0.3: 0.1, 0.15, 0.25
    assert [round(v, 6) for v in fig.axes[0].lines[0].get_ydata()[:3]] == [0.1, 0.15, 0.25]
