"""Multi-turn search rollouts (DESIGN §2), batched over every active row.

Each turn generates until ``</search>`` or ``</answer>`` (stop strings, not generate-to-max),
parses the first action, runs all of the turn's searches in one ``search()`` call, and appends
``<information>`` blocks. Trajectories are built by concatenating token ids, never by
re-rendering the chat template, and carry a ``loss_mask`` that is 1 only on tokens the policy
generated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import Cache, DynamicLayer

from .models import use_grouped_sdpa_on_cpu
from .prompts import INVALID_ACTION, information_block, render_policy_prompt
from .search import Doc, format_docs

STOP_STRINGS = ["</search>", "</answer>"]
_ACTION = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)


class GenerationBackend(Protocol):
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 top_p: float, continuing: bool = False) -> list[list[int]]:
        """New token ids per prompt, ending at a stop string or EOS (inclusive). ``continuing``:
        each prompt extends one of the previous call's rows (same weights), so a backend may
        reuse what it computed for them."""


class HFBackend:
    """transformers ``generate`` with left padding, stop strings, and KV-cache reuse across turns."""

    def __init__(self, model, tokenizer, stop_strings: list[str] = STOP_STRINGS, stop_in_generate: bool = True,
                 reuse_cache: bool = True):
        """``stop_in_generate=False`` generates to EOS or the token limit and cuts at the stop string
        afterwards, as the original code does (kept for ``benchmarks/rollout.py``).
        ``reuse_cache=False`` encodes every prompt from scratch on every call."""
        self.model, self.tokenizer, self.stop_strings = model, tokenizer, stop_strings
        self.stop_in_generate, self.reuse_cache = stop_in_generate, reuse_cache
        use_grouped_sdpa_on_cpu(model)  # padded batches: no copy of the KV cache per layer and step
        self.generated_tokens = 0  # tokens the model produced, including any cut off afterwards
        self.prefilled_tokens = 0  # prompt tokens encoded (those taken from the cache are not)
        self.pad_id = tokenizer.pad_token_id
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self._ends: dict[int, bool] = {}
        self._kept: dict | None = None  # the last call's cache and where each row's tokens sit in it

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature, top_p, continuing=False):
        plan = self._reuse_plan(prompts) if continuing and self._kept else None
        ids, attn, cache = self._inputs(prompts, plan)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        if self.stop_in_generate:
            sampling.update(stopping_criteria=StoppingCriteriaList([_StopAtText(self, ids.shape[1])]))
        out = self.model.generate(input_ids=ids.to(self.model.device), attention_mask=attn.to(self.model.device),
                                  past_key_values=cache if cache is not None else GrowingCache(), max_new_tokens=max_new_tokens, pad_token_id=self.pad_id,
                                  top_k=None, return_dict_in_generate=True, **sampling)
        width = ids.shape[1]
        new = out.sequences[:, width:].tolist()
        trimmed = [self._trim(row) for row in new]
        # Generation stopped at the stop string, or ran on to EOS or the limit and was cut here.
        produced = trimmed if self.stop_in_generate else [self._trim(row, at_stop=False) for row in new]
        self.generated_tokens += sum(len(row) for row in produced)
        if self.reuse_cache:
            self._keep(prompts, out.sequences.cpu(), attn, trimmed, out.past_key_values)
        return trimmed

    def release(self) -> None:
        """Drop the kept cache (its memory, and any chance of reusing it after a weight update)."""
        self._kept = None

    # A multi-turn rollout sends each row back with its generated tokens and a document block
    # appended. Re-encoding the whole context every turn encoded 1.7x the tokens (tiny profile),
    # so the cache of the previous call is kept and only each row's new tokens are encoded. Rows sit at different offsets in the kept
    # cache, so a row's new tokens follow a gap of padding that the attention mask hides;
    # positions come from the mask, so the model sees exactly the unpadded sequence.

    def _reuse_plan(self, prompts) -> list[tuple[int, int]] | None:
        """(kept row, tokens reused) per prompt, in order, or None when a prompt extends no kept row."""
        rows, plan, r = self._kept["tokens"], [], 0
        for p in prompts:
            while r < len(rows) and p[: len(rows[r])] != rows[r]:
                r += 1
            if r == len(rows):
                return None
            plan.append((r, min(len(rows[r]), len(p) - 1)))  # at least one token to encode
            r += 1
        return plan

    def _inputs(self, prompts, plan):
        """Input ids and attention mask (left padded), and the cache they continue (or None)."""
        if plan is None:
            self._kept = None
            ids, attn = self._left_pad(prompts)
            self.prefilled_tokens += sum(len(p) for p in prompts)
            return ids, attn, None
        kept, self._kept = self._kept, None  # the cache is about to grow: never reuse it twice
        rows = [r for r, _ in plan]
        mask = kept["mask"][rows].clone()
        for j, (r, used) in enumerate(plan):
            mask[j, kept["columns"][r][used:]] = 0  # kept tokens this prompt does not repeat
        # Pack each row's kept columns to the right, in order, so the padding gaps of earlier turns
        # leave the cache (they were a third of its width). Keys already carry their rotary
        # positions, so moving a column changes nothing the model computes.
        width = int(mask.sum(1).max())
        order = torch.sort(mask, dim=1, stable=True).indices[:, mask.shape[1] - width:]
        cache = _gather_columns(kept["cache"], torch.tensor(rows), order, self.model.device)
        suffix_ids, suffix_mask = self._left_pad([p[used:] for p, (_, used) in zip(prompts, plan)])
        self.prefilled_tokens += int(suffix_mask.sum())
        ids = kept["ids"][rows].gather(1, order)
        return torch.cat([ids, suffix_ids], 1), torch.cat([mask.gather(1, order), suffix_mask], 1), cache

    def _left_pad(self, rows):
        width = max(len(p) for p in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, p in enumerate(rows):
            if p:
                ids[r, width - len(p):] = torch.tensor(p)
                attn[r, width - len(p):] = 1
        return ids, attn

    def _keep(self, prompts, sequences, attn, trimmed, cache) -> None:
        """Remember the cache: it holds every column but the last generated one."""
        columns = sequences.shape[1] - 1
        if cache is None or cache.get_seq_length() != columns:
            return
        width = attn.shape[1]
        generated = torch.zeros(len(prompts), columns - width, dtype=attn.dtype)
        for j, row in enumerate(trimmed):
            generated[j, : len(row)] = 1  # padding after a row's stop is in the cache but not in the row
        mask = torch.cat([attn, generated], 1)
        self._kept = {"cache": cache, "ids": sequences[:, :columns], "mask": mask,
                      "columns": [m.nonzero().flatten().tolist() for m in mask],
                      "tokens": [p + row[: columns - width] for p, row in zip(prompts, trimmed)]}

    def _trim(self, row: list[int], at_stop: bool = True) -> list[int]:
        """Cut after the first stop string (with ``at_stop``) or EOS: ``generate`` pads rows that
        finished early. The pad token may double as an EOS (Qwen3), so a row is cut where its
        text first ends in a stop string, before any padding that follows it.
        """
        for i, t in enumerate(row):
            if t in self.eos_ids:
                return row[: i + 1]
            if at_stop and self._may_end_stop(t):
                tail = self.tokenizer.decode(row[max(0, i - 15): i + 1])
                if any(tail.endswith(s) for s in self.stop_strings):
                    return row[: i + 1]
        return row

    def _may_end_stop(self, token_id: int) -> bool:
        """Cheap pre-check (cached per token): does this token's text end like a stop string?"""
        if token_id not in self._ends:
            text = self.tokenizer.decode([token_id])
            self._ends[token_id] = any(text and s.endswith(text[-1]) for s in self.stop_strings)
        return self._ends[token_id]


class _GrowingLayer(DynamicLayer):
    """A key/value cache layer that writes each step's keys and values into spare room of a
    buffer. transformers' ``DynamicLayer`` concatenates instead, copying the whole cache at every
    step: a sixth of a tiny rollout's time."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._room = None
        length, new = (self.keys.shape[-2] if self.keys.numel() else 0), key_states.shape[-2]
        room = self._room
        # A new buffer when there is none, when it is full, or when the cache's rows were replaced
        # (``batch_select_indices`` and ``_gather_columns`` assign new tensors).
        if (room is None or length + new > room[0].shape[-2] or room[0].shape[0] != key_states.shape[0]
                or (length and self.keys.data_ptr() != room[0].data_ptr())):
            shape = (*key_states.shape[:2], length + new + max(64, length + new), key_states.shape[-1])
            room = (key_states.new_empty(shape), value_states.new_empty(shape))
            if length:
                room[0][:, :, :length] = self.keys
                room[1][:, :, :length] = self.values
            self._room = room
        room[0][:, :, length:length + new] = key_states
        room[1][:, :, length:length + new] = value_states
        self.keys, self.values = room[0][:, :, :length + new], room[1][:, :, :length + new]
        return self.keys, self.values


class GrowingCache(Cache):
    """A ``DynamicCache`` whose layers grow in place (``_GrowingLayer``)."""

    def __init__(self):
        super().__init__(layer_class_to_replicate=_GrowingLayer)


def _gather_columns(cache, rows: torch.Tensor, columns: torch.Tensor, device):
    """Keep ``rows`` of a key/value cache and, per row, the cache columns ``columns[row]``."""
    rows, columns = rows.to(device), columns.to(device)
    for layer in cache.layers:
        for name in ("keys", "values"):
            states = getattr(layer, name)[rows]
            index = columns[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
            setattr(layer, name, states.gather(2, index))
    return cache


class _StopAtText(StoppingCriteria):
    """Ends a row once its generated text ends in one of the backend's stop strings: the rule
    ``_trim`` cuts by. transformers' ``stop_strings`` does the same for any tokenizer but cost a
    quarter of a tiny rollout's time; here a row's text is decoded only when its newest token can
    end a stop string (a cached per-token check), which is rare."""

    def __init__(self, backend: HFBackend, prompt_width: int):
        self.backend, self.prompt_width = backend, prompt_width
        self.stopped: set[int] = set()

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        start = max(self.prompt_width, input_ids.shape[1] - 16)
        for row, token in enumerate(input_ids[:, -1].tolist()):
            if row in self.stopped or token in self.backend.eos_ids or not self.backend._may_end_stop(token):
                continue
            tail = self.backend.tokenizer.decode(input_ids[row, start:].tolist())
            if any(tail.endswith(s) for s in self.backend.stop_strings):
                self.stopped.add(row)
        done[list(self.stopped)] = True
        return done.to(input_ids.device)


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


# (queries, the rows asking them) -> (documents per query, noisy flag per query or None)
SearchFn = Callable[[list[str], list["Trajectory"]], tuple[list[list[Doc]], list[bool | None]]]


def rollout(backend: GenerationBackend, tokenizer, rows: list[dict], search_fn: SearchFn, cfg,
            temperature: float | None = None, enable_thinking: bool = True) -> list[Trajectory]:
    """Run the protocol on ``rows`` ({"question", "golden_answers"}); ``cfg`` is a RolloutConfig.

    ``search_fn(queries, trajectories)`` gets the turn's queries and the rows asking them, so a
    simulator can see each row's question and gold answer; it returns documents per query and
    whether each call was served noisy documents (None for a real engine).
    """
    temperature = cfg.temperature if temperature is None else temperature
    trajs = []
    for row in rows:
        t = Trajectory(row["question"], list(row["golden_answers"]))
        prompt_ids = tokenizer(render_policy_prompt(tokenizer, row["question"], enable_thinking),
                               add_special_tokens=False)["input_ids"]
        t.extend(prompt_ids, from_policy=False)
        t.prompt_len = len(prompt_ids)
        trajs.append(t)

    for turn in range(cfg.max_turns + 1):
        active = [t for t in trajs if not t.done]
        if not active:
            break
        final_turn = turn == cfg.max_turns  # after max_turns searches, only an answer counts
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
        searching: list[tuple[Trajectory, str]] = []
        for t, ids, b in zip(active, new_ids, budget):
            ids = ids[:b]
            t.extend(ids, from_policy=True)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            t.turns.append(text)
            action = parse_action(text)
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
    if hasattr(backend, "release"):
        backend.release()  # the kept cache is stale once the weights change
    return trajs


def engine_search_fn(engine, topk: int) -> SearchFn:
    """Adapt a plain engine (BM25, web, none) to the rollout's search hook."""
    return lambda queries, _trajs: (engine.search(queries, topk), [None] * len(queries))
