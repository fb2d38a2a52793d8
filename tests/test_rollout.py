import pytest
import torch

from zslib.config import RolloutConfig
from zslib.generation.hf_backend import GrowingCache, HFBackend, _GrowingLayer, length_groups
from zslib.prompts import INVALID_ACTION, STOP_STRINGS, information_block, render_policy_prompt
from zslib.rollout import engine_search_fn, parse_action, rollout
from zslib.search import Doc, format_docs


class ScriptedBackend:
    """Returns fixed turns per row, tokenized: stands in for a model to test the loop itself."""
    last_logprobs: list = []

    def release(self):
        pass

    def __init__(self, tokenizer, turns_per_row):
        self.tok, self.turns, self.calls = tokenizer, turns_per_row, []

    def generate(self, prompts, max_new_tokens, temperature, top_p, continuing=False):
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
                    lambda qs, ts: ([docs[q] for q in qs], [None] * len(qs)), RolloutConfig(max_turns=3))
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
                    lambda qs, ts: ([[Doc("T", "t")] for _ in qs], [None] * len(qs)), RolloutConfig(max_turns=1))
    assert len(trajs[0].calls) == 1 and trajs[0].answer is None and trajs[0].done


def test_parse_action_takes_the_first_complete_block():
    assert parse_action("x <search> q1 </search> <answer> a </answer>") == ("search", "q1")
    assert parse_action("<answer>a</answer><search>q</search>") == ("answer", "a")
    assert parse_action("<search> unfinished") is None


def _expected_context(t, tokenizer, cfg):
    """What the loop should have inserted, rebuilt from the turns and calls on their own."""
    parts, calls = [], iter(t.calls)
    for i, turn in enumerate(t.turns):
        action = parse_action(turn)
        if action and action[0] == "search" and i < cfg.max_turns:
            call = next(calls)
            obs = tokenizer(format_docs([Doc(*d) for d in call["docs"]]), add_special_tokens=False)["input_ids"]
            parts.append(information_block(tokenizer.decode(obs[: cfg.max_obs_tokens])))
        elif not action and i < cfg.max_turns:
            parts.append(INVALID_ACTION)
    return "".join(parts)


def test_real_rollouts_mask_exactly_prompt_information_and_invalid_text(protocol_model, tokenizer, bm25):
    model, rows = protocol_model
    cfg = RolloutConfig(max_turns=2, max_tokens_per_turn=48, max_obs_tokens=60)
    trajs = rollout(HFBackend(model, tokenizer), tokenizer, rows, engine_search_fn(bm25, 3), cfg, temperature=0.0)
    assert sum(len(t.calls) for t in trajs) >= 8 and sum(t.answer is not None for t in trajs) >= 8
    for t in trajs:
        assert len(t.loss_mask) == len(t.token_ids) and t.loss_mask[: t.prompt_len] == [0] * t.prompt_len
        assert tokenizer.decode(t.token_ids[: t.prompt_len]) == render_policy_prompt(tokenizer, t.question)
        response, mask = t.token_ids[t.prompt_len:], t.loss_mask[t.prompt_len:]
        context = tokenizer.decode([i for i, m in zip(response, mask) if not m])
        assert context == _expected_context(t, tokenizer, cfg)
        generated = tokenizer.decode([i for i, m in zip(response, mask) if m], skip_special_tokens=True)
        assert generated == "".join(t.turns)


def test_generation_stops_at_the_first_stop_string(protocol_model, tokenizer, bm25):
    model, rows = protocol_model
    trajs = rollout(HFBackend(model, tokenizer), tokenizer, rows, engine_search_fn(bm25, 3),
                    RolloutConfig(max_turns=2, max_tokens_per_turn=200), temperature=0.0)
    stopped = 0
    for t in trajs:
        for turn in t.turns:
            ends = [turn.find(s) + len(s) for s in STOP_STRINGS if s in turn]
            if ends:
                assert len(turn) == min(ends), f"text after the stop string: {turn!r}"
                stopped += 1
    assert stopped >= 16


def test_stop_check_finds_a_multi_token_stop_string_at_the_end_of_the_new_text(protocol_model, tokenizer):
    stop = "Doc 2("
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert len(enc(stop)) > 1  # the protocol tags are single tokens; this is not
    backend = HFBackend(protocol_model[0], tokenizer, stop_strings=[stop])
    assert backend._ends_in_stop(enc(" Doc 1(a) Doc 2("))
    assert not backend._ends_in_stop(enc(" Doc 1(a) Doc 3("))
    assert not backend._ends_in_stop(enc(" Doc 2( and more"))
    first = enc(" Doc 1(a) Doc 2(")
    assert backend._trim(first + enc(" and more")) == first


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_decoding_matches_transformers_generate_while_rows_leave_the_batch(protocol_model, tokenizer, temperature):
    model, rows = protocol_model
    prompts = [tokenizer(render_policy_prompt(tokenizer, r["question"]), add_special_tokens=False)["input_ids"]
               for r in rows]
    backend = HFBackend(model, tokenizer, reuse_cache=False)
    torch.manual_seed(0)
    got = backend.generate(prompts, 40, temperature, 1.0)
    ids, attn = backend._left_pad(prompts)
    torch.manual_seed(0)
    sampling = dict(do_sample=True, temperature=temperature) if temperature else dict(do_sample=False)
    out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=40, top_k=None, top_p=1.0,
                         stop_strings=STOP_STRINGS, tokenizer=tokenizer, pad_token_id=backend.pad_id, **sampling)
    assert got == [backend._trim(row) for row in out[:, ids.shape[1]:].tolist()]
    lengths = sorted(len(row) for row in got)
    assert lengths[len(lengths) // 4 - 1] < lengths[-1], "a quarter of the rows stopped early and left the batch"


def test_growing_cache_layer_holds_what_concatenation_would_and_writes_in_place():
    torch.manual_seed(0)
    layer, steps = _GrowingLayer(), [torch.randn(3, 2, n, 4) for n in (5, 1, 1, 1)]
    for i, k in enumerate(steps):
        keys, values = layer.update(k, -k)
        expected = torch.cat(steps[: i + 1], dim=2)
        assert torch.equal(keys, expected) and torch.equal(values, -expected)
        if i == 0:
            buffer = keys.data_ptr()
    assert keys.data_ptr() == buffer, "one-token steps went into the spare room, no copy"
    layer.batch_select_indices(torch.tensor([2, 0]))  # rows replaced: the next step starts a new buffer
    keys, _ = layer.update(steps[-1][:2], -steps[-1][:2])
    assert torch.equal(keys, torch.cat([expected[[2, 0]], steps[-1][:2]], dim=2))


def test_generating_with_the_growing_cache_gives_the_same_logits(protocol_model, tokenizer):
    from transformers import DynamicCache
    model = protocol_model[0]
    batch = tokenizer(["Question: who wrote it?", "Question: where?"], return_tensors="pt", padding=True,
                      padding_side="left")
    outs = [model.generate(**batch, max_new_tokens=12, do_sample=False, past_key_values=cache, output_scores=True,
                           return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
            for cache in (DynamicCache(), GrowingCache())]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].scores, outs[1].scores):
        assert torch.allclose(a, b, atol=1e-5)


def test_batched_rollout_equals_per_row_rollout_under_greedy(protocol_model, tokenizer, bm25):
    model, rows = protocol_model
    backend, fn, cfg = HFBackend(model, tokenizer), engine_search_fn(bm25, 3), RolloutConfig(max_turns=2)
    batched = rollout(backend, tokenizer, rows, fn, cfg, temperature=0.0)
    for row, t in zip(rows, batched):
        alone = rollout(backend, tokenizer, [row], fn, cfg, temperature=0.0)[0]
        assert alone.token_ids == t.token_ids and alone.loss_mask == t.loss_mask
        assert alone.calls == t.calls and alone.answer == t.answer


def test_reusing_the_cache_across_turns_changes_no_trajectory(protocol_model, tokenizer, bm25):
    model, rows = protocol_model
    fn, cfg = engine_search_fn(bm25, 3), RolloutConfig(max_turns=2)
    fresh, reused = HFBackend(model, tokenizer, reuse_cache=False, share_prefix=False), HFBackend(model, tokenizer)
    expected = rollout(fresh, tokenizer, rows, fn, cfg, temperature=0.0)
    got = rollout(reused, tokenizer, rows, fn, cfg, temperature=0.0)
    assert sum(len(t.turns) > 1 for t in got) >= 8  # later turns did continue from the cache
    for a, b in zip(expected, got):
        assert a.token_ids == b.token_ids and a.loss_mask == b.loss_mask and a.calls == b.calls
    # Every turn after the first encoded only the tokens appended since the last call.
    assert reused.prefilled_tokens < 0.7 * fresh.prefilled_tokens
    assert reused._kept is None  # released when the rollout ended


def test_sharing_the_prompts_common_prefix_changes_no_output_and_encodes_it_once(protocol_model, tokenizer):
    model, rows = protocol_model
    prompts = [tokenizer(render_policy_prompt(tokenizer, r["question"]), add_special_tokens=False)["input_ids"]
               for r in rows]
    shared = next(i for i in range(len(prompts[0])) if len({p[i] for p in prompts}) > 1)  # the instruction
    assert shared >= 16
    alone, together = HFBackend(model, tokenizer, share_prefix=False), HFBackend(model, tokenizer)
    # The next turn continues from the kept cache, whose rows now start with the shared columns.
    block = tokenizer("<information> x </information>", add_special_tokens=False)["input_ids"]
    for encoded in assert_same_outputs(alone, together, prompts, [block] * len(prompts), "prefilled_tokens"):
        assert encoded == [sum(len(p) for p in prompts), sum(len(p) for p in prompts) - (len(prompts) - 1) * shared]


def assert_same_outputs(reference, other, prompts, next_turn, counter):
    """Two backends give the same tokens, greedy and sampled, for a fresh batch and for the next
    turn (each row extended by ``next_turn[i]``), which continues from their kept caches. Returns,
    per temperature, how much each backend's ``counter`` grew on the fresh batch."""
    grown = []
    for temperature in (0.0, 1.0):
        outputs, counts = [], []
        for backend in (reference, other):
            torch.manual_seed(0)
            before = getattr(backend, counter)
            outputs.append(backend.generate(prompts, 40, temperature, 1.0))
            counts.append(getattr(backend, counter) - before)
        assert outputs[0] == outputs[1]
        grown.append(counts)
        longer = [p + out + extra for p, out, extra in zip(prompts, outputs[0], next_turn)]
        torch.manual_seed(1)
        expected = reference.generate(longer, 20, temperature, 1.0, continuing=True)
        torch.manual_seed(1)
        assert other.generate(longer, 20, temperature, 1.0, continuing=True) == expected
    return grown


def test_length_groups_cut_where_padding_is_saved():
    lengths = [5, 50] * 10  # two kinds of row, interleaved
    groups = length_groups(lengths, 4)
    assert groups == [(list(range(0, 20, 2)), 5), (list(range(1, 20, 2)), 50)]  # 550 positions instead of 1000
    assert length_groups(lengths, 1) == [(list(range(20)), 50)]
    assert length_groups([7] * 40, 4) == [(list(range(40)), 7)]  # nothing to save
    assert len(length_groups([5, 50] * 7, 4)) == 1  # 7 rows of each: groups would be under 8 rows
    # Cutting 1..40 saves 8·(40−8) = 256 positions at 8, ≥ 5% of 40·40 = 80; four groups at most.
    groups = length_groups(list(range(40, 0, -1)), 4)
    assert len(groups) == 4 and sorted(r for g, _ in groups for r in g) == list(range(40))
    assert all(w == max(40 - r for r in g) for g, w in groups)


def test_prefilling_rows_of_similar_length_together_changes_no_output(protocol_model, tokenizer):
    model, rows = protocol_model
    filler = tokenizer("<information> " + "Xo Ba was born in Tavin. " * 8 + "</information>",
                       add_special_tokens=False)["input_ids"]
    # Half the prompts carry a long block: one padded prefill would spend most positions on padding.
    prompts = [tokenizer(render_policy_prompt(tokenizer, r["question"]), add_special_tokens=False)["input_ids"]
               + (filler if i % 2 else []) for i, r in enumerate(rows)]
    padded, grouped = HFBackend(model, tokenizer, prefill_groups=1), HFBackend(model, tokenizer)
    # The next turn (rows of different lengths again) continues from the joined cache.
    next_turn = [filler[:3 + i] for i in range(len(prompts))]
    for positions in assert_same_outputs(padded, grouped, prompts, next_turn, "prefill_positions"):
        assert positions[1] < 0.75 * positions[0]
