"""Files every step reads and writes: the repository root, JSONL, and atomic writes.

A leaf module (nothing of zslib is imported here), so every other module can use it. The rule it
keeps: a reader never sees half a file, and an interrupted run loses nothing already written.

- ``read_jsonl``: records of a JSONL file; a bad line is an error naming the file and line, except a
  last line cut off mid-write, which an appending writer may leave (``torn_tail``);
- ``write_jsonl`` and ``write_text_atomic``: a temporary file, then a rename;
- ``append_jsonl``: lines added and flushed to disk before the call returns;
- ``write_folder_atomic`` and ``complete_folders``: checkpoint-style folders that appear whole or not at all;
- ``check_recipe`` and ``write_recipe``: a folder that a step keeps between runs (a base, a fine-tuned simulator,
  an RL run) records the settings that made it (``recipe.json``), so a profile edited since is refused, never
  mistaken for the folder's recipe.
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


RECIPE = "recipe.json"  # in a kept folder: the settings that made it


def as_recipe(settings: dict) -> dict:
    """``settings`` as they read back from a recipe file (tuples become lists, and so on)."""
    return json.loads(json.dumps(settings, default=str))


def recipe_changes(stored: dict, wanted: dict) -> list[str]:
    """``key: stored -> wanted`` for each setting that differs between two recipes (a section's settings
    are named ``section.key``)."""
    flat: dict[str, list] = {}
    for which, recipe in enumerate((stored, wanted)):
        for k, v in recipe.items():
            for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)]):
                flat.setdefault(f"{k}.{kk}" if kk else k, [None, None])[which] = vv
    return [f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(flat.items()) if a != b]


def check_recipe(folder: str | Path, recipe: dict, what: str, remedy: str) -> None:
    """Refuse ``folder`` when its ``recipe.json`` differs from ``recipe``: a ValueError naming the file, each
    setting that differs, and ``remedy``; nothing is touched. A folder without one (made before recipes were
    recorded) passes unchecked, and so does a link: it is another run's, shared on purpose and checked there
    (``benchmarks/seeds.py`` links seed 0's simulator into the other seeds' runs)."""
    folder = Path(folder)
    path = folder / RECIPE
    if folder.is_symlink() or not path.exists():
        return
    changes = recipe_changes(json.loads(path.read_text()), as_recipe(recipe))
    if changes:
        raise ValueError(f"{path}: this folder holds {what} of another recipe than the profile's "
                         f"({'; '.join(changes)}), left as it is: {remedy}")


def write_recipe(folder: str | Path, recipe: dict) -> None:
    write_text_atomic(Path(folder) / RECIPE, json.dumps(as_recipe(recipe), indent=1))
