"""Files every step reads and writes: the repository root, JSONL, and atomic writes.

A leaf module (nothing of zslib is imported here), so every other module can use it. The rule it
keeps: a reader never sees half a file, and an interrupted run loses nothing already written.

- ``read_jsonl``: records of a JSONL file; a bad line is an error naming the file and line, except a
  last line cut off mid-write, which an appending writer may leave (``torn_tail``);
- ``write_jsonl`` and ``write_text_atomic``: a temporary file, then a rename;
- ``append_jsonl``: lines added and flushed to disk before the call returns;
- ``write_folder_atomic`` and ``complete_folders``: checkpoint-style folders that appear whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent  # the repository: configs/, outputs/, notebooks/


class JSONLError(ValueError):
    """A line of a JSONL file that is not a JSON record (the message names the file and line)."""


def read_jsonl(path: str | Path, torn_tail: str = "error") -> list[dict]:
    """Every record of a JSONL file (blank lines skipped).

    ``torn_tail``: what to do with a last line that is not a complete record (no newline, or not
    JSON), as a process killed mid-write leaves it: ``"error"`` (the default), ``"ignore"`` it, or
    ``"repair"``: cut it from the file. A bad line before the last is always an error.
    """
    if torn_tail not in ("error", "ignore", "repair"):
        raise ValueError(f"torn_tail must be error, ignore or repair, not {torn_tail!r}")
    path = Path(path)
    with open(path, "rb") as f:
        lines = f.readlines()
    records, good_bytes = [], 0
    for n, raw in enumerate(lines, 1):
        torn = n == len(lines) and torn_tail != "error"  # the last line, where a cut-off write shows
        try:
            if torn and not raw.endswith(b"\n"):
                raise ValueError("the line has no newline at its end")
            record = json.loads(raw) if raw.strip() else None
        except ValueError as e:
            if not torn:
                reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                raise JSONLError(f"{path}, line {n}: not valid JSON ({reason})"
                                 + (", and not the last line" if torn_tail != "error" else "")) from None
            if torn_tail == "repair":
                with open(path, "r+b") as f:
                    f.truncate(good_bytes)
            break
        if record is not None:
            records.append(record)
        good_bytes += len(raw)
    return records


def _lines(rows: list[dict], sort_keys: bool) -> str:
    return "".join(json.dumps(r, sort_keys=sort_keys, ensure_ascii=False) + "\n" for r in rows)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically: a temporary file, then a rename (a reader never sees half of it,
    and an interrupted write leaves the old file whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_jsonl(path: str | Path, rows: list[dict], sort_keys: bool = True) -> None:
    """Rows as JSONL, atomically. Keys are sorted by default, so the same rows give the same bytes."""
    write_text_atomic(path, _lines(rows, sort_keys))


def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Append rows and flush them to disk: a crash after this call loses none of them."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(_lines(rows, sort_keys=False))
        f.flush()
        os.fsync(f.fileno())


def write_folder_atomic(final: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(folder)`` into a temporary folder that is renamed to ``final`` when complete, so a
    crash never leaves a half-written folder under the final name."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def complete_folders(parent: str | Path, pattern: str = "step-*") -> list[Path]:
    """``parent``'s complete folders matching ``pattern``, in name order (an unfinished one still
    ends in ``.tmp``)."""
    parent = Path(parent)
    if not parent.exists():
        return []
    return sorted(p for p in parent.glob(pattern) if not p.name.endswith(".tmp"))
