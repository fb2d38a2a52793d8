"""Step 1 (docs/method.md §6): a collector model runs the protocol against a real engine; every
trajectory is appended to a JSONL file as soon as its batch finishes.

An interrupted collection resumes where it stopped: rows already in the file are skipped, and
a last line cut off mid-write is dropped (the rows before it are kept).
"""

from __future__ import annotations

from pathlib import Path

from .files import append_jsonl, read_jsonl
from .progress import tqdm
from .reward import exact_match, f1_score
from .rollout import Trajectory, rollout


def trajectory_record(t: Trajectory, row_id: str, sample: int, tokenizer) -> dict:
    return {"id": row_id, "sample": sample, "question": t.question, "golden_answers": t.golden_answers,
            "answer": t.answer, "em": exact_match(t.answer, t.golden_answers),
            "f1": f1_score(t.answer, t.golden_answers), "first_action": t.first_action,
            "invalid_actions": t.invalid_actions, "hit_limit": t.hit_limit, "calls": t.calls, "turns": t.turns,
            "response": tokenizer.decode(t.response_ids, skip_special_tokens=False)}


def read_trajectories(path: str | Path, repair: bool = False) -> list[dict]:
    """Every complete record. A bad line other than the last is an error naming the file and line;
    a broken last line (an interrupted write) is ignored, or cut from the file with ``repair``."""
    path = Path(path)
    return read_jsonl(path, torn_tail="repair" if repair else "ignore") if path.exists() else []


def collect(backend, tokenizer, rows: list[dict], search_fn, cfg, path: str | Path, temperature: float,
            samples_per_question: int = 1, batch_size: int | None = None, enable_thinking: bool = True) -> dict:
    """Roll out each (row, sample) not yet in ``path`` and append the trajectories batch by batch
    (``enable_thinking``: ``thinking.collector``).

    Returns {"written": new records, "skipped": records found from an earlier run}.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["id"], r["sample"]) for r in read_trajectories(path, repair=True)}
    todo = [(row, s) for row in rows for s in range(samples_per_question) if (row["id"], s) not in done]
    batch_size = batch_size or cfg.batch_size
    written = 0
    with tqdm(total=len(todo), desc="collect") as bar:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            trajs = rollout(backend, tokenizer, [row for row, _ in chunk], search_fn, cfg, temperature=temperature,
                            enable_thinking=enable_thinking)
            # one write per batch, on disk before the next batch starts
            append_jsonl(path, [trajectory_record(t, row["id"], s, tokenizer) for t, (row, s) in zip(trajs, chunk)])
            written += len(chunk)
            bar.update(len(chunk))
    return {"written": written, "skipped": len(done)}


def summarize(records: list[dict]) -> dict:
    n = max(1, len(records))
    return {"trajectories": len(records), "em": sum(r["em"] for r in records) / n,
            "f1": sum(r["f1"] for r in records) / n,
            "searches_per_question": sum(len(r["calls"]) for r in records) / n,
            "answered": sum(r["answer"] is not None for r in records) / n,
            "calls": sum(len(r["calls"]) for r in records)}
