"""The RL trainer on a small model that already follows the protocol: masks reach the loss,
rewards read only the policy's text, and an interrupted run resumes to the same result."""

import copy
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from zslib import algos, rl_models, trainer
from zslib.config import ConfigError, RLConfig, RolloutConfig, load_profile
from zslib.files import read_jsonl as read_rows
from zslib.simulator import engine_for
from zslib.prompts import INVALID_ACTION
from zslib.generation.hf_backend import HFBackend
from zslib.rollout import Trajectory, engine_search_fn, rollout

TIMING = ("seconds", "tokens_per_s", "rollout_seconds", "simulator_seconds", "logprobs_seconds", "update_seconds",
          "validation_seconds", "weight_sync_seconds")


@pytest.fixture(scope="module")
def policy_dir(protocol_model, tokenizer, tmp_path_factory):
    model, _ = protocol_model
    folder = tmp_path_factory.mktemp("policy")
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def _profile(policy_dir, **rl):
    overrides = {"models.policy": str(policy_dir), "rollout.max_turns": 2, "rollout.max_tokens_per_turn": 40,
                 "rollout.max_obs_tokens": 96}
    overrides.update({f"rl.{k}": v for k, v in rl.items()})
    return load_profile("tiny", overrides)


def _rollouts(protocol_model, tokenizer, bm25, n=4):
    model, rows = protocol_model
    torch.manual_seed(0)
    return rollout(HFBackend(model, tokenizer), tokenizer, rows[:n], engine_search_fn(bm25, 3),
                   RolloutConfig(max_turns=2, max_tokens_per_turn=40, max_obs_tokens=96), temperature=0.0)


def test_batch_tensors_shift_the_loss_mask_and_the_ablation_trains_documents(protocol_model, tokenizer, bm25):
    trajs = _rollouts(protocol_model, tokenizer, bm25)
    assert any(t.calls for t in trajs), "the model searches, so there are <information> blocks"
    on = rl_models.batch_tensors(trajs, tokenizer.pad_token_id, loss_mask=True)
    off = rl_models.batch_tensors(trajs, tokenizer.pad_token_id, loss_mask=False)
    for r, t in enumerate(trajs):
        n = len(t.token_ids)
        assert on["mask"][r, :n - 1].tolist() == t.loss_mask[1:]
        assert on["mask"][r, n - 1:].sum() == 0 and off["mask"][r, n - 1:].sum() == 0, "padding never trains"
        assert off["mask"][r, :t.prompt_len - 1].sum() == 0, "the prompt never trains"
        assert off["mask"][r, t.prompt_len - 1:n - 1].sum() == n - t.prompt_len, "every response token trains"
        assert on["input_ids"][r, :n].tolist() == t.token_ids
    assert on["input_ids"].shape[1] % 64 == 0


def test_right_padding_needs_no_attention_mask(protocol_model, tokenizer, bm25):
    """Log-probs of a padded batch equal each row's log-probs computed alone."""
    trajs = _rollouts(protocol_model, tokenizer, bm25)
    batch = rl_models.batch_tensors(trajs, tokenizer.pad_token_id)
    with torch.no_grad():
        together, _ = rl_models.token_logprobs(protocol_model[0], batch["input_ids"])
        for r, t in enumerate(trajs):
            alone, _ = rl_models.token_logprobs(protocol_model[0], torch.tensor([t.token_ids]))
            assert torch.allclose(together[r, :len(t.token_ids) - 1], alone[0], atol=1e-5)


class _FixedLogits(torch.nn.Module):
    """Stands in for a model: returns trainable logits, so their gradient can be read per token."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.logits)


@pytest.mark.parametrize("loss_mask", [True, False])
def test_information_tokens_get_no_gradient_with_the_loss_mask(protocol_model, tokenizer, bm25, loss_mask):
    trajs = _rollouts(protocol_model, tokenizer, bm25)
    batch = rl_models.batch_tensors(trajs, tokenizer.pad_token_id, loss_mask=loss_mask)
    ids, mask = batch["input_ids"], batch["mask"]
    with torch.no_grad():
        real = protocol_model[0](input_ids=ids).logits
    fixed = _FixedLogits(real.clone())
    logp, entropy = rl_models.token_logprobs(fixed, ids, with_entropy=True)
    assert torch.allclose(entropy, algos.entropy_from_logits(real[:, :-1]), atol=1e-4)
    old = logp.detach() + 0.05 * torch.randn_like(logp)   # ratios away from 1, as after an update
    ref = logp.detach() + 0.1 * torch.randn_like(logp)
    adv = torch.randn(len(trajs), 1).expand_as(mask) * mask
    loss, _ = trainer.rl_loss(RLConfig(kl_coef=0.1, entropy_coef=0.01), logp, entropy, old, ref, adv, mask)
    loss.backward()
    grad = fixed.logits.grad[:, :-1].abs().sum(-1)  # position j predicts token j + 1, like mask[:, j]

    # Which positions predict a token inside an <information> block (tags included)?
    in_info = torch.zeros_like(mask, dtype=torch.bool)
    for r, t in enumerate(trajs):
        text_upto = [tokenizer.decode(t.token_ids[t.prompt_len:j + 1]) for j in range(t.prompt_len, len(t.token_ids))]
        for j, text in zip(range(t.prompt_len, len(t.token_ids)), text_upto):
            inside = text.count("<information>") > text.count("</information>")
            closing = text.endswith("</information>")
            in_info[r, j - 1] = inside or closing
    assert in_info.any()
    if loss_mask:
        assert grad[mask == 0].max() == 0, "no gradient reaches a token the policy did not write"
        assert grad[in_info].max() == 0
        assert (grad[mask == 1] > 0).float().mean() > 0.9
    else:
        assert (grad[in_info] > 0).float().mean() > 0.9, "the ablation trains the documents"


def test_a_micro_batch_is_padded_to_its_own_longest_row():
    ids = torch.arange(3 * 192).view(3, 192)
    batch = trainer.Batch(ids, torch.ones(3, 191), torch.zeros(3), torch.zeros(3), ref_logp=torch.zeros(3, 191),
                          lengths=torch.tensor([150, 70, 65]))
    short = batch.rows(torch.tensor([1, 2])).trimmed()
    assert short.input_ids.shape == (2, 128) and short.mask.shape == short.ref_logp.shape == (2, 127)
    assert torch.equal(short.input_ids, ids[1:, :128]) and short.scores.shape == (2,)
    assert batch.trimmed().input_ids.shape == (3, 192), "the longest row keeps the full width"


def _cut(t: Trajectory, keep: int) -> Trajectory:
    """``t`` with only its prompt and ``keep`` more tokens: a row far shorter than the others."""
    n = t.prompt_len + keep
    return dataclasses.replace(t, token_ids=t.token_ids[:n], loss_mask=[0] * t.prompt_len + [1] * keep)


# The memory-bounded ways through a mini-batch, each against one plain pass over it.
MEMORY_SAVERS = {"micro-batches of 4 rows, log-probs in chunks of 37": {"micro_batch_size": 4, "logprob_chunk": 37},
                 "micro-batches by tokens, with activation checkpointing": {"micro_batch_tokens": 200,
                                                                            "gradient_checkpointing": True}}


@pytest.mark.parametrize("algorithm", ["grpo", "ppo", "reinforce_pp"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_memory_bounded_updates_give_the_gradient_of_one_pass_over_the_mini_batch(
        policy_dir, protocol_model, tokenizer, bm25, tmp_path, algorithm, agg):
    """Micro-batches (by rows or by a token budget, each padded to its own longest), chunked log-probs and
    activation checkpointing change the memory, not the update: the policy's (and PPO's critic's)
    gradients and the statistics equal one pass over the 6 rows, whose lengths differ 2.5-fold
    (no clipping, so the gradients are compared as computed)."""
    trajs = _rollouts(protocol_model, tokenizer, bm25, n=6)
    trajs[1], trajs[4] = _cut(trajs[1], 3), _cut(trajs[4], 9)
    grads, stats = {}, {}
    for name, settings in {"one pass": {}, **MEMORY_SAVERS}.items():
        profile = _profile(policy_dir, algorithm=algorithm, engine="bm25", mini_batch_size=6,
                           ppo_epochs=2,  # off-policy: logprobs() computes the old log-probs, by micro-batch
                           agg=agg, kl_coef=0.1, entropy_coef=0.01, grad_clip=1e9, validate_every=0,
                           bf16_autocast=False, **settings)  # fp32: the orders of summation agree to rounding
        t = trainer.RLTrainer(profile, tmp_path / str(len(grads)), real_engine=bm25, questions=protocol_model[1])
        batch = t.score(trainer.Rollouts(1, [], trajs, torch.tensor([0, 0, 0, 1, 1, 1]), 0.0, 0))
        batch.scores = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 0.2], device=batch.scores.device)
        t.advantages(t.logprobs(batch))
        noise = 0.1 * torch.randn(batch.old_logp.shape, generator=torch.Generator().manual_seed(0))
        batch.old_logp = batch.old_logp + noise.to(batch.old_logp.device)  # ratios away from 1 exercise the clip
        stats[name] = t._optimizer_step(batch)
        grads[name] = [p.grad.clone() for p in [*t.policy.parameters(), *(t.critic.parameters() if t.critic else [])]]
        if settings:
            assert len(t._micro_batches(batch)) >= 2, name
    lengths = batch.lengths.tolist()
    assert max(lengths) > 2.5 * min(lengths)
    # fp32 sums taken in another order: on an AVX2 CPU a small loss made of larger terms (seq-mean-token-sum)
    # moved by 7e-5 of itself (4e-7), so the bars are 1e-4 / 1e-6; a wrong divisor moves it by whole percents
    for name in MEMORY_SAVERS:
        for a, b in zip(grads["one pass"], grads[name]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
        assert stats[name] == pytest.approx(stats["one pass"], rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize("lora", [False, True])
def test_chunked_logprobs_and_entropy_equal_one_pass(protocol_model, tokenizer, bm25, lora):
    """Log-probs and entropy from the output layer a few positions at a time equal one pass over every
    position, with and without gradient, through a peft wrapper too (and with its adapter disabled,
    the LoRA reference)."""
    model = protocol_model[0]
    if lora:
        from peft import LoraConfig, get_peft_model
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = rl_models.batch_tensors(_rollouts(protocol_model, tokenizer, bm25, n=3), tokenizer.pad_token_id)["input_ids"]
    plain = rl_models.token_logprobs(model, ids, with_entropy=True)
    for chunk in (1, 37, 10 ** 6):
        with torch.no_grad():
            logp, entropy = rl_models.token_logprobs(model, ids, with_entropy=True, chunk=chunk)
        assert torch.allclose(logp, plain[0], atol=1e-5) and torch.allclose(entropy, plain[1], atol=1e-5)
    if lora:
        with model.disable_adapter():
            base = rl_models.token_logprobs(model, ids)[0]
            assert torch.allclose(rl_models.token_logprobs(model, ids, chunk=37)[0], base, atol=1e-5)
        assert not torch.allclose(base, plain[0], atol=1e-3), "the adapter changes the log-probs"


def test_the_reference_matches_the_policy_exactly_before_the_first_update(policy_dir, protocol_model, tokenizer,
                                                                            bm25, tmp_path):
    """The reference has the policy's precision and autocast, so under bf16 autocast the KL starts at 0."""
    profile = _profile(policy_dir, engine="bm25", ppo_epochs=2, validate_every=0, bf16_autocast=True)
    t = trainer.RLTrainer(profile, tmp_path, real_engine=bm25, questions=protocol_model[1])
    assert next(t.reference.parameters()).dtype == next(t.policy.parameters()).dtype == torch.float32
    trajs = _rollouts(protocol_model, tokenizer, bm25, n=2)
    batch = t.logprobs(t.score(trainer.Rollouts(1, [], trajs, torch.tensor([0, 0]), 0.0, 0)))
    assert torch.equal(batch.old_logp, batch.ref_logp)


def test_a_step_rolls_out_in_chunks_of_the_rollout_batch_size_with_the_same_result(policy_dir, protocol_model, bm25,
                                                                                   tmp_path):
    """6 rollouts in chunks of 4 and 2 (their KV cache bounded by rollout.batch_size) equal one batch of 6."""
    seen, out = [], {}
    for size in (64, 4):
        profile = _profile(policy_dir, engine="bm25", questions_per_step=3, group_size=2, validate_every=0)
        profile.rollout.batch_size, profile.rollout.temperature = size, 0.0
        t = trainer.RLTrainer(profile, tmp_path / str(size), real_engine=bm25, questions=protocol_model[1])
        generate = t.backend.generate
        t.backend.generate = lambda prompts, *a, **k: seen.append(len(prompts)) or generate(prompts, *a, **k)
        out[size] = [tr.token_ids for tr in t.rollout_group().trajs]
    assert max(seen) == 6 and 4 in seen and 2 in seen and all(n <= 4 for n in seen[seen.index(4):])
    assert out[4] == out[64]


def test_the_engines_logprobs_sit_on_the_tokens_it_sampled_and_weight_the_loss(tokenizer):
    """vLLM's log-probs of the sampled tokens land where ``token_logprobs`` puts those tokens; with
    ``rl.tis_cap`` a uniform ratio pi_old / pi_rollout of 4 weights the policy loss by the cap, 2."""
    t = Trajectory("q", ["a"], token_ids=[5, 6, 7, 8, 9, 10, 11, 12], loss_mask=[0, 0, 0, 1, 1, 0, 0, 1], prompt_len=3,
                   sampled_logprobs=[-0.5, -1.5, -2.5])
    rollout_logp = rl_models.batch_tensors([t], 0)["rollout_logp"]
    nan = float("nan")
    expected = torch.tensor([[nan, nan, -0.5, -1.5, nan, nan, -2.5] + [nan] * 56])  # shifted by one, width 64 - 1
    assert torch.equal(torch.isnan(rollout_logp), torch.isnan(expected))
    assert rollout_logp[~torch.isnan(rollout_logp)].tolist() == [-0.5, -1.5, -2.5]
    assert rl_models.batch_tensors([dataclasses.replace(t, sampled_logprobs=[])], 0)["rollout_logp"] is None

    logp = torch.log(torch.tensor([[0.2, 0.4, 0.1, 0.3]]))
    rollout = logp - torch.log(torch.tensor(4.0))
    adv, mask = torch.tensor([[1.0, -1.0, 0.5, 2.0]]), torch.ones(1, 4)
    cfg = RLConfig(kl_coef=0.0, entropy_coef=0.0)
    plain, stats = trainer.rl_loss(cfg, logp, torch.zeros(1, 4), logp, logp, adv, mask, rollout_logp=rollout)
    assert stats["rollout_mismatch_kl"] == pytest.approx(-torch.log(torch.tensor(4.0)).item())
    assert "tis_weight" not in stats
    weighted, stats = trainer.rl_loss(RLConfig(kl_coef=0.0, entropy_coef=0.0, tis_cap=2.0), logp, torch.zeros(1, 4),
                                      logp, logp, adv, mask, rollout_logp=rollout)
    assert weighted.item() == pytest.approx(2 * plain.item()) and stats["tis_weight"] == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="rl.tis_cap .* needs rollout.backend: vllm"):
        load_profile("tiny", {"rl.tis_cap": 2.0})


def test_micro_batches_by_tokens_hold_every_row_once_within_the_budget():
    lengths = torch.tensor([700, 60, 130, 65, 300, 64, 250])
    batch = trainer.Batch(torch.zeros(7, 704, dtype=torch.long), torch.ones(7, 703), torch.zeros(7), torch.zeros(7),
                          lengths=lengths)
    t = trainer.RLTrainer.__new__(trainer.RLTrainer)
    t.cfg = load_profile("tiny", {"rl.micro_batch_tokens": 640}).rl
    parts = t._micro_batches(batch)
    # Longest first, widths padded to 64: 704, 320, 256, 192, 128, 64, 64. A part costs its rows times its
    # first row's width: [704] alone (over the budget by itself); 2 x 320 = 640 fits, a third row not;
    # 3 x 192 = 576 fits, a fourth (768) not; the last row alone.
    assert [index.tolist() for index, _ in parts] == [[0], [4, 6], [2, 3, 5], [1]]
    assert [tuple(part.input_ids.shape) for _, part in parts] == [(1, 704), (2, 320), (3, 192), (1, 64)]


def test_reward_reads_only_the_policy_text(tokenizer):
    """The invalid-action message shows '<answer> answer </answer>': it must not score; the answer
    the rollout parsed from the policy's own turn does."""
    t = Trajectory("q", ["answer"])
    t.extend(tokenizer("prompt", add_special_tokens=False)["input_ids"], from_policy=False)
    t.prompt_len = len(t.token_ids)
    t.extend(tokenizer("thinking only", add_special_tokens=False)["input_ids"], from_policy=True)
    t.turns.append("thinking only")
    t.extend(tokenizer(INVALID_ACTION, add_special_tokens=False)["input_ids"], from_policy=False)
    for reward in ("f1", "em", "format"):
        assert trainer.trajectory_score(t, reward, tokenizer) == 0.0
    t.turns.append("<answer> The Answer </answer>")
    t.answer = "The Answer"
    assert trainer.trajectory_score(t, "em", tokenizer) == 1.0
    assert trainer.trajectory_score(t, "f1", tokenizer) == 1.0


def _run(profile, run_dir, bm25, rows, simulator=None, steps=None, resume=True):
    engine = engine_for(profile, loaded=simulator) if simulator else None
    t = trainer.RLTrainer(profile, run_dir, engine=engine, real_engine=bm25, questions=rows,
                          validation={"1hop": rows[-4:]})
    t.train(steps=steps, resume=resume)
    return t


def _deterministic(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


@pytest.mark.parametrize("algorithm,engine,lora", [("grpo", "bm25", False), ("ppo", "simulator", False),
                                                  ("reinforce_pp", "bm25", True)])
def test_interrupted_run_resumes_to_the_same_metrics_and_weights(policy_dir, protocol_model, tokenizer, bm25,
                                                                   tmp_path, algorithm, engine, lora):
    model, rows = protocol_model
    profile = _profile(policy_dir, algorithm=algorithm, engine=engine, steps=4, questions_per_step=2,
                       group_size=3, mini_batch_size=4, checkpoint_every=2, curriculum="linear",
                       p_start=0.0, p_end=1.0, lr=1e-3, critic_lr=1e-3, lora=lora, lora_r=4, validate_every=2)
    # The protocol model stands in for the simulator: its documents are nonsense, the calls are real.
    simulator = (model, tokenizer) if engine == "simulator" else None
    whole = _run(profile, tmp_path / "whole", bm25, rows, simulator)
    whole_metrics = read_rows(whole.metrics_path)
    assert [m["step"] for m in whole_metrics] == [1, 2, 3, 4]

    _run(profile, tmp_path / "cut", bm25, rows, simulator, steps=3)      # "interrupted" after step 3
    (tmp_path / "cut" / "checkpoints" / "step-000003.tmp").mkdir()        # and mid-way through a save
    resumed = _run(profile, tmp_path / "cut", bm25, rows, simulator)     # restarts from step 2
    assert _deterministic(read_rows(resumed.metrics_path)) == _deterministic(whole_metrics)
    for a, b in zip(whole.policy.state_dict().values(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b)
    # Validation at steps 2 and 4; best/ holds the checkpointed weights of the best step (earliest on ties).
    validated = {m["step"]: m["val_em"] for m in whole_metrics if "val_em" in m}
    assert sorted(validated) == [2, 4]
    best_step = max(sorted(validated), key=validated.get)
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    best_file = resumed.best_dir / f"step-{best_step:06d}" / weights
    ckpt_file = resumed.ckpt_dir / f"step-{best_step:06d}" / "policy" / weights
    assert [p.name for p in resumed.best_dir.iterdir()] == [best_file.parent.name]
    assert best_file.read_bytes() == ckpt_file.read_bytes()
    assert resumed.use_best_policy() == {"step": best_step, "val_em": validated[best_step]}
    if engine == "simulator":
        assert all(m["noise_prob"] == pytest.approx(m["step"] / 4) for m in whole_metrics)
        assert whole_metrics[-1]["noisy_share"] == 1.0, "p = 1 at the last step: every call is noisy"
    if algorithm == "ppo":
        assert all("value_loss" in m for m in whole_metrics)
        for a, b in zip(whole.critic.state_dict().values(), resumed.critic.state_dict().values()):
            assert torch.equal(a, b)
    if lora:  # the adapter learned, and the reference (adapter disabled) is still the base
        assert whole_metrics[-1]["kl"] > 0
        saved = resumed.save_policy(tmp_path / "merged")
        merged = type(model).from_pretrained(str(saved))
        ids = torch.tensor([tokenizer("Question: who?")["input_ids"]])
        with torch.no_grad():  # the trainer's policy sits on the GPU when there is one
            trained = resumed.policy(input_ids=ids.to(resumed.policy.device)).logits.cpu()
            assert torch.allclose(merged(input_ids=ids).logits, trained, atol=1e-4)
            assert not torch.allclose(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)
    assert len(resumed.checkpoints()) == 2 and resumed.checkpoints()[-1].name == "step-000004"
    samples = read_rows(resumed.samples_path)
    assert sorted({s["step"] for s in samples}) == [1, 2, 3, 4]
    assert all(len(s["token_ids"]) == len(s["loss_mask"]) for s in samples)


def test_an_algorithm_is_its_registry_entry(policy_dir, bm25, protocol_model, monkeypatch, tmp_path):
    """A name the registry does not know fails when the profile loads; a new entry needs nothing else:
    the profile accepts it and the trainer builds a critic because the entry asks for one."""
    with pytest.raises(ConfigError, match="rl.algorithm must be one of grpo, .*ppo.*, not 'dpo'"):
        _profile(policy_dir, algorithm="dpo", engine="bm25")
    monkeypatch.setitem(algos.ALGORITHMS, "ppo_twin", algos.Algorithm(algos.ALGORITHMS["ppo"].advantages, True))
    for name, critic in (("ppo_twin", True), ("grpo", False)):
        t = trainer.RLTrainer(_profile(policy_dir, algorithm=name, engine="bm25", validate_every=0), tmp_path / name,
                              questions=protocol_model[1], real_engine=bm25)
        assert (t.critic is not None) is critic and hasattr(t, "critic_optimizer") is critic


def test_masked_html_greys_exactly_the_mask_0_tokens(tokenizer):
    import html
    import re

    from zslib.plots import masked_tokens_html

    parts = [("<|im_start|>user\nQ?<|im_end|>", 0), ("<search> Xo born </search>", 1),
             ("\n\n<information>Doc 1(Title: Xo) Xo & Yi.</information>\n\n", 0), ("<answer> Yi </answer>", 1)]
    ids, mask = [], []
    for text, m in parts:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids, mask = ids + piece, mask + [m] * len(piece)
    out = masked_tokens_html(tokenizer, ids, mask)
    grey = "".join(html.unescape(t) for t in re.findall(r'<span style="color:#aaa">(.*?)</span>', out, re.DOTALL))
    black = "".join(html.unescape(t) for t in re.findall(r'<span style="color:#000;[^"]*">(.*?)</span>', out, re.DOTALL))
    assert grey == parts[0][0] + parts[2][0]
    assert black == parts[1][0] + parts[3][0]


def test_resume_drops_lines_after_the_checkpoint_and_a_cut_off_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "rew')
    assert trainer._keep_until(path, 2) == [{"step": 1}, {"step": 2}]
    assert read_rows(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"ste\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        trainer._keep_until(path, 2)
    assert path.read_text() == '{"step": 1}\n{"ste\n{"step": 2}\n', "nothing is lost on error"


def test_a_run_folder_refuses_a_profile_edited_since_and_keeps_its_run(policy_dir, protocol_model, bm25, tmp_path):
    rows = protocol_model[1]
    settings = dict(engine="bm25", steps=2, lr=3.0e-4, questions_per_step=2, group_size=2, mini_batch_size=4,
                    validate_every=0, checkpoint_every=1)
    run = _run(_profile(policy_dir, **settings), tmp_path, bm25, rows, steps=1)
    stored = json.loads(run.recipe_path.read_text())
    assert stored["rl"]["lr"] == 3.0e-4 and stored["seed"] == 0 and "checkpoint_every" not in stored["rl"]
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    for edit in ({"lr": 6.0e-4}, {"steps": 3}):  # a changed lr; a longer run is another curriculum too
        with pytest.raises(ValueError, match=r"recipe\.json.*rl\.(lr: 0\.0003 -> 0\.0006|steps: 2 -> 3)"):
            _run(_profile(policy_dir, **{**settings, **edit}), tmp_path, bm25, rows)
    stops = _profile(policy_dir, **settings)  # a guard that stops (or rolls back) changes what the run does
    stops = dataclasses.replace(stops, guard=dataclasses.replace(stops.guard, action="stop"))
    with pytest.raises(ValueError, match=r"recipe\.json.*guard\.action: 'warn' -> 'stop'"):
        _run(stops, tmp_path, bm25, rows)
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before, "nothing touched"

    # Memory and bookkeeping settings may change between sessions: the run resumes and finishes.
    resumed = _run(_profile(policy_dir, **{**settings, "micro_batch_size": 2, "keep_checkpoints": 3}), tmp_path, bm25, rows)
    assert resumed.step_count == 2 and [m["step"] for m in read_rows(resumed.metrics_path)] == [1, 2]
    # Training afresh is the way to the edited recipe, which the folder then records.
    fresh = _run(_profile(policy_dir, **{**settings, "lr": 6.0e-4}), tmp_path, bm25, rows, steps=1, resume=False)
    assert json.loads(fresh.recipe_path.read_text())["rl"]["lr"] == 6.0e-4
    assert [m["step"] for m in read_rows(fresh.metrics_path)] == [1]


def test_recipe_changes_name_each_setting_that_differs():
    from zslib.files import recipe_changes
    a = {"seed": 0, "rl": {"lr": 2e-4, "steps": 30, "engine": "simulator"}}
    b = {"seed": 1, "rl": {"lr": 2e-4, "steps": 30, "engine": "bm25", "reward": "em"}}
    assert recipe_changes(a, b) == ["rl.engine: 'simulator' -> 'bm25'", "rl.reward: None -> 'em'", "seed: 0 -> 1"]
    assert recipe_changes(a, json.loads(json.dumps(a))) == []


def test_two_hop_validation_keeps_the_step_best_on_the_mean_of_both_kinds(policy_dir, protocol_model, bm25,
                                                                         monkeypatch, tmp_path):
    rows = protocol_model[1]
    two_hop = [{"question": "In which city did Xo study?", "golden_answers": ["Masa"], "id": "dev_2"}]
    t = trainer.RLTrainer(_profile(policy_dir, engine="bm25", validate_every=1), tmp_path / "run", questions=rows,
                          validation={"1hop": rows[:2], "2hop": two_hop}, real_engine=bm25)
    # Scripted scores per step: step 1 is better on 1-hop, step 2 on the mean of both kinds.
    script = {(1, 2): 0.8, (1, 1): 0.0, (2, 2): 0.6, (2, 1): 0.4}
    monkeypatch.setattr(trainer, "greedy_with_engine", lambda model, tok, qs, *a, **k: {
        "em": script[(t.step_count, len(qs))], "f1": 0.0, "searches_per_question": 1.5 if len(qs) == 2 else 2.0,
        "n": len(qs)})
    seen = []
    for step in (1, 2):
        t.step_count = step
        seen.append(t.validate())
    assert [v["val_em"] for v in seen] == [pytest.approx(0.4), pytest.approx(0.5)]
    assert [(v["val_em_1hop"], v["val_em_2hop"]) for v in seen] == [(0.8, 0.0), (0.6, 0.4)]
    assert seen[0]["val_search_calls"] == 3 + 2  # 1.5 searches x 2 one-hop questions, 2 x 1 two-hop one
    assert t.best_validation == (pytest.approx(0.5), 2)
    assert [p.name for p in t.best_dir.iterdir()] == ["step-000002"]


def test_run_figures_read_the_drop_on_1_hop_validation_and_report_2_hop_apart():
    plain = [{"step": 5, "val_em": 0.6}, {"step": 6}, {"step": 10, "val_em": 0.8}, {"step": 15, "val_em": 0.7}]
    assert trainer.run_figures(plain, 0.5, 0.75) == {"em_gain": 0.25, "val_em_drop": pytest.approx(0.1),
                                                     "val_em_2hop_drop": None}
    both = [{"step": 5, "val_em": 0.45, "val_em_1hop": 0.6, "val_em_2hop": 0.3},
            {"step": 10, "val_em": 0.7, "val_em_1hop": 0.9, "val_em_2hop": 0.5},
            {"step": 15, "val_em": 0.6, "val_em_1hop": 0.95, "val_em_2hop": 0.25}]
    figures = trainer.run_figures(both, 0.5, 0.9)
    assert figures["val_em_drop"] == 0.0 and figures["val_em_2hop_drop"] == pytest.approx(0.25)
    assert trainer.run_figures([], 0.5, 0.5)["val_em_drop"] is None


def _guarded(policy_dir, action, lr, rl=None, **guard):
    settings = dict(engine="bm25", steps=4, questions_per_step=2, group_size=3, mini_batch_size=6,
                    validate_every=1, checkpoint_every=1, lr=lr, warmup_steps=0)
    profile = _profile(policy_dir, **{**settings, **(rl or {})})
    return dataclasses.replace(profile, guard=dataclasses.replace(profile.guard, action=action, **guard))


def test_an_induced_collapse_is_caught_and_a_healthy_run_is_not_touched(policy_dir, protocol_model, bm25, tmp_path):
    rows = protocol_model[1]
    # a learning rate 100 times the one these tests train with: the first update wrecks the policy
    wrecked = _run(_guarded(policy_dir, "stop", 1e-1, window=1), tmp_path / "wrecked", bm25, rows)
    metrics = read_rows(wrecked.metrics_path)
    assert len(metrics) < 4 and metrics[-1]["guard_action"] == "stop", [m.get("guard_signs") for m in metrics]
    assert metrics[-1]["guard_signs"] and all("guard_action" not in m for m in metrics[:-1])
    assert wrecked.checkpoints()[-1].name == f"step-{metrics[-1]['step']:06d}"  # stopped with a checkpoint
    print("signs:", metrics[-1]["guard_signs"])
    # The healthy run is watched as the profile sets the guard (a window of 3 steps) over 12 trajectories a
    # step: with one step of 6, batch noise alone passes the entropy bar even at a learning rate of 1e-9.
    healthy = _run(_guarded(policy_dir, "stop", 1e-5, rl=dict(steps=6, questions_per_step=4, mini_batch_size=12)),
                   tmp_path / "healthy", bm25, rows)
    assert [m["step"] for m in read_rows(healthy.metrics_path)] == [1, 2, 3, 4, 5, 6]
    assert all("guard_action" not in m for m in read_rows(healthy.metrics_path))


def test_a_rollback_restores_the_best_weights_and_lowers_the_learning_rate(policy_dir, protocol_model, bm25, tmp_path):
    from transformers import AutoModelForCausalLM

    from zslib.files import complete_folders
    rows = protocol_model[1]
    only_validation = dict(entropy_rise=100.0, entropy_fall=1.0, length_rise=100.0, invalid_rise=1.0, invalid_max=1.0,
                           equal_groups_rise=1.0, kl_max=100.0)
    t = _run(_guarded(policy_dir, "rollback", 1e-5, window=1, val_drop=0.1, max_rollbacks=1, **only_validation),
             tmp_path / "run", bm25, rows, steps=2)
    assert t.rollbacks == 0 and len(t.watched) == 2
    best = complete_folders(t.best_dir)[-1]
    best_em = json.loads((best / "validation.json").read_text())["val_em"]
    with torch.no_grad():  # the weights move away from the best ones, as a collapse would take them
        for p in t.policy.parameters():
            p.add_(0.5)
    lr = t.optimizer.param_groups[0]["lr"]
    t.step_count = 3
    assert t.watch({"step": 3, "val_em": best_em - 0.2}) == "rollback"
    saved = AutoModelForCausalLM.from_pretrained(str(best), dtype=torch.float32).state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in t.policy.state_dict().items() if k in saved)
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(lr * 0.5) and not t.optimizer.state
    assert t.watched == [] and t.rollbacks == 1
    # the watch starts afresh: the same drop against a best it no longer sees is no sign; a second rollback
    # past max_rollbacks is a stop
    assert t.watch({"step": 4, "val_em": best_em - 0.2}) == "none"
    assert t.watch({"step": 5, "val_em": best_em + 0.3}) == "none"
    m = {"step": 6, "val_em": best_em}
    assert t.watch(m) == "stop" and t.stop_requested and m["guard_signs"][0].startswith("validation EM")
