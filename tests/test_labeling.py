import json

import pytest

from zslib import collect, config, labeling
from zslib.tiny import world
from zslib.simulator import parse_docs


def traj(tid, answer, gold, calls):
    return {"id": tid, "question": f"question {tid}?", "golden_answers": gold, "answer": answer,
            "calls": [{"query": q, "docs": docs, "noisy": None} for q, docs in calls]}


DOCS_WITH = [["Xo Ba", "Xo Ba was born in Tavin."]]
DOCS_WITHOUT = [["Quo Li", "Quo Li was born in Mern."]]


def test_v1_labels_follow_the_trajectory_outcome():
    records = [traj("a", "Tavin", ["Tavin"], [("q1", DOCS_WITHOUT), ("q2", DOCS_WITH)]),
               traj("b", "Mern", ["Tavin"], [("q3", DOCS_WITH)]),
               traj("c", None, ["Tavin"], [("q4", DOCS_WITH)]),
               traj("d", "the city of Tavin", ["Tavin"], [("q5", DOCS_WITH)]),  # F1 = 2·(1/3)·1 / (1/3 + 1) = 0.5
               traj("e", "Tavin", ["Tavin"], [])]                                 # answered without searching
    pairs = labeling.label_trajectories(records, metric="f1", threshold=0.5)
    assert [(p["query"], p["useful"]) for p in pairs] == [("q1", True), ("q2", True), ("q3", False),
                                                           ("q4", False), ("q5", True)]
    em_pairs = labeling.label_trajectories(records, metric="em", threshold=1.0)
    assert [p["useful"] for p in em_pairs] == [True, True, False, False, False]


def test_contains_judge_overrides_v1_and_keeps_the_old_label():
    records = [traj("a", "Tavin", ["Tavin"], [("q1", DOCS_WITHOUT), ("q2", DOCS_WITH)]),
               traj("b", "Mern", ["Tavin"], [("q3", DOCS_WITH)])]
    pairs = labeling.label_trajectories(records)
    judged = labeling.apply_judge(pairs, labeling.judge_contains(pairs))
    assert [(p["useful"], p["v1_useful"]) for p in judged] == [(False, True), (True, True), (True, False)]


def test_with_evidence_the_judge_calls_a_supporting_document_useful():
    # A 2-hop question: its first search finds the bridge (Xo Ba), whose own article holds the answer.
    rows = [{"question": "Where was the author of Book Q born?", "supporting_titles": ["Book Q", "Xo Ba"]},
            {"question": "Where was Xo Ba born?"}]  # a dataset row without supporting titles
    evidence = labeling.supporting_titles(rows)
    assert evidence == {rows[0]["question"]: {"Book Q", "Xo Ba"}}
    first_hop = [["Book Q", "Book Q was written by Xo Ba."]]
    pairs = [{"question": rows[0]["question"], "golden_answers": ["Tavin"], "docs": first_hop},
             {"question": rows[0]["question"], "golden_answers": ["Tavin"], "docs": DOCS_WITHOUT},
             {"question": rows[0]["question"], "golden_answers": ["Tavin"], "docs": DOCS_WITH},
             {"question": rows[1]["question"], "golden_answers": ["Tavin"], "docs": first_hop}]
    assert labeling.judge_contains(pairs) == [False, False, True, False]
    assert labeling.judge_contains(pairs, evidence) == [True, False, True, False]


def test_counterparts_with_evidence_for_first_hops(bm25, tiny_world):
    rows = [r for r in tiny_world["splits"]["train"] if r["hops"] == 2][:30]
    evidence = labeling.supporting_titles(rows)
    pairs = [{"question": r["question"], "golden_answers": r["golden_answers"], "query": r["subject"],
              "docs": [], "useful": i % 2 == 0, "source": "trajectory"} for i, r in enumerate(rows)]
    added = labeling.add_counterparts(pairs, bm25, k=3, evidence=evidence)[len(pairs):]
    assert len(added) >= 20 and {p["useful"] for p in added} == {True, False}
    for p in added:
        titles = {t for t, _ in p["docs"]}
        supporting = evidence[p["question"]]
        holds_answer = any(p["golden_answers"][0] in text for _, text in p["docs"])
        if p["useful"]:  # the query names the first hop's subject: its article comes first
            assert p["docs"][0][0] in supporting or p["golden_answers"][0] in p["docs"][0][1]
        else:
            assert not titles & supporting and not holds_answer


def test_deduplicate_and_balance():
    p = lambda q, useful: {"question": "Q?", "query": q, "useful": useful, "docs": [[q, q]], "golden_answers": ["a"],
                           "source": "trajectory"}
    pairs = [p("Xo  Ba", True), p("xo ba", True), p("xo ba", False), p("other", True), p("third", True)]
    unique = labeling.deduplicate(pairs)
    assert [(x["query"], x["useful"]) for x in unique] == [("Xo  Ba", True), ("xo ba", False), ("other", True),
                                                            ("third", True)]
    balanced = labeling.balance(unique, seed=0)
    assert sum(x["useful"] for x in balanced) == sum(not x["useful"] for x in balanced) == 1


def test_the_same_documents_are_kept_at_most_twice_per_label():
    same = [["T", "t"]]
    pairs = [{"question": f"Q{i}?", "query": "born year", "useful": i >= 4, "docs": same, "golden_answers": ["a"],
              "source": "trajectory"} for i in range(7)]
    assert [x["question"] for x in labeling.deduplicate(pairs)] == ["Q0?", "Q1?", "Q4?", "Q5?"]
    assert len(labeling.deduplicate(pairs, max_same_docs=10)) == 7


def test_with_k_docs_keeps_full_pairs_cut_to_k():
    pairs = [{"docs": [["a", "1"]] * n, "useful": True} for n in (1, 3, 5)]
    assert [len(p["docs"]) for p in labeling.with_k_docs(pairs, 3)] == [3, 3]


def test_counterparts_from_the_real_engine_hold_or_lack_the_answer(bm25, tiny_world):
    rows = [r for r in tiny_world["splits"]["train"] if r["hops"] == 1][:40]
    pairs = [{"question": r["question"], "golden_answers": r["golden_answers"], "query": r["question"],
              "docs": [], "useful": i % 2 == 0, "source": "trajectory"} for i, r in enumerate(rows)]
    added = labeling.add_counterparts(pairs, bm25, k=3)[len(pairs):]
    assert len(added) >= 35
    for p in added:
        original = next(x for x in pairs if x["question"] == p["question"])
        assert p["useful"] != original["useful"] and 1 <= len(p["docs"]) <= 3  # BM25 may match fewer
        holds = any(p["golden_answers"][0] in text for _, text in p["docs"])
        assert holds == p["useful"]
        if p["useful"]:
            assert p["golden_answers"][0] in p["docs"][0][1], "the answer-bearing document comes first"


def test_invented_pairs_are_about_unseen_entities(bm25, tiny_world):
    taken = {e["name"] for e in tiny_world["entities"]}
    questions, articles = world.invented_world(world.WorldConfig(), seed=99, taken=taken)
    assert questions and not {q["subject"] for q in questions} & taken
    pairs = labeling.invented_pairs(questions, articles, bm25, n=30, k=3, seed=0, real_titles=sorted(taken))
    useful = [p for p in pairs if p["useful"]]
    assert len(useful) == 30 and len(pairs) > 50
    for p in pairs:
        holds = any(p["golden_answers"][0] in text for _, text in p["docs"])
        assert holds == p["useful"]
    subject_of = {q["question"]: q["subject"] for q in questions}
    assert all(p["docs"][0][0] == subject_of[p["question"]] for p in useful), "useful docs open with the article"


def test_sft_rows_carry_the_keyword_and_parse_back(tokenizer):
    pairs = [{"question": "Where was Xo Ba born?", "golden_answers": ["Tavin"], "query": "Xo Ba born",
              "docs": DOCS_WITH + DOCS_WITHOUT, "useful": useful, "source": "trajectory"} for useful in (True, False)]
    rows = labeling.sft_rows(pairs, tokenizer, words_per_doc=30)
    assert "\nUseful Output:" in rows[0]["prompt"] and "useful" in rows[0]["prompt"]
    assert "\nNoisy Output:" in rows[1]["prompt"] and "useful" not in rows[1]["prompt"]
    for row in rows:  # rendered with the chat template, ready for generation
        assert row["prompt"].startswith("<|im_start|>user\n") and row["prompt"].endswith("<|im_start|>assistant\n")
        assert "The answer is Tavin." in row["prompt"] and "Write 2 " in row["prompt"]
    docs, ok = parse_docs(rows[0]["completion"], 2)
    assert ok and [[d.title, d.text] for d in docs] == pairs[0]["docs"]


def test_without_titles_drops_documents_and_pairs_that_lose_their_answer():
    pairs = [{"question": "Q1?", "query": "q", "golden_answers": ["Tavin"], "useful": True,
              "docs": DOCS_WITH + DOCS_WITHOUT, "source": "trajectory"},
             {"question": "Q2?", "query": "q", "golden_answers": ["Tavin"], "useful": False,
              "docs": DOCS_WITH + DOCS_WITHOUT, "source": "trajectory"},
             {"question": "Q3?", "query": "q", "golden_answers": ["Mern"], "useful": True,
              "docs": DOCS_WITH + DOCS_WITHOUT, "source": "trajectory"},
             {"question": "Q4?", "query": "q", "golden_answers": ["Mern"], "useful": False,
              "docs": DOCS_WITHOUT, "source": "trajectory"}]
    kept = labeling.without_titles(pairs, {"Quo Li"})
    assert [(p["question"], p["docs"]) for p in kept] == [("Q1?", DOCS_WITH), ("Q2?", DOCS_WITH)]


def test_heldout_triples_skip_excluded_questions_and_subjects(tiny_world):
    rows = tiny_world["splits"]["test"]
    exclude = {rows[0]["question"], rows[1]["subject"]}
    triples = labeling.heldout_triples(rows, 500, seed=0, exclude=exclude)
    assert len(triples) == 500 and all(t["hops"] == 1 for t in triples)
    assert not any(t["question"] in exclude or t["subject"] in exclude for t in triples)
    assert all(t["query"] == t["question"] or t["query"].startswith(t["subject"] + " ") for t in triples)
    assert 0.2 < sum(t["query"] != t["question"] for t in triples) / 500 < 0.6
    assert labeling.heldout_triples(rows, 500, seed=0, exclude=exclude) == triples


def test_lead_with_answer_moves_the_answer_to_the_first_sentence():
    doc = ["Xo Ba", "Xo Ba is a poet. Xo Ba was born in Tavin. Xo Ba studied at Mern College."]
    pair = {"question": "Where did Xo Ba study?", "golden_answers": ["Mern College"], "query": "Xo Ba",
            "docs": DOCS_WITHOUT + [doc], "useful": True, "source": "trajectory"}
    led = labeling.lead_with_answer(pair)
    assert led["docs"] == [["Xo Ba", "Xo Ba studied at Mern College. Xo Ba is a poet. Xo Ba was born in Tavin."]] + DOCS_WITHOUT
    assert pair["docs"][1] == doc, "the input pair is not changed"
    noisy = {**pair, "useful": False}
    assert labeling.lead_with_answer(noisy) is noisy
    assert labeling.lead_with_answer({**pair, "golden_answers": ["Quux"]})["docs"] == pair["docs"]


# --- build_pairs: the whole recipe of notebook 02 on hand-made trajectories -------------------------

def _mentions(doc, answer):
    return answer.lower() in f"{doc[0]} {doc[1]}".lower()


@pytest.fixture
def recipe(tiny_world, monkeypatch, tmp_path):
    """Trajectory records as ``collect.read_trajectories`` yields them, about five people of the
    tiny world's train split, and a profile whose data folder is that world's (k = 2 documents)."""
    monkeypatch.setattr(config.Profile, "data_dir", property(lambda self: tiny_world["dir"]))
    test_subjects = {r["subject"] for r in tiny_world["splits"]["test"]}
    by_title = {a["title"]: [a["title"], a["text"]] for a in tiny_world["articles"]}
    rows, subjects = [], set()
    for r in tiny_world["splits"]["train"]:  # each answered by its subject's article, not in its opening sentence
        if r["hops"] == 1 and r["relation"] in ("born_in", "educated_at") and r["subject"] not in subjects:
            rows.append(r)
            subjects.add(r["subject"])
        if len(rows) == 5:
            break
    a, b, c, d, e = rows
    answers = [r["golden_answers"][0] for r in rows]
    fillers = [doc for title, doc in sorted(by_title.items())
               if title not in test_subjects | subjects and not any(_mentions(doc, x) for x in answers)][:6]
    held_out = next(by_title[t] for t in sorted(test_subjects) if not any(_mentions(by_title[t], x) for x in answers))
    article = {r["subject"]: by_title[r["subject"]] for r in rows}
    wrong = fillers[0][0]  # a name, never a gold answer

    def rec(i, row, answer, query, docs):
        return {"id": f"tiny/train_{i}", "sample": 0, "question": row["question"],
                "golden_answers": row["golden_answers"], "answer": answer, "calls": [
                    {"query": query, "docs": docs, "noisy": None}]}

    q = {r["subject"]: f"{r['subject']} {world.RELATION_KEYWORDS[r['relation']]}" for r in rows}
    records = [
        rec(0, a, answers[0], q[a["subject"]], [article[a["subject"]], fillers[1]]),  # right, docs hold it
        rec(1, b, wrong, q[b["subject"]], [article[b["subject"]], fillers[2]]),       # wrong, docs hold it
        rec(2, c, answers[2], q[c["subject"]], [fillers[3], fillers[4]]),             # right, docs lack it
        rec(3, a, answers[0], "  " + q[a["subject"]].upper(), [article[a["subject"]], fillers[1]]),  # a repeat of 0
        rec(4, d, answers[3], q[d["subject"]], [article[d["subject"]]]),              # one document only
        rec(5, e, wrong, q[e["subject"]], [held_out, fillers[5]]),                    # a held-out subject's article
    ]
    path = tmp_path / "trajectories.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    records = collect.read_trajectories(path)
    assert len(records) == 6 and all(not _mentions(article[r["subject"]][1].split(". ")[0], x)
                                     for r, x in zip(rows, answers))

    def profile(**labeling):
        overrides = {"simulator.topk": 2, "labeling.judge": "none", "labeling.paired": False, "labeling.invented": 0,
                     "labeling.balance": False, "labeling.answer_first": False}
        return config.load_profile("tiny", {**overrides, **{f"labeling.{k}": v for k, v in labeling.items()}})

    return {"records": records, "rows": rows, "queries": q, "held_out": held_out[0], "profile": profile,
            "test_subjects": test_subjects}


def _label_of(pairs, query):
    return [p["useful"] for p in pairs if p["query"] == query]


def test_build_pairs_v1_deduplicates_and_keeps_full_pairs(recipe, bm25):
    a, b, c, d, e = recipe["rows"]
    q = recipe["queries"]
    pairs, info = labeling.build_pairs(recipe["profile"](), recipe["records"], bm25)
    assert info["v1"]["pairs"] == 6 and info["v1"]["by_source"] == {"trajectory/noisy": 2, "trajectory/useful": 4}
    assert info["judge_changed"] is None
    assert info["deduplicated"] == 5, "the repeat of the first trajectory's query (case, spaces) is dropped"
    # d's pair has one document, e's loses the held-out article and keeps one: both are too short for k = 2.
    assert sorted(p["query"] for p in pairs) == sorted([q[a["subject"]], q[b["subject"]], q[c["subject"]]])
    assert _label_of(pairs, q[a["subject"]]) == [True] and _label_of(pairs, q[b["subject"]]) == [False]
    assert _label_of(pairs, q[c["subject"]]) == [True], "v1 trusts the right answer"
    assert all(len(p["docs"]) == 2 for p in pairs)


def test_build_pairs_contains_judge_relabels_by_the_documents(recipe, bm25):
    a, b, c, d, e = recipe["rows"]
    q = recipe["queries"]
    pairs, info = labeling.build_pairs(recipe["profile"](judge="contains"), recipe["records"], bm25)
    assert info["judged"] == 6 and info["judge_changed"] == 2  # b (wrong, docs hold it) and c (right, docs lack it)
    assert _label_of(pairs, q[a["subject"]]) == [True]
    assert _label_of(pairs, q[b["subject"]]) == [True] and _label_of(pairs, q[c["subject"]]) == [False]
    assert info["final"]["answer_in_docs"] == {"useful": 1.0, "noisy": 0.0}


class _YesBackend:
    """An llm judge that says yes to everything: every pair becomes useful."""
    def generate(self, prompts, max_new_tokens, temperature, top_p):
        return [[1] for _ in prompts]


class _CharTokenizer:
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(ch) for ch in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "Yes"


def test_build_pairs_uses_the_llm_judge_it_is_given(recipe, bm25):
    pairs, info = labeling.build_pairs(recipe["profile"](judge="llm"), recipe["records"], bm25,
                                       judge=(_YesBackend(), _CharTokenizer()))
    assert info["judge_changed"] == 2  # the two wrong trajectories' pairs
    assert len(pairs) == 3 and all(p["useful"] for p in pairs)


def test_build_pairs_full_recipe(recipe, bm25):
    P = recipe["profile"](judge="contains", paired=True, invented=12, balance=True, answer_first=True)
    pairs, info = labeling.build_pairs(P, recipe["records"], bm25)
    assert {p["source"] for p in pairs} == {"trajectory", "counterpart", "invented"}
    assert all(len(p["docs"]) == 2 for p in pairs)
    useful = [p for p in pairs if p["useful"]]
    assert len(useful) == len(pairs) - len(useful) > 0
    assert info["final"]["pairs"] == len(pairs)
    titles = {t for p in pairs for t, _ in p["docs"]}
    assert recipe["held_out"] not in titles and not titles & recipe["test_subjects"]
    for p in pairs:
        answer = p["golden_answers"][0]
        first_sentence = p["docs"][0][1].split(". ")[0]
        if p["useful"]:  # answer first: the first document opens with the sentence stating the answer
            assert answer in first_sentence, (p["query"], p["docs"][0])
        else:
            assert not any(_mentions(doc, answer) for doc in p["docs"])
    a = recipe["rows"][0]
    mine = [p for p in pairs if p["source"] == "trajectory" and p["question"] == a["question"]]
    assert len(mine) <= 1  # the repeat is gone (balance may also have dropped the one left)
    if mine:  # its article, the answer sentence moved to the front, the other sentences kept
        title, text = mine[0]["docs"][0]
        original = dict(recipe["records"][0]["calls"][0]["docs"])[title]
        assert title == a["subject"] and text != original
        assert sorted(x.rstrip(".") for x in text.split(". ")) == sorted(x.rstrip(".") for x in original.split(". "))
