"""Answer extraction and QA scores (docs/method.md §8): EM, cover-EM and F1 with SQuAD normalisation.

Two registries: ``METRICS`` scores an answer against the gold ones (``labeling.metric`` judges
collected trajectories with it), ``REWARDS`` scores a whole trajectory for RL (``rl.reward``).
"""

from __future__ import annotations

import re
import string
from collections import Counter

from .registry import Registry

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def extract_answer(response: str) -> str | None:
    """The last <answer> block of the response (pass the response, not the prompt)."""
    found = _ANSWER.findall(response or "")
    return found[-1].strip() if found else None


def exact_match(pred: str | None, golden_answers: list[str]) -> float:
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in golden_answers))


def cover_exact_match(pred: str | None, golden_answers: list[str]) -> float:
    """ZeroSearch's reported "EM": a normalised gold answer is a substring of the prediction."""
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    return float(any(normalize_answer(g) in p for g in golden_answers))


def f1_score(pred: str | None, golden_answers: list[str]) -> float:
    if pred is None:
        return 0.0
    p_tokens = normalize_answer(pred).split()
    best = 0.0
    for g in golden_answers:
        g_tokens = normalize_answer(g).split()
        common = sum((Counter(p_tokens) & Counter(g_tokens)).values())
        if common == 0:
            continue
        precision, recall = common / len(p_tokens), common / len(g_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


_BLOCK = re.compile(r"<(think|search|information|answer)>(.*?)</\1>", re.DOTALL)
_VALID_ORDER = re.compile(r"^(think )?(search information (think )?)*answer $")


def valid_format(response: str) -> bool:
    """Search-R1's format check on a response: blocks in the order think? (search information
    think?)* answer, with nothing but whitespace between them (an invalid-action message breaks it)."""
    names, end = [], 0
    for m in _BLOCK.finditer(response or ""):
        if response[end:m.start()].strip():
            return False
        names.append(m.group(1))
        end = m.end()
    if response is None or response[end:].strip():
        return False
    return bool(_VALID_ORDER.match("".join(n + " " for n in names)))


def format_reward(response: str, golden_answers: list[str], answer: str | None = ...) -> float:
    """Search-R1 v0.3: right and well formed 1, right 0.8, wrong but well formed 0.2, wrong 0.1,
    no answer at all 0 (right = exact match of the last answer block). Pass ``answer`` when the
    response holds text the policy did not write (the invalid-action message shows an example
    answer block, which must not count)."""
    if answer is ...:
        answer = extract_answer(response)
    if answer is None:
        return 0.0
    right, valid = exact_match(answer, golden_answers) == 1.0, valid_format(response)
    return {(True, True): 1.0, (True, False): 0.8, (False, True): 0.2, (False, False): 0.1}[(right, valid)]


# ``labeling.metric``: (answer or None, golden answers) -> score in [0, 1].
METRICS = Registry("labeling.metric", {"f1": f1_score, "em": exact_match, "cover_em": cover_exact_match})

# ``rl.reward``: a trajectory's sequence reward from (its answer, the golden answers, its response:
# everything after the prompt, documents included, whose block order the format reward checks). The
# answer is the last <answer> block of the policy's own turns: an example answer in a message the
# policy did not write never counts.
REWARDS = Registry("rl.reward", {
    "f1": lambda answer, golden, response: f1_score(answer, golden),
    "em": lambda answer, golden, response: exact_match(answer, golden),
    "format": lambda answer, golden, response: format_reward(response, golden, answer=answer),
})
