"""Step 4 (docs/method.md §7-9): the RL loop, readable top to bottom.

One step of ``RLTrainer.step``:

1. sample ``questions_per_step`` training questions, each ``group_size`` times;
2. roll them out against the engine: the simulator with this step's noise probability (one
   independent draw per search call), or the real BM25 engine for comparison;
3. score each trajectory (F1, EM or the format reward);
4. old and reference log-probs (and the critic's values for PPO) under no gradient;
5. advantages (GRPO, REINFORCE++, REINFORCE++-baseline or GAE);
6. ``ppo_epochs`` passes of mini-batch updates with gradient clipping;
7. one JSON line of metrics, a few sampled trajectories, and every ``checkpoint_every`` steps an
   atomic checkpoint from which ``train(resume=True)`` continues bit for bit.

Token tensors are ``[batch, tokens - 1]``: position j holds the log-prob of token j + 1 given the
tokens up to j, and ``mask`` is the rollout's ``loss_mask`` shifted the same way (1 only on tokens
the policy generated), so prompt, ``<information>`` blocks and padding carry no gradient.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from . import algos
from .backends import backend_for
from .curriculum import noise_probability
from .data import sample_questions, write_text_atomic
from .evaluate import greedy_with_engine, two_hop_validation_questions, validation_questions
from .models import quiet_loading
from .reward import exact_match, extract_answer, f1_score, format_reward
from .progress import tqdm
from .rollout import engine_search_fn, rollout
from .search import make_engine
from .simulator import engine_for, simulator_search_fn

ALGORITHMS = ("grpo", "ppo", "reinforce_pp", "reinforce_pp_baseline")
REWARDS = ("f1", "em", "format")
ENGINES = ("simulator", "bm25")


# ---------------------------------------------------------------- scores and tensors

def trajectory_score(traj, reward: str, tokenizer) -> float:
    """The sequence reward. The answer is the last <answer> block the *policy* wrote: the
    invalid-action message (not the policy's) shows an example answer block that must not count."""
    answer = extract_answer("".join(traj.turns))
    if reward == "f1":
        return f1_score(answer, traj.golden_answers)
    if reward == "em":
        return exact_match(answer, traj.golden_answers)
    if reward == "format":
        return format_reward(tokenizer.decode(traj.response_ids, skip_special_tokens=True), traj.golden_answers,
                             answer=answer)
    raise ValueError(f"rl.reward must be one of {', '.join(REWARDS)}, got {reward!r}")


def batch_tensors(trajs, pad_id: int, loss_mask: bool = True, multiple: int = 64) -> dict:
    """Right-padded ``input_ids`` ``[B, T]`` and the shifted ``mask`` ``[B, T-1]``.

    Padding goes on the right, after every real token, so the causal mask alone keeps it out of
    every real token's attention: no attention mask is needed (with one, CPU attention takes a
    slower path). The width is rounded up to a ``multiple`` so kernels see few distinct shapes.
    With ``loss_mask=False`` (the ablation) every response token is trained, documents included;
    the prompt and padding never are.
    """
    width = -(-max(len(t.token_ids) for t in trajs) // multiple) * multiple
    ids = torch.full((len(trajs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, t in enumerate(trajs):
        n = len(t.token_ids)
        ids[r, :n] = torch.tensor(t.token_ids)
        mask[r, :n] = torch.tensor(t.loss_mask) if loss_mask else 1
        if not loss_mask:
            mask[r, :t.prompt_len] = 0
    return {"input_ids": ids, "mask": mask[:, 1:]}


def token_logprobs(model, input_ids, with_entropy: bool = False):
    """log pi(token j+1 | tokens <= j) for every position (right-padded rows), and optionally the
    entropy there."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    if not with_entropy:
        return torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1), None
    # One log-softmax serves both (cheaper than algos.entropy_from_logits, the same value).
    all_logp = torch.log_softmax(logits, -1)
    entropy = -(all_logp.exp() * all_logp).sum(-1)
    return all_logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1), entropy


class Critic(nn.Module):
    """PPO's token-level critic: a transformer backbone and a linear value head. ``values[:, j]``
    is the value of the state after token j, aligned with ``token_logprobs``."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids):
        hidden = self.backbone(input_ids=input_ids, use_cache=False).last_hidden_state
        return self.head(hidden[:, :-1]).squeeze(-1).float()


def advantages(cfg, scores, group_ids, mask, values=None):
    """(advantages, returns) for the configured algorithm; returns is None except for PPO."""
    if cfg.algorithm == "grpo":
        return algos.grpo_advantages(scores, group_ids, mask, norm_by_std=cfg.norm_by_std), None
    if cfg.algorithm == "reinforce_pp":
        return algos.reinforce_pp_advantages(algos.last_token_scores(scores, mask), mask, cfg.gamma), None
    if cfg.algorithm == "reinforce_pp_baseline":
        return algos.reinforce_pp_baseline_advantages(scores, group_ids, mask), None
    if cfg.algorithm == "ppo":
        return algos.gae_advantages(algos.last_token_scores(scores, mask), values, mask, cfg.gamma, cfg.lam)
    raise ValueError(f"rl.algorithm must be one of {', '.join(ALGORITHMS)}, got {cfg.algorithm!r}")


def rl_loss(cfg, logp, entropy, old_logp, ref_logp, adv, mask) -> tuple[torch.Tensor, dict]:
    """pg - c_H * H + beta * KL, each aggregated over mask-1 tokens only (KL with a plus sign,
    docs/method.md §9). Returns (loss, statistics)."""
    pg, stats = algos.policy_loss(logp, old_logp, adv, mask, cfg.clip_low, cfg.clip_high, cfg.clip_c, cfg.agg)
    ent = algos.agg_loss(entropy, mask, cfg.agg)
    kl = algos.agg_loss(algos.kl_penalty(logp, ref_logp, cfg.kl_kind), mask, cfg.agg)
    loss = pg - cfg.entropy_coef * ent + cfg.kl_coef * kl
    return loss, {"pg_loss": pg.item(), "entropy": ent.item(), "kl": kl.item(), **stats}


def _equal_groups(grouped: torch.Tensor) -> float:
    """Share of rows (groups) of ``[groups, group_size]`` scores that are all equal."""
    return (grouped.max(1).values == grouped.min(1).values).float().mean().item()


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def _write_folder(final: Path, write) -> Path:
    """``write(folder)`` into a temporary folder that is renamed to ``final`` when complete, so a
    crash never leaves a half-written one under the final name."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def _complete_folders(parent: Path) -> list[Path]:
    """``parent``'s complete ``step-N`` folders, oldest first (unfinished ones end in ``.tmp``)."""
    if not parent.exists():
        return []
    return sorted(p for p in parent.glob("step-*") if not p.name.endswith(".tmp"))


def _keep_until(path: Path, step: int) -> list[dict]:
    """Drop the lines a run wrote after its last checkpoint (it is resumed from there), and a last
    line cut off mid-write by the interruption; returns the rows kept."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise ValueError(f"{path}, line {n}: not valid JSON, and not the last line") from None
    kept = [r for r in rows if r["step"] <= step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def run_figures(metrics: list[dict], base_em: float, trained_em: float) -> dict:
    """Notebook 04's checked figures (``checks.rl``): the held-out EM gain over the base, and how much
    validation EM the run lost after its best step (None without validation). The drop is read on the
    1-hop validation questions, the 200 its bar was set on; with 2-hop validation, their own drop is
    ``val_em_2hop_drop`` (34 questions on the tiny world: one standard error of a drop is about 0.12)."""
    def drop(key):
        values = [m[key] for m in metrics if key in m]
        return max(values) - values[-1] if values else None

    two_hop = any("val_em_2hop" in m for m in metrics)
    return {"em_gain": trained_em - base_em, "val_em_drop": drop("val_em_1hop" if two_hop else "val_em"),
            "val_em_2hop_drop": drop("val_em_2hop")}


# ---------------------------------------------------------------- the trainer

class RLTrainer:
    """Policy, reference, optional critic, engine and optimizers for one run under ``run_dir``
    (default ``outputs/<profile>/rl/``): ``metrics.jsonl``, ``samples.jsonl``, ``checkpoints/``,
    with validation the best-validated weights in ``best/``, and at the end the trained ``policy/``."""

    def __init__(self, profile, run_dir: str | Path | None = None, questions: list[dict] | None = None,
                 simulator=None, bm25=None, validation: list[dict] | None = None, engine=None, backend=None,
                 validation_two_hop: list[dict] | None = None):
        """``engine``: the search engine RL trains against (default: the profile's, ``rl.engine``:
        ``simulator.engine_for`` or BM25); ``backend``: a callable ``(policy, tokenizer) ->
        GenerationBackend`` (default: ``backends.backend_for`` with the profile); so a new engine,
        transport or inference engine needs no change here. ``simulator``: an already loaded
        ``(model, tokenizer)`` to share between runs; ``bm25``: an engine to reuse; ``questions``:
        the training questions (default: the profile's train sets, at most ``max_hops`` hops);
        ``validation``: the validation questions (default: ``evaluate.validation_questions``, and with
        ``rl.validation_two_hop`` the dev split's 2-hop ones), used when ``rl.validate_every > 0``;
        ``validation_two_hop``: with ``validation``, the 2-hop ones to ask too (default none)."""
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        self.profile, self.cfg = profile, profile.rl
        cfg = self.cfg
        torch.manual_seed(profile.seed)  # first: model and adapter initialisation draw from it
        for name, value, allowed in (("algorithm", cfg.algorithm, ALGORITHMS), ("reward", cfg.reward, REWARDS),
                                     ("engine", cfg.engine, ENGINES)):
            if value not in allowed:
                raise ValueError(f"rl.{name} must be one of {', '.join(allowed)}, got {value!r}")
        self.run_dir = Path(run_dir or profile.rl_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path, self.samples_path = self.run_dir / "metrics.jsonl", self.run_dir / "samples.jsonl"
        self.ckpt_dir, self.best_dir = self.run_dir / "checkpoints", self.run_dir / "best"
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = getattr(torch, profile.models.dtype) if self.device == "cuda" else torch.float32

        quiet_loading()
        self.tokenizer = AutoTokenizer.from_pretrained(profile.policy_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # fp32 master weights (bf16 comes from autocast): a 1e-6 step vanishes in bf16 weights.
        self.policy = AutoModelForCausalLM.from_pretrained(profile.policy_path, dtype=torch.float32).to(self.device)
        if cfg.lora:
            from peft import LoraConfig, get_peft_model
            self.policy = get_peft_model(self.policy, LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM"))
            self.reference = None  # the base with the adapter disabled
        else:
            self.reference = AutoModelForCausalLM.from_pretrained(profile.policy_path, dtype=self.dtype)
            self.reference = self.reference.to(self.device).eval().requires_grad_(False)
        self.critic = None
        if cfg.algorithm == "ppo":
            backbone = AutoModel.from_pretrained(cfg.critic_model or profile.policy_path, dtype=torch.float32)
            self.critic = Critic(backbone).to(self.device)

        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._warmup)
        if self.critic is not None:
            self.critic_optimizer = torch.optim.AdamW(self.critic.parameters(), lr=cfg.critic_lr, weight_decay=0.0)
            self.critic_scheduler = torch.optim.lr_scheduler.LambdaLR(self.critic_optimizer, self._warmup)

        self.backend = (backend or (lambda model, tok: backend_for(profile, model, tok)))(self.policy, self.tokenizer)
        if cfg.engine == "simulator":
            self.engine = engine or engine_for(profile, loaded=simulator, device=self.device)
            self.topk = profile.simulator.topk
        else:
            self.engine = engine or bm25 or make_engine(profile.search, profile.corpus_path, profile.out / "bm25")
            self.topk = profile.search.topk
        if questions is None:
            questions = sample_questions(profile, profile.data.train_sets, "train", 10 ** 9, seed=profile.seed)
            questions = [q for q in questions if not cfg.max_hops or q.get("hops", 1) <= cfg.max_hops]
        self.questions = questions
        if cfg.validate_every > 0:  # validation always uses the real engine (docs/method.md §7)
            if validation is not None:  # the caller's questions, both kinds
                self.validation, self.validation_two_hop = validation, list(validation_two_hop or [])
            else:
                self.validation = validation_questions(profile, cfg.validation_size, cfg.eval_size)
                self.validation_two_hop = two_hop_validation_questions(profile) if cfg.validation_two_hop else []
            self.real_engine = self.engine if cfg.engine != "simulator" else (
                bm25 or make_engine(profile.search, profile.corpus_path, profile.out / "bm25"))
        self.best_validation = None  # (val_em, step) of the weights in best/

        # Every source of randomness is seeded and saved in checkpoints.
        self.question_rng = random.Random(profile.seed)
        self.noise_rng = torch.Generator().manual_seed(profile.seed + 1)
        self.shuffle_rng = torch.Generator().manual_seed(profile.seed + 2)
        self.step_count = 0

    def _warmup(self, step: int) -> float:
        return min(1.0, (step + 1) / max(1, self.cfg.warmup_steps))

    def _autocast(self):
        if self.cfg.bf16_autocast:
            return torch.autocast(self.device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _reference_logprobs(self, ids):
        if self.reference is not None:
            return token_logprobs(self.reference, ids)[0]
        with self.policy.disable_adapter():
            return token_logprobs(self.policy, ids)[0]

    # ------------------------------------------------------------ one step

    def noise_probability(self, step: int) -> float:
        c = self.cfg
        return noise_probability(step, c.steps, c.p_start, c.p_end, c.base, c.curriculum)

    def step(self) -> dict:
        cfg, tok = self.cfg, self.tokenizer
        step = self.step_count + 1
        start = time.time()
        timing = {"simulator": 0.0}

        # 1-2. a batch of questions, group_size rollouts each, against the engine
        picked = self.question_rng.sample(self.questions, min(cfg.questions_per_step, len(self.questions)))
        rows = [q for q in picked for _ in range(cfg.group_size)]
        group_ids = torch.arange(len(picked)).repeat_interleave(cfg.group_size)
        p_noise = self.noise_probability(step) if cfg.engine == "simulator" else 0.0
        if cfg.engine == "simulator":
            inner = simulator_search_fn(self.engine, self.topk, p_noise, self.noise_rng,
                                        self.profile.simulator.hop_hints)
        else:
            inner = engine_search_fn(self.engine, self.topk)

        tokens_before = getattr(self.engine, "generated_tokens", 0)

        def search_fn(queries, trajs):
            t0 = time.time()
            out = inner(queries, trajs)
            timing["simulator"] += time.time() - t0
            return out

        self.policy.eval()
        t0 = time.time()
        trajs = rollout(self.backend, tok, rows, search_fn, self.profile.rollout)  # rollout.temperature
        timing["rollout"] = time.time() - t0 - timing["simulator"]

        # 3. rewards
        scores = torch.tensor([trajectory_score(t, cfg.reward, tok) for t in trajs])
        batch = {k: v.to(self.device) for k, v in batch_tensors(trajs, tok.pad_token_id, cfg.loss_mask).items()}
        ids, mask = batch["input_ids"], batch["mask"]
        scores = scores.to(self.device)

        # 4. old and reference log-probs, values
        t0 = time.time()
        chunks = torch.arange(len(trajs)).split(cfg.mini_batch_size)
        # One epoch over one mini-batch is exactly on-policy: the update's own forward pass gives the
        # old log-probs (detached), so a separate pass would compute the same numbers again.
        on_policy = cfg.ppo_epochs == 1 and len(chunks) == 1
        with torch.no_grad(), self._autocast():
            old_logp = None if on_policy else torch.cat([token_logprobs(self.policy, ids[i])[0] for i in chunks])
            ref_logp = torch.cat([self._reference_logprobs(ids[i]) for i in chunks])
            values = torch.cat([self.critic(ids[i]) for i in chunks]) if self.critic is not None else None
        timing["logprobs"] = time.time() - t0

        # 5. advantages
        adv, returns = advantages(cfg, scores, group_ids.to(self.device), mask, values)

        # 6. updates
        t0 = time.time()
        self.policy.train()
        sums: dict[str, list[float]] = {}
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(trajs), generator=self.shuffle_rng)
            for i in order.split(cfg.mini_batch_size):
                optional = [None if x is None else x[i] for x in (old_logp, values, returns)]
                for key, value in self._update(ids[i], mask[i], ref_logp[i], adv[i], *optional).items():
                    sums.setdefault(key, []).append(value)
        self.scheduler.step()
        if self.critic is not None:
            self.critic_scheduler.step()
        timing["update"] = time.time() - t0
        t0 = time.time()
        self.backend.load_weights()  # the next rollouts (and validation) sample the updated policy
        timing["weight_sync"] = time.time() - t0
        self.step_count = step

        # 7. validate: greedy, real engine; the best weights so far are kept in best/
        validation = {}
        if cfg.validate_every > 0 and (step % cfg.validate_every == 0 or step == cfg.steps):
            t0 = time.time()
            validation = self.validate()
            timing["validation"] = time.time() - t0

        # 8. log
        seconds = time.time() - start
        calls = [c for t in trajs for c in t.calls]
        response_tokens = sum(len(t.response_ids) for t in trajs)
        metrics = {
            "step": step, "noise_prob": p_noise,
            "noisy_share": sum(bool(c["noisy"]) for c in calls) / len(calls) if calls else 0.0,
            "reward_mean": scores.mean().item(),
            # Groups whose rollouts all scored the same give GRPO no signal (a collapse sign when it grows)
            "equal_reward_groups": _equal_groups(scores.view(-1, cfg.group_size)),
            "em": sum(exact_match(t.answer, t.golden_answers) for t in trajs) / len(trajs),
            "f1": sum(f1_score(t.answer, t.golden_answers) for t in trajs) / len(trajs),
            "searches_per_answer": len(calls) / len(trajs),
            "search_calls": len(calls),  # served by the simulator, or by the real engine with rl.engine bm25
            "simulator_tokens": getattr(self.engine, "generated_tokens", 0) - tokens_before,
            # Does the policy search again when its first results were noisy? (None: no such rollout)
            "searched_again_after_noisy": _share([len(t.calls) > 1 for t in trajs if t.calls and t.calls[0]["noisy"]]),
            "invalid_action_rate": sum(t.invalid_actions for t in trajs) / max(1, sum(len(t.turns) for t in trajs)),
            "response_tokens": response_tokens / len(trajs),
            **{k: sum(v) / len(v) for k, v in sums.items()},
            "lr": self.scheduler.get_last_lr()[0],
            **validation,
            "seconds": seconds, "tokens_per_s": response_tokens / seconds,
            **{f"{k}_seconds": v for k, v in timing.items()},
        }
        samples = [{"step": step, "text": tok.decode(t.token_ids), "token_ids": t.token_ids,
                    "loss_mask": t.loss_mask, "prompt_len": t.prompt_len, "reward": s.item(),
                    "golden_answers": t.golden_answers, "calls": t.calls}
                   for t, s in zip(trajs[:cfg.samples_per_step * cfg.group_size:cfg.group_size],
                                   scores[:cfg.samples_per_step * cfg.group_size:cfg.group_size])]
        _append_jsonl(self.metrics_path, [metrics])
        _append_jsonl(self.samples_path, samples)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            self.save_checkpoint()
        return metrics

    def validate(self) -> dict:
        """Greedy scores on the validation questions with the real engine; with 2-hop validation
        questions, ``val_em`` is the mean of the 1-hop and 2-hop EMs, so a step that trades one kind
        for the other is not kept. A new best ``val_em`` (ties go to the earlier step) saves the policy
        (or adapter) to ``best/step-N/``; the previous best is removed only once the new one is complete."""
        scores = greedy_with_engine(self.policy, self.tokenizer, self.validation, self.real_engine,
                                    self.profile, desc="validation", backend=self.backend)
        out = {"val_em": scores["em"], "val_f1": scores["f1"],
               "val_searches_per_question": scores["searches_per_question"],
               "val_search_calls": round(scores["searches_per_question"] * scores["n"])}
        if self.validation_two_hop:
            two = greedy_with_engine(self.policy, self.tokenizer, self.validation_two_hop, self.real_engine,
                                     self.profile, desc="validation, 2-hop", backend=self.backend)
            out.update({"val_em_1hop": scores["em"], "val_em_2hop": two["em"], "val_em": (scores["em"] + two["em"]) / 2,
                        "val_searches_per_question_2hop": two["searches_per_question"],
                        "val_search_calls": out["val_search_calls"] + round(two["searches_per_question"] * two["n"])})
        if self.best_validation is None or out["val_em"] > self.best_validation[0]:
            self.best_validation = (out["val_em"], self.step_count)

            def write(folder: Path) -> None:
                self.policy.save_pretrained(str(folder))
                (folder / "validation.json").write_text(json.dumps({"step": self.step_count, "val_em": out["val_em"]}))

            _write_folder(self.best_dir / f"step-{self.step_count:06d}", write)
            for old in _complete_folders(self.best_dir)[:-1]:
                shutil.rmtree(old)
        return out

    def use_best_policy(self) -> dict | None:
        """With ``keep_best`` and validation: load the best-validated weights into the policy and
        return their ``{"step", "val_em"}``; otherwise leave the last weights and return None."""
        found = _complete_folders(self.best_dir)
        if not (self.cfg.keep_best and self.cfg.validate_every > 0 and found):
            return None
        self._load_policy_weights(found[-1])
        return json.loads((found[-1] / "validation.json").read_text())

    def _update(self, ids, mask, ref_logp, adv, old_logp, old_values, returns) -> dict:
        """One optimizer step on a mini-batch; every term sees only mask-1 tokens. ``old_logp`` None:
        on-policy, the old log-probs are this forward pass's own."""
        cfg = self.cfg
        with self._autocast():
            logp, entropy = token_logprobs(self.policy, ids, with_entropy=True)
        old_logp = logp.detach() if old_logp is None else old_logp
        loss, out = rl_loss(cfg, logp, entropy, old_logp, ref_logp, adv, mask)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        out["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip).item()
        self.optimizer.step()
        if self.critic is not None:
            with self._autocast():
                values = self.critic(ids)
            vloss = algos.value_loss(values, old_values, returns, mask, cfg.value_clip, cfg.agg)
            self.critic_optimizer.zero_grad(set_to_none=True)
            vloss.backward()
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.grad_clip)
            self.critic_optimizer.step()
            out["value_loss"] = vloss.item()
        return out

    # ------------------------------------------------------------ the run

    def train(self, steps: int | None = None, resume: bool = True) -> list[dict]:
        """Run up to ``steps`` (default ``rl.steps``). With ``resume`` the run continues from its
        last checkpoint; lines logged after that checkpoint are dropped and redone. Without it,
        earlier products of this run directory are removed first."""
        if resume:
            self.load_checkpoint()
        else:
            for path in (self.metrics_path, self.samples_path):
                path.unlink(missing_ok=True)
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            shutil.rmtree(self.best_dir, ignore_errors=True)
        kept = _keep_until(self.metrics_path, self.step_count)
        _keep_until(self.samples_path, self.step_count)
        # The best validation so far, from the steps kept; a best saved after the checkpoint is
        # dropped with them (the redone steps save it again).
        for folder in _complete_folders(self.best_dir):
            if int(folder.name.split("-")[1]) > self.step_count:
                shutil.rmtree(folder)
        validated = [(m["val_em"], m["step"]) for m in kept if "val_em" in m]
        self.best_validation = max(validated, key=lambda v: (v[0], -v[1])) if validated else None
        last = min(steps or self.cfg.steps, self.cfg.steps)
        out = []
        bar = tqdm(range(self.step_count, last), desc=f"RL ({self.cfg.algorithm}, {self.cfg.engine})",
                   initial=self.step_count, total=last)
        for _ in bar:
            m = self.step()
            out.append(m)
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}", p=f"{m['noise_prob']:.2f}")
        return out

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (an unfinished one keeps its ``.tmp`` name)."""
        return _complete_folders(self.ckpt_dir)

    def save_checkpoint(self) -> Path:
        """Policy (or adapter), critic, optimizers, schedulers, RNG states and step, written to a
        temporary folder that is renamed when complete: a crash never leaves a half checkpoint."""
        final = _write_folder(self.ckpt_dir / f"step-{self.step_count:06d}", self._write_checkpoint)
        for old in self.checkpoints()[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old)
        return final

    def _write_checkpoint(self, tmp: Path) -> None:
        self.policy.save_pretrained(str(tmp / "policy"))
        state = {"step": self.step_count, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                 "question_rng": self.question_rng.getstate(), "noise_rng": self.noise_rng.get_state(),
                 "shuffle_rng": self.shuffle_rng.get_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if self.critic is not None:
            state.update(critic=self.critic.state_dict(), critic_optimizer=self.critic_optimizer.state_dict(),
                         critic_scheduler=self.critic_scheduler.state_dict())
        torch.save(state, tmp / "trainer_state.pt")

    def load_checkpoint(self) -> bool:
        """Restore the last complete checkpoint, if any."""
        found = self.checkpoints()
        if not found:
            return False
        path = found[-1]
        self._load_policy_weights(path / "policy")
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.question_rng.setstate(state["question_rng"])
        self.noise_rng.set_state(state["noise_rng"])
        self.shuffle_rng.set_state(state["shuffle_rng"])
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
            self.critic_scheduler.load_state_dict(state["critic_scheduler"])
        self.step_count = state["step"]
        return True

    def _load_policy_weights(self, folder: Path) -> None:
        """Copy saved weights into the live policy, so the optimizer keeps its parameters."""
        if self.cfg.lora:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file
            set_peft_model_state_dict(self.policy, load_file(str(folder / "adapter_model.safetensors")))
        else:
            from transformers import AutoModelForCausalLM
            saved = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
            self.policy.load_state_dict(saved.state_dict())
        self.backend.load_weights()  # a vLLM engine still holds the weights it started with

    def save_policy(self, folder: str | Path | None = None) -> Path:
        """The trained policy (adapter merged) and tokenizer, loadable with ``from_pretrained``."""
        folder = Path(folder or self.run_dir / "policy")
        model = copy.deepcopy(self.policy).merge_and_unload() if self.cfg.lora else self.policy
        model.save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))
        return folder
