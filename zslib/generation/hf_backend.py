"""The HF generation backend: a transformers causal LM decoding batches with our own loop.

Rows leave the batch as they stop (at a stop string or EOS), the KV cache is kept across turns,
and a long common prefix (the prompt template) is encoded once. ``zslib/generation/backends.py`` builds it;
``benchmarks/rollout.py`` measures each of these choices against the plain version.
"""

from __future__ import annotations

import copy
import os

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from .. import distributed
from .models import special_token_ids, use_grouped_sdpa_on_cpu
from ..prompts import STOP_STRINGS

MIN_SHARED_PREFIX = 16  # shorter common prefixes are encoded with each row (an extra call costs more)
PREFILL_GROUPS = 4  # at most this many prefill calls per batch, each for rows of similar length
MIN_PREFILL_GROUP = 8  # rows; a smaller group's call costs more than the padding it saves
MIN_PREFILL_SAVING = 0.05  # a further group must save this share of the padded positions


def _whole_copy(model, dtype):
    """A sharded model's whole weights in a plain model of ``dtype`` on this process's device."""
    from transformers import AutoModelForCausalLM
    whole = AutoModelForCausalLM.from_config(model.config, dtype=dtype).to(next(model.parameters()).device)
    whole.load_state_dict(distributed.full_state_dict(model))
    return whole.eval().requires_grad_(False)


class HFBackend:
    """A transformers causal LM decoding left-padded batches with its own loop: a row stops at a
    stop string or EOS and then leaves the batch, and the KV cache is kept across turns."""

    def __init__(self, model, tokenizer, stop_strings: list[str] = STOP_STRINGS, stop_in_generate: bool = True,
                 reuse_cache: bool = True, share_prefix: bool = True, prefill_groups: int = PREFILL_GROUPS,
                 dtype: str | None = None):
        """``reuse_cache=False`` encodes every prompt from scratch on every call (one-turn callers,
        as the simulator and the judge, have nothing to reuse). ``dtype`` (``models.dtype``): decode
        with a copy of the model in that dtype when its weights are in another (the trainer's fp32
        master weights): half the KV cache and faster kernels in bf16; ``load_weights`` refreshes it.

        Benchmark switches, for ``benchmarks/rollout.py`` to measure each choice against the plain
        version; nothing else sets them: ``stop_in_generate=False`` generates to EOS or the token
        limit and cuts at the stop string afterwards, as the original code does;
        ``share_prefix=False`` encodes the prompts' common prefix once per row; ``prefill_groups=1``
        encodes all rows' new tokens in one call, padded to the longest."""
        self.source, self.tokenizer, self.stop_strings = model, tokenizer, stop_strings
        self.model = model
        if distributed.is_sharded(model):  # a sharded policy (rl.fsdp) cannot decode alone: a whole copy does
            self.model = _whole_copy(model, getattr(torch, dtype or "float32"))
        elif dtype is not None and next(model.parameters()).dtype != getattr(torch, dtype):
            self.model = copy.deepcopy(model).to(getattr(torch, dtype)).eval().requires_grad_(False)
        self.stop_in_generate, self.reuse_cache, self.share_prefix = stop_in_generate, reuse_cache, share_prefix
        self.prefill_groups = prefill_groups
        use_grouped_sdpa_on_cpu(self.model)  # padded batches: no copy of the KV cache per layer and step
        self.generated_tokens = 0  # tokens the model produced, including any cut off afterwards
        self.last_logprobs: list[list[float]] = []  # not recorded: the trainer computes its own
        self.prefilled_tokens = 0  # prompt tokens encoded (those taken from the cache are not)
        self.prefill_positions = 0  # positions the prefill computed: those tokens and their padding
        self.pad_id, self.eos_ids = special_token_ids(model, tokenizer)
        self._ends: dict[int, bool] = {}
        self._kept: dict | None = None  # the last call's cache and where each row's tokens sit in it

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature, top_p, continuing=False):
        plan = self._reuse_plan(prompts) if continuing and self._kept else None
        new_ids, attn, cache = self._inputs(prompts, plan)
        new, fed, cache, mask = self._decode(new_ids, attn, cache, max_new_tokens, temperature, top_p)
        self.generated_tokens += sum(len(row) for row in new)
        trimmed = [self._trim(row) for row in new]  # cut at the stop string (generate-to-max only)
        if self.reuse_cache:
            self._keep(prompts, trimmed, fed, cache, mask, attn.shape[1])
        return trimmed

    def release(self) -> None:
        """Drop the kept cache (its memory, and any chance of reusing it after a weight update)."""
        self._kept = None

    def load_weights(self) -> None:
        """After a policy update: the cache built with the old weights goes; a decoding copy takes the
        live model's new weights (cast to its dtype)."""
        self.release()
        if self.model is not self.source:
            self.model.load_state_dict(distributed.full_state_dict(self.source))  # every process, when sharded

    def sleep(self) -> None:
        """Before the update: the kept cache is the only memory this backend holds of its own."""
        self.release()

    def wake_up(self) -> None:
        """Nothing to do: the model is the trainer's own."""

    # Decoding. transformers' ``generate`` runs every row until the longest has stopped: in a tiny
    # rollout, half the rows' steps were spent on rows that had already stopped.

    def _decode(self, new_ids, attn, cache, max_new_tokens, temperature, top_p):
        """Greedy or sampled decoding. Returns each row's new tokens (ending at EOS or a stop string,
        inclusive), how many of them the cache holds, and the cache with its mask (all rows)."""
        device, batch = self.model.device, new_ids.shape[0]
        cache = cache if cache is not None else GrowingCache()
        attn = attn.to(device)
        positions = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)[:, -new_ids.shape[1]:]
        inputs, rows = new_ids.to(device), list(range(batch))  # rows[j]: the batch row of running row j
        warpers = ([TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
                   if temperature > 0 else [])
        new, fed, done, parked = [[] for _ in range(batch)], [0] * batch, [False] * batch, []
        logits = self._prefill(inputs, attn, positions, cache)
        for _ in range(max_new_tokens):
            picked = self._pick(logits, rows, batch, warpers)
            for j, r in enumerate(rows):
                if not done[r]:
                    new[r].append(picked[j])
                    done[r] = (picked[j] in self.eos_ids or len(new[r]) == max_new_tokens
                               or (self.stop_in_generate and self._ends_in_stop(new[r])))
            if all(done[r] for r in rows):
                break
            stopped = [j for j, r in enumerate(rows) if done[r]]
            if len(stopped) >= max(1, len(rows) // 4):  # a quarter of the batch idles: they leave it
                if self.reuse_cache:  # their states come back at the end, for the next turn
                    index = torch.tensor(stopped, device=device)
                    parked.append(([rows[j] for j in stopped], attn[index],
                                   [(layer.keys[index], layer.values[index]) for layer in cache.layers]))
                running = [j for j, r in enumerate(rows) if not done[r]]
                cache.batch_select_indices(torch.tensor(running, device=device))
                attn, positions, rows = attn[running], positions[running], [rows[j] for j in running]
            # Each row feeds its newest token; a row that stopped earlier feeds padding, masked out.
            feed = [(new[r][-1], 1) if fed[r] < len(new[r]) else (self.pad_id, 0) for r in rows]
            for r, (_, valid) in zip(rows, feed):
                fed[r] += valid
            inputs = torch.tensor([[token] for token, _ in feed], device=device)
            attn = torch.cat([attn, torch.tensor([[valid] for _, valid in feed], dtype=attn.dtype, device=device)], 1)
            positions = positions[:, -1:] + 1
            logits = self._forward(inputs, attn, positions, cache)
        if not self.reuse_cache:
            return new, fed, None, None
        return new, fed, *self._unpark(cache, attn, rows, parked, batch)

    def _forward(self, ids, attn, positions, cache) -> torch.Tensor:
        """The next-token logits of each row; the cache grows by ``ids``' columns."""
        return self.model(input_ids=ids, attention_mask=attn, position_ids=positions, past_key_values=cache,
                          use_cache=True, logits_to_keep=1).logits[:, -1].float()

    # The new tokens of a batch are left padded to the longest row's. In a tiny rollout that padding
    # was a large share of what the prefill computed, and the prefill a large share of the time
    # (docs/results.md, "Figures behind the code"), so rows of similar length are encoded together
    # and their caches joined afterwards.

    def _prefill(self, ids, attn, positions, cache) -> torch.Tensor:
        """Encode every row's new tokens into ``cache`` (in place); the last position's logits."""
        width, past = ids.shape[1], attn.shape[1] - ids.shape[1]
        groups = length_groups(attn[:, past:].sum(1).tolist(), self.prefill_groups)
        self.prefill_positions += sum(len(g) * w for g, w in groups)
        if len(groups) == 1:
            return self._forward(ids, attn, positions, cache)
        logits, joined = None, []
        for rows, w in groups:
            index = torch.tensor(rows, device=ids.device)
            part = GrowingCache()
            for layer in cache.layers:  # the rows' past columns
                part.layers.append(_GrowingLayer.holding(layer.keys[index], layer.values[index]))
            part_attn = torch.cat([attn[index, :past], attn[index, attn.shape[1] - w:]], 1)
            part_logits = self._forward(ids[index, width - w:], part_attn, positions[index, width - w:], part)
            if logits is None:
                logits = part_logits.new_empty(ids.shape[0], part_logits.shape[-1])
                # Keys and values each in their own dtype: under bf16 autocast a Llama layer's values
                # come out bf16 and its keys fp32 (rotary embeddings are applied in fp32).
                joined = [[states.new_zeros(ids.shape[0], states.shape[1], past + width, states.shape[3])
                           for states in (layer.keys, layer.values)] for layer in part.layers]
            logits[index] = part_logits
            for pair, layer in zip(joined, part.layers):  # each row: [past, padding, its own tokens]
                for whole, states in zip(pair, (layer.keys, layer.values)):
                    whole[index, :, :past] = states[:, :, :past]
                    whole[index, :, past + width - w:] = states[:, :, past:]
        cache.layers = [_GrowingLayer.holding(keys, values) for keys, values in joined]
        return logits

    def _pick(self, logits, rows, batch, warpers) -> list[int]:
        """The next token of each running row: argmax, or a sample drawn as ``generate`` draws it
        (same warpers, and one draw over the whole batch, rows that left included, so every row gets
        the random numbers it would get there, whoever has stopped)."""
        if not warpers:
            return logits.argmax(-1).tolist()
        scores = logits.new_zeros(batch, logits.shape[-1])
        scores[rows] = logits
        for warp in warpers:
            scores = warp(None, scores)
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)[rows].tolist()

    @staticmethod
    def _unpark(cache, attn, rows, parked, batch):
        """The cache and mask of the whole batch, in row order: rows that left early get their
        states back, padded on the right with masked columns."""
        if not parked:
            return cache, attn
        mask = attn.new_zeros(batch, attn.shape[1])
        mask[rows] = attn
        for left, left_mask, _ in parked:
            mask[left, : left_mask.shape[1]] = left_mask
        for i, layer in enumerate(cache.layers):
            for name in ("keys", "values"):
                states = getattr(layer, name)
                whole = states.new_zeros(batch, *states.shape[1:])
                whole[rows] = states
                for left, _, left_states in parked:
                    part = left_states[i][0 if name == "keys" else 1]
                    whole[left, :, : part.shape[2]] = part
                setattr(layer, name, whole)
        return cache, mask

    # A multi-turn rollout sends each row back with its generated tokens and a document block
    # appended. Re-encoding the whole context every turn encodes most tokens several times over
    # (docs/results.md, "Figures behind the code"), so the cache of the previous call is kept and
    # only each row's new tokens are encoded.

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
        """The tokens to encode (left padded), the attention mask over the cache and them, and the
        cache they continue (or None)."""
        if plan is None:
            self._kept = None
            return self._encode_shared_prefix(prompts)
        kept, self._kept = self._kept, None  # the cache is about to grow: never reuse it twice
        rows = [r for r, _ in plan]
        mask = kept["mask"][rows].clone()
        for j, (r, used) in enumerate(plan):
            mask[j, kept["columns"][r][used:]] = 0  # kept tokens this prompt does not repeat
        # Pack each row's kept columns to the right, in order, so the padding gaps of earlier turns
        # leave the cache. Keys already carry their rotary positions, so moving a column changes
        # nothing the model computes.
        width = int(mask.sum(1).max())
        order = torch.sort(mask, dim=1, stable=True).indices[:, mask.shape[1] - width:]
        cache = _gather_columns(kept["cache"], torch.tensor(rows), order, self.model.device)
        suffix_ids, suffix_mask = self._left_pad([p[used:] for p, (_, used) in zip(prompts, plan)])
        self.prefilled_tokens += int(suffix_mask.sum())
        return suffix_ids, torch.cat([mask.gather(1, order), suffix_mask], 1), cache

    # Every policy prompt opens with the same instruction (93 of a tiny prompt's ~110 tokens), so
    # a fresh batch encodes that prefix once and lets all rows attend to it, as vLLM's prefix
    # caching does. Rows then hold [prefix, padding, own tokens]: the mask hides the gap, and
    # positions count only unmasked tokens, so each row computes what it would alone.

    def _encode_shared_prefix(self, prompts):
        """The prompts' common prefix encoded once into a fresh cache (when worth it), and the
        rest of each prompt left padded, as ``_inputs`` returns them."""
        shared = len(os.path.commonprefix(prompts)) if self.share_prefix and len(prompts) > 1 else 0
        shared = min(shared, min(len(p) for p in prompts) - 1)  # every row keeps a token to encode
        if shared < MIN_SHARED_PREFIX:
            ids, attn = self._left_pad(prompts)
            self.prefilled_tokens += sum(len(p) for p in prompts)
            return ids, attn, None
        cache = GrowingCache()
        self.model(input_ids=torch.tensor([prompts[0][:shared]], device=self.model.device), past_key_values=cache,
                   use_cache=True, logits_to_keep=1)
        for layer in cache.layers:  # a view: the first decoding step copies it into each row's buffer
            layer.keys = layer.keys.expand(len(prompts), -1, -1, -1)
            layer.values = layer.values.expand(len(prompts), -1, -1, -1)
        suffix_ids, suffix_mask = self._left_pad([p[shared:] for p in prompts])
        self.prefilled_tokens += shared + int(suffix_mask.sum())
        prefix_mask = torch.ones(len(prompts), shared, dtype=suffix_mask.dtype)
        return suffix_ids, torch.cat([prefix_mask, suffix_mask], 1), cache

    def _left_pad(self, rows):
        width = max(len(p) for p in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, p in enumerate(rows):
            if p:
                ids[r, width - len(p):] = torch.tensor(p)
                attn[r, width - len(p):] = 1
        return ids, attn

    def _keep(self, prompts, trimmed, fed, cache, mask, width) -> None:
        """Remember the cache. Row j's k-th new token sits in column ``width + k`` once fed back;
        tokens cut off after a stop string are masked out."""
        mask = mask.cpu().clone()
        cached = [min(n, len(row)) for n, row in zip(fed, trimmed)]
        for j, n in enumerate(cached):
            mask[j, width + n:] = 0
        self._kept = {"cache": cache, "mask": mask, "columns": [m.nonzero().flatten().tolist() for m in mask],
                      "tokens": [p + row[:n] for p, row, n in zip(prompts, trimmed, cached)]}

    def _trim(self, row: list[int]) -> list[int]:
        """Cut after the first stop string or EOS."""
        for i, t in enumerate(row):
            if t in self.eos_ids or (self._may_end_stop(t) and self._ends_in_stop(row[: i + 1])):
                return row[: i + 1]
        return row

    def _ends_in_stop(self, row: list[int]) -> bool:
        """Does a stop string end in the last of these new tokens? That token may carry more text:
        Qwen3's tokenizer spells ``</search>`` and a blank line as ``</``, ``search``, ``>\n\n``, so
        the text need not *end* with the stop string. (Generation stops at the first one, so any
        stop string in the tail ends in its last token.) Decoded only when the last token can
        complete one (a cached per-token check), which is rare."""
        if not self._may_end_stop(row[-1]):
            return False
        tail = self.tokenizer.decode(row[-16:])
        return any(s in tail for s in self.stop_strings)

    def _may_end_stop(self, token_id: int) -> bool:
        """Cheap pre-check (cached per token): does this token's text hold the last character of a
        stop string (``>``), as the token that completes one must?"""
        if token_id not in self._ends:
            text = self.tokenizer.decode([token_id])
            self._ends[token_id] = any(s[-1] in text for s in self.stop_strings)
        return self._ends[token_id]


def length_groups(lengths: list[int], max_groups: int) -> list[tuple[list[int], int]]:
    """Rows split into at most ``max_groups`` groups of similar length, as (row indices, the
    group's longest length). Groups are runs of the rows sorted by length, cut where a cut saves
    the most padding, while a cut saves at least ``MIN_PREFILL_SAVING`` of the single call's
    positions and leaves groups of at least ``MIN_PREFILL_GROUP`` rows."""
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    cuts = [0, len(order)]  # group g is order[cuts[g]:cuts[g + 1]]
    while len(cuts) - 1 < max_groups:
        best = None
        for g in range(len(cuts) - 1):
            lo, hi = cuts[g], cuts[g + 1]
            for c in range(lo + MIN_PREFILL_GROUP, hi - MIN_PREFILL_GROUP + 1):
                # Rows lo..c-1 pad to lengths[order[c-1]] instead of the group's longest.
                saved = (c - lo) * (lengths[order[hi - 1]] - lengths[order[c - 1]])
                if best is None or saved > best[0]:
                    best = (saved, c)
        if best is None or best[0] < MIN_PREFILL_SAVING * len(lengths) * max(lengths):
            break
        cuts = sorted(cuts + [best[1]])
    if len(cuts) == 2:
        return [(list(range(len(lengths))), max(lengths))]
    return [(order[a:b], lengths[order[b - 1]]) for a, b in zip(cuts, cuts[1:])]


class _GrowingLayer(DynamicLayer):
    """A key/value cache layer that writes each step's keys and values into spare room of a
    buffer. transformers' ``DynamicLayer`` concatenates instead, copying the whole cache at every
    step: a sixth of a tiny rollout's time."""

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> "_GrowingLayer":
        """A layer that starts from these keys and values (its first update copies them)."""
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values, layer._room = keys, values, None
        return layer

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
            # Twice the room needed: copies stay rare, at the price of up to 2x the cache's memory.
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
