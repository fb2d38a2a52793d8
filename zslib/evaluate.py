"""Evaluation: retrieval recall of an engine, QA scores of a policy run through rollouts, and the
harness of notebook 05 (methods × datasets × engines, with bootstrap intervals, written to
``outputs/<profile>/eval/``)."""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import write_jsonl, write_text_atomic
from .generation.backends import backend_for
from .progress import tqdm
from .prompts import direct_user_message, information_block, rag_user_message, render_policy_prompt, render_user_prompt
from .reward import cover_exact_match, exact_match, f1_score, valid_format
from .rollout import Trajectory, engine_search_fn, hit_limit_rate, rollout
from .search import NullEngine, make_engine, profile_engine
from .simulator import engine_for, simulator_search_fn


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
        "hit_limit_rate": hit_limit_rate(trajs),
        "n": len(trajs),
    }


def _batch_starts(n: int, size: int, desc: str):
    """Batch offsets with a transient progress bar (often nested, as in validation); a single batch
    (a side-by-side question) draws none."""
    starts = range(0, n, size)
    return tqdm(starts, desc=desc, leave=False, disable=len(starts) < 2)


def evaluate_policy(backend, tokenizer, rows: list[dict], search_fn, cfg, temperature: float,
                    desc: str = "evaluate", enable_thinking: bool = True) -> tuple[dict, list]:
    """Roll out every row in batches of ``cfg.batch_size``; returns (scores, trajectories)."""
    trajs = []
    for i in _batch_starts(len(rows), cfg.batch_size, desc):
        trajs += rollout(backend, tokenizer, rows[i:i + cfg.batch_size], search_fn, cfg, temperature=temperature,
                         enable_thinking=enable_thinking)
    return score_trajectories(trajs), trajs


def heldout_questions(profile, n: int | None = None, hops: int = 1) -> list[dict]:
    """The held-out questions every policy evaluation uses: the first ``n`` (default
    ``data.eval_size``) questions with ``hops`` hops of the first evaluation set's test split
    (datasets without hop counts count as 1-hop)."""
    from .data import eval_split, load_for_profile

    name = profile.data.eval_sets[0]
    rows = load_for_profile(profile, name, eval_split(name)).to_list()
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


def two_hop_validation_questions(profile) -> list[dict]:
    """The 2-hop questions of the first evaluation set's dev split (the test split's all go to the
    final evaluation), for validating on both kinds; [] for datasets without hop counts."""
    from .data import load_for_profile

    try:
        rows = load_for_profile(profile, profile.data.eval_sets[0], "dev").to_list()
    except Exception as e:  # a set without a dev split: say so, rather than validate on 1-hop alone
        raise ValueError(f"rl.validation_two_hop needs a dev split of {profile.data.eval_sets[0]!r}: {e}") from None
    return [r for r in rows if r.get("hops", 1) == 2]


def greedy_with_engine(model, tokenizer, rows: list[dict], engine, profile, desc: str = "evaluate",
                       backend=None) -> dict:
    """A policy's greedy scores with a real engine (validation never uses the simulator, docs/method.md §7).
    ``backend``: one already generating with ``model``'s current weights (the trainer's)."""
    was_training = model.training
    model.eval()
    scores, _ = evaluate_policy(backend or backend_for(profile, model, tokenizer), tokenizer, rows,
                                engine_search_fn(engine, profile.search.topk), profile.rollout, 0.0, desc=desc,
                                enable_thinking=profile.thinking.policy)
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


# ---------------------------------------------------------------- the harness (notebook 05)

BASELINES = ("direct", "rag", "base")
RESULT_KEYS = ("method", "dataset", "engine", "em", "em_ci", "cover_em", "f1", "searches_per_question",
               "searched_share", "invalid_rate", "answer_tokens", "hit_limit_rate", "n")


@dataclass
class Method:
    """A policy and how it is asked: ``protocol`` (search as it likes), ``direct`` (no documents)
    or ``rag`` (the question's top-k documents up front, then one answer)."""
    name: str
    model: object
    tokenizer: object
    style: str = "protocol"

    def __post_init__(self):
        if self.style not in ("protocol", "direct", "rag"):
            raise ValueError(f"method {self.name!r}: style must be protocol, direct or rag, not {self.style!r}")


def baselines(model, tokenizer) -> list[Method]:
    """``direct``, ``rag`` and ``base``: the untrained policy base asked three ways."""
    return [Method("direct", model, tokenizer, "direct"), Method("rag", model, tokenizer, "rag"),
            Method("base", model, tokenizer, "protocol")]


def trained_runs(profile) -> dict[str, Path]:
    """Every trained policy a run produced: notebook 04's (``rl``) and each ``rl/compare/<name>``."""
    runs = {}
    if (profile.rl_dir / "policy" / "config.json").exists():
        runs[f"rl ({profile.rl.algorithm})"] = profile.rl_dir / "policy"
    compare = profile.rl_dir / "compare"
    for d in sorted(compare.iterdir()) if compare.is_dir() else []:
        if (d / "policy" / "config.json").exists():
            runs[f"compare/{d.name}"] = d / "policy"
    return runs


def eval_datasets(profile, n: int | None = None) -> dict[str, list[dict]]:
    """The held-out questions by dataset: the tiny world's 1-hop and 2-hop ones, or the first ``n``
    (default ``data.eval_size``) of every set in ``data.eval_sets``."""
    from .data import eval_split, load_for_profile

    n = n or profile.data.eval_size
    if profile.data.eval_sets == ["tiny"]:
        sets = {"tiny 1-hop": heldout_questions(profile, n), "tiny 2-hop": heldout_questions(profile, n, hops=2)}
        return {k: v for k, v in sets.items() if v}
    return {name: load_for_profile(profile, name, eval_split(name)).to_list()[:n] for name in profile.data.eval_sets}


def method_prompts(method: Method, rows: list[dict], search_fn, topk: int, tiny: bool, thinking=None):
    """(prompts, search hook, turns) for one method: what each baseline means on each kind of model.

    The tiny policy knows only the protocol, so there ``direct`` is the protocol with an engine that
    finds nothing and ``rag`` the protocol with the question's documents in an ``<information>``
    block before its first turn. Instruct models get prompts of their own, with thinking as
    ``thinking`` (the profile's ``thinking`` section) says. ``rag`` answers in one turn.
    """
    tok = method.tokenizer
    if method.style == "protocol":
        return None, search_fn, None
    think = getattr(thinking, method.style, False)
    if method.style == "direct":
        if tiny:
            return None, engine_search_fn(NullEngine(), topk), None
        return [render_user_prompt(tok, direct_user_message(r["question"]), think) for r in rows], search_fn, 0
    stubs = [Trajectory(r["question"], list(r["golden_answers"])) for r in rows]
    docs, _ = search_fn([r["question"] for r in rows], stubs)  # one retrieval with the question
    if tiny:
        return [render_policy_prompt(tok, r["question"], getattr(thinking, "policy", True)) + information_block(d).lstrip("\n")
                for r, d in zip(rows, docs)], search_fn, 0
    return [render_user_prompt(tok, rag_user_message(r["question"], d), think) for r, d in zip(rows, docs)], search_fn, 0


def run_method(method: Method, rows: list[dict], search_fn, profile, desc: str = "evaluate",
               temperature: float = 0.0) -> list[Trajectory]:
    """Greedy (by default) rollouts of one method on ``rows``, batched as in training."""
    cfg = profile.rollout
    was_training = getattr(method.model, "training", False)
    method.model.eval()
    backend = backend_for(profile, method.model, method.tokenizer)
    trajs = []
    for i in _batch_starts(len(rows), cfg.batch_size, desc):
        chunk = rows[i:i + cfg.batch_size]
        prompts, hook, turns = method_prompts(method, chunk, search_fn, profile.search.topk, profile.is_tiny,
                                              profile.thinking)
        trajs += rollout(backend, method.tokenizer, chunk, hook, cfg, temperature=temperature, prompts=prompts,
                         max_turns=turns, enable_thinking=profile.thinking.policy)
    method.model.train(was_training)
    return trajs


def bootstrap_ci(values: list[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> list[float]:
    """Percentile bootstrap interval of the mean: ``resamples`` draws of n values with replacement."""
    if not values:
        return [0.0, 0.0]
    rng, n = random.Random(seed), len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    return [means[int(tail * (resamples - 1))], means[int(round((1 - tail) * (resamples - 1)))]]


def score(trajs: list[Trajectory], tokenizer, seed: int = 0) -> dict:
    """The result row's metrics (fractions in 0..1). ``invalid_rate``: responses out of the protocol's
    order (think? (search information think?)* answer); ``answer_tokens``: mean tokens of the
    extracted answers (questions without one count 0)."""
    n = max(1, len(trajs))
    common = score_trajectories(trajs)
    responses = [tokenizer.decode(t.response_ids, skip_special_tokens=True) for t in trajs]
    return {
        **{k: common[k] for k in ("em", "cover_em", "f1", "searches_per_question", "searched_share")},
        "em_ci": bootstrap_ci([exact_match(t.answer, t.golden_answers) for t in trajs], seed=seed),
        "invalid_rate": sum(not valid_format(r) for r in responses) / n,
        "answer_tokens": sum(len(tokenizer(t.answer, add_special_tokens=False)["input_ids"]) if t.answer else 0
                             for t in trajs) / n,
        "hit_limit_rate": common["hit_limit_rate"],
        "n": len(trajs),
    }


def predictions(trajs: list[Trajectory], rows: list[dict], tokenizer, method: str, dataset: str, engine: str) -> list[dict]:
    return [{"method": method, "dataset": dataset, "engine": engine, "id": r.get("id"), "question": r["question"],
             "golden_answers": list(r["golden_answers"]), "prediction": t.answer, "searches": len(t.calls),
             "response": tokenizer.decode(t.response_ids, skip_special_tokens=True)}
            for t, r in zip(trajs, rows)]


def evaluate_all(profile, methods: list[Method], datasets: dict[str, list[dict]], engines: dict[str, object],
                 seed: int | None = None) -> tuple[list[dict], list[dict]]:
    """Every (method, dataset, engine): result rows and one prediction per question.

    ``engines`` maps a label to a rollout search hook (``rollout.SearchFn``); the policies that search as they
    like (``base``, the trained ones) run with each, the ``direct`` and ``rag`` baselines with the first only.
    With several datasets, each (method, engine) also gets an ``average`` row (the datasets' unweighted mean,
    as papers report).
    """
    seed = profile.seed if seed is None else seed
    rows, preds = [], []
    for e, (engine_name, hook) in enumerate(engines.items()):
        for method in methods:
            if method.style != "protocol" and e > 0:  # the baselines' engine is the real one (direct never searches)
                continue
            per_set = []
            for set_name, questions in datasets.items():
                trajs = run_method(method, questions, hook, profile, desc=f"{method.name}, {set_name}, {engine_name}")
                rows.append({"method": method.name, "dataset": set_name, "engine": engine_name,
                             **score(trajs, method.tokenizer, seed)})
                per_set.append(rows[-1])
                preds += predictions(trajs, questions, method.tokenizer, method.name, set_name, engine_name)
            if len(per_set) > 1 and profile.data.eval_sets != ["tiny"]:
                mean = {k: sum(r[k] for r in per_set) / len(per_set) for k in RESULT_KEYS[3:] if k != "em_ci"}
                mean["em_ci"] = [sum(r["em_ci"][i] for r in per_set) / len(per_set) for i in (0, 1)]
                mean["n"] = sum(r["n"] for r in per_set)
                rows.append({"method": method.name, "dataset": "average", "engine": engine_name, **mean})
    return rows, preds


SIMULATOR_USEFUL = "simulator (useful)"  # notebook 05's label: the fine-tuned simulator, useful documents only


def evaluation_engines(profile, simulator_engine: bool = True, retriever_url: str | None = None) -> dict:
    """The engines notebook 05 evaluates with, as rollout hooks by label: the profile's real engine (labelled
    by ``search.engine``); a retrieval server speaking Search-R1's protocol at ``retriever_url`` (``retriever``);
    and, with ``simulator_engine``, the fine-tuned simulator asked for useful documents only
    (``SIMULATOR_USEFUL``: written knowing the gold answer, so an optimistic figure, not a real engine's)."""
    engines = {profile.search.engine: engine_search_fn(profile_engine(profile), profile.search.topk)}
    if retriever_url:
        server = make_engine(dataclasses.replace(profile.search, engine="retriever", url=retriever_url))
        engines["retriever" if profile.search.engine != "retriever" else f"retriever ({retriever_url})"] = \
            engine_search_fn(server, profile.search.topk)
    if simulator_engine:
        sim = engine_for(profile, variant="finetuned")
        engines[SIMULATOR_USEFUL] = simulator_search_fn(sim, profile.simulator.topk, 0.0,
                                                        torch.Generator().manual_seed(profile.seed),
                                                        profile.simulator.hop_hints)
    return engines


def engine_gaps(preds: list[dict], real: str, seed: int = 0) -> list[dict]:
    """Each (method, dataset) evaluated with the ``real`` engine and another, side by side: EM under both,
    the gap (other minus real) with a 95% paired bootstrap interval (the same questions under both engines,
    resampled together), and the searches per question under each. A gap whose interval excludes 0 means
    the method's score depends on which engine it was given."""
    by: dict[tuple, dict] = {}
    for p in preds:
        by.setdefault((p["method"], p["dataset"], p["engine"]), {})[p["id"] if p["id"] is not None else p["question"]] = p
    out = []
    for (method, dataset, engine), answered in by.items():
        base = by.get((method, dataset, real))
        if engine == real or base is None:
            continue
        keys = [k for k in base if k in answered]
        real_em = [exact_match(base[k]["prediction"], base[k]["golden_answers"]) for k in keys]
        other_em = [exact_match(answered[k]["prediction"], answered[k]["golden_answers"]) for k in keys]
        n = max(1, len(keys))
        out.append({"method": method, "dataset": dataset, "engine": engine, "real": real,
                    "em_real": sum(real_em) / n, "em_engine": sum(other_em) / n,
                    "gap": (sum(other_em) - sum(real_em)) / n,
                    "gap_ci": bootstrap_ci([o - r for o, r in zip(other_em, real_em)], seed=seed),
                    "searches_real": sum(base[k]["searches"] for k in keys) / n,
                    "searches_engine": sum(answered[k]["searches"] for k in keys) / n, "n": len(keys)})
    return out


def engine_gaps_markdown(gaps: list[dict]) -> str:
    head = ("| method | dataset | engine | EM, real | EM, engine | gap | 95% interval | searches/q, real "
            "| searches/q, engine | n |\n|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(
        f"| {g['method']} | {g['dataset']} | {g['engine']} (vs {g['real']}) | {g['em_real']:.3f} | {g['em_engine']:.3f} | "
        f"{g['gap']:+.3f} | {g['gap_ci'][0]:+.3f} to {g['gap_ci'][1]:+.3f} | {g['searches_real']:.2f} | "
        f"{g['searches_engine']:.2f} | {g['n']} |" for g in gaps) + "\n"


def results_markdown(rows: list[dict]) -> str:
    """The result rows as a markdown table; every score is a fraction in 0..1, as everywhere in the workbench."""
    head = ("| method | dataset | engine | EM | 95% interval | cover-EM | F1 | searches/q | searched | invalid "
            "| answer tokens | n |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['method']} | {r['dataset']} | {r['engine']} | {r['em']:.3f} | "
             f"{r['em_ci'][0]:.3f}–{r['em_ci'][1]:.3f} | {r['cover_em']:.3f} | {r['f1']:.3f} | "
             f"{r['searches_per_question']:.2f} | {r['searched_share']:.2f} | {r['invalid_rate']:.2f} | "
             f"{r['answer_tokens']:.1f} | {r['n']} |" for r in rows]
    return head + "\n".join(lines) + "\n"


def write_results(out_dir: str | Path, rows: list[dict], preds: list[dict]) -> dict[str, Path]:
    """``results.json`` ({"rows": […]}), ``results.md`` and ``predictions.jsonl``, each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md", "predictions": out_dir / "predictions.jsonl"}
    write_text_atomic(paths["json"], json.dumps({"rows": [{k: r[k] for k in RESULT_KEYS} for r in rows]}, indent=1))
    write_text_atomic(paths["md"], results_markdown(rows))
    write_jsonl(paths["predictions"], preds)
    return paths


def cost_summary(profile, runs: dict[str, list[dict]], trajectories: list[dict], api_price_per_1000: float,
                 gpu_price_per_hour: float) -> dict:
    """What the run's searches cost: real-engine calls made by collection (``trajectories``) and by
    validation (every run's ``val_search_calls``), the calls RL made
    to the simulator instead (all runs trained against it), and those calls priced both ways: through a
    paid API at ``api_price_per_1000``, and as the simulator's own seconds at ``gpu_price_per_hour``
    (on this machine the seconds are CPU seconds: the price is then what the same work would be billed
    on a GPU-hour, an upper bound for a tiny model)."""
    val_calls = sim_calls = sim_tokens = 0
    sim_seconds, tokens_logged = 0.0, False
    for metrics in runs.values():
        for m in metrics:
            if m.get("val_search_calls") is not None:
                val_calls += m["val_search_calls"]
            elif m.get("val_searches_per_question") is not None:  # runs logged before val_search_calls
                val_calls += round(m["val_searches_per_question"] * profile.rl.validation_size)
            if "simulator_seconds" in m and m.get("simulator_seconds", 0) > 0:
                calls = m.get("search_calls", round(m["searches_per_answer"] * profile.rl.questions_per_step
                                                    * profile.rl.group_size))
                sim_calls += calls
                sim_tokens += m.get("simulator_tokens", 0)
                tokens_logged |= "simulator_tokens" in m
                sim_seconds += m["simulator_seconds"]
    return {"collection_calls": sum(len(r.get("calls", [])) for r in trajectories), "validation_calls": val_calls,
            "rl_simulator_calls": sim_calls, "rl_simulator_tokens": sim_tokens if tokens_logged else None, "rl_simulator_seconds": sim_seconds,
            "api_price_per_1000": api_price_per_1000, "gpu_price_per_hour": gpu_price_per_hour,
            "rl_api_dollars": sim_calls / 1000 * api_price_per_1000,
            "rl_simulator_dollars": sim_seconds / 3600 * gpu_price_per_hour}


def compare(rows: list[dict], method: str, against: list[str], dataset: str, engine: str) -> list[str]:
    """Sentences on how ``method`` compares with each of ``against`` on one dataset, from the rows:
    ahead, behind, or within each other's 95% intervals."""
    by = {(r["method"], r["dataset"], r["engine"]): r for r in rows}
    me = by.get((method, dataset, engine))
    if me is None:
        return [f"{method} was not evaluated on {dataset} with {engine}."]
    out = []
    for other in against:
        r = by.get((other, dataset, engine))
        if r is None:
            continue
        gap = me["em"] - r["em"]
        overlap = me["em_ci"][0] <= r["em_ci"][1] and r["em_ci"][0] <= me["em_ci"][1]
        verdict = ("level" if gap == 0 else "ahead" if gap > 0 else "behind") + (
            ", and the intervals overlap" if overlap and gap == 0 else ", but the intervals overlap" if overlap
            else ", intervals apart")
        out.append(f"{method} EM {me['em']:.3f} against {other} {r['em']:.3f} on {dataset} ({gap:+.3f}): {verdict}.")
    return out


def side_by_side(preds: list[dict], trained: list[str], dataset: str, engine: str, n: int) -> list[dict]:
    """Up to ``n`` questions of ``dataset`` that the first trained method answers right and ``base``
    does not (the rows to run again for notebook 05's side-by-side view)."""
    if not trained:
        return []
    right = {(p["method"], p["id"]): exact_match(p["prediction"], p["golden_answers"]) for p in preds
             if p["dataset"] == dataset and p["engine"] == engine}
    rows = [p for p in preds if p["method"] == trained[0] and p["dataset"] == dataset and p["engine"] == engine]
    picked = [p for p in rows if right.get((trained[0], p["id"])) and not right.get(("base", p["id"]))]
    return [{"id": p["id"], "question": p["question"], "golden_answers": p["golden_answers"]} for p in picked[:n]]
