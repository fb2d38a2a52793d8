"""Multi-turn search rollouts (docs/method.md §3), batched over every active row.

Each turn generates until ``</search>`` or ``</answer>`` (stop strings, not generate-to-max),
keeps its tokens up to the one that completes the first action (``through_first_action``: a real
tokenizer's last tag token can carry more text, and a backend can return more), parses that
action, runs all of the turn's searches in one ``search()`` call, and appends ``<information>``
blocks. Trajectories are built by concatenating token ids, never by
re-rendering the chat template, and carry a ``loss_mask`` that is 1 only on tokens the policy
generated.

The inference engine is not here: ``rollout`` drives any backend of ``zslib/generation/backends.py``
(transformers or vLLM) through its ``generate`` and ``release``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .prompts import INVALID_ACTION, information_block, render_policy_prompt
from .search import Doc, format_docs

if TYPE_CHECKING:  # for the annotation only
    from .generation.backends import GenerationBackend

_ACTION = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)


@dataclass
class Trajectory:
    question: str
    golden_answers: list[str]
    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    prompt_len: int = 0
    turns: list[str] = field(default_factory=list)          # generated text per turn
    calls: list[dict] = field(default_factory=list)         # {"query", "docs", "noisy"}
    first_action: str | None = None                         # search | answer | invalid
    answer: str | None = None
    invalid_actions: int = 0
    done: bool = False
    sampled_logprobs: list[float] = field(default_factory=list)  # per generated token, when the backend returns them (vLLM)
    hop_answers: list[str] = field(default_factory=list)    # a multi-hop question's answer per hop, when its data has them
    cut_tokens: int = 0   # tokens the backend returned after a turn's first action, dropped (``through_first_action``)
    hit_limit: int = 0    # turns that used their whole token budget without an action (long thinking, rambling)

    def extend(self, ids: list[int], from_policy: bool) -> None:
        self.token_ids += ids
        self.loss_mask += [int(from_policy)] * len(ids)

    @property
    def response_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]


def parse_action(text: str) -> tuple[str, str] | None:
    """The first complete ``<search>`` or ``<answer>`` block: (kind, content), or None."""
    m = _ACTION.search(text)
    return (m.group(1), m.group(2).strip()) if m else None


def through_first_action(ids: list[int], tokenizer) -> int:
    """How many of a turn's tokens to keep: up to and including the token that completes its first
    action (all of them when there is none).

    A real tokenizer splits ``</search>`` into several tokens, and its last one may carry more text
    (``>\n\n``), so a backend can return tokens past the action: a model-written ``<information>``
    block or a second ``<answer>``. They are dropped, so the loss mask never covers text the policy
    wrote beyond its action, and the trajectory, its parsed answer and its reward see the same turn."""
    def complete(n: int) -> bool:
        return _ACTION.search(tokenizer.decode(ids[:n], skip_special_tokens=True)) is not None

    # Complete prefixes only grow longer, so one decode settles the usual cases: no action at all, or
    # the backend stopped on the completing token.
    if len(ids) < 2 or not complete(len(ids) - 1):
        return len(ids)
    low, high = 1, len(ids) - 1  # complete(high) holds; find the shortest complete prefix
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if complete(mid) else (mid + 1, high)
    return high


# (queries, the rows asking them) -> (documents per query, noisy flag per query or None)
SearchFn = Callable[[list[str], list["Trajectory"]], tuple[list[list[Doc]], list[bool | None]]]


def rollout(backend: "GenerationBackend", tokenizer, rows: list[dict], search_fn: SearchFn, cfg,
            temperature: float | None = None, enable_thinking: bool = True,
            prompts: list[str] | None = None, max_turns: int | None = None) -> list[Trajectory]:
    """Run the protocol on ``rows`` ({"question", "golden_answers"}); ``cfg`` is a RolloutConfig.

    ``search_fn(queries, trajectories)`` gets the turn's queries and the rows asking them, so a
    simulator can see each row's question and gold answer; it returns documents per query and
    whether each call was served noisy documents (None for a real engine). ``prompts``: each row's
    rendered prompt, for baselines with prompts of their own (default: the policy prompt).
    ``max_turns``: searches allowed before the last turn, which may only answer (default
    ``cfg.max_turns``; 0: answer at once, as the one-shot baselines do).
    """
    temperature = cfg.temperature if temperature is None else temperature
    max_turns = cfg.max_turns if max_turns is None else max_turns
    trajs = []
    for i, row in enumerate(rows):
        t = Trajectory(row["question"], list(row["golden_answers"]), hop_answers=list(row.get("hop_answers") or []))
        text = prompts[i] if prompts is not None else render_policy_prompt(tokenizer, row["question"], enable_thinking)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        t.extend(prompt_ids, from_policy=False)
        t.prompt_len = len(prompt_ids)
        trajs.append(t)

    for turn in range(max_turns + 1):
        active = [t for t in trajs if not t.done]
        if not active:
            break
        final_turn = turn == max_turns  # after max_turns searches, only an answer counts
        budget = [min(cfg.max_tokens_per_turn, cfg.max_context - len(t.token_ids)) for t in active]
        for t, b in zip(active, budget):
            if b <= 0:
                t.done = True
        active = [t for t, b in zip(active, budget) if b > 0]
        if not active:
            break
        budget = [b for b in budget if b > 0]
        new_ids = backend.generate([t.token_ids for t in active], max(budget), temperature, cfg.top_p,
                                   continuing=turn > 0)
        logprobs = backend.last_logprobs or [[]] * len(active)
        searching: list[tuple[Trajectory, str]] = []
        for t, ids, b, lp in zip(active, new_ids, budget, logprobs):
            ids = ids[:b]
            kept = through_first_action(ids, tokenizer)
            t.cut_tokens += len(ids) - kept
            ids = ids[:kept]
            t.extend(ids, from_policy=True)
            t.sampled_logprobs += lp[:kept]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            t.turns.append(text)
            action = parse_action(text)
            t.hit_limit += action is None and len(ids) == b  # the whole budget spent without an action
            kind = action[0] if action else "invalid"
            if t.first_action is None:
                t.first_action = kind
            if kind == "answer":
                t.answer, t.done = action[1], True
            elif kind == "search" and not final_turn:
                searching.append((t, action[1]))
            elif final_turn:
                t.done = True
            else:
                t.invalid_actions += 1
                t.extend(tokenizer(INVALID_ACTION, add_special_tokens=False)["input_ids"], from_policy=False)
        if searching:
            results, noisy = search_fn([q for _, q in searching], [t for t, _ in searching])
            for (t, query), docs, flag in zip(searching, results, noisy):
                t.calls.append({"query": query, "docs": [[d.title, d.text] for d in docs], "noisy": flag})
                obs = tokenizer(format_docs(docs), add_special_tokens=False)["input_ids"][: cfg.max_obs_tokens]
                block = information_block(tokenizer.decode(obs))
                t.extend(tokenizer(block, add_special_tokens=False)["input_ids"], from_policy=False)
        for t in trajs:
            if not t.done and len(t.token_ids) >= cfg.max_context:
                t.done = True
    backend.release()  # the kept cache is stale once the weights change
    return trajs


def hit_limit_rate(trajs: list[Trajectory]) -> float:
    """The share of turns that used their whole token budget without an action: long thinking or
    rambling that ``rollout.max_tokens_per_turn`` cut off (``thinking``, docs/guide.md)."""
    return sum(t.hit_limit for t in trajs) / max(1, sum(len(t.turns) for t in trajs))


def engine_search_fn(engine, topk: int) -> SearchFn:
    """Adapt a plain engine (BM25, web, none) to the rollout's search hook."""
    return lambda queries, _trajs: (engine.search(queries, topk), [None] * len(queries))
