"""Step 2 (docs/method.md §6): trajectories -> labelled (query, documents) pairs -> the simulator's SFT set.

- v1: a trajectory that answered right (F1 or EM at least a threshold) makes all its calls'
  documents *useful*; a wrong one makes them *noisy*.
- v2: a judge looks at each (query, documents) and says whether they hold the answer:
  ``contains`` checks the answer string (exact for the tiny world, whose articles state facts
  verbatim) or, where the dataset names each question's supporting documents, one of those
  (``evidence``); ``llm`` asks a model.
- Pairs are deduplicated, optionally completed with each query's other label from the real
  engine (*paired* examples: same prompt but the keyword, so only the keyword and the answer in
  the prompt tell them apart), optionally joined by examples about invented entities (the
  tiny simulator learns to copy the answer from its prompt only from facts it cannot recall),
  and balanced.

``build_pairs`` runs the whole recipe for a profile, as notebook 02 does.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter

from .prompts import render_simulator_prompt, simulator_user_message
from .registry import Registry
from .reward import METRICS, normalize_answer
from .search import Doc, format_docs
from .simulator import contains_answer
from .tiny.world import RELATION_KEYWORDS, invented_world, load_entities


def label_trajectories(records: list[dict], metric: str = "f1", threshold: float = 0.5) -> list[dict]:
    """v1 labels: one pair per search call, useful when its trajectory answered right."""
    score = METRICS[metric]
    pairs = []
    for rec in records:
        correct = score(rec.get("answer"), rec["golden_answers"]) >= threshold
        for call in rec["calls"]:
            pairs.append({"question": rec["question"], "golden_answers": rec["golden_answers"],
                          "query": call["query"], "docs": [list(d) for d in call["docs"]],
                          "useful": correct, "source": "trajectory", "trajectory": rec["id"]})
    return pairs


def _docs(pair: dict) -> list[Doc]:
    return [Doc(t, x) for t, x in pair["docs"]]


def supporting_titles(rows: list[dict]) -> dict[str, set[str]]:
    """question -> titles of the documents its answer rests on, for datasets that record them
    (the tiny world, as HotpotQA records supporting facts); empty for the others."""
    return {r["question"]: set(r["supporting_titles"]) for r in rows if r.get("supporting_titles")}


def holds_evidence(docs: list[Doc], answers: list[str], titles: set[str] = frozenset()) -> bool:
    """The documents state an answer, or one of them is a supporting document (``titles``)."""
    return contains_answer(docs, answers) or any(d.title in titles for d in docs)


def judge_contains(pairs: list[dict], evidence: dict[str, set[str]] | None = None) -> list[bool]:
    """Useful when the documents state the answer or, with ``evidence`` (``supporting_titles``),
    hold a supporting document: a 2-hop question's first search finds the bridge entity, not the
    answer (option ``labeling.evidence``; on the tiny world it did not help, see docs/results.md)."""
    evidence = evidence or {}
    return [holds_evidence(_docs(p), p["golden_answers"], evidence.get(p["question"], set())) for p in pairs]


JUDGE_PROMPT = ("Question: {question}\nAnswer: {answer}\nDocuments:\n{docs}\n\n"
                "Do the documents contain the answer to the question? Reply with yes or no.")


def judge_llm(pairs: list[dict], backend, tokenizer, batch_size: int = 16, thinking: bool = False) -> list[bool]:
    """v2: ask a model, per (query, documents), whether the documents contain the answer
    (``thinking``: ``thinking.judge``; off, it answers in its first word)."""
    verdicts = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        prompts = [render_simulator_prompt(tokenizer, JUDGE_PROMPT.format(
            question=p["question"], answer=p["golden_answers"][0], docs=format_docs(_docs(p))), thinking) for p in chunk]
        out = backend.generate([tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts], 4, 0.0, 1.0)
        verdicts += [tokenizer.decode(o, skip_special_tokens=True).strip().lower().startswith("yes") for o in out]
    return verdicts


def apply_judge(pairs: list[dict], verdicts: list[bool]) -> list[dict]:
    """The judge's verdict replaces the v1 label; ``v1_useful`` keeps the old one for statistics."""
    return [{**p, "v1_useful": p["useful"], "useful": bool(v)} for p, v in zip(pairs, verdicts)]


def _key(p: dict) -> tuple:
    return (normalize_answer(p["question"]), normalize_answer(p["query"]))


def deduplicate(pairs: list[dict], max_same_docs: int = 2) -> list[dict]:
    """One pair per (question, query, label), and at most ``max_same_docs`` pairs per (documents,
    label): vague queries ("born year") fetch the same results again and again, and a simulator
    trained on those repeats learns to write them for any query."""
    seen, docs_seen, out = set(), Counter(), []
    for p in pairs:
        key = _key(p) + (p["useful"],)
        docs_key = (json.dumps(p["docs"]), p["useful"])
        if key not in seen and docs_seen[docs_key] < max_same_docs:
            seen.add(key)
            docs_seen[docs_key] += 1
            out.append(p)
    return out


def with_k_docs(pairs: list[dict], k: int) -> list[dict]:
    """Pairs with at least k documents, cut to k: the simulator is always asked for k, and
    shorter completions teach it to stop early."""
    return [{**p, "docs": p["docs"][:k]} for p in pairs if len(p["docs"]) >= k]


def useful_docs(engine, query: str, question: str, answers: list[str], k: int,
                titles: set[str] = frozenset()) -> list[Doc] | None:
    """The engine's results for the query, with a document holding the answer (or a supporting
    document, ``titles``) first, found with the question if the query misses it; None when the
    engine has none."""
    results, by_question = engine.search([query, question], 3 * k)
    holding = [d for d in results + by_question if holds_evidence([d], answers, titles)]
    if not holding:
        return None
    docs = [holding[0]]
    for d in results + by_question:  # the query's own results first, then the question's
        if d not in docs and len(docs) < k:
            docs.append(d)
    return docs


def noisy_docs(engine, query: str, answers: list[str], k: int, titles: set[str] = frozenset()) -> list[Doc] | None:
    """Related results for the query with every answer-bearing (or supporting) document removed."""
    results = engine.search([query], 4 * k)[0]
    kept = [d for d in results if not holds_evidence([d], answers, titles)][:k]
    return kept if len(kept) == k else None


def add_counterparts(pairs: list[dict], engine, k: int, evidence: dict[str, set[str]] | None = None) -> list[dict]:
    """For each (question, query) with one label, build the other from the real engine
    (``evidence``: as for ``judge_contains``)."""
    evidence = evidence or {}
    labels: dict[tuple, set] = {}
    for p in pairs:
        labels.setdefault(_key(p), set()).add(p["useful"])
    out, done = list(pairs), set()
    for p in pairs:
        key = _key(p)
        if len(labels[key]) == 2 or key in done:
            continue
        done.add(key)
        want_useful, titles = not p["useful"], evidence.get(p["question"], set())
        docs = (useful_docs(engine, p["query"], p["question"], p["golden_answers"], k, titles) if want_useful
                else noisy_docs(engine, p["query"], p["golden_answers"], k, titles))
        if docs:
            out.append({"question": p["question"], "golden_answers": p["golden_answers"], "query": p["query"],
                        "docs": [[d.title, d.text] for d in docs], "useful": want_useful, "source": "counterpart"})
    return out


def terse_query(row: dict, rng: random.Random) -> str:
    """The question itself, or (for tiny-world rows) the subject's name plus a relation keyword,
    the two query forms the policy base writes."""
    if "subject" in row and row.get("relation") in RELATION_KEYWORDS and rng.random() < 0.4:
        return f"{row['subject']} {RELATION_KEYWORDS[row['relation']]}"
    return row["question"]


def invented_pairs(questions: list[dict], articles: dict[str, dict], engine, n: int, k: int,
                   seed: int, real_titles: list[str]) -> list[dict]:
    """Paired examples about invented entities (``world.invented_world``): the useful documents
    start with the subject's article, which no model has seen; the rest are real articles
    without the answer. The real ones come from the engine for the query with the invented name
    swapped for a random real title: the query itself matches only its keywords, which would
    fetch the same few articles every time."""
    rng = random.Random(seed)
    picked = rng.sample(questions, min(n, len(questions)))
    queries = [terse_query(q, rng) for q in picked]
    results = engine.search([query.replace(q["subject"], rng.choice(real_titles))
                             for q, query in zip(picked, queries)], 2 * k)
    out = []
    for q, query, docs in zip(picked, queries, results):
        a = articles[q["subject"]]
        others = [[d.title, d.text] for d in docs if not contains_answer([d], q["golden_answers"])]
        rng.shuffle(others)
        base = {"question": q["question"], "golden_answers": q["golden_answers"], "query": query, "source": "invented"}
        out.append({**base, "docs": [[a["title"], a["text"]]] + others[: k - 1], "useful": True})
        if len(others) >= k:
            out.append({**base, "docs": others[:k], "useful": False})
    return out


def without_titles(pairs: list[dict], titles: set[str]) -> list[dict]:
    """Remove documents with these titles (e.g. the evaluation split's subjects, so the simulator
    is tested on entities its SFT set never showed). A pair left with no document, or a useful
    pair that loses its only answer-bearing document, is dropped."""
    out = []
    for p in pairs:
        kept = {**p, "docs": [d for d in p["docs"] if d[0] not in titles]}
        lost_answer = (p["useful"] and contains_answer(_docs(p), p["golden_answers"])
                       and not contains_answer(_docs(kept), p["golden_answers"]))
        if kept["docs"] and not lost_answer:
            out.append(kept)
    return out


def balance(pairs: list[dict], seed: int) -> list[dict]:
    """Drop random pairs of the larger label until useful and noisy are equally many."""
    rng = random.Random(seed)
    useful = [p for p in pairs if p["useful"]]
    noisy = [p for p in pairs if not p["useful"]]
    n = min(len(useful), len(noisy))
    keep = {id(p) for p in rng.sample(useful, n) + rng.sample(noisy, n)}
    return [p for p in pairs if id(p) in keep]


def lead_with_answer(pair: dict) -> dict:
    """A useful pair with its first answer-bearing document first, and that document's first
    answer-bearing sentence moved to its start: the simulator then states the answer right after
    the title, the easiest place to copy it to (option ``labeling.answer_first``)."""
    if not pair["useful"]:
        return pair
    docs = [list(d) for d in pair["docs"]]
    hit = next((i for i, d in enumerate(docs) if contains_answer([Doc(*d)], pair["golden_answers"])), None)
    if hit is None:
        return pair
    title, text = docs.pop(hit)
    sentences = [s for s in re.split(r"(?<=\.) ", text) if s]
    lead = next((i for i, s in enumerate(sentences) if contains_answer([Doc("", s)], pair["golden_answers"])), 0)
    sentences.insert(0, sentences.pop(lead))
    return {**pair, "docs": [[title, " ".join(sentences)]] + docs}


def sft_rows(pairs: list[dict], tokenizer, words_per_doc: int, thinking: bool = False) -> list[dict]:
    """Prompt/completion rows: the fine-tuned simulator prompt (k = the pair's number of
    documents) and the documents in the ``Doc i(Title: …)`` format as the completion. ``thinking``:
    ``thinking.simulator``, as the simulator will be prompted."""
    rows = []
    for p in pairs:
        docs = _docs(p)
        message = simulator_user_message(p["query"], p["question"], p["golden_answers"][0], p["useful"],
                                         k=len(docs), words=words_per_doc)
        rows.append({"prompt": render_simulator_prompt(tokenizer, message, thinking), "completion": format_docs(docs),
                     "useful": p["useful"], "question": p["question"], "query": p["query"],
                     "golden_answers": p["golden_answers"], "source": p["source"]})
    return rows


def statistics(pairs: list[dict]) -> dict:
    """Counts by label and source, and how often each label's documents hold the answer."""
    by = Counter((p["source"], "useful" if p["useful"] else "noisy") for p in pairs)
    holds = {lab: [contains_answer(_docs(p), p["golden_answers"]) for p in pairs if p["useful"] == (lab == "useful")]
             for lab in ("useful", "noisy")}
    return {"pairs": len(pairs), "by_source": {f"{s}/{lab}": n for (s, lab), n in sorted(by.items())},
            "answer_in_docs": {lab: sum(v) / max(1, len(v)) for lab, v in holds.items()}}


def heldout_triples(rows: list[dict], n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """(question, gold answers, query) triples for evaluating a simulator on questions whose
    subjects are not in its SFT set; 1-hop rows only when the rows say how many hops they take."""
    rng = random.Random(seed)
    pool = [r for r in rows if r.get("hops", 1) == 1 and r["question"] not in exclude]
    if "subject" in (pool[0] if pool else {}):
        pool = [r for r in pool if r["subject"] not in exclude]
    picked = rng.sample(pool, min(n, len(pool)))
    return [{**r, "query": terse_query(r, rng)} for r in picked]


def llm_judge(profile):
    """The ``llm`` judge's (backend, tokenizer): ``labeling.judge_model``, or the simulator base."""
    from .generation.models import load_causal_lm  # here, not at the top: torch and transformers load only for the llm judge
    from .generation.backends import backend_for

    model, tokenizer = load_causal_lm(profile.labeling.judge_model or profile.simulator_path, profile.models.dtype)
    return backend_for(profile, model, tokenizer, ["\n"]), tokenizer


# ``labeling.judge``: the v2 verdict per pair, from (profile, pairs, supporting titles by question,
# the llm judge's (backend, tokenizer) or None to build it); ``none`` keeps the v1 labels.
JUDGES = Registry("labeling.judge", {
    "none": None,
    "contains": lambda profile, pairs, evidence, llm: judge_contains(pairs, evidence),
    "llm": lambda profile, pairs, evidence, llm: judge_llm(pairs, *(llm or llm_judge(profile)),
                                                           thinking=profile.thinking.judge),
})


def build_pairs(profile, records: list[dict], engine, judge=None) -> tuple[list[dict], dict]:
    """The whole labelling recipe of a profile (its ``labeling`` section): v1 labels from the
    trajectory ``records`` (``collect.read_trajectories``), the judge (none / contains / llm),
    deduplication, counterparts from the real ``engine`` (``paired``), invented-entity pairs
    (``invented``), on the tiny profile the removal of the test split's subjects' articles (the
    simulator is evaluated on them), k = ``simulator.topk`` documents per pair, balancing, a
    sample of at most ``max_pairs``, and ``answer_first``.

    ``judge``: the llm judge's (backend, tokenizer); None builds it with ``llm_judge``.
    Returns (pairs, info): info holds ``v1`` and ``final`` (``statistics``), ``judge_changed``
    (labels the judge changed, None without a judge), ``judged`` (pairs judged) and ``deduplicated``
    (pairs after deduplication)."""
    from .data import load_for_profile, sample_questions  # here, not at the top: data loads datasets

    L, k = profile.labeling, profile.simulator.topk
    pairs = label_trajectories(records, L.metric, L.threshold)
    info = {"v1": statistics(pairs), "judge_changed": None, "judged": len(pairs)}
    # Questions' supporting documents (the tiny world's, or a multi-hop set's) count as evidence too.
    evidence = (supporting_titles(sample_questions(profile, profile.data.train_sets, "train", 10 ** 9, profile.seed))
                if L.evidence else {})
    verdicts = JUDGES[L.judge]
    if verdicts is not None:
        pairs = apply_judge(pairs, verdicts(profile, pairs, evidence, judge))
        info["judge_changed"] = sum(p["useful"] != p["v1_useful"] for p in pairs)
    pairs = deduplicate(pairs)
    info["deduplicated"] = len(pairs)

    if L.paired:
        pairs = add_counterparts(pairs, engine, k, evidence)
    if L.invented:
        taken = {e["name"] for e in load_entities(profile.data_dir / "entities.jsonl")}
        questions, articles = invented_world(profile.world, seed=profile.seed + 1000, taken=taken)
        pairs += invented_pairs(questions, articles, engine, L.invented, k, seed=profile.seed, real_titles=sorted(taken))
    # The simulator is evaluated (notebook 03) on test-split subjects: keep their articles out of its SFT set.
    if profile.tiny_world:
        held_out = {r["subject"] for r in load_for_profile(profile, "tiny", "test").to_list()}
        pairs = without_titles(pairs, held_out)
    pairs = with_k_docs(pairs, k)
    if L.balance:
        pairs = balance(pairs, seed=profile.seed)
    pairs = random.Random(profile.seed).sample(pairs, min(L.max_pairs, len(pairs)))
    if L.answer_first:
        pairs = [lead_with_answer(p) for p in pairs]
    info["final"] = statistics(pairs)
    return pairs, info
