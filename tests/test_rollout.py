from zslib.config import RolloutConfig
from zslib.prompts import INVALID_ACTION
from zslib.rollout import parse_action, rollout
from zslib.search import Doc


class ScriptedBackend:
    """Returns fixed turns per row, tokenized: stands in for a model to test the loop itself."""

    def __init__(self, tokenizer, turns_per_row):
        self.tok, self.turns, self.calls = tokenizer, turns_per_row, []

    def generate(self, prompts, max_new_tokens, temperature, top_p):
        self.calls.append(len(prompts))
        out = []
        for p in prompts:
            row = next(i for i, t in enumerate(self.turns) if self.tok.decode(p).count("Question: " + t[0] + "?"))
            text = self.turns[row][1].pop(0)
            out.append(self.tok(text, add_special_tokens=False)["input_ids"][:max_new_tokens])
        return out


def test_rollout_masks_everything_the_policy_did_not_write(tokenizer):
    backend = ScriptedBackend(tokenizer, [
        ("qa", ["<think> a </think>\n<search> alpha </search>", "<answer> Beta </answer>"]),
        ("qb", ["hmm no action", "<answer> x </answer>"]),
    ])
    docs = {"alpha": [Doc("Alpha", "Alpha is Beta.")]}
    trajs = rollout(backend, tokenizer, [{"question": "qa", "golden_answers": ["Beta"]},
                                         {"question": "qb", "golden_answers": ["y"]}],
                    lambda qs, ts: [docs[q] for q in qs], RolloutConfig(max_turns=3))
    a, b = trajs
    assert backend.calls == [2, 2], "both rows are generated together each turn"
    assert a.answer == "Beta" and a.first_action == "search" and a.calls[0]["query"] == "alpha"
    assert b.answer == "x" and b.first_action == "invalid" and b.invalid_actions == 1
    for t, generated in ((a, ["<think> a </think>\n<search> alpha </search>", "<answer> Beta </answer>"]),
                         (b, ["hmm no action", "<answer> x </answer>"])):
        assert len(t.token_ids) == len(t.loss_mask)
        policy_text = tokenizer.decode([i for i, m in zip(t.token_ids, t.loss_mask) if m])
        assert policy_text == "".join(generated)
    context_a = tokenizer.decode([i for i, m in zip(a.token_ids[a.prompt_len:], a.loss_mask[a.prompt_len:]) if not m])
    assert context_a == "\n\n<information>Doc 1(Title: Alpha) Alpha is Beta.</information>\n\n"
    context_b = tokenizer.decode([i for i, m in zip(b.token_ids[b.prompt_len:], b.loss_mask[b.prompt_len:]) if not m])
    assert context_b == INVALID_ACTION


def test_after_max_turns_only_an_answer_counts(tokenizer):
    backend = ScriptedBackend(tokenizer, [("qa", ["<search> a </search>", "<search> b </search>"])])
    trajs = rollout(backend, tokenizer, [{"question": "qa", "golden_answers": ["z"]}],
                    lambda qs, ts: [[Doc("T", "t")] for _ in qs], RolloutConfig(max_turns=1))
    assert len(trajs[0].calls) == 1 and trajs[0].answer is None and trajs[0].done


def test_parse_action_takes_the_first_complete_block():
    assert parse_action("x <search> q1 </search> <answer> a </answer>") == ("search", "q1")
    assert parse_action("<answer>a</answer><search>q</search>") == ("answer", "a")
    assert parse_action("<search> unfinished") is None
