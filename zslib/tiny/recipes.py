"""What the tiny bases are trained on (docs/method.md §12): packed texts, copy drills, answer drills and
the scripted demonstrations of the search protocol.

- ``simulator_corpus``: every article, plus ``Doc i(Title: …)`` result blocks, so the simulator base
  knows the whole world and the document format before any SFT;
- ``policy_examples``: part of the train-split articles plus demonstrations by a scripted,
  deliberately imperfect agent (``scripted_demos``). Most demonstrations are about entities whose
  articles the policy never reads outside ``<information>``, so it learns to copy names from the
  documents instead of recalling them;
- ``copy_drills`` and ``answer_drills``: copying invented names, years and titles, the skill both
  bases need most.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..prompts import information_block, render_policy_prompt
from ..search import Doc, SearchEngine
from .tokenizer import PAD
from .world import RELATION_KEYWORDS, RELATION_TOPICS, RELATIONS, TITLE_WORDS, Namer, invented_world

@dataclass
class Example:
    """Token ids and a 0/1 mask of the tokens that carry loss."""
    ids: list[int]
    mask: list[int]


def pack_texts(tokenizer, texts: list[str], max_len: int, seed: int) -> list[Example]:
    """Shuffle and pack plain texts into sequences of at most ``max_len`` tokens (full loss)."""
    rng = random.Random(seed)
    texts = list(texts)
    rng.shuffle(texts)
    eos = tokenizer.convert_tokens_to_ids(PAD)
    out, cur = [], []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        piece = ids[: max_len - 1] + [eos]
        if cur and len(cur) + len(piece) > max_len:
            out.append(Example(cur, [1] * len(cur)))
            cur = []
        cur = cur + piece
    if cur:
        out.append(Example(cur, [1] * len(cur)))
    return out


def segments_to_example(tokenizer, segments: list[tuple[str, bool]]) -> Example:
    """Tokenize each segment on its own, as a rollout concatenates them (ids, never re-rendered)."""
    ids, mask = [], []
    for text, trained in segments:
        seg = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += seg
        mask += [int(trained)] * len(seg)
    return Example(ids, mask)


def simulator_corpus(tokenizer, articles: list[dict], questions: list[dict], engine: SearchEngine,
                     max_len: int, seed: int, doc_blocks: int = 3000, topk: int = 5,
                     extra_texts: list[str] = ()) -> list[Example]:
    """All articles (several shuffles) and result blocks in the document format: the simulator
    knows every question's answer, like a large LLM knows Wikipedia."""
    rng = random.Random(seed)
    texts = [f"{a['title']}\n{a['text']}" for a in articles]
    picked = rng.sample(questions, min(doc_blocks, len(questions)))
    queries = [q["question"] if rng.random() < 0.5 else q["subject"] for q in picked]
    results = engine.search(queries, topk)
    blocks = [information_block(docs).strip() for docs in results if docs]
    return pack_texts(tokenizer, texts * 3 + blocks + list(extra_texts), max_len, seed)


def answer_drills(world_cfg, taken: set[str], n: int, seed: int) -> list[str]:
    """A question and its answer, then the subject's article, about invented entities.

    The article's facts are new, so the model predicts the answer inside it only by finding it
    in the line above: the skill a simulator needs to write a useful document from its prompt,
    which the main corpus cannot teach (every article there can be recalled).
    """
    questions, articles = invented_world(world_cfg, seed, taken)
    picked = random.Random(seed).sample(questions, min(n, len(questions)))
    return [f"Question: {q['question']} Answer: {q['golden_answers'][0]}\n"
            f"Doc 1(Title: {q['subject']}) {articles[q['subject']]['text']}" for q in picked]


# The two ways a demonstration's first turn goes on after its first thought: the policy base's one
# decision that RL works on, measured by ``decision_margins``.
SEARCH_DECISION = " I need to search for this. </think>\n<search>"
MEMORY_DECISION = " I think I know this. </think>\n<answer>"


def first_thought(q: dict) -> str:
    """What every demonstration thinks first: what the question asks for ("<think> This asks for a
    birthplace."), named by its last relation.

    Without it the decision to search came right after "<think> I", and a base trained on the
    same recipe on another CPU never searched: the decision had to read the relation from the
    question across the whole prompt, and the base had learned only the share of demonstrations
    that answer from memory (the same small margin toward memory for every relation: docs/results.md,
    "Figures behind the code"). Naming the relation first makes the decision depend on the words
    just before it.
    """
    return f"<think> This asks for {RELATION_TOPICS[q['relation'].split('/')[-1]]}."


# A second-hop query asks the bridge entity the question of the second relation.
_SECOND_HOP = {r: t for r, (_, _, t, _) in RELATIONS.items()}


def _answer_in(docs: list[Doc], answer: str) -> bool:
    return any(answer in d.text for d in docs)


def _wrong_pick(docs: list[Doc], relation: str, answer: str, entities_by_name: dict,
                rng: random.Random) -> tuple[str, str] | None:
    """(subject, object) of the same relation in another retrieved document: a plausible misreading."""
    options = [(d.title, entities_by_name[d.title]["facts"][relation]) for d in docs
               if relation in entities_by_name.get(d.title, {}).get("facts", {})]
    options = [o for o in options if o[1] != answer]
    return rng.choice(options) if options else None


def scripted_demos(tokenizer, questions: list[dict], engine: SearchEngine, entities_by_name: dict,
                   known: set[str], topk: int, seed: int, per_question: int,
                   train_docs: bool = False, memory_relations=(), memory_demos: int = 0,
                   guess_loss: bool = True, restate_topic: bool = False,
                   enable_thinking: bool = True) -> list[Example]:
    """Demonstrations of the protocol with mistakes: no search, poor queries, wrong picks.

    The assistant's turns carry loss, the prompt never does. With ``train_docs`` the
    <information> blocks carry loss too: articles repeat their subject's name, so predicting
    them is copying practice, the skill the policy needs most (it must copy unseen names from
    the question into its query and from the documents into its answer).

    With ``guess_loss=False`` a name or year the agent guesses (it could not know it) carries no
    loss: only what it copied or recalled does, so guesses do not teach the model that any name of
    the right type may follow ``<answer>``.

    A question whose last relation is in ``memory_relations`` also gets ``memory_demos`` more
    demonstrations that answer without a search. The guess is right only for a 1-hop question
    about an entity the policy read about, so on held-out questions it is a wrong guess that RL
    can fix only by searching.
    """
    rng = random.Random(seed)
    plans = []
    for q in questions:
        for _ in range(per_question):
            u = rng.random()
            style = ("no_search" if u < 0.08 else "poor_query" if u < 0.18 else
                     "wrong_pick" if u < 0.24 else "good")
            plans.append((q, style))
    # Batch every first query through the engine at once: bm25s is fast on batches.
    first_queries = []
    for q, style in plans:
        if style == "poor_query":
            first_queries.append(RELATION_KEYWORDS[q["relation"].split("/")[0]] + " " + rng.choice(["name", "place", "year", "who"]))
        elif rng.random() < 0.6:
            first_queries.append(q["question"])
        else:
            first_queries.append(f"{q['subject']} {RELATION_KEYWORDS[q['relation'].split('/')[0]]}")
    first_results = engine.search(first_queries, topk)

    out = []
    for (q, style), query, docs in zip(plans, first_queries, first_results):
        answer, subject = q["golden_answers"][0], q["subject"]
        relations = q["relation"].split("/")
        prompt = render_policy_prompt(tokenizer, q["question"], enable_thinking)
        segs: list[tuple[str, bool]] = [(prompt, False)]
        if style == "no_search":
            out.append(_memory_demo(tokenizer, q, known, entities_by_name, rng, guess_loss, enable_thinking))
            continue
        segs.append((first_thought(q) + SEARCH_DECISION + " " + query + " </search>", True))
        # Later thoughts open with the same sentence when tiny.restate_topic: whether to answer or to
        # search the bridge entity then depends on words a few tokens back, not a turn back.
        again = first_thought(q) if restate_topic else "<think>"
        segs.append((information_block(docs), train_docs))
        if q["hops"] == 2:
            bridge = entities_by_name[subject]["facts"][relations[0]]
            if bridge in " ".join(d.text for d in docs):
                q2 = _SECOND_HOP[relations[1]].format(s=bridge) if rng.random() < 0.6 else f"{bridge} {RELATION_KEYWORDS[relations[1]]}"
                docs = engine.search([q2], topk)[0]
                segs.append((f"{again} {_evidence(subject, relations[0], bridge)} Now I need to search for {bridge}. </think>\n"
                             f"<search> {q2} </search>", True))
                segs.append((information_block(docs), train_docs))
            subject = bridge  # the answer is a fact of the bridge entity
        if not _answer_in(docs, answer) and rng.random() < 0.7:
            retry = q["question"] if query != q["question"] else subject
            docs = engine.search([retry], topk)[0]
            segs.append((f"{again} The answer is not here. I will search again. </think>\n<search> {retry} </search>", True))
            segs.append((information_block(docs), train_docs))
        if _answer_in(docs, answer):
            # Quote the sentence that answers, then the answer: each step is a short copy.
            said, pick = subject, answer
            if style == "wrong_pick" and q["hops"] == 1:
                misread = _wrong_pick(docs, relations[-1], answer, entities_by_name, rng)
                if misread:
                    said, pick = misread
            segs.append((f"{again} {_evidence(said, relations[-1], pick)} </think>\n<answer> {pick} </answer>{tokenizer.eos_token}", True))
        else:
            guess = _random_same_type(answer, entities_by_name, rng)
            segs += [(f"{again} I could not find it, so I will guess. </think>\n<answer>", True), (f" {guess}", guess_loss),
                     (f" </answer>{tokenizer.eos_token}", True)]
        out.append(segments_to_example(tokenizer, segs))
    # Drawn from a generator of their own, so the demonstrations above stay exactly as they are
    # without memory relations: the base keeps every skill, and only its choice to search changes.
    memory_rng = random.Random(seed + 1)
    for q in questions:
        if q["relation"].split("/")[-1] in memory_relations:
            out += [_memory_demo(tokenizer, q, known, entities_by_name, memory_rng, guess_loss, enable_thinking)
                    for _ in range(memory_demos)]
    return out


def _memory_demo(tokenizer, q: dict, known: set[str], entities_by_name: dict, rng: random.Random,
                 guess_loss: bool = True, enable_thinking: bool = True) -> Example:
    """An answer without a search: right only for a 1-hop question about an entity the policy read
    about (recalled, so it carries loss); otherwise a guess, with loss only if ``guess_loss``."""
    answer = q["golden_answers"][0]
    recalled = q["subject"] in known and q["hops"] == 1
    guess = answer if recalled else _random_same_type(answer, entities_by_name, rng)
    return segments_to_example(tokenizer, [(render_policy_prompt(tokenizer, q["question"], enable_thinking), False),
                                           (f"{first_thought(q)}{MEMORY_DECISION}", True),
                                           (f" {guess}", recalled or guess_loss), (f" </answer>{tokenizer.eos_token}", True)])


def _evidence(subject: str, relation: str, obj: str) -> str:
    """The article sentence stating the fact, as the policy quotes it in <think>."""
    return RELATIONS[relation][3].format(s=subject, o=obj)


def _random_same_type(answer: str, entities_by_name: dict, rng: random.Random) -> str:
    if answer.isdigit():
        return str(rng.randint(1780, 2020))
    kind = entities_by_name[answer]["type"] if answer in entities_by_name else None
    pool = [n for n, e in entities_by_name.items() if e["type"] == kind] or list(entities_by_name)
    return rng.choice(pool)


def copy_drills(tokenizer, n: int, seed: int, number_share: float = 0.0, title_share: float = 0.0) -> list[Example]:
    """Lists of freshly invented names, then the same list again; only the repeat carries loss.

    Predicting the repeat is pure copying (the names are new each time, so nothing can be
    recalled). A short warm-up on these grows the attention circuit (induction heads) that the
    policy needs to copy unseen names into its queries and answers; demonstrations alone grow
    it too slowly for a CPU budget (a probe, docs/method.md §12).

    With ``number_share`` > 0 that share of the items are years. Year tokens (" 180", " 195", …)
    occur in identical contexts, so a model that never had to reproduce one exactly keeps them
    nearly interchangeable and cannot copy them: the first simulator base copied names from the
    line above and years only by chance, and fine-tuning did not fix it. The same
    holds for the common words of book and film titles ("Harbor", "Orchard"): with ``title_share`` >
    0 that share of the other items are titles. A policy base without both copied no years and wrote
    "The Last Signal of Fashax" for "The Last Orchard of Hustax" in its queries (docs/results.md, "Figures
    behind the code").
    """
    rng = random.Random(seed)
    namer = Namer(rng)
    adjectives, nouns = TITLE_WORDS

    def item() -> str:
        # (no draw for a share of 0: name-only drills stay exactly as their seed makes them)
        if number_share and rng.random() < number_share:
            return str(rng.randint(1700, 2030))
        if title_share and rng.random() < title_share:
            adjective, noun, place = rng.choice(adjectives), rng.choice(nouns), namer.word(2, 2)
            return f"The {adjective} {noun} of {place}" if rng.random() < 0.5 else f"{adjective} {noun} in {place}"
        return namer.word(2, 2) + (" " + namer.word(2, 2) if rng.random() < 0.5 else "")

    drills = []
    for _ in range(n):
        items = [item() for _ in range(rng.randint(2, 5))]
        listing = ", ".join(items)
        first = tokenizer(listing + "\n", add_special_tokens=False)["input_ids"]
        repeat = tokenizer(listing, add_special_tokens=False)["input_ids"]
        drills.append(Example(first + repeat, [0] * len(first) + [1] * len(repeat)))
    return drills


def known_subjects(train_rows: list[dict], fraction: float, seed: int) -> set[str]:
    """The train-split entities whose articles the policy reads in pretraining."""
    subjects = sorted({r["subject"] for r in train_rows})
    return set(random.Random(seed).sample(subjects, int(len(subjects) * fraction)))


def policy_examples(profile, tokenizer, engine, articles: list[dict], entities: list[dict],
                    train_rows: list[dict]) -> list[Example]:
    """Known train-split articles, scripted demonstrations, and copy drills to keep that skill."""
    cfg = profile.tiny  # tiny.memory_relations and memory_demos were checked when the profile loaded
    known = known_subjects(train_rows, cfg.known_fraction, profile.seed)
    by_name = {e["name"]: e for e in entities}
    known_texts = [f"{a['title']}\n{a['text']}" for a in articles if a["title"] in known]
    examples = pack_texts(tokenizer, known_texts * 2, max_len=256, seed=profile.seed)
    examples += scripted_demos(tokenizer, train_rows, engine, by_name, known, profile.search.topk,
                               seed=profile.seed, per_question=cfg.demos_per_question,
                               train_docs=cfg.demo_loss_on_information,
                               memory_relations=cfg.memory_relations, memory_demos=cfg.memory_demos,
                               guess_loss=cfg.guess_loss, restate_topic=cfg.restate_topic,
                               enable_thinking=profile.thinking.policy)
    return examples + copy_drills(tokenizer, cfg.copy_drills, profile.seed + 8, cfg.copy_years, cfg.copy_titles)
