"""Does the simulator let a 2-hop question be answered after one search?

The policy base answers training questions at the rollout temperature, as in RL's first steps,
once against BM25 and once against the fine-tuned simulator serving useful documents only (noise
0), 1-hop and 2-hop questions apart. Per setting: EM, searches per question, EM by searches made,
and how often the first search's documents already hold the final answer.

The simulator is told the gold answer (docs/method.md §5), and notebook 02's ``contains`` judge labels
documents useful only when they hold it (``labeling.evidence``, off by default, changes that). So for a 2-hop question's first hop, which a real engine
answers with the bridge entity alone, the simulator tends to write the final answer in. One search
then pays against the simulator but never against BM25, which is what RL learns from (docs/results.md,
"What RL does to 2-hop questions"). ``simulator.hop_hints`` tells it the bridge entity for a first hop
instead; the third engine row measures that. Needs notebooks 00 and 03.

    .venv/bin/python benchmarks/simulator_hops.py [--profile tiny] [--questions 128]
"""

from __future__ import annotations

import argparse

import torch

from zslib import config, data, evaluate, rollout, search, simulator
from zslib.generation import hf_backend, models


def first_docs_hold_answer(trajs) -> float:
    """Share of searching trajectories whose first call's documents state a gold answer."""
    searched = [t for t in trajs if t.calls]
    return sum(simulator.contains_answer([search.Doc(*d) for d in t.calls[0]["docs"]], t.golden_answers)
               for t in searched) / max(1, len(searched))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--questions", type=int, default=128, help="per number of hops")
    args = ap.parse_args()
    torch.set_num_threads(2)
    P = config.load_profile(args.profile)
    rows = data.sample_questions(P, P.data.train_sets, "train", 10 ** 9, seed=P.seed)
    by_hops = {h: [r for r in rows if r.get("hops", 1) == h][:args.questions] for h in (1, 2)}
    model, tok = models.load_causal_lm(P.policy_path, P.models.dtype)
    bm25 = search.profile_engine(P)
    sim = simulator.engine_for(P)
    search_fns = {"bm25": rollout.engine_search_fn(bm25, P.search.topk),  # k as in RL for each engine
                  "simulator, useful": simulator.simulator_search_fn(sim, P.simulator.topk, 0.0,  # noise 0
                                                                     torch.Generator()),
                  "simulator, useful, hop hints": simulator.simulator_search_fn(sim, P.simulator.topk, 0.0,
                                                                                torch.Generator(), hop_hints=True)}
    print(f"policy base at temperature {P.rollout.temperature}, {args.questions} training questions per row\n")
    print("| questions | engine | EM | searches/q | EM, 1 search | EM, 2+ searches | first search's docs hold the answer |")
    print("|---|---|---|---|---|---|---|")
    for hops, questions in by_hops.items():
        for name, search_fn in search_fns.items():
            torch.manual_seed(P.seed)
            scores, trajs = evaluate.evaluate_policy(hf_backend.HFBackend(model, tok), tok, questions, search_fn,
                                                     P.rollout, P.rollout.temperature, desc=f"{hops}-hop, {name}")
            split = scores["em_by_searches"]
            cell = {k: f"{split[k]['em']:.3f} (n {split[k]['n']})" if k in split else "" for k in ("1", "2+")}
            print(f"| {hops}-hop | {name} | {scores['em']:.3f} | {scores['searches_per_question']:.2f} | {cell['1']} | "
                  f"{cell['2+']} | {first_docs_hold_answer(trajs):.3f} |")


if __name__ == "__main__":
    main()
