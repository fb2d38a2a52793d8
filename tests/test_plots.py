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
    assert [ax.get_title().split("\n")[0] for ax in fig.axes] == list(plots.RL_PANELS.values())
    assert fig.axes[0].get_title().endswith("\n(3-step moving mean)"), "a smoothed panel says so"
    assert fig.axes[1].get_title() == "validation EM (greedy, real engine)", "validation points are raw"
    validation = fig.axes[1].lines[0]
    assert list(validation.get_xdata()) == [5, 10] and list(validation.get_ydata()) == [0.5, 1.0]
    # trailing mean over 3 of 1, 2, 3, 4: 1, 1.5, 2, 3
    assert list(fig.axes[0].lines[0].get_ydata()[:4]) == [1.0, 1.5, 2.0, 3.0]
    without = plots.rl_curves({"grpo": _metrics(False)})
    assert len(without.axes) == 3 and "validation EM (greedy, real engine)" not in [ax.get_title() for ax in without.axes]


def test_rl_curves_draw_equal_series_once_and_lay_panels_out_in_rows():
    # rl.reward: f1, so the reward is F1, up to float32 rounding
    rows = [{**m, "f1": m["reward_mean"] + 1e-8} for m in _metrics(True)]
    fig = plots.rl_curves({"grpo": rows}, smooth=1)
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels == ["reward = F1", "EM"], "the reward is not hidden under an identical F1 line"
    rows_of_panels = sorted({round(ax.get_position().y0, 3) for ax in fig.axes})
    assert len(fig.axes) == 4 and len(rows_of_panels) == 2, "four panels: two rows of two"
    assert len(plots.collapse_signs({"grpo": _metrics(False)}).axes) == 2, "only the panels logged"


def test_collapse_signs_draw_one_titled_panel_per_sign():
    rows = [{"step": i, "entropy": 0.1 * i, "kl": 0.0, "invalid_action_rate": 0.0, "response_tokens": 40.0,
             "equal_reward_groups": 0.5} for i in range(1, 7)]
    fig = plots.collapse_signs({"grpo": rows}, smooth=2)
    assert [ax.get_title().split("\n")[0] for ax in fig.axes] == list(plots.COLLAPSE_PANELS.values())
    # trailing mean over 2 of 0.1, 0.2, 0.3: 0.1, 0.15, 0.25
    assert [round(v, 6) for v in fig.axes[0].lines[0].get_ydata()[:3]] == [0.1, 0.15, 0.25]


def test_every_figure_is_saved_as_a_png_named_by_notebook_and_plot(tmp_path):
    plots.save_to(tmp_path, "04")
    try:
        plots.rl_curves({"grpo": _metrics(True)})
        plots.rl_curves({"grpo": _metrics(False)})
        plots.collapse_signs({"grpo": _metrics(False)})
    finally:
        plots.save_to(None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["04_collapse_signs.png", "04_rl_curves.png", "04_rl_curves_2.png"]
    assert (tmp_path / "04_rl_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plots.rl_curves({"grpo": _metrics(True)})  # saving stopped: nothing new
    assert len(list(tmp_path.iterdir())) == 3


def test_results_bars_draw_each_methods_interval():
    rows = [{"method": m, "dataset": d, "engine": "bm25", "em": em, "em_ci": [em - 0.1, em + 0.05]}
            for m, em in (("base", 0.5), ("rl", 0.7)) for d in ("1-hop", "2-hop")]
    fig = plots.results_bars(rows)
    ax = fig.axes[0]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == [0.5, 0.5, 0.7, 0.7]
    # error bars: one LineCollection per method, segments from em - 0.1 to em + 0.05
    segments = [seg for coll in ax.collections for seg in coll.get_segments()]
    spans = sorted((round(s[0][1], 6), round(s[1][1], 6)) for s in segments)
    assert spans == [(0.4, 0.55), (0.4, 0.55), (0.6, 0.75), (0.6, 0.75)]


def test_ablation_runs_draw_one_series_per_family_the_reference_first_and_the_base():
    points = [{"family": "algorithm", "em": 0.6, "searched": 0.7}, {"family": "reference", "em": 0.9, "searched": 1.0},
              {"family": "reference", "em": 0.7, "searched": 0.8}, {"family": "other", "em": 0.1}]  # no share: not drawn
    fig = plots.ablation_runs(points, {"em": 0.5, "searched_share": 0.71})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["reference", "algorithm", "base"]
    assert [c.get_offsets().tolist() for c in ax.collections] == [[[1.0, 0.9], [0.8, 0.7]], [[0.7, 0.6]], [[0.71, 0.5]]]
