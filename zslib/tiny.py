"""The tiny offline profile's tokenizer and Qwen3-architecture base models (docs/method.md §12).

- ``train_tokenizer``: byte-level BPE (~1k merges, so unseen names split like seen ones),
  the protocol tags as atomic tokens, wrapped as a transformers tokenizer with a
  Qwen-style chat template. Nothing downstream relies on the tags being single tokens.
- ``build_model``: a ``Qwen3Config`` of a few million parameters.
- ``simulator_corpus``: every article, plus ``Doc i(Title: …)`` result blocks, so the
  simulator base knows the whole world and the document format before any SFT.
- ``policy_corpus``: part of the train-split articles plus demonstrations of the search
  protocol by a scripted, deliberately imperfect agent. Most demonstrations are about
  entities whose articles the policy never reads outside <information>, so it learns to copy
  names from the documents instead of recalling them.
- ``pretrain``: a plain causal-LM loop on the CPU with a progress bar and a JSONL loss log.
Both bases are saved with ``save_pretrained`` and loaded back only through the Auto classes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError
from .progress import tqdm
from .prompts import TAGS, information_block, render_policy_prompt
from .search import Doc, SearchEngine
from .world import RELATION_KEYWORDS, RELATION_TOPICS, RELATIONS, TITLE_WORDS, Namer, invented_world

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD, EOS = "<|endoftext|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], merges: int, out_dir: str | Path):
    """Byte-level BPE with ``merges`` merges; saved so ``AutoTokenizer`` loads it like a hub one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + len(SPECIAL_TOKENS) + merges,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   padding_side="left", chat_template=CHAT_TEMPLATE)
    fast.add_tokens(list(TAGS))  # atomic here; Qwen3 spells them with several tokens
    fast.save_pretrained(str(out_dir))
    return fast


# ---------------------------------------------------------------- models

def build_model(tokenizer, cfg, seed: int):
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_positions, tie_word_embeddings=True, rope_theta=10000.0,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(EOS), tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id)
    return model


# ---------------------------------------------------------------- training examples

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
    that answer from memory (+0.2 nats toward memory for every relation). Naming the relation
    first makes the decision depend on the words just before it.
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
                   guess_loss: bool = True, restate_topic: bool = False) -> list[Example]:
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
        prompt = render_policy_prompt(tokenizer, q["question"])
        segs: list[tuple[str, bool]] = [(prompt, False)]
        if style == "no_search":
            out.append(_memory_demo(tokenizer, q, known, entities_by_name, rng, guess_loss))
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
            segs.append((f"{again} {_evidence(said, relations[-1], pick)} </think>\n<answer> {pick} </answer>{EOS}", True))
        else:
            guess = _random_same_type(answer, entities_by_name, rng)
            segs += [(f"{again} I could not find it, so I will guess. </think>\n<answer>", True), (f" {guess}", guess_loss),
                     (f" </answer>{EOS}", True)]
        out.append(segments_to_example(tokenizer, segs))
    # Drawn from a generator of their own, so the demonstrations above stay exactly as they are
    # without memory relations: the base keeps every skill, and only its choice to search changes.
    memory_rng = random.Random(seed + 1)
    for q in questions:
        if q["relation"].split("/")[-1] in memory_relations:
            out += [_memory_demo(tokenizer, q, known, entities_by_name, memory_rng, guess_loss)
                    for _ in range(memory_demos)]
    return out


def _memory_demo(tokenizer, q: dict, known: set[str], entities_by_name: dict, rng: random.Random,
                 guess_loss: bool = True) -> Example:
    """An answer without a search: right only for a 1-hop question about an entity the policy read
    about (recalled, so it carries loss); otherwise a guess, with loss only if ``guess_loss``."""
    answer = q["golden_answers"][0]
    recalled = q["subject"] in known and q["hops"] == 1
    guess = answer if recalled else _random_same_type(answer, entities_by_name, rng)
    return segments_to_example(tokenizer, [(render_policy_prompt(tokenizer, q["question"]), False),
                                           (f"{first_thought(q)}{MEMORY_DECISION}", True),
                                           (f" {guess}", recalled or guess_loss), (f" </answer>{EOS}", True)])


@torch.no_grad()
def decision_margins(model, tokenizer, rows: list[dict], batch_size: int = 64) -> list[float]:
    """log p(search) - log p(answer from memory) at the base's first decision, in nats, per row: the
    demonstrations' two first-turn openings (``first_thought`` then ``SEARCH_DECISION`` or
    ``MEMORY_DECISION``) scored after the row's prompt. Above 0 the model prefers to search.

    A margin of a few tenths of a nat is a coin that a CPU's rounding can toss; a recipe should give
    a clear one, of either sign, that depends on the question.
    """
    seqs, starts = [], []
    for q in rows:
        prompt = tokenizer(render_policy_prompt(tokenizer, q["question"]), add_special_tokens=False)["input_ids"]
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


def evaluate_base(profile, model, tokenizer, engine, rows: list[dict] | None = None) -> dict:
    """Notebook 00's look at the policy base on the held-out 1-hop questions, and the figures its
    checks read (``checks.base``).

    - ``settings``: scores greedy and at T=1, with the engine and with one that returns nothing;
    - ``by_relation``: per relation, greedy with the engine: questions, EM, searched share, and the
      mean and smallest decision margin (``decision_margins``), and whether it is a memory relation;
    - ``figures``: the bars' inputs (names as in ``checks.FIGURES["base"]``).
    """
    from .evaluate import evaluate_policy, heldout_questions
    from .backends import backend_for
    from .rollout import engine_search_fn
    from .reward import exact_match
    from .search import NullEngine

    rows = rows if rows is not None else heldout_questions(profile)
    backend = backend_for(profile, model, tokenizer)
    settings, greedy = {}, None
    for name, eng in (("bm25", engine), ("no search", NullEngine())):
        for temperature in (0.0, 1.0):
            key = f"{name}, T={temperature:g}"
            settings[key], trajs = evaluate_policy(backend, tokenizer, rows, engine_search_fn(eng, profile.search.topk),
                                                   profile.rollout, temperature, desc=key)
            if name == "bm25" and temperature == 0.0:
                greedy = trajs
    margins = decision_margins(model, tokenizer, rows)
    memory = set(profile.tiny.memory_relations) if profile.tiny.memory_demos > 0 else set()
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
    it too slowly for a CPU budget (a probe: 25% of test queries copied after 500 steps).

    With ``number_share`` > 0 that share of the items are years. Year tokens (" 180", " 195", …)
    occur in identical contexts, so a model that never had to reproduce one exactly keeps them
    nearly interchangeable and cannot copy them: the first simulator base copied a name from the
    line above 82% of the time and a year 6% (chance), and fine-tuning did not fix it. The same
    holds for the common words of book and film titles ("Harbor", "Orchard"): with ``title_share`` >
    0 that share of the other items are titles. A policy base without both copied 0% of the years
    and wrote "The Last Signal of Fashax" for "The Last Orchard of Hustax" in its queries.
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


# ---------------------------------------------------------------- pretraining loop

def _batches(examples: list[Example], batch_tokens: int, rng: random.Random,
             width_multiple: int = 64) -> list[tuple[int, list[Example]]]:
    """(width, examples) batches of about ``batch_tokens`` padded tokens, in random order.

    Examples are bucketed by length rounded up to ``width_multiple`` and every batch of a bucket
    is padded to that width, so training sees only a few tensor shapes. (With a new shape at
    nearly every step, CPU bf16 autocast kept growing memory: notebook 00 peaked at 6 GB, now 2.)
    """
    buckets: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        buckets.setdefault(-(-len(e.ids) // width_multiple) * width_multiple, []).append(i)
    batches = []
    for width, members in sorted(buckets.items()):
        rng.shuffle(members)
        rows = max(1, batch_tokens // width)
        batches += [(width, members[k:k + rows]) for k in range(0, len(members), rows)]
    rng.shuffle(batches)
    return [(width, [examples[i] for i in b]) for width, b in batches]


def _collate(batch: list[Example], pad_id: int, width: int | None = None) -> dict:
    width = width or max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for r, e in enumerate(batch):  # right padding: positions start at 0 as in generation
        n = len(e.ids)
        ids[r, :n] = torch.tensor(e.ids)
        attn[r, :n] = 1
        m = torch.tensor(e.mask, dtype=torch.bool)
        labels[r, :n] = torch.where(m, ids[r, :n], torch.full_like(ids[r, :n], -100))
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def pretrain(model, examples: list[Example], steps: int, cfg, log_path: str | Path, seed: int,
             desc: str = "pretrain", phase: str | None = None, after: list[dict] | None = None) -> list[dict]:
    """AdamW with warm-up and cosine decay; one JSON line per step in ``log_path``.

    A later phase passes the earlier phase's log rows as ``after``: its steps, tokens and
    seconds continue from there and its rows are appended to the same log.
    """
    last = after[-1] if after else {"step": 0, "tokens": 0, "seconds": 0.0}
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pad_id = model.config.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    queue: list[tuple[int, list[Example]]] = []
    history, seen_tokens, start = [], 0, time.time()
    with open(log_path, "a" if after else "w") as log, tqdm(total=steps, desc=desc) as bar:
        for step in range(steps):
            if not queue:
                queue = _batches(examples, cfg.batch_tokens, rng)
            width, members = queue.pop()
            batch = _collate(members, pad_id, width)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            seen_tokens += int(batch["attention_mask"].sum())
            row = {"step": last["step"] + step + 1, "loss": round(loss.item(), 4), "lr": sched.get_last_lr()[0],
                   "tokens": last["tokens"] + seen_tokens,
                   "seconds": round(last["seconds"] + time.time() - start, 2)}
            if phase:
                row["phase"] = phase
            history.append(row)
            log.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            bar.update(1)
    model.eval()
    return history


def read_log(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- what notebook 00 builds

def tokenizer_texts(articles: list[dict], questions: list[dict]) -> list[str]:
    """Articles, questions and protocol text, with the fixed protocol phrases repeated so their
    words become whole tokens (they occur in every demonstration)."""
    from .prompts import INVALID_ACTION, POLICY_INSTRUCTION

    protocol = [POLICY_INSTRUCTION, INVALID_ACTION, "I need to search for this.", "The documents give the answer.",
                "The answer is not here. I will search again.", "I could not find it, so I will guess.",
                "I think I know this.", "I found it. Now I need to search for it.", "Doc 1(Title: x)"]
    return ([f"{a['title']}\n{a['text']}" for a in articles] + [q["question"] for q in questions]
            + protocol * 200)


def _save(model, tokenizer, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def copy_warmup(model, tokenizer, cfg, log_path, seed: int, years: float = 0.0, titles: float = 0.0,
                steps: int | None = None) -> list[dict]:
    """Phase 1 of a base: copy drills in small batches (steps matter more than tokens), with
    ``years`` of the items years and ``titles`` of the others titles."""
    warm = dataclasses.replace(cfg, batch_tokens=cfg.copy_warmup_batch_tokens)
    steps = steps or cfg.copy_warmup_steps
    drills = copy_drills(tokenizer, 20 * steps, seed, years, titles)
    return pretrain(model, drills, steps, warm, log_path, seed=seed, desc="copy warm-up",
                    phase="copy warm-up")


def known_subjects(train_rows: list[dict], fraction: float, seed: int) -> set[str]:
    """The train-split entities whose articles the policy reads in pretraining."""
    subjects = sorted({r["subject"] for r in train_rows})
    return set(random.Random(seed).sample(subjects, int(len(subjects) * fraction)))


def policy_examples(profile, tokenizer, engine, articles: list[dict], entities: list[dict],
                    train_rows: list[dict]) -> list[Example]:
    """Known train-split articles, scripted demonstrations, and copy drills to keep that skill."""
    cfg = profile.tiny
    unknown = sorted(set(cfg.memory_relations) - set(RELATIONS))
    if unknown:
        raise ConfigError(f"tiny.memory_relations: unknown relation {unknown[0]!r} (known: {', '.join(RELATIONS)})")
    if cfg.memory_demos < 0:
        raise ConfigError(f"tiny.memory_demos: expected 0 or more, got {cfg.memory_demos}")
    known = known_subjects(train_rows, cfg.known_fraction, profile.seed)
    by_name = {e["name"]: e for e in entities}
    known_texts = [f"{a['title']}\n{a['text']}" for a in articles if a["title"] in known]
    examples = pack_texts(tokenizer, known_texts * 2, max_len=256, seed=profile.seed)
    examples += scripted_demos(tokenizer, train_rows, engine, by_name, known, profile.search.topk,
                               seed=profile.seed, per_question=cfg.demos_per_question,
                               train_docs=cfg.demo_loss_on_information,
                               memory_relations=cfg.memory_relations, memory_demos=cfg.memory_demos,
                               guess_loss=cfg.guess_loss, restate_topic=cfg.restate_topic)
    return examples + copy_drills(tokenizer, cfg.copy_drills, profile.seed + 8, cfg.copy_years, cfg.copy_titles)


def answer_copy_phase(profile, model, tokenizer, entities: list[dict], log_path, after: list[dict]) -> list[dict]:
    """Phase 3 of the simulator base: copy drills with years among the names, and answer drills.

    After the main phase the simulator copied an answer name from the line above 82% of the time
    but a year 6% (chance), and fine-tuning did not teach it (0% of years, even on training
    rows). After these 300 steps (2 minutes): years 100%, names 95% (400 held-out drills).
    Mixing the same drills into the main phase instead did not work (years 10%, names 26%).
    """
    cfg = profile.tiny
    examples = copy_drills(tokenizer, 20 * cfg.simulator_copy_steps, seed=profile.seed + 7, number_share=0.4)
    examples += pack_texts(tokenizer, answer_drills(profile.world, {e["name"] for e in entities}, cfg.answer_drills,
                                                    profile.seed + 3000), max_len=256, seed=profile.seed + 1)
    phase_cfg = dataclasses.replace(cfg, batch_tokens=cfg.simulator_copy_batch_tokens, warmup_steps=10)
    return pretrain(model, examples, cfg.simulator_copy_steps, phase_cfg, log_path, seed=profile.seed + 3,
                    desc="simulator-base, answer copying", phase="answer copying", after=after)


def build_bases(profile, tokenizer, engine, articles: list[dict], entities: list[dict],
                splits: dict[str, list[dict]], rebuild: bool = False) -> dict[str, list[dict]]:
    """Both tiny bases: a copy warm-up each (see ``shares``), then each its own corpus; saved for the Auto classes.

    A base already saved is kept unless ``rebuild``: delete one base's folder to retrain only it
    (each phase seeds itself, so the other would come out the same). Returns the loss log of each
    base trained (``outputs/<profile>/models/<base>.loss.jsonl``).
    """
    cfg = profile.tiny
    paths = {"simulator-base": Path(profile.simulator_path), "policy-base": Path(profile.policy_path)}
    todo = [name for name, path in paths.items() if rebuild or not (path / "config.json").exists()]
    # The policy's warm-up holds years and titles (it copies both into queries and answers). The
    # simulator's stays names only: with years and titles there, its fine-tuned documents held a
    # year answer 15% of the time instead of copying it from the prompt (its own phase 3 teaches years).
    shares = {"simulator-base": (0.0, 0.0, cfg.copy_warmup_steps),
              "policy-base": (cfg.copy_years, cfg.copy_titles, cfg.policy_copy_warmup_steps)}
    warm = {}  # (years, titles, steps) -> (model, log): one warm-up per kind, shared when both bases want the same
    logs = {}
    for name in todo:
        if shares[name] not in warm:
            start = build_model(tokenizer, cfg, seed=profile.seed)
            log = profile.models_dir / f"{name}.loss.jsonl"
            years, titles, steps = shares[name]
            warm[shares[name]] = (start, copy_warmup(start, tokenizer, cfg, log, profile.seed, years, titles, steps))
        start, warm_log = warm[shares[name]]
        if name == "simulator-base":
            steps = cfg.simulator_steps
            examples = simulator_corpus(tokenizer, articles, splits["train"] + splits["dev"] + splits["test"],
                                        engine, max_len=256, seed=profile.seed,
                                        extra_texts=answer_drills(profile.world, {e["name"] for e in entities},
                                                                  cfg.answer_drills, profile.seed + 2000))
        else:
            steps = cfg.policy_steps
            examples = policy_examples(profile, tokenizer, engine, articles, entities, splits["train"])
        model = copy.deepcopy(start)
        log = profile.models_dir / f"{name}.loss.jsonl"
        log.write_text("".join(json.dumps(r) + "\n" for r in warm_log))
        logs[name] = warm_log + pretrain(model, examples, steps, cfg, log, seed=profile.seed, desc=name,
                                         phase="main", after=warm_log)
        if name == "simulator-base":
            logs[name] += answer_copy_phase(profile, model, tokenizer, entities, log, after=logs[name])
        _save(model, tokenizer, paths[name])
    return logs
