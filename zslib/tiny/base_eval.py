"""Notebook 00's look at the tiny policy base: scores with and without search, and the margin of its
first decision (search, or answer from memory) per relation."""

from __future__ import annotations

import torch

from ..evaluate import evaluate_policy, heldout_questions
from ..generation.backends import backend_for
from ..prompts import render_policy_prompt
from ..reward import exact_match
from ..rollout import engine_search_fn
from ..search import NullEngine
from .recipes import MEMORY_DECISION, SEARCH_DECISION, first_thought

@torch.no_grad()
def decision_margins(model, tokenizer, rows: list[dict], batch_size: int = 64,
                     enable_thinking: bool = True) -> list[float]:
    """log p(search) - log p(answer from memory) at the base's first decision, in nats, per row: the
    demonstrations' two first-turn openings (``first_thought`` then ``SEARCH_DECISION`` or
    ``MEMORY_DECISION``) scored after the row's prompt. Above 0 the model prefers to search.

    A margin of a few tenths of a nat is a coin that a CPU's rounding can toss; a recipe should give
    a clear one, of either sign, that depends on the question.
    """
    seqs, starts = [], []
    for q in rows:
        prompt = tokenizer(render_policy_prompt(tokenizer, q["question"], enable_thinking), add_special_tokens=False)["input_ids"]
        for decision in (SEARCH_DECISION, MEMORY_DECISION):
            seqs.append(prompt + tokenizer(first_thought(q) + decision, add_special_tokens=False)["input_ids"])
            starts.append(len(prompt))
    totals = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        ids = torch.full((len(chunk), max(map(len, chunk))), tokenizer.pad_token_id, dtype=torch.long)
        for r, seq in enumerate(chunk):  # right padding: causal attention keeps it out of real tokens
            ids[r, :len(seq)] = torch.tensor(seq)
        ids = ids.to(model.device)
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
        token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1).cpu()
        totals += [token_logp[r, starts[i + r] - 1:len(seq) - 1].sum().item() for r, seq in enumerate(chunk)]
    return [totals[2 * j] - totals[2 * j + 1] for j in range(len(rows))]


def evaluate_base(profile, model, tokenizer, engine, rows: list[dict] | None = None,
                  temperatures: tuple[float, ...] = (0.0, 1.0)) -> dict:
    """Notebook 00's look at the policy base on the held-out 1-hop questions, and the figures its
    checks read (``checks.base``).

    - ``settings``: scores at each of ``temperatures`` (greedy first), with the engine and with one
      that returns nothing;
    - ``by_relation``: per relation, greedy with the engine: questions, EM, searched share, and the
      mean and smallest decision margin (``decision_margins``), and whether it is a memory relation;
    - ``figures``: the bars' inputs (names as in ``checks.FIGURES["base"]``).
    """
    rows = rows if rows is not None else heldout_questions(profile)
    backend = backend_for(profile, model, tokenizer)
    settings, greedy = {}, None
    for name, eng in (("bm25", engine), ("no search", NullEngine())):
        for temperature in temperatures:
            key = f"{name}, T={temperature:g}"
            settings[key], trajs = evaluate_policy(backend, tokenizer, rows, engine_search_fn(eng, profile.search.topk),
                                                   profile.rollout, temperature, desc=key,
                                                   enable_thinking=profile.thinking.policy)
            if name == "bm25" and temperature == 0.0:
                greedy = trajs
    margins = decision_margins(model, tokenizer, rows, enable_thinking=profile.thinking.policy)
    # The relations the base was taught to answer from memory: the tiny base's, or a warm-up's
    taught = profile.tiny if profile.is_tiny else profile.warmup
    memory = set(taught.memory_relations) if taught.memory_demos > 0 else set()
    by_relation: dict[str, dict] = {}
    for q, t, m in zip(rows, greedy, margins):
        r = by_relation.setdefault(q["relation"], {"n": 0, "em": 0.0, "searched_share": 0.0, "margins": [],
                                                   "memory": q["relation"] in memory})
        r["n"] += 1
        r["em"] += exact_match(t.answer, t.golden_answers)
        r["searched_share"] += bool(t.calls)
        r["margins"].append(m)
    for r in by_relation.values():
        r["em"] /= r["n"]
        r["searched_share"] /= r["n"]
        found = r.pop("margins")
        r["margin_mean"], r["margin_min"] = sum(found) / len(found), min(found)
    by_relation = dict(sorted(by_relation.items()))
    search_rel = [r for r in by_relation.values() if not r["memory"]]
    memory_rel = [r for r in by_relation.values() if r["memory"]]
    figures = {
        "well_formed_first_action": settings["bm25, T=0"]["well_formed_first_action"],
        "em_bm25": settings["bm25, T=0"]["em"],
        "em_no_search": settings["no search, T=0"]["em"],
        "searched_share_search_relations": (sum(r["searched_share"] * r["n"] for r in search_rel)
                                            / max(1, sum(r["n"] for r in search_rel))),
        "margin_search_relations": min((r["margin_mean"] for r in search_rel), default=float("nan")),
    }
    # None (not checked) when the profile has no memory relations
    figures["margin_memory_relations"] = max((r["margin_mean"] for r in memory_rel), default=None)
    return {"settings": settings, "by_relation": by_relation, "figures": figures}
