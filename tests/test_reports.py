"""Sentences written from a run's numbers: they must say what the numbers say, whichever way they go."""

import torch

from zslib import reports
from zslib.rollout import Trajectory
from zslib.trainer import Batch, Rollouts


def _run(entropy, invalid, equal, val_1hop, val_2hop=None, steps=8):
    """Metrics of a run whose signs go from the first value to the second over its steps."""
    rows = []
    for i in range(steps):
        t = i / (steps - 1)
        rows.append({"step": i + 1, "noise_prob": 0.1 * (i + 1), "reward_mean": 0.2 + 0.05 * i,
                     "entropy": entropy[0] + t * (entropy[1] - entropy[0]),
                     "invalid_action_rate": invalid[0] + t * (invalid[1] - invalid[0]),
                     "equal_reward_groups": equal[0] + t * (equal[1] - equal[0]), "kl": 0.001 * i})
    for m, v in zip(rows[1::2], val_1hop):
        m.update({"val_em": v, "val_em_1hop": v} if val_2hop is None else {"val_em_1hop": v})
    if val_2hop is not None:
        for m, v1, v2 in zip(rows[1::2], val_1hop, val_2hop):
            m.update({"val_em_2hop": v2, "val_em": (v1 + v2) / 2})
    return rows


def test_a_steady_run_is_called_healthy():
    healthy, lines = reports.collapse_report(_run((0.4, 0.42), (0.05, 0.06), (0.3, 0.35), [0.5, 0.6, 0.62, 0.61]))
    assert healthy and lines[0].startswith("Healthy")
    assert all(not line.startswith("SIGN") for line in lines)


def test_a_collapsing_run_names_each_sign():
    # entropy +100% (> 25%), invalid actions +0.2 (> 0.05), groups +0.1 (within 0.15), 1-hop validation
    # drops 0.7 -> 0.55 (> 0.05), 2-hop 0.5 -> 0.2 (> 0.15)
    healthy, lines = reports.collapse_report(_run((0.4, 0.8), (0.05, 0.25), (0.3, 0.4), [0.6, 0.7, 0.6, 0.55],
                                                  [0.3, 0.5, 0.3, 0.2]))
    assert not healthy and lines[0].startswith("4 signs of collapse (entropy of the policy's tokens; invalid actions")
    signs = [line for line in lines if line.startswith("SIGN")]
    assert [s.split(":")[0].removeprefix("SIGN  ") for s in signs] == [
        "entropy of the policy's tokens", "invalid actions per turn", "1-hop validation EM", "2-hop validation EM"]
    assert "best 0.700 at step 4, last 0.550 (a drop of 0.150" in signs[2]


def test_curve_summary_follows_the_reward_and_the_noise():
    metrics = _run((0.4, 0.4), (0, 0), (0, 0), [0.5, 0.6, 0.62, 0.61])
    lines = reports.curve_summary(metrics, window=2)
    # rewards 0.2, 0.25, ..., 0.55: first two 0.225, last two 0.525; noise 0.1 -> 0.8
    assert lines[0] == ("Training reward (sampled rollouts against the engine RL uses): 0.225 over the first 2 steps, "
                        "0.525 over the last 2; it rose while the noise probability went from 0.10 to 0.80.")
    assert lines[1].startswith("Its 2-step mean peaked at step 8 (0.525")
    falling = [{**m, "reward_mean": 1 - m["reward_mean"]} for m in metrics]
    assert "it fell while" in reports.curve_summary(falling, window=2)[0]
    assert "best 0.620 at step 6" in lines[2]


def _sample(tokenizer, response, calls, reward=0.0):
    prompt = tokenizer("<|im_start|>user\nQuestion: Who?<|im_end|>\n", add_special_tokens=False)["input_ids"]
    ids = prompt + tokenizer(response, add_special_tokens=False)["input_ids"]
    return {"token_ids": ids, "prompt_len": len(prompt), "golden_answers": ["Masa"], "reward": reward,
            "calls": calls, "text": tokenizer.decode(ids)}


def test_sample_notes_flag_a_useful_call_without_the_answer_and_read_only_the_policys_answer(tokenizer):
    from zslib.prompts import INVALID_ACTION
    calls = [{"query": "Teabe College city", "docs": [["Teabe College", "Teabe College is in Masa."]], "noisy": False},
             {"query": "Masa", "docs": [["Masa", "Masa is a city."]], "noisy": True},
             {"query": "Teabe", "docs": [["Teabe", "Teabe is a city."]], "noisy": False}]
    notes = reports.sample_notes(_sample(tokenizer, "<answer> Masa </answer>", calls, 1.0), tokenizer)
    assert notes[0] == "answer 'Masa': right (gold 'Masa'), reward 1.00"
    assert notes[1].endswith("useful documents that state 'Masa', as asked")
    assert "noisy documents, yet they state the answer" in notes[2]
    assert "do not state 'Masa': the simulator missed" in notes[3]
    # A 2-hop question's first search should find the bridge entity, not the final answer.
    two_hop = {"hop_answers": ["Teabe College", "Masa"]}
    first = [{"query": "Where did Xo study?", "docs": [["Xo", "Xo studied at Teabe College."]], "noisy": False}]
    assert "state 'Teabe College', as asked" in reports.sample_notes(_sample(tokenizer, "", first), tokenizer, two_hop)[1]
    # The invalid-action message shows an example answer block: it is not the policy's answer.
    assert reports.sample_notes(_sample(tokenizer, "hmm" + INVALID_ACTION, []), tokenizer)[0].startswith("no answer")


def test_recall_note_counts_the_facts_reproduced_word_for_word():
    truth = "Xo is a chemist. Xo was born in Shine. Xo was born in the year 1886. Xo studied at Teabe College."
    note = reports.recall_note("Xo is a chemist. Xo was born in Shine. Ho studied at Lubi Institute.", truth)
    assert note == ("the sample states 1 of the article's 3 facts word for word; not: Xo was born in the year 1886; "
                    "Xo studied at Teabe College")


def test_step_rows_show_each_rollouts_reward_advantage_and_the_updates_direction():
    trajs = [Trajectory("q", ["a"], answer="a"), Trajectory("q", ["a"]), Trajectory("r", ["b"], answer="c")]
    trajs[0].calls = [{"query": "x", "docs": [], "noisy": True}, {"query": "y", "docs": [], "noisy": False}]
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1]])
    batch = Batch(torch.zeros(3, 5, dtype=torch.long), mask, torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0, 0, 1]),
                  advantages=torch.tensor([[0.0, 0.7, 0.7, 0.0], [-0.7, -0.7, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    group = Rollouts(1, [], trajs, batch.group_ids, 0.1, 0)
    rows = reports.step_rows(group, batch, torch.tensor([-1.0, -2.0, -1.5]), torch.tensor([-0.9, -2.1, -1.5]))
    assert [(r["question"], r["answer"], r["searches"], r["reward"], r["advantage"], r["Δ log-prob"]) for r in rows] == [
        (1, "a", "noisy / useful", 1.0, 0.7, "+1.00e-01"), (1, "(none)", "none", 0.0, -0.7, "-1.00e-01"),
        (2, "c", "none", 0.5, 0.0, "+0.00e+00")]
    assert reports.update_agreement([0.7, -0.7, 0.0], [0.1, -0.1, 0.0]) == (
        "1 of the 1 rollouts with a positive advantage became more likely; 1 of the 1 with a negative advantage "
        "became less likely; 1 had an advantage of 0 (their group all scored the same): the update does not aim at "
        "them, they move only as a side effect of the others.")
    table = reports.markdown_table(rows).splitlines()
    assert table[0] == "| question | answer | searches | reward | advantage | Δ log-prob |" and len(table) == 5


def test_evaluation_summary_and_baseline_notes_use_the_rows_numbers():
    base = {"em": 0.5, "searches_per_question": 0.8, "searched_share": 0.7, "n": 10,
            "two_hop": {"em": 0.2, "searches_per_question": 1.0, "searched_share": 0.9, "n": 4}}
    trained = {"em": 0.75, "searches_per_question": 1.0, "searched_share": 1.0, "n": 10,
               "two_hop": {"em": 0.5, "searches_per_question": 1.5, "searched_share": 1.0, "n": 4}}
    assert reports.evaluation_summary({"base": base, "trained": trained}) == [
        "1-hop (10 questions): EM 0.500 -> 0.750 (+0.250); searches per question 0.80 -> 1.00; searched 70% -> 100%.",
        "2-hop (4 questions): EM 0.200 -> 0.500 (+0.300); searches per question 1.00 -> 1.50; searched 90% -> 100%."]
    assert list(reports.by_kind({"base": base, "trained": trained})) == ["base 1-hop", "trained 1-hop", "base 2-hop",
                                                                          "trained 2-hop"]
    rows = [{"method": "direct", "dataset": "d", "engine": "e", "searches_per_question": 1.2, "invalid_rate": 0.5},
            {"method": "rag", "dataset": "d", "engine": "e", "searches_per_question": 0.0, "invalid_rate": 0.25}]
    said = ["<search> x </search>\n\n<information></information>\n\n<answer> a </think>", "<answer> b </answer>"]
    predictions = [{"method": "direct", "dataset": "d", "engine": "e", "response": x} for x in said]
    predictions += [{"method": "rag", "dataset": "d", "engine": "e", "response": x}
                    for x in ["<answer> c </answer>"] * 3 + ["<think> hop </think>\n<search> q </search>"]]
    notes = reports.baseline_notes(rows, predictions, tiny=True)
    assert notes[0].startswith("direct on d: 1.20 searches per question, and 0.50 of its responses out of the")
    assert "0.50 of its responses hold an empty <information> block" in notes[0]
    assert "0.25 of its responses are out of the protocol's order, and 0.25 end in a search" in notes[1]
