"""BM25 at Wikipedia scale: build, open and query ``search.BM25Engine`` over a synthetic corpus.

    python benchmarks/bm25_scale.py [--passages 2000000] [--dir outputs/bench/bm25_scale] [--queries 512]

The corpus: ``--passages`` rows in Search-R1's ``{"id", "contents"}`` form, a 2-4 word title and a
100-word passage (wiki-18's passages are 100 words) drawn from a Zipf vocabulary of 300,000 words, so
posting lists are as skewed as a real language's. It is written once and kept (``--dir``). Each phase runs
in a process of its own, which reports its own peak resident memory:

- build: read the corpus, tokenize in chunks, index, save (time, peak memory, index size on disk);
- open: the cached index, memory-mapped (time, resident memory after opening, corpus bytes read);
- query: batches of 1 and of 64 queries of 3-6 words taken from random passages, on one thread and on
  every core (queries/s), with the documents read from the corpus as the engine returns them.

The table ends with a linear extrapolation to wiki-18's 21,015,324 passages: an upper bound for what
grows with the vocabulary (opening the index, its resident memory), which grows slower than the corpus. Results go to
``<dir>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WIKI18 = 21_015_324


def rss_gib() -> float:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_corpus(path: Path, passages: int, seed: int = 0, words: int = 300_000, length: int = 100) -> None:
    """The synthetic corpus, written to a temporary name and renamed when whole."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths, codes = rng.integers(3, 10, size=words), rng.integers(0, 26, size=(words, 9))
    vocab = np.array(["".join(letters[c[:n]]) for c, n in zip(codes, lengths)], dtype=object)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for start in range(0, passages, 10_000):
            n = min(10_000, passages - start)
            rows = vocab[np.minimum(rng.zipf(1.15, size=(n, length + 4)) - 1, words - 1)]
            titles = rng.integers(2, 5, size=n)
            # lower-case letters only: the JSON needs no escaping beyond the title's quotes and the newline
            f.writelines('{"id": "%d", "contents": "\\"%s\\"\\n%s"}\n'
                         % (start + i, " ".join(rows[i, :titles[i]]).title(), " ".join(rows[i, 4:])) for i in range(n))
    tmp.replace(path)


def phase_build(corpus: Path, index: Path) -> dict:
    from zslib.search import BM25Engine
    base = rss_gib()
    t = time.perf_counter()
    engine = BM25Engine(corpus, index)
    seconds = time.perf_counter() - t
    size = sum(p.stat().st_size for p in index.iterdir())
    return {"seconds": seconds, "peak_gib": peak_gib(), "base_gib": base, "index_gib": size / 2**30,
            "passages": len(engine.docs)}


def phase_query(corpus: Path, index: Path, queries: int, seed: int = 1) -> dict:
    import random

    from zslib import search
    base = rss_gib()
    t = time.perf_counter()
    engine = search.BM25Engine(corpus, index)
    opened = {"open_seconds": time.perf_counter() - t, "open_rss_gib": rss_gib() - base,
              "open_corpus_bytes": engine.docs.bytes_read}
    rng = random.Random(seed)
    asked = []
    for _ in range(queries):
        words = engine.docs.doc(rng.randrange(len(engine.docs))).text.split()
        start = rng.randrange(len(words) - 6)
        asked.append(" ".join(words[start:start + rng.randint(3, 6)]))
    rates = {}
    for threads in (1, os.cpu_count() or 1):
        engine.threads = threads
        for batch in (1, 64):
            t = time.perf_counter()
            for i in range(0, len(asked), batch):
                engine.search(asked[i:i + batch], 3)
            rates[f"qps_batch{batch}_threads{threads}"] = len(asked) / (time.perf_counter() - t)
    return {**opened, **rates, "after_queries_rss_gib": rss_gib() - base, "peak_gib": peak_gib(), "base_gib": base}


def run_phase(args, name: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--phase", name, "--dir", str(args.dir), "--passages",
                          str(args.passages), "--queries", str(args.queries)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bm25_scale phase {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(result: dict) -> str:
    b, q, n = result["build"], result["query"], result["passages"]
    scale = WIKI18 / n
    threads = os.cpu_count() or 1
    rows = [("corpus on disk (GiB)", result["corpus_gib"], result["corpus_gib"] * scale),
            ("build: seconds", b["seconds"], b["seconds"] * scale),
            ("build: peak resident above the interpreter's (GiB)", b["peak_gib"] - b["base_gib"],
             (b["peak_gib"] - b["base_gib"]) * scale),
            ("index on disk (GiB)", b["index_gib"], b["index_gib"] * scale),
            ("open cached index: seconds", q["open_seconds"], q["open_seconds"] * scale),
            ("open: resident after opening (GiB)", q["open_rss_gib"], q["open_rss_gib"] * scale),
            ("open: corpus bytes read", q["open_corpus_bytes"], None),
            ("resident after the queries (GiB)", q["after_queries_rss_gib"], q["after_queries_rss_gib"] * scale)]
    for threads_ in sorted({1, threads}):
        for batch in (1, 64):
            qps = q[f"qps_batch{batch}_threads{threads_}"]
            rows.append((f"queries/s, batch {batch}, {threads_} thread{'s' if threads_ > 1 else ''}", qps, qps / scale))
    lines = [f"| measure | {n:,} passages | extrapolated to wiki-18 ({WIKI18:,}) |", "|---|---|---|"]
    for name, value, extra in rows:
        fmt = (lambda v: f"{v:,.0f}") if "bytes" in name else (lambda v: f"{v:,.2f}" if v < 100 else f"{v:,.0f}")
        lines.append(f"| {name} | {fmt(value)} | {'-' if extra is None else fmt(extra)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passages", type=int, default=2_000_000)
    ap.add_argument("--dir", type=Path, default=ROOT / "outputs" / "bench" / "bm25_scale")
    ap.add_argument("--queries", type=int, default=512)
    ap.add_argument("--phase", choices=("build", "query"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    corpus, index = args.dir / f"corpus-{args.passages}.jsonl", args.dir / f"index-{args.passages}"
    if args.phase == "build":
        print(json.dumps(phase_build(corpus, index)))
        return 0
    if args.phase == "query":
        print(json.dumps(phase_query(corpus, index, args.queries)))
        return 0
    args.dir.mkdir(parents=True, exist_ok=True)
    if not corpus.exists():
        t = time.perf_counter()
        write_corpus(corpus, args.passages)
        print(f"wrote {corpus} in {time.perf_counter() - t:.0f} s", flush=True)
    import shutil
    shutil.rmtree(index, ignore_errors=True)  # the build is measured from scratch
    result = {"passages": args.passages, "corpus_gib": corpus.stat().st_size / 2**30, "cpus": os.cpu_count(),
              "build": run_phase(args, "build"), "query": run_phase(args, "query")}
    (args.dir / "results.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
