"""Evaluation: retrieval recall of an engine, and QA scores of a policy run through rollouts."""

from __future__ import annotations

from tqdm.auto import tqdm

from .reward import cover_exact_match, exact_match, f1_score
from .rollout import HFBackend, engine_search_fn, rollout


def retrieval_recall(engine, rows: list[dict], topk: int, batch_size: int = 256) -> float:
    """Share of questions whose supporting (first) title is among the top-k for the question."""
    hits = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        results = engine.search([r["question"] for r in chunk], topk)
        hits += sum(r["supporting_titles"][0] in {d.title for d in docs} for r, docs in zip(chunk, results))
    return hits / max(1, len(rows))


def em_by_searches(trajs) -> dict:
    """EM split by how many searches a trajectory made ("0", "1", "2+"): shows whether extra
    searches help or are wasted, which searches per question alone cannot."""
    groups: dict[str, list] = {}
    for t in trajs:
        groups.setdefault("2+" if len(t.calls) >= 2 else str(len(t.calls)), []).append(t)
    return {k: {"n": len(g), "em": sum(exact_match(t.answer, t.golden_answers) for t in g) / len(g)}
            for k, g in sorted(groups.items())}


def score_trajectories(trajs) -> dict:
    n = max(1, len(trajs))
    return {
        "em": sum(exact_match(t.answer, t.golden_answers) for t in trajs) / n,
        "cover_em": sum(cover_exact_match(t.answer, t.golden_answers) for t in trajs) / n,
        "f1": sum(f1_score(t.answer, t.golden_answers) for t in trajs) / n,
        "well_formed_first_action": sum(t.first_action in ("search", "answer") for t in trajs) / n,
        "searches_per_question": sum(len(t.calls) for t in trajs) / n,
        "searched_share": sum(len(t.calls) > 0 for t in trajs) / n,
        "em_by_searches": em_by_searches(trajs),
        "answered": sum(t.answer is not None for t in trajs) / n,
        "n": len(trajs),
    }


def evaluate_policy(backend, tokenizer, rows: list[dict], search_fn, cfg, temperature: float,
                    desc: str = "evaluate") -> tuple[dict, list]:
    """Roll out every row in batches of ``cfg.batch_size``; returns (scores, trajectories)."""
    trajs = []
    for i in tqdm(range(0, len(rows), cfg.batch_size), desc=desc):
        trajs += rollout(backend, tokenizer, rows[i:i + cfg.batch_size], search_fn, cfg, temperature=temperature)
    return score_trajectories(trajs), trajs


def heldout_questions(profile, n: int | None = None, hops: int = 1) -> list[dict]:
    """The held-out questions every policy evaluation uses: the first ``n`` (default
    ``data.eval_size``) questions with ``hops`` hops of the first evaluation set's test split
    (datasets without hop counts count as 1-hop)."""
    from .data import EVAL_SPLIT, load_for_profile

    name = profile.data.eval_sets[0]
    rows = load_for_profile(profile, name, EVAL_SPLIT[name]).to_list()
    return [r for r in rows if r.get("hops", 1) == hops][: n or profile.data.eval_size]


def validation_questions(profile, n: int, evaluated: int) -> list[dict]:
    """The last ``n`` 1-hop questions of the held-out split, for validation during training: disjoint
    from the first ``evaluated`` ones that ``heldout_questions`` gives the final evaluation."""
    if n < 1:
        raise ValueError(f"rl.validation_size must be at least 1 when rl.validate_every > 0, got {n}")
    rows = heldout_questions(profile, 10 ** 9)
    if n + evaluated > len(rows):
        raise ValueError(f"rl.validation_size {n} + rl.eval_size {evaluated} is more than the "
                         f"{len(rows)} held-out 1-hop questions of {profile.data.eval_sets[0]!r}")
    return rows[-n:]


def greedy_with_engine(model, tokenizer, rows: list[dict], engine, profile, desc: str = "evaluate") -> dict:
    """A policy's greedy scores with a real engine (validation never uses the simulator, DESIGN §5)."""
    was_training = model.training
    model.eval()
    scores, _ = evaluate_policy(HFBackend(model, tokenizer), tokenizer, rows,
                                engine_search_fn(engine, profile.search.topk), profile.rollout, 0.0, desc=desc)
    model.train(was_training)
    return scores


def heldout_scores(model, tokenizer, profile, engine, n: int | None = None, desc: str = "evaluate") -> dict:
    """Greedy scores on the first ``n`` held-out 1-hop questions and, when the dataset has any, on
    its 2-hop ones under ``"two_hop"``: what training did to searching more than once."""
    scores = greedy_with_engine(model, tokenizer, heldout_questions(profile, n), engine, profile, desc=desc)
    two_hop = heldout_questions(profile, n, hops=2)
    if two_hop:
        scores["two_hop"] = greedy_with_engine(model, tokenizer, two_hop, engine, profile, desc=f"{desc}, 2-hop")
    return scores
