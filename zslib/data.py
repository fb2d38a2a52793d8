"""QA datasets in one schema: ``id``, ``question``, ``golden_answers`` (list of str), ``dataset``.

Sources, tried in this order:
- ``path``: a JSONL or parquet file, or a folder holding ``<split>.jsonl`` / ``<split>.parquet``;
- ``"tiny"``: the synthetic world written by notebook 00 (keeps its metadata columns:
  ``hops``, ``relation``, ``subject``, ``supporting_titles``);
- any source may give a multi-hop question ``hop_answers``: each hop's answer, the last a gold one
  (the tiny world's 2-hop questions do; ``simulator.hop_hints`` uses them);
- a FlashRAG name (nq, triviaqa, popqa, hotpotqa, 2wikimultihopqa, musique, bamboogle): the
  hub's ``RUC-NLPIR/FlashRAG_datasets`` when online.

A malformed row is an error naming the file and row; no row is dropped silently.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

from .files import ROOT, JSONLError, read_jsonl

FLASHRAG_DATASETS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
FLASHRAG_HUB_ID = "RUC-NLPIR/FlashRAG_datasets"
TINY_EXTRA = ("hops", "relation", "subject", "supporting_titles")


if TYPE_CHECKING:  # imported where used: the GPU check's machine has no datasets package
    import datasets


class DataError(ValueError):
    pass


def read_rows(file: Path) -> list[dict]:
    if file.suffix == ".parquet":
        import datasets
        return datasets.Dataset.from_parquet(str(file)).to_list()
    try:
        return read_jsonl(file)
    except JSONLError as e:
        raise DataError(str(e)) from None


def normalize_rows(rows: list[dict], source: str, name: str, split: str) -> list[dict]:
    """Check and convert rows to the unified schema; ``source`` names the file in errors."""
    out = []
    for n, row in enumerate(rows, 1):
        where = f"{source}, row {n}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")
        q = row.get("question")
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{where}: field 'question' is missing or empty")
        answers = row.get("golden_answers")
        if not isinstance(answers, (list, tuple)) or not answers:
            raise DataError(f"{where}: field 'golden_answers' must be a non-empty list, got {answers!r}")
        if not all(isinstance(a, (str, int, float)) and str(a).strip() for a in answers):
            raise DataError(f"{where}: field 'golden_answers' holds an empty or non-text answer: {answers!r}")
        item = {"id": str(row.get("id", f"{split}_{n - 1}")), "question": q.strip(),
                "golden_answers": [str(a).strip() for a in answers], "dataset": name}
        if name == "tiny":
            for k in TINY_EXTRA:
                item[k] = row[k]
        if row.get("hop_answers") is not None:
            item["hop_answers"] = _hop_answers(row["hop_answers"], item["golden_answers"], where)
        out.append(item)
    if any("hop_answers" in item for item in out):  # one column for all rows (from_list reads the first row's keys)
        for item in out:
            item.setdefault("hop_answers", [])
    return out


def _hop_answers(value, golden: list[str], where: str) -> list[str]:
    """The optional ``hop_answers`` field of a multi-hop question: each hop's answer in order, the
    last one a gold answer (the tiny world's 2-hop questions: [bridge entity, answer])."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) and a.strip() for a in value):
        raise DataError(f"{where}: field 'hop_answers' must be a list of non-empty strings, got {value!r}")
    if value and value[-1].strip() not in golden:
        raise DataError(f"{where}: field 'hop_answers' must end with a gold answer, got {value!r}")
    return [a.strip() for a in value]


def _local_file(path: Path, split: str) -> Path:
    if path.is_dir():
        for ext in (".jsonl", ".parquet"):
            if (path / f"{split}{ext}").exists():
                return path / f"{split}{ext}"
        raise DataError(f"{path}: no {split}.jsonl or {split}.parquet in this folder")
    if not path.exists():
        raise DataError(f"{path}: no such file")
    return path


def load_qa(name: str, split: str, path: str | Path | None = None) -> datasets.Dataset:
    """One QA split as a ``datasets.Dataset`` in the unified schema."""
    import datasets
    if path is None and name == "tiny":
        path = ROOT / "outputs" / "tiny" / "data"
        if not (path / f"{split}.jsonl").exists():
            raise DataError(f"{path / f'{split}.jsonl'} does not exist: run notebooks/00_prepare.ipynb first")
    if path is not None:
        file = _local_file(Path(path), split)
        rows = normalize_rows(read_rows(file), str(file), name, split)
    elif name in FLASHRAG_DATASETS:
        hub = datasets.load_dataset(FLASHRAG_HUB_ID, name, split=split)
        rows = normalize_rows(hub.to_list(), f"{FLASHRAG_HUB_ID}/{name}/{split}", name, split)
    else:
        raise DataError(f"unknown dataset {name!r}: use 'tiny', one of {', '.join(FLASHRAG_DATASETS)}, "
                        "or give a path")
    if not rows:
        raise DataError(f"{name}/{split}: no rows")
    return datasets.Dataset.from_list(rows)


# FlashRAG publishes labelled test sets for some datasets only; the rest are evaluated on dev.
EVAL_SPLIT = {"nq": "test", "triviaqa": "test", "popqa": "test", "bamboogle": "test",
              "hotpotqa": "dev", "2wikimultihopqa": "dev", "musique": "dev", "tiny": "test"}


def eval_split(name: str) -> str:
    """The split a dataset is evaluated on: FlashRAG's convention, ``test`` for any other set."""
    return EVAL_SPLIT.get(name, "test")


def load_for_profile(profile, name: str, split: str) -> datasets.Dataset:
    """A dataset as a profile sees it, tried in this order: the tiny world under outputs/; a path
    (a JSONL or parquet file in FlashRAG form, used whatever the split, or a folder of
    ``<split>.jsonl``/``.parquet``), relative to the repository or absolute; ``<data.local_dir>/<name>``;
    a FlashRAG name on the hub. A name that is none of these is an error listing what was tried."""
    if name == "tiny":
        return load_qa("tiny", split, profile.data_dir)
    for candidate in (Path(name), ROOT / name):
        if candidate.suffix in (".jsonl", ".parquet", ".json") or candidate.is_dir():
            if candidate.exists():
                return load_qa(candidate.stem, split, candidate)
    local = Path(profile.data.local_dir) / name if profile.data.local_dir else None
    if local is not None and (local.exists() or name not in FLASHRAG_DATASETS):
        return load_qa(name, split, local)
    if name not in FLASHRAG_DATASETS:
        raise DataError(f"dataset {name!r}: not 'tiny', not a JSONL/parquet file or folder (tried {Path(name)} and "
                        f"{ROOT / name}), no data.local_dir, and not a FlashRAG name ({', '.join(FLASHRAG_DATASETS)})")
    return load_qa(name, split, None)


def sample_questions(profile, names: list[str], split: str, n: int, seed: int) -> list[dict]:
    """Up to ``n`` questions drawn at random from the named sets' ``split`` (ids made
    unique as ``<set>/<id>``). The same seed draws the same questions in the same order."""
    rows = []
    for name in names:
        rows += [{**r, "id": f"{name}/{r['id']}"} for r in load_for_profile(profile, name, split).to_list()]
    random.Random(seed).shuffle(rows)
    return rows[:n]
