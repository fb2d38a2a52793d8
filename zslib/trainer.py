"""Step 4 (docs/method.md §7-9): the RL loop, as phases a reader (and notebook 04) can call one at a time.

    T = RLTrainer(profile)
    group = T.rollout_group()   # 1-2. questions x group_size rollouts against the engine, noise p(step)
    batch = T.score(group)      # 3.   rewards, and the rollouts as token tensors (rl_models.batch_tensors)
    T.logprobs(batch)           # 4.   old and reference log-probs, the critic's values (PPO)
    T.advantages(batch)         # 5.   the algorithm's advantages (algos.ALGORITHMS)
    stats = T.update(batch)     # 6.   ppo_epochs passes of mini-batch updates (T.loss on each)
    T.sync_weights()            #      the rollout backend generates with the new weights
    step_metrics(...)           # 7.   one JSON line of metrics (a pure function)

``T.step()`` runs these in order, validates every ``rl.validate_every`` steps with the real engine,
logs and checkpoints; ``T.train()`` is the loop of steps, and resumes bit for bit from the last
checkpoint. Models are built apart from the loop (``rl_models.load_models``), and so are engines
(``make_engines``): a caller may pass its own.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import algos, distributed, guard
from .curriculum import noise_probability
from .data import sample_questions
from .evaluate import greedy_with_engine, two_hop_validation_questions, validation_questions
from .files import (RECIPE, append_jsonl, as_recipe, check_recipe, complete_folders, read_jsonl, write_folder_atomic,
                    write_jsonl, write_recipe)
from .generation.backends import backend_for
from .progress import tqdm
from .reward import REWARDS, exact_match, f1_score
from .rl_models import PolicyModels, batch_tensors, load_models, padded_width, token_logprobs
from .rollout import Trajectory, engine_search_fn, hit_limit_rate, rollout
from .search import profile_engine
from .simulator import engine_for, simulator_search_fn


# ---------------------------------------------------------------- what the phases pass on

@dataclass
class Rollouts:
    """Phase 1-2: one step's trajectories, ``group_size`` per question, rows of a group adjacent."""
    step: int
    questions: list[dict]
    trajs: list[Trajectory]
    group_ids: torch.Tensor      # [B]: which question each rollout answers
    noise_prob: float            # the curriculum's p(step) (0 against a real engine)
    simulator_tokens: int        # tokens the simulator generated for these rollouts
    seconds: dict = field(default_factory=dict)  # rollout, simulator (its share of the rollout's time)


@dataclass
class Batch:
    """Phases 3-5: the rollouts as tensors ``[B, T-1]`` (``rl_models``), filled in phase by phase."""
    input_ids: torch.Tensor          # [B, T]
    mask: torch.Tensor               # [B, T-1], 1 on the policy's own tokens
    scores: torch.Tensor             # [B] sequence rewards
    group_ids: torch.Tensor          # [B]
    old_logp: torch.Tensor | None = None   # None: on-policy, the update's own forward pass gives them
    ref_logp: torch.Tensor | None = None
    values: torch.Tensor | None = None     # the critic's (PPO)
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None    # the critic's targets (PPO)
    lengths: torch.Tensor | None = None    # [B] real tokens per row (the rest is right padding)
    rollout_logp: torch.Tensor | None = None  # the inference engine's log-probs of the sampled tokens (vLLM), NaN elsewhere

    def rows(self, index) -> "Batch":
        """The batch restricted to ``index`` (a mini-batch)."""
        return Batch(**{k: None if v is None else v[index] for k, v in vars(self).items()})

    def trimmed(self, multiple: int = 64) -> "Batch":
        """The same rows, padded only to their own longest (rounded up to ``multiple``, as
        ``batch_tensors``): a micro-batch of short rows does not pay for the batch's longest."""
        if self.lengths is None:
            return self
        width = min(padded_width(int(self.lengths.max()), multiple), self.input_ids.shape[1])
        return Batch(**{k: v if v is None or v.dim() == 1 else v[:, :width - (k != "input_ids")]
                        for k, v in vars(self).items()})


# ---------------------------------------------------------------- pure functions

def trajectory_score(traj: Trajectory, reward: str, tokenizer) -> float:
    """The sequence reward (``reward.REWARDS``) of the answer the rollout parsed (``traj.answer``): the
    one action that ended the trajectory, so reward, answer and kept tokens agree. Text the policy did
    not write (the invalid-action message shows an example answer block) never counts."""
    response = tokenizer.decode(traj.response_ids, skip_special_tokens=True)
    return REWARDS[reward](traj.answer, traj.golden_answers, response)


def rl_loss(cfg, logp, entropy, old_logp, ref_logp, adv, mask,
            counts: algos.Counts | None = None, rollout_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """pg - c_H * H + beta * KL, each aggregated over mask-1 tokens only (KL with a plus sign,
    docs/method.md §9). Returns (loss, statistics). ``counts``: the mini-batch's denominators when
    these rows are one micro-batch of it (then losses and statistics add up over micro-batches).
    ``rollout_logp``: the inference engine's log-probs of the sampled tokens; with ``rl.tis_cap`` the
    policy-gradient term is weighted by truncated importance sampling (``algos.truncated_is_weights``)."""
    counts = counts or algos.Counts.of(mask, cfg.agg)
    weights, extra = None, {}
    if rollout_logp is not None:
        sampled = mask * ~torch.isnan(rollout_logp)
        # E over the engine's samples of log pi_rollout - log pi_old: how far the two have drifted apart
        extra["rollout_mismatch_kl"] = algos.agg_loss(torch.nan_to_num(rollout_logp - old_logp), sampled,
                                                      count=counts.tokens).item()
        if cfg.tis_cap:
            weights = algos.truncated_is_weights(old_logp, rollout_logp, cfg.tis_cap)
            extra["tis_weight"] = algos.agg_loss(weights, mask, count=counts.tokens).item()
    pg, stats = algos.policy_loss(logp, old_logp, adv, mask, cfg.clip_low, cfg.clip_high, cfg.clip_c, cfg.agg,
                                  counts, weights)
    ent = algos.agg_loss(entropy, mask, cfg.agg, counts.loss)
    kl = algos.agg_loss(algos.kl_penalty(logp, ref_logp, cfg.kl_kind), mask, cfg.agg, counts.loss)
    loss = pg - cfg.entropy_coef * ent + cfg.kl_coef * kl
    return loss, {"pg_loss": pg.item(), "entropy": ent.item(), "kl": kl.item(), **stats, **extra}


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def step_metrics(group: Rollouts, scores: torch.Tensor, group_size: int, update: dict, lr: float,
                 validation: dict, seconds: float, timing: dict) -> dict:
    """The JSON line a step logs: what the rollouts did, the update's mean statistics (``update``),
    the learning rate, the validation scores if any, and where the time went."""
    trajs = group.trajs
    calls = [c for t in trajs for c in t.calls]
    response_tokens = sum(len(t.response_ids) for t in trajs)
    grouped = scores.view(-1, group_size)
    return {
        "step": group.step, "noise_prob": group.noise_prob,
        "noisy_share": sum(bool(c["noisy"]) for c in calls) / len(calls) if calls else 0.0,
        "reward_mean": scores.mean().item(),
        # Groups whose rollouts all scored the same give GRPO no signal (a collapse sign when it grows)
        "equal_reward_groups": (grouped.max(1).values == grouped.min(1).values).float().mean().item(),
        "em": sum(exact_match(t.answer, t.golden_answers) for t in trajs) / len(trajs),
        "f1": sum(f1_score(t.answer, t.golden_answers) for t in trajs) / len(trajs),
        "searches_per_answer": len(calls) / len(trajs),
        "search_calls": len(calls),  # served by the simulator, or by the real engine with rl.engine bm25
        "simulator_tokens": group.simulator_tokens,
        # Does the policy search again when its first results were noisy? (None: no such rollout)
        "searched_again_after_noisy": _share([len(t.calls) > 1 for t in trajs if t.calls and t.calls[0]["noisy"]]),
        "invalid_action_rate": sum(t.invalid_actions for t in trajs) / max(1, sum(len(t.turns) for t in trajs)),
        "hit_limit_rate": hit_limit_rate(trajs),
        "response_tokens": response_tokens / len(trajs),
        **update,
        "lr": lr,
        **validation,
        "seconds": seconds, "tokens_per_s": response_tokens / seconds,
        **{f"{k}_seconds": v for k, v in timing.items()},
    }


def run_figures(metrics: list[dict], base_em: float, trained_em: float) -> dict:
    """Notebook 04's checked figures (``checks.rl``): the held-out EM gain over the base, and how much
    validation EM the run lost after its best step (None without validation). The drop is read on the
    1-hop validation questions, the ones its bar was set on; with 2-hop validation, their own drop is
    ``val_em_2hop_drop`` (too few questions for a bar of its own: docs/results.md)."""
    def drop(key):
        values = [m[key] for m in metrics if key in m]
        return max(values) - values[-1] if values else None

    two_hop = any("val_em_2hop" in m for m in metrics)
    return {"em_gain": trained_em - base_em, "val_em_drop": drop("val_em_1hop" if two_hop else "val_em"),
            "val_em_2hop_drop": drop("val_em_2hop")}


# ``rl`` settings that size memory, processes or bookkeeping only: a run resumed with other values of them takes
# the same steps (up to float rounding), so they may change between sessions and machines.
RESUMABLE_CHANGES = ("micro_batch_size", "micro_batch_tokens", "logprob_chunk", "gradient_checkpointing", "fsdp",
                     "checkpoint_every", "keep_checkpoints", "samples_per_step")


def run_recipe(profile) -> dict:
    """What an RL run trains with: the seed, the ``rl`` section but ``RESUMABLE_CHANGES``, and the collapse
    guard (a stop or a rollback changes the run). A run folder keeps the recipe it started with
    (``recipe.json``), so that a profile edited since (``rl.lr``, say) is never resumed, or read back, as the
    run it holds."""
    rl = {k: v for k, v in dataclasses.asdict(profile.rl).items() if k not in RESUMABLE_CHANGES}
    return as_recipe({"seed": profile.seed, "rl": rl, "guard": dataclasses.asdict(profile.guard)})


def make_engines(profile, engine=None, real=None, device: str | None = None) -> tuple[object, object | None]:
    """(the engine RL searches, the real engine validation asks or None), building those not given:
    ``rl.engine``'s simulator (``simulator.engine_for``) or the profile's real engine, and the real
    engine whenever validation needs one (it never uses the simulator, docs/method.md §7)."""
    simulated = profile.rl.simulated
    if not simulated:
        engine = engine or real
    # validation runs on the main process only; RL against the real engine needs it on every one
    if real is None and (not simulated or (profile.rl.validate_every > 0 and distributed.is_main())):
        real = engine if not simulated and engine is not None else _real_engine(profile, everywhere=not simulated)
    if engine is None:
        engine = rl_simulator(profile, device) if simulated else real
    return engine, real


def rl_simulator(profile, device: str | None = None):
    """The simulator ``rl.engine`` names: the fine-tuned one, or (``prompt_only``) the simulator base with the
    prompt-only prompt, the paper's prompt-based baseline."""
    finetuned = profile.rl.engine == "simulator"
    return engine_for(profile, finetuned=finetuned, variant=None if finetuned else "prompt_only", device=device)


def _real_engine(profile, everywhere: bool):
    """The profile's real engine; when every process needs it, the main process builds (or opens) it first
    and the others open what it cached, rather than each building the same index at once."""
    if not everywhere or distributed.world_size() == 1:
        return profile_engine(profile)
    if distributed.is_main():
        profile_engine(profile)
    distributed.barrier()
    return profile_engine(profile)  # the main process's own, shared; the others open the cached index


def _gathered(group: Rollouts, scores: torch.Tensor) -> tuple[Rollouts, torch.Tensor]:
    """Every process's rollouts and rewards as one step's (itself alone with one process)."""
    if distributed.world_size() == 1:
        return group, scores
    parts = distributed.gather((group.questions, group.trajs, scores.tolist(), group.simulator_tokens))
    merged = Rollouts(group.step, [q for p in parts for q in p[0]], [t for p in parts for t in p[1]],
                      torch.cat([torch.full((len(p[1]),), i) for i, p in enumerate(parts)]), group.noise_prob,
                      sum(p[3] for p in parts), group.seconds)
    return merged, torch.tensor([x for p in parts for x in p[2]])


def _by_name(model, state: dict) -> dict:
    """An optimizer state saved by position (``optimizer.state_dict()`` of an unsharded run) keyed by
    parameter names instead, as a sharded run loads it."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def _keep_until(path: Path, step: int) -> list[dict]:
    """Drop the lines a run wrote after its last checkpoint (it is resumed from there), and a last
    line cut off mid-write by the interruption; returns the rows kept."""
    if not path.exists():
        return []
    kept = [r for r in read_jsonl(path, torn_tail="ignore") if r["step"] <= step]
    write_jsonl(path, kept, sort_keys=False)
    return kept


# ---------------------------------------------------------------- the trainer

class RLTrainer:
    """One RL run under ``run_dir`` (default ``outputs/<profile>/rl/``): ``metrics.jsonl``,
    ``samples.jsonl``, ``checkpoints/``, with validation the best-validated weights in ``best/``, and
    at the end the trained ``policy/``."""

    def __init__(self, profile, run_dir: str | Path | None = None, *, models: PolicyModels | None = None,
                 engine=None, real_engine=None, backend=None, questions: list[dict] | None = None,
                 validation: dict[str, list[dict]] | None = None):
        """Everything defaults to the profile's; pass a part to share it between runs or to replace it:

        - ``models``: ``rl_models.load_models(profile, …)``'s policy, reference and critic;
        - ``engine``: what RL searches (``rl.engine``: the simulator, or the real engine);
          ``real_engine``: the real engine validation uses (``make_engines`` builds both);
        - ``backend``: ``(policy, tokenizer) -> GenerationBackend`` (default ``backends.backend_for``);
        - ``questions``: the training questions (default: the profile's train sets, at most
          ``rl.max_hops`` hops);
        - ``validation``: ``{"1hop": rows, "2hop": rows}`` (default: ``evaluate.validation_questions``
          and, with ``rl.validation_two_hop``, the dev split's 2-hop ones), asked when
          ``rl.validate_every > 0``.
        """
        self.profile, self.cfg = profile, profile.rl
        cfg = self.cfg
        torch.manual_seed(profile.seed)  # first: model and adapter initialisation draw from it
        self.algorithm = algos.ALGORITHMS[cfg.algorithm]
        self.run_dir = Path(run_dir or profile.rl_dir)
        self.metrics_path, self.samples_path = self.run_dir / "metrics.jsonl", self.run_dir / "samples.jsonl"
        self.ckpt_dir, self.best_dir = self.run_dir / "checkpoints", self.run_dir / "best"
        self.recipe_path = self.run_dir / RECIPE  # run_recipe as the run started
        self.run_dir.mkdir(parents=True, exist_ok=True)

        self.models = models or load_models(profile, self.algorithm.needs_critic)
        self.tokenizer, self.policy = self.models.tokenizer, self.models.policy
        self.reference, self.critic, self.device = self.models.reference, self.models.critic, self.models.device
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._warmup)
        if self.critic is not None:
            self.critic_optimizer = torch.optim.AdamW(self.critic.parameters(), lr=cfg.critic_lr, weight_decay=0.0)
            self.critic_scheduler = torch.optim.lr_scheduler.LambdaLR(self.critic_optimizer, self._warmup)
        self.backend = (backend or (lambda model, tok: backend_for(profile, model, tok)))(self.policy, self.tokenizer)

        self.engine, self.real_engine = make_engines(profile, engine, real_engine, self.device)
        self.topk = profile.simulator.topk if cfg.simulated else profile.search.topk
        if questions is None:
            questions = sample_questions(profile, profile.data.train_sets, "train", 10 ** 9, seed=profile.seed)
            questions = [q for q in questions if not cfg.max_hops or q.get("hops", 1) <= cfg.max_hops]
        self.questions = questions
        self.validation = validation if validation is not None or cfg.validate_every <= 0 else {
            "1hop": validation_questions(profile, cfg.validation_size, cfg.eval_size),
            "2hop": two_hop_validation_questions(profile) if cfg.validation_two_hop else []}
        self.best_validation = None  # (val_em, step) of the weights in best/
        self.watched: list[dict] = []  # the steps the collapse guard reads: since the start or the last rollback
        self.rollbacks, self.stop_requested = 0, False

        # Every source of randomness is seeded and saved in checkpoints.
        self.question_rng = random.Random(profile.seed)
        self.noise_rng = torch.Generator().manual_seed(profile.seed + 1)
        self.shuffle_rng = torch.Generator().manual_seed(profile.seed + 2)
        self.step_count = 0
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.sharded = distributed.is_sharded(self.policy)
        # FSDP averages the processes' gradients; the losses are already divided by the global counts, so
        # scaling by the number of processes makes that average the sum (as the unsharded path reduces them).
        self._fsdp_scale = self.world if self.sharded else 1
        if cfg.questions_per_step % self.world or cfg.mini_batch_size % self.world:
            raise ValueError(f"rl.questions_per_step ({cfg.questions_per_step}) and rl.mini_batch_size "
                             f"({cfg.mini_batch_size}) must be multiples of the {self.world} processes")
        self._rank_streams()

    def _rank_streams(self) -> None:
        """With several processes, each one past the first samples and draws noise from streams of its
        own (seeded by rank and step), so their rollouts differ; the first keeps the single-process ones."""
        if self.rank:
            seed = (self.profile.seed * 1_000_003 + self.rank) * 1_000_003 + self.step_count
            torch.manual_seed(seed)
            self.noise_rng.manual_seed(seed + 1)

    @property
    def _mini_batch_size(self) -> int:
        """This process's rows per optimizer step: its share of ``rl.mini_batch_size``."""
        return self.cfg.mini_batch_size // self.world

    def _warmup(self, step: int) -> float:
        return min(1.0, (step + 1) / max(1, self.cfg.warmup_steps))

    def _autocast(self):
        if self.cfg.bf16_autocast:
            return torch.autocast(self.device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def noise_probability(self, step: int) -> float:
        """The curriculum's probability that a search call at ``step`` gets noisy documents."""
        c = self.cfg
        return noise_probability(step, c.steps, c.p_start, c.p_end, c.base, c.curriculum)

    # ------------------------------------------------------------ the phases of one step

    def rollout_group(self, step: int | None = None) -> Rollouts:
        """Phases 1-2: draw ``questions_per_step`` training questions and roll each out ``group_size``
        times against the engine, ``rollout.batch_size`` rows at a time; against the simulator, each
        search call is noisy with the curriculum's probability at ``step`` (default: the next step),
        one draw per call."""
        cfg, step = self.cfg, step or self.step_count + 1
        picked = self.question_rng.sample(self.questions, min(cfg.questions_per_step, len(self.questions)))
        picked = picked[self.rank::self.world]  # every process draws the same questions and takes its share
        rows = [q for q in picked for _ in range(cfg.group_size)]
        simulated = cfg.simulated
        p_noise = self.noise_probability(step) if simulated else 0.0
        inner = (simulator_search_fn(self.engine, self.topk, p_noise, self.noise_rng, self.profile.simulator.hop_hints)
                 if simulated else engine_search_fn(self.engine, self.topk))
        seconds = {"simulator": 0.0}

        def search_fn(queries, trajs):
            t0 = time.time()
            out = inner(queries, trajs)
            seconds["simulator"] += time.time() - t0
            return out

        tokens_before = getattr(self.engine, "generated_tokens", 0)
        self.policy.eval()
        t0 = time.time()
        size, trajs = self.profile.rollout.batch_size, []
        for i in range(0, len(rows), size):  # at most rollout.batch_size rows decode at once (their KV cache)
            trajs += rollout(self.backend, self.tokenizer, rows[i:i + size], search_fn, self.profile.rollout,
                             enable_thinking=self.profile.thinking.policy)  # at rollout.temperature
        seconds["rollout"] = time.time() - t0 - seconds["simulator"]
        return Rollouts(step, picked, trajs, torch.arange(len(picked)).repeat_interleave(cfg.group_size), p_noise,
                        getattr(self.engine, "generated_tokens", 0) - tokens_before, seconds)

    def score(self, group: Rollouts) -> Batch:
        """Phase 3: each rollout's reward (``rl.reward``) and the rollouts as token tensors, with the
        loss mask (``rl.loss_mask: false``, the ablation, trains the documents too)."""
        scores = torch.tensor([trajectory_score(t, self.cfg.reward, self.tokenizer) for t in group.trajs])
        tensors = batch_tensors(group.trajs, self.tokenizer.pad_token_id, self.cfg.loss_mask)
        rollout_logp = tensors["rollout_logp"]
        return Batch(tensors["input_ids"].to(self.device), tensors["mask"].to(self.device), scores.to(self.device),
                     group.group_ids.to(self.device), lengths=tensors["lengths"].to(self.device),
                     rollout_logp=None if rollout_logp is None else rollout_logp.to(self.device))

    def logprobs(self, batch: Batch) -> Batch:
        """Phase 4, without gradient: the reference's log-probs (for the KL), the old policy's (for the
        ratio) and the critic's values, in micro-batches. One epoch over one mini-batch is exactly
        on-policy: the update's own forward pass gives the old log-probs, so they stay None here."""
        cfg, ids = self.cfg, batch.input_ids
        on_policy = cfg.ppo_epochs == 1 and len(ids) <= self._mini_batch_size
        with torch.no_grad(), self._autocast():
            batch.old_logp = None if on_policy else self._in_parts(lambda x: self._logprobs(self.policy, x)[0], batch)
            batch.ref_logp = self._in_parts(self._reference_logprobs, batch)
            batch.values = self._in_parts(self.critic, batch) if self.critic is not None else None
        return batch

    def _micro_batches(self, batch: Batch) -> list[tuple[torch.Tensor, Batch]]:
        """``batch`` in parts, each padded only to its own longest row, with the rows each part holds:
        ``rl.micro_batch_size`` rows in order (0: ``rl.mini_batch_size``), or with ``rl.micro_batch_tokens``
        the rows longest first, as many per part as fit that many padded tokens. One forward (and
        backward) pass each."""
        cfg, rows = self.cfg, len(batch.input_ids)
        if not cfg.micro_batch_tokens:
            size = cfg.micro_batch_size or self._mini_batch_size
            return [(i, batch.rows(i).trimmed()) for i in torch.arange(rows).split(size)]
        parts, part = [], []
        for i in torch.argsort(batch.lengths, descending=True, stable=True).tolist():
            width = padded_width(int(batch.lengths[part[0] if part else i]))  # the part's longest row comes first
            if part and (len(part) + 1) * width > cfg.micro_batch_tokens:
                parts.append(part)
                part = []
            part.append(i)
        parts.append(part)
        return [(torch.tensor(p), batch.rows(torch.tensor(p)).trimmed()) for p in parts]

    def _in_parts(self, fn, batch: Batch) -> torch.Tensor:
        """``fn(input_ids) -> [rows, tokens - 1]`` over ``batch`` one micro-batch at a time, each
        result padded back to the batch's width (with zeros, under mask 0) and put back in its rows."""
        out = None
        for index, part in self._micro_batches(batch):
            x = fn(part.input_ids)
            if out is None:
                out = x.new_zeros(len(batch.input_ids), batch.input_ids.shape[1] - 1)
            out[index.to(x.device), :x.shape[1]] = x
        return out

    def _logprobs(self, model, ids, with_entropy: bool = False):
        return token_logprobs(model, ids, with_entropy, chunk=self.cfg.logprob_chunk)

    def _reference_logprobs(self, ids):
        if self.reference is not None:
            return self._logprobs(self.reference, ids)[0]
        with self.policy.disable_adapter():  # LoRA: the base without the adapter is the reference
            return self._logprobs(self.policy, ids)[0]

    def advantages(self, batch: Batch) -> Batch:
        """Phase 5: the algorithm's advantages per token (``algos.ALGORITHMS``), and for PPO the
        critic's returns."""
        batch.advantages, batch.returns = self.algorithm.advantages(batch.scores, batch.group_ids, batch.mask,
                                                                    batch.values, self.cfg)
        return batch

    def loss(self, batch: Batch, counts: algos.Counts | None = None) -> tuple[torch.Tensor, dict]:
        """The RL loss of ``batch`` (or a mini-batch of it, ``batch.rows(i)``) under the current
        policy, with gradient, and its statistics: every term sees only mask-1 tokens. ``counts``:
        the mini-batch's denominators when ``batch`` is one micro-batch of it."""
        with self._autocast():
            logp, entropy = self._logprobs(self.policy, batch.input_ids, with_entropy=True)
        old_logp = logp.detach() if batch.old_logp is None else batch.old_logp
        return rl_loss(self.cfg, logp, entropy, old_logp, batch.ref_logp, batch.advantages, batch.mask, counts,
                       batch.rollout_logp)

    def update(self, batch: Batch) -> dict:
        """Phase 6: ``ppo_epochs`` passes over the batch in shuffled mini-batches, one optimizer step
        each (and the critic's, for PPO); then the learning-rate schedules step. Returns the mean of
        each statistic over the mini-batches."""
        self.policy.train()
        if self.critic is not None:
            self.critic.train()  # gradient checkpointing acts in training mode only
        sums: dict[str, list[float]] = {}
        for _ in range(self.cfg.ppo_epochs):
            order = torch.randperm(len(batch.input_ids), generator=self.shuffle_rng)
            for i in order.split(self._mini_batch_size):
                for key, value in self._optimizer_step(batch.rows(i)).items():
                    sums.setdefault(key, []).append(value)
        # The gradients' memory goes back until the next update (4 bytes a parameter, through the rollouts).
        self.optimizer.zero_grad(set_to_none=True)
        if self.critic is not None:
            self.critic_optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.critic is not None:
            self.critic_scheduler.step()
        return {k: sum(v) / len(v) for k, v in sums.items()}

    def _optimizer_step(self, mini: Batch) -> dict:
        """One optimizer step on a mini-batch, its gradient accumulated over micro-batches: each
        micro-batch's loss is divided by the whole mini-batch's counts, so the sum of their gradients
        is the gradient of one pass over the mini-batch (and so are the statistics)."""
        cfg, out = self.cfg, {}
        counts = algos.Counts(*distributed.all_sum(list(vars(algos.Counts.of(mini.mask, cfg.agg)).values())))
        self.optimizer.zero_grad(set_to_none=True)
        if self.critic is not None:
            self.critic_optimizer.zero_grad(set_to_none=True)
        for _, part in self._micro_batches(mini):
            loss, stats = self.loss(part, counts)
            (loss * self._fsdp_scale).backward()
            if self.critic is not None:
                with self._autocast():
                    values = self.critic(part.input_ids)
                vloss = algos.value_loss(values, part.values, part.returns, part.mask, cfg.value_clip, cfg.agg, counts)
                vloss.backward()
                stats["value_loss"] = vloss.item()
            for key, value in stats.items():
                out[key] = out.get(key, 0.0) + value
        # Each process's part was divided by the global counts: the sums are the global mini-batch's.
        out = dict(zip(out, distributed.all_sum(list(out.values()))))
        if not self.sharded:  # FSDP has reduced them in the backward pass already
            distributed.all_reduce_grads([*self.policy.parameters(), *(self.critic.parameters() if self.critic else [])])
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip)
        out["grad_norm"] = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
        self.optimizer.step()
        if self.critic is not None:
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.grad_clip)
            self.critic_optimizer.step()
        return out

    def rollout_logprobs(self, batch: Batch) -> torch.Tensor:
        """Each rollout's mean log-prob per token of its own (mask-1) tokens under the current policy,
        ``[B]``, without gradient: an update should raise it where the advantage is positive and lower
        it where it is negative."""
        with torch.no_grad(), self._autocast():
            logp = self._in_parts(lambda x: self._logprobs(self.policy, x)[0], batch)
        mask = batch.mask.to(logp.dtype)
        return (logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)

    def sync_weights(self) -> None:
        """After an update: the rollout backend generates with the new weights (a vLLM engine gets
        them sent; the HF backend drops the cache it built with the old ones)."""
        self.backend.load_weights()

    # ------------------------------------------------------------ one step, and the run

    def step(self) -> dict:
        """One RL step: the phases in order, validation when due, one metrics line, a few samples, and
        a checkpoint every ``rl.checkpoint_every`` steps."""
        start = time.time()
        group = self.rollout_group()
        self.backend.sleep()  # a colocated vLLM engine frees its GPU memory for the update (vllm.sleep_mode)
        timing = dict(group.seconds)
        batch = self.score(group)
        t0 = time.time()
        self.logprobs(batch)
        timing["logprobs"] = time.time() - t0
        self.advantages(batch)
        t0 = time.time()
        update = self.update(batch)
        timing["update"] = time.time() - t0
        t0 = time.time()
        self.backend.wake_up()
        self.sync_weights()  # the next rollouts (and validation) sample the updated policy
        timing["weight_sync"] = time.time() - t0
        self.step_count = group.step

        validation = {}
        if self.cfg.validate_every > 0 and (group.step % self.cfg.validate_every == 0 or group.step == self.cfg.steps):
            weights = self._whole_weights()  # every process takes part when the policy is sharded
            if distributed.is_main():  # the others go on to the next step's rollouts meanwhile
                t0 = time.time()
                validation = self.validate(weights)
                timing["validation"] = time.time() - t0
        group, scores = _gathered(group, batch.scores)  # the metrics describe every process's rollouts
        metrics = step_metrics(group, scores, self.cfg.group_size, update, self.scheduler.get_last_lr()[0],
                               validation, time.time() - start, timing)
        self.watch(metrics)
        if distributed.is_main():
            append_jsonl(self.metrics_path, [metrics])
            append_jsonl(self.samples_path, self._samples(group, scores))
        if group.step % self.cfg.checkpoint_every == 0 or group.step == self.cfg.steps or self.stop_requested:
            self.save_checkpoint()  # every process takes part (FSDP gathers); the main one writes
        return metrics

    GUARD_ACTIONS = ("none", "warn", "stop", "rollback")

    def watch(self, metrics: dict) -> str:
        """The collapse guard (``zslib/guard.py``, ``guard:``) after a step: the signs of collapse in the steps
        since the start or the last rollback, logged in ``metrics`` (``guard_signs``, ``guard_action``), then,
        by ``guard.action``, nothing more, a stop (``train`` ends after this step, with a checkpoint), or a
        rollback: the best-validated weights back in the policy, the optimiser's moments cleared, the learning
        rate times ``guard.lr_factor``, and the watch starting afresh. Returns the action taken."""
        g = self.profile.guard
        if g.action == "off":
            return "none"
        self.watched.append(metrics)
        found = guard.signs(self.watched, g) if distributed.is_main() else []
        action = guard.decide(found, g, self.rollbacks)
        if action == "rollback" and not complete_folders(self.best_dir):
            action = "stop"  # no validation yet: nothing better to go back to
        # the main process decides (only it validates, and it has written best/ by now); the others follow
        action = self.GUARD_ACTIONS[int(distributed.all_sum([float(self.GUARD_ACTIONS.index(action))
                                                             if distributed.is_main() else 0.0])[0])]
        if action == "none":
            return action
        metrics.update(guard_signs=found, guard_action=action)
        if action == "rollback":
            best = complete_folders(self.best_dir)
            self._load_policy_weights(best[-1])
            self.optimizer.state.clear()  # moments of the steps that went wrong would push the same way
            self.scheduler.base_lrs = [lr * g.lr_factor for lr in self.scheduler.base_lrs]
            for group_, lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group_["lr"] = lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
            self.rollbacks += 1
            self.watched = []
            metrics.update(guard_rollback_to=int(best[-1].name.split("-")[1]),
                           guard_lr=self.optimizer.param_groups[0]["lr"])
        if action == "stop":
            self.stop_requested = True
        return action

    def _whole_weights(self) -> dict | None:
        """With a sharded policy, its whole weights (a collective); None otherwise (``save_pretrained`` reads them)."""
        return distributed.full_state_dict(self.policy) if self.sharded else None

    def _samples(self, group: Rollouts, scores: torch.Tensor) -> list[dict]:
        """The first rollout of each of the first ``samples_per_step`` questions, for samples.jsonl."""
        n, g = self.cfg.samples_per_step, self.cfg.group_size
        return [{"step": group.step, "text": self.tokenizer.decode(t.token_ids), "token_ids": t.token_ids,
                 "loss_mask": t.loss_mask, "prompt_len": t.prompt_len, "reward": s.item(),
                 "golden_answers": t.golden_answers, "calls": t.calls}
                for t, s in zip(group.trajs[:n * g:g], scores[:n * g:g])]

    def validate(self, weights: dict | None = None) -> dict:
        """Greedy scores on the validation questions with the real engine; with 2-hop validation
        questions, ``val_em`` is the mean of the 1-hop and 2-hop EMs, so a step that trades one kind
        for the other is not kept. A new best ``val_em`` (ties go to the earlier step) saves the policy
        (or adapter) to ``best/step-N/``; the previous best is removed only once the new one is complete."""
        def ask(rows, desc):
            return greedy_with_engine(self.policy, self.tokenizer, rows, self.real_engine, self.profile, desc=desc,
                                      backend=self.backend)

        scores = ask(self.validation["1hop"], "validation")
        out = {"val_em": scores["em"], "val_f1": scores["f1"],
               "val_searches_per_question": scores["searches_per_question"],
               "val_search_calls": round(scores["searches_per_question"] * scores["n"])}
        if self.validation.get("2hop"):
            two = ask(self.validation["2hop"], "validation, 2-hop")
            out.update({"val_em_1hop": scores["em"], "val_em_2hop": two["em"], "val_em": (scores["em"] + two["em"]) / 2,
                        "val_searches_per_question_2hop": two["searches_per_question"],
                        "val_search_calls": out["val_search_calls"] + round(two["searches_per_question"] * two["n"])})
        if self.best_validation is None or out["val_em"] > self.best_validation[0]:
            self.best_validation = (out["val_em"], self.step_count)

            def write(folder: Path) -> None:
                self.policy.save_pretrained(str(folder), state_dict=weights)  # weights: the sharded policy's
                (folder / "validation.json").write_text(json.dumps({"step": self.step_count, "val_em": out["val_em"]}))

            write_folder_atomic(self.best_dir / f"step-{self.step_count:06d}", write)
            for old in complete_folders(self.best_dir)[:-1]:
                shutil.rmtree(old)
        return out

    def use_best_policy(self) -> dict | None:
        """With ``keep_best`` and validation: load the best-validated weights into the policy and
        return their ``{"step", "val_em"}``; otherwise leave the last weights and return None."""
        found = complete_folders(self.best_dir)
        if not (self.cfg.keep_best and self.cfg.validate_every > 0 and found):
            return None
        self._load_policy_weights(found[-1])
        return json.loads((found[-1] / "validation.json").read_text())

    def train(self, steps: int | None = None, resume: bool = True) -> list[dict]:
        """Run up to ``steps`` (default ``rl.steps``). With ``resume`` the run continues from its
        last checkpoint; lines logged after that checkpoint are dropped and redone. Without it,
        earlier products of this run directory are removed first."""
        if not resume and distributed.is_main():
            for path in (self.metrics_path, self.samples_path):
                path.unlink(missing_ok=True)
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            shutil.rmtree(self.best_dir, ignore_errors=True)
            self.recipe_path.unlink(missing_ok=True)
        if distributed.is_main():
            self._check_recipe()
        distributed.barrier()  # the others read what the main process left
        if resume and self.load_checkpoint():
            self._rank_streams()
        if distributed.is_main():
            kept = _keep_until(self.metrics_path, self.step_count)
            _keep_until(self.samples_path, self.step_count)
            # The best validation so far, from the steps kept; a best saved after the checkpoint is
            # dropped with them (the redone steps save it again).
            for folder in complete_folders(self.best_dir):
                if int(folder.name.split("-")[1]) > self.step_count:
                    shutil.rmtree(folder)
            validated = [(m["val_em"], m["step"]) for m in kept if "val_em" in m]
            self.best_validation = max(validated, key=lambda v: (v[0], -v[1])) if validated else None
            # the guard's watch resumes where it was: the steps since the last rollback, and the rollbacks made
            since = max([i + 1 for i, m in enumerate(kept) if m.get("guard_action") == "rollback"], default=0)
            self.watched, self.rollbacks = kept[since:], sum(m.get("guard_action") == "rollback" for m in kept)
        self.stop_requested = False
        last = min(steps or self.cfg.steps, self.cfg.steps)
        out = []
        bar = tqdm(range(self.step_count, last), desc=f"RL ({self.cfg.algorithm}, {self.cfg.engine})",
                   initial=self.step_count, total=last)
        for _ in bar:
            m = self.step()
            out.append(m)
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}", p=f"{m['noise_prob']:.2f}")
            if self.stop_requested:
                bar.write(f"the collapse guard stopped the run at step {m['step']}: " + "; ".join(m["guard_signs"]))
                break
        distributed.barrier()  # the main process's last validation and checkpoint are on disk for all
        return out

    # ------------------------------------------------------------ checkpoints

    def _check_recipe(self) -> None:
        """Refuse to go on with a run folder that holds a run of another recipe (the profile was edited since it
        started); a run that starts here records its recipe. A folder from before recipes were recorded
        has none, and is resumed unchecked."""
        ours = run_recipe(self.profile)
        check_recipe(self.run_dir, ours, "a run", f"to train afresh, move or delete {self.run_dir} (or set fresh = "
                     "True in notebook 04, train(resume=False) here), or give the run a folder of its own")
        if not self.recipe_path.exists() and not self.checkpoints():
            write_recipe(self.run_dir, ours)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (an unfinished one keeps its ``.tmp`` name)."""
        return complete_folders(self.ckpt_dir)

    def save_checkpoint(self) -> Path | None:
        """Policy (or adapter), critic, optimizers, schedulers, RNG states and step, written to a
        temporary folder that is renamed when complete: a crash never leaves a half checkpoint. Every
        process calls it (a sharded policy is gathered first); the main one writes, the others get None."""
        weights = self._whole_weights()
        # A sharded optimizer's state, whole and keyed by parameter names: any number of processes resumes it.
        optimizer = {"optimizer_by_name": distributed.optimizer_state(self.policy, self.optimizer)} if self.sharded \
            else {"optimizer": self.optimizer.state_dict()}
        if not distributed.is_main():
            return None
        final = write_folder_atomic(self.ckpt_dir / f"step-{self.step_count:06d}",
                                    lambda tmp: self._write_checkpoint(tmp, weights, optimizer))
        for old in self.checkpoints()[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old)
        return final

    def _write_checkpoint(self, tmp: Path, weights: dict | None, optimizer: dict) -> None:
        self.policy.save_pretrained(str(tmp / "policy"), state_dict=weights)
        state = {"step": self.step_count, **optimizer,
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
        if "optimizer_by_name" in state or self.sharded:
            distributed.load_optimizer_state(self.policy, self.optimizer, state.get("optimizer_by_name")
                                             or _by_name(self.policy, state["optimizer"]))
        else:
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
            distributed.load_full_state_dict(self.policy, saved.state_dict())
        self.sync_weights()  # a vLLM engine still holds the weights it started with

    def save_policy(self, folder: str | Path | None = None) -> Path:
        """The trained policy (adapter merged) and tokenizer, loadable with ``from_pretrained``."""
        folder = Path(folder or self.run_dir / "policy")
        weights = self._whole_weights()  # every process takes part when the policy is sharded
        if not distributed.is_main():
            return folder
        model = copy.deepcopy(self.policy).merge_and_unload() if self.cfg.lora else self.policy
        model.save_pretrained(str(folder), state_dict=weights)
        self.tokenizer.save_pretrained(str(folder))
        return folder
