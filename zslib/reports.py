"""Sentences about a run, written from its numbers: what a notebook says about its results follows
them, whatever the run gave (prose that quoted one run's figures went stale with the next run).

Each function takes plain dicts (metrics lines, evaluation scores, samples) and returns sentences.
"""

from __future__ import annotations

from .guard import peaks
from .prompts import INVALID_ACTION
from .reward import exact_match, extract_answer
from .search import Doc
from .simulator import contains_answer, hop_answer


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _window(metrics: list[dict], key: str, last: bool, n: int) -> float:
    values = [m[key] for m in metrics if m.get(key) is not None]
    return _mean(values[-n:] if last else values[:n])


def _trend(first: float, last: float, tolerance: float) -> str:
    if last > first + tolerance:
        return "rose"
    if last < first - tolerance:
        return "fell"
    return "stayed level"


# ---------------------------------------------------------------- notebook 04: the curves

def curve_summary(metrics: list[dict], window: int = 5) -> list[str]:
    """How the training reward moved while the noise rose: means over the first and last ``window``
    steps, and the step where the ``window``-step mean peaked."""
    if not metrics:
        return ["No steps were logged."]
    n = min(window, len(metrics))
    first, last = _window(metrics, "reward_mean", False, n), _window(metrics, "reward_mean", True, n)
    rewards = [m["reward_mean"] for m in metrics]
    means = [_mean(rewards[max(0, i - n + 1):i + 1]) for i in range(len(rewards))]
    peak = max(range(len(means)), key=lambda i: means[i])
    p_first, p_last = metrics[0]["noise_prob"], metrics[-1]["noise_prob"]
    lines = [f"Training reward (sampled rollouts against the engine RL uses): {first:.3f} over the first {n} steps, "
             f"{last:.3f} over the last {n}; it {_trend(first, last, 0.02)} while the noise probability went from "
             f"{p_first:.2f} to {p_last:.2f}.",
             f"Its {n}-step mean peaked at step {metrics[peak]['step']} ({means[peak]:.3f}, noise probability "
             f"{metrics[peak]['noise_prob']:.2f})."]
    validated = [m for m in metrics if "val_em" in m]
    if validated:
        best = max(validated, key=lambda m: (m["val_em"], -m["step"]))
        lines.append(f"Validation EM (greedy, real engine) went from {validated[0]['val_em']:.3f} at step "
                     f"{validated[0]['step']} to {validated[-1]['val_em']:.3f} at step {validated[-1]['step']}, "
                     f"best {best['val_em']:.3f} at step {best['step']}.")
    return lines


# Each collapse sign: (metric, what it is, how much its last-quarter mean may exceed its first-quarter mean).
COLLAPSE_SIGNS = (("entropy", "entropy of the policy's tokens", 0.25, "relative"),
                  ("invalid_action_rate", "invalid actions per turn", 0.05, "absolute"),
                  ("equal_reward_groups", "share of groups whose rollouts all scored the same", 0.15, "absolute"))


def collapse_report(metrics: list[dict], drop_bar: float = 0.05, drop_bar_2hop: float = 0.15) -> tuple[bool, list[str]]:
    """Whether a run shows signs of collapse, and one sentence per sign checked: the first and last
    quarter of the run compared for entropy, invalid actions and all-equal groups, and the last
    validation EM against the best (``drop_bar`` for the 1-hop questions or the only kind,
    ``drop_bar_2hop`` for the fewer, noisier 2-hop ones). Returns (healthy, sentences)."""
    quarter = max(1, len(metrics) // 4)
    lines, signs = [], 0
    for key, name, allowed, kind in COLLAPSE_SIGNS:
        if not any(key in m for m in metrics):
            continue
        first, last = _window(metrics, key, False, quarter), _window(metrics, key, True, quarter)
        rise = (last - first) / max(abs(first), 1e-9) if kind == "relative" else last - first
        bad = rise > allowed
        signs += bad
        limit = f"{allowed:.0%}" if kind == "relative" else f"{allowed:.2f}"
        lines.append(f"{'SIGN' if bad else 'ok  '}  {name}: {first:.3f} in the first quarter of the run, {last:.3f} in the "
                     f"last ({'a rise above' if bad else 'within'} {limit}).")
    kls = [m["kl"] for m in metrics if "kl" in m]
    if kls:
        lines.append(f"info  KL to the reference: {kls[0]:.4f} at the first step, {kls[-1]:.4f} at the last (it grows "
                     "as the policy learns; rl.kl_coef weighs it in the loss).")
    for key, name, bar in (("val_em_1hop", "1-hop validation EM", drop_bar), ("val_em_2hop", "2-hop validation EM",
                                                                               drop_bar_2hop)):
        key = key if any(key in m for m in metrics) else ("val_em" if key == "val_em_1hop" else None)
        validated = [m for m in metrics if key and key in m]
        if not validated:
            continue
        best = max(validated, key=lambda m: (m[key], -m["step"]))
        drop = best[key] - validated[-1][key]
        bad = drop > bar
        signs += bad
        lines.append(f"{'SIGN' if bad else 'ok  '}  {name if key != 'val_em' else 'validation EM'}: best "
                     f"{best[key]:.3f} at step {best['step']}, last {validated[-1][key]:.3f} (a drop of {drop:.3f}; "
                     f"{'above' if bad else 'within'} {bar:.2f}).")
    named = [line.split(":")[0].removeprefix("SIGN").strip() for line in lines if line.startswith("SIGN")]
    verdict = ("Healthy: none of the signs of collapse." if signs == 0 else
               f"{signs} sign{'s' if signs > 1 else ''} of collapse ({'; '.join(named)}): read the curves above before "
               "trusting the last step (with rl.keep_best the best-validated step is the trained policy).")
    return signs == 0, [verdict] + lines


def guard_lines(metrics: list[dict], cfg) -> list[str]:
    """What the collapse guard (the profile's ``guard:``, ``cfg``) found and did, one line per step it acted
    on; when it found nothing, how close the run came to a bar."""
    action = cfg.action
    if action == "off":
        return ["The collapse guard is off (guard.action: off)."]
    acted = [m for m in metrics if m.get("guard_action")]
    if not acted:
        lines = [f"The collapse guard (guard.action: {action}) found no sign in any step."]
        near = [(p["peak"] / getattr(cfg, bar), bar, p) for bar, p in peaks(metrics, cfg).items()]
        if near:
            share, bar, p = max(near, key=lambda t: t[0])
            lines.append(f"Closest to a bar: {bar} {p['peak']:.3f} at step {p['at']}, {share:.0%} of its bar "
                         f"{getattr(cfg, bar):g}.")
        return lines
    done = {"warn": "logged", "stop": "stopped the run", "rollback": "rolled back"}
    lines = []
    for m in acted:
        what = done[m["guard_action"]]
        if m["guard_action"] == "rollback":
            what += f" to step {m['guard_rollback_to']}'s weights, learning rate now {m['guard_lr']:.2e}"
        lines.append(f"step {m['step']}: {what}: " + "; ".join(m["guard_signs"]))
    return lines


# ---------------------------------------------------------------- notebook 04: training samples

def sample_notes(sample: dict, tokenizer, question: dict | None = None) -> list[str]:
    """What to notice in one logged training rollout (a line of samples.jsonl): whether its answer is
    right, and for each search whether the documents hold what that search should find. ``question``:
    the training row, whose ``hop_answers`` say what a 2-hop question's first search should find."""
    golden = sample["golden_answers"]
    hops = (question or {}).get("hop_answers") or []
    response = tokenizer.decode(sample["token_ids"][sample["prompt_len"]:], skip_special_tokens=True)
    answer = extract_answer(response.replace(INVALID_ACTION, ""))  # the invalid-action message shows an example
    lines = [f"answer {answer!r}: {'right' if exact_match(answer, golden) else 'wrong'} (gold {golden[0]!r}), "
             f"reward {sample['reward']:.2f}" if answer is not None else
             f"no answer (gold {golden[0]!r}), reward {sample['reward']:.2f}"]
    for n, call in enumerate(sample["calls"], 1):
        wanted = hop_answer(call["query"], golden[0], hops) if hops else golden[0]
        holds = contains_answer([Doc(t, x) for t, x in call["docs"]], [wanted])
        kind = "noisy" if call["noisy"] else "useful"
        if call["noisy"] is None:
            verdict = "hold it" if holds else "do not hold it"
            lines.append(f"search {n} {call['query']!r}: the real engine's documents {verdict} ({wanted!r})")
        elif call["noisy"]:
            lines.append(f"search {n} {call['query']!r}: noisy documents, "
                         + ("yet they state the answer (a simulator slip)" if holds else "without the answer, as asked"))
        else:
            lines.append(f"search {n} {call['query']!r}: {kind} documents that "
                         + (f"state {wanted!r}, as asked" if holds else
                            f"do not state {wanted!r}: the simulator missed (asked for useful documents, it should "
                            "have written the answer in; the loss mask keeps them out of the gradient, but the policy "
                            "read them)"))
    return lines


def prompt_question(text: str) -> str:
    """The question a rollout answers, from its decoded text (after the prompt's last ``Question:``)."""
    tail = text[text.rfind("Question:") + len("Question:"):] if "Question:" in text else ""
    return tail.split("?")[0].strip() + "?" if "?" in tail else tail.strip()


# ---------------------------------------------------------------- notebook 04: the run, and base against trained

ENGINE_NAMES = {"simulator": "fine-tuned simulator", "prompt_only": "prompt-only simulator (the simulator base)",
                "bm25": "real engine (BM25)"}  # rl.engine's values in words


def run_summary(metrics: list[dict], best: dict | None, engine: str) -> list[str]:
    """What ``train()`` did: validation EM by step, which weights are the trained policy, time and calls."""
    lines = []
    validated = [m for m in metrics if "val_em" in m]
    if validated:
        lines.append("validation EM by step (greedy, real engine):")
        lines += [f"  {m['step']:3d}: {m['val_em']:.3f}" + (f" (1-hop {m['val_em_1hop']:.3f}, 2-hop {m['val_em_2hop']:.3f})"
                                                          if "val_em_2hop" in m else "") for m in validated]
    lines.append(f"trained policy: step {best['step']} (best validation EM)" if best else "trained policy: the last step")
    seconds = sum(m["seconds"] for m in metrics)
    calls = sum(m.get("search_calls", 0) for m in metrics)
    lines.append(f"{len(metrics)} steps, {seconds / 60:.1f} min of training ({seconds / max(1, len(metrics)):.2f} s/step); "
                 f"{calls:,} search calls, served by the {ENGINE_NAMES.get(engine, engine)}")
    split = {k: sum(m.get(f"{k}_seconds", 0.0) for m in metrics) / max(seconds, 1e-9)
             for k in ("rollout", "simulator", "logprobs", "update", "validation")}
    lines.append("time split: " + ", ".join(f"{k} {v:.0%}" for k, v in split.items()))
    return lines


def _kinds(results: dict[str, dict]):
    """(label, method, scores) per kind of question and method of ``heldout_scores`` results."""
    for label, pick in (("1-hop", lambda r: r), ("2-hop", lambda r: r.get("two_hop"))):
        for method, scores in results.items():
            if pick(scores):
                yield label, method, pick(scores)


def by_kind(results: dict[str, dict]) -> dict[str, dict]:
    """``{"base 1-hop": scores, "trained 1-hop": …, "base 2-hop": …}`` for one bar chart."""
    return {f"{method} {label}": scores for label, method, scores in _kinds(results)}


def evaluation_lines(results: dict[str, dict]) -> list[str]:
    """One line per method and kind of question: EM, F1, searches, and EM by the searches made."""
    return [f"{method:8s} {label}  EM {s['em']:.3f}  F1 {s['f1']:.3f}  searches/question {s['searches_per_question']:.2f}  "
            f"searched {s['searched_share']:.0%}  n {s['n']}  EM by searches made: "
            + ", ".join(f"{k}: {g['em']:.3f} (n {g['n']})" for k, g in s["em_by_searches"].items())
            for label, method, s in _kinds(results)]


def evaluation_summary(results: dict[str, dict]) -> list[str]:
    """Base against trained, per kind of question (``{"base": scores, "trained": scores}``, each with
    an optional ``"two_hop"``), from ``evaluate.heldout_scores``."""
    lines = []
    for label in ("1-hop", "2-hop"):
        kind = {method: scores for lab, method, scores in _kinds(results) if lab == label}
        if "base" not in kind or "trained" not in kind:
            continue
        base, trained = kind["base"], kind["trained"]
        gap = trained["em"] - base["em"]
        lines.append(f"{label} ({trained['n']} questions): EM {base['em']:.3f} -> {trained['em']:.3f} ({gap:+.3f}); "
                     f"searches per question {base['searches_per_question']:.2f} -> "
                     f"{trained['searches_per_question']:.2f}; searched {base['searched_share']:.0%} -> "
                     f"{trained['searched_share']:.0%}.")
    return lines


# ---------------------------------------------------------------- notebook 00: the simulator base

def recall_note(generated: str, article: str) -> str:
    """How much of an article a model's continuation reproduces: the article's sentences (after the
    first, which names the entity's kind) found word for word in ``generated``."""
    facts = [s.strip().rstrip(".") for s in article.split(". ")[1:] if s.strip()]
    found = [f for f in facts if f in generated]
    missed = [f for f in facts if f not in generated]
    line = f"the sample states {len(found)} of the article's {len(facts)} facts word for word"
    return line + (f"; not: {'; '.join(missed)}" if missed else "")


# ---------------------------------------------------------------- notebook 05: the baselines

def baseline_notes(rows: list[dict], predictions: list[dict], tiny: bool) -> list[str]:
    """What the baselines' search and invalid figures mean, counted from their responses (result rows
    and predictions of ``evaluate.evaluate_all``)."""
    def responses(r):
        return [p["response"] for p in predictions if (p["method"], p["dataset"], p["engine"]) ==
                (r["method"], r["dataset"], r["engine"])]

    lines = []
    for r in rows:
        said = responses(r)
        if r["method"] == "direct" and tiny:
            empty = _mean([("<information></information>" in x) for x in said])
            lines.append(
                f"direct on {r['dataset']}: {r['searches_per_question']:.2f} searches per question, and {r['invalid_rate']:.2f} "
                f"of its responses out of the protocol's order. On the tiny profile `direct` is the policy base with "
                f"an engine that returns nothing: the base knows only the search protocol, so it still searches; "
                f"{empty:.2f} of its responses hold an empty <information> block, which it never saw in training, and "
                f"the turn after one often breaks the protocol (an unclosed tag, a thought inside <answer>). Its "
                f"searches cost nothing and find nothing.")
        elif r["method"] == "rag":
            stopped = _mean([x.rstrip().endswith("</search>") for x in said])
            lines.append(f"rag on {r['dataset']}: one retrieval with the question, given up front, and one turn that may "
                         f"only answer; {r['invalid_rate']:.2f} of its responses are out of the protocol's order, and "
                         f"{stopped:.2f} end in a search, which that one turn does not serve, so they give no answer "
                         f"(on 2-hop questions that search is the second hop).")
    return lines


# ---------------------------------------------------------------- notebook 04: one step by hand

def step_rows(group, batch, before=None, after=None) -> list[dict]:
    """One row per rollout of a step (``trainer.Rollouts`` and its ``Batch``): its question, answer,
    searches, reward and advantage (``rollout_advantages``), and with ``before``/``after``
    (``RLTrainer.rollout_logprobs``) how the update moved its mean log-prob per token."""
    advantages = rollout_advantages(batch)
    rows = []
    for r, t in enumerate(group.trajs):
        answer = " ".join((t.answer or "(none)").split())  # one line, and no tags a table would render
        answer = (answer if len(answer) <= 40 else answer[:39] + "…").replace("<", "&lt;")
        row = {"question": int(batch.group_ids[r]) + 1, "answer": answer,
               "searches": " / ".join(("noisy" if c["noisy"] else "useful") if c["noisy"] is not None else "real"
                                      for c in t.calls) or "none",
               "reward": round(float(batch.scores[r]), 3), "advantage": round(float(advantages[r]), 3)}
        if before is not None and after is not None:
            row["Δ log-prob"] = f"{float(after[r] - before[r]):+.2e}"
        rows.append(row)
    return rows


def rollout_advantages(batch) -> list[float]:
    """Each rollout's advantage: the mean over its own tokens (GRPO gives them all the same one)."""
    mask = batch.mask.to(batch.advantages.dtype)
    return ((batch.advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist()


def update_agreement(advantages: list[float], changes: list[float]) -> str:
    """Did an update move each rollout the way its advantage says? A count per sign."""
    up = [c for a, c in zip(advantages, changes) if a > 0]
    down = [c for a, c in zip(advantages, changes) if a < 0]
    zero = sum(a == 0 for a in advantages)
    parts = []
    if up:
        parts.append(f"{sum(c > 0 for c in up)} of the {len(up)} rollouts with a positive advantage became more likely")
    if down:
        parts.append(f"{sum(c < 0 for c in down)} of the {len(down)} with a negative advantage became less likely")
    if zero:
        parts.append(f"{zero} had an advantage of 0 (their group all scored the same): the update does not aim at "
                     "them, they move only as a side effect of the others")
    if not up and not down:
        parts.append("so this step taught nothing; with more rollouts per question, or later in training, groups differ")
    return "; ".join(parts) + "."


def as_html(lines: list[str]) -> str:
    """Sentences as an HTML list, to show under a figure or a trajectory in the same output."""
    import html
    return "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"


def markdown_table(rows: list[dict]) -> str:
    """Rows of equal keys as a markdown table."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]).replace("|", "\\|") for k in keys) + " |" for r in rows]
    return "\n".join(lines)
