"""BM25 at Wikipedia scale: build, open and query ``search.BM25Engine`` over a synthetic corpus.

    python benchmarks/bm25_scale.py [--passages 200000,2000000] [--dir outputs/bench/bm25_scale] [--queries 512]

Each corpus: ``--passages`` rows in Search-R1's ``{"id", "contents"}`` form, a 2-4 word title and a
100-word passage (wiki-18's passages are 100 words) drawn from a Zipf vocabulary of 300,000 words, so
posting lists are as skewed as a real language's. It is written once and kept (``--dir``). Each phase runs
in a process of its own, which reports its own peak resident memory:

- build: read the corpus, tokenize in chunks, index, save (time, peak memory, index size on disk);
- open: the cached index, memory-mapped (time, resident memory after opening, corpus bytes read);
- query: batches of 1 and of 64 queries of 3-6 words taken from random passages, on one thread and on
  every core (queries/s), with the documents read from the corpus as the engine returns them.

The table ends with an extrapolation to wiki-18's 21,015,324 passages, affine in the corpus size through the
two largest sizes (so what is fixed, such as the chunk being tokenized, stays fixed): an upper bound for what
grows with the vocabulary (opening the index, its resident memory), which grows slower than the corpus, and a
lower bound for the vocabulary itself (this one has 300,000 words; wiki-18's has millions). Results go to
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


def run_phase(args, name: str, passages: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--phase", name, "--dir", str(args.dir), "--passages",
                          str(passages), "--queries", str(args.queries)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bm25_scale phase {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measures(result: dict) -> dict:
    """The table's rows for one corpus size. Query rates become seconds per query for the extrapolation."""
    b, q = result["build"], result["query"]
    rows = {"corpus on disk (GiB)": result["corpus_gib"], "build: seconds": b["seconds"],
            "build: peak resident above the interpreter's (GiB)": b["peak_gib"] - b["base_gib"],
            "index on disk (GiB)": b["index_gib"], "open cached index: seconds": q["open_seconds"],
            "open: resident after opening (GiB)": q["open_rss_gib"], "open: corpus bytes read": q["open_corpus_bytes"],
            "resident after the queries (GiB)": q["after_queries_rss_gib"]}
    for key, value in q.items():
        if key.startswith("qps_"):
            batch, threads = key[len("qps_batch"):].split("_threads")
            rows[f"queries/s, batch {batch}, {threads} thread{'s' if threads != '1' else ''}"] = value
    return rows


def extrapolate(sizes: list[int], values: list[float], name: str, target: int = WIKI18) -> float | None:
    """Affine in the corpus size through the two largest measurements (through 0 with one): what is fixed
    (the interpreter's share, one chunk in hand) stays fixed. Rates are extrapolated as seconds per query."""
    if "bytes read" in name:
        return None
    rate = name.startswith("queries/s")
    ys = [1 / v for v in values] if rate else values
    if len(sizes) == 1:
        y = ys[0] * target / sizes[0]
    else:
        (n0, y0), (n1, y1) = (sizes[-2], ys[-2]), (sizes[-1], ys[-1])
        y = y1 + (y1 - y0) * (target - n1) / (n1 - n0)
    if y <= 0:  # sizes too small (or too noisy) to tell the slope
        return None
    return 1 / y if rate else y


def table(results: list[dict]) -> str:
    sizes = [r["passages"] for r in results]
    rows = [measures(r) for r in results]
    lines = ["| measure | " + " | ".join(f"{n:,} passages" for n in sizes) + f" | wiki-18 ({WIKI18:,}), extrapolated |",
             "|---" * (len(sizes) + 2) + "|"]
    fmt = lambda name, v: "-" if v is None else f"{v:,.0f}" if "bytes" in name or abs(v) >= 100 else f"{v:,.2f}"
    for name in rows[-1]:
        values = [r[name] for r in rows]
        lines.append(f"| {name} | " + " | ".join(fmt(name, v) for v in values)
                     + f" | {fmt(name, extrapolate(sizes, values, name))} |")
    return "\n".join(lines)


def measure(args, passages: int) -> dict:
    corpus, index = args.dir / f"corpus-{passages}.jsonl", args.dir / f"index-{passages}"
    if not corpus.exists():
        t = time.perf_counter()
        write_corpus(corpus, passages)
        print(f"wrote {corpus} in {time.perf_counter() - t:.0f} s", flush=True)
    import shutil
    shutil.rmtree(index, ignore_errors=True)  # the build is measured from scratch
    return {"passages": passages, "corpus_gib": corpus.stat().st_size / 2**30, "cpus": os.cpu_count(),
            "build": run_phase(args, "build", passages), "query": run_phase(args, "query", passages)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passages", default="200000,2000000", help="corpus sizes, comma-separated, smallest first")
    ap.add_argument("--dir", type=Path, default=ROOT / "outputs" / "bench" / "bm25_scale")
    ap.add_argument("--queries", type=int, default=512)
    ap.add_argument("--phase", choices=("build", "query"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = sorted(int(n) for n in str(args.passages).split(","))
    if args.phase:
        corpus, index = args.dir / f"corpus-{sizes[0]}.jsonl", args.dir / f"index-{sizes[0]}"
        result = phase_build(corpus, index) if args.phase == "build" else phase_query(corpus, index, args.queries)
        print(json.dumps(result))
        return 0
    args.dir.mkdir(parents=True, exist_ok=True)
    results = [measure(args, n) for n in sizes]
    (args.dir / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
