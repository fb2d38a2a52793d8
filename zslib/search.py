"""Search engines behind one interface: ``search(queries, topk) -> list[list[Doc]]``.

- ``BM25Engine``: a real local engine (bm25s) over a corpus JSONL, the tiny world's articles
  or a Wikipedia dump in Search-R1's ``{"id", "contents"}`` form. The index is built once and
  saved with a fingerprint of the corpus, so a changed corpus is re-indexed; a cached one opens
  memory-mapped, and documents are read from the corpus only when a search returns them.
- ``WebSearchEngine``: a SerpAPI/Serper-style HTTP API with an on-disk answer cache, retries
  with back-off, and the API key read from an environment variable (never stored).
- ``RetrieverEngine``: the retrieval server the field already runs (Search-R1's ``/retrieve``: e5 and FAISS
  over wiki-18, or BM25), shared by every process and notebook.
- ``NullEngine``: returns nothing; measures what a policy knows without search.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .files import read_jsonl
from .http_client import post_json
from .registry import Registry


@dataclass(frozen=True)
class Doc:
    title: str
    text: str


def format_docs(docs: list[Doc]) -> str:
    """The block the policy reads inside <information>: one ``Doc i(Title: t) text`` per line."""
    return "\n".join(f"Doc {i}(Title: {d.title}) {d.text}" for i, d in enumerate(docs, 1))


class SearchEngine(Protocol):
    def search(self, queries: list[str], topk: int) -> list[list[Doc]]: ...


class NullEngine:
    def search(self, queries: list[str], topk: int) -> list[list[Doc]]:
        return [[] for _ in queries]


def _doc_from_row(row: dict, where: str) -> Doc:
    if "title" in row and "text" in row:
        return Doc(str(row["title"]), str(row["text"]))
    if "contents" in row:  # Search-R1 / FlashRAG wiki dumps: '"Title"\ntext'
        title, _, text = str(row["contents"]).partition("\n")
        return Doc(title.strip().strip('"'), text.strip())
    raise ValueError(f"{where}: a corpus row needs 'title' and 'text', or 'contents'")


def read_corpus(path: str | Path) -> list[Doc]:
    """Every passage of a corpus JSONL; a row without a title and text is an error naming it."""
    return [_doc_from_row(row, f"{path}, row {n}") for n, row in enumerate(read_jsonl(path), 1)]


INDEX_FORMAT = "zslib-bm25/2"  # what the stamp promises: bm25s, English stop words, lazy rows by byte offset


FINGERPRINT_BLOCK = 1 << 20


def fingerprint(path: str | Path, block: int | None = None) -> dict:
    """A corpus's identity without reading it whole: size, modification time and a hash of its first,
    middle and last ``block`` bytes (a 14 GB corpus is fingerprinted in milliseconds)."""
    path, block = Path(path), block or FINGERPRINT_BLOCK
    stat = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, stat.st_size // 2 - block // 2), max(0, stat.st_size - block)}):
            f.seek(offset)
            h.update(f.read(block))
    return {"format": INDEX_FORMAT, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sample_sha256": h.hexdigest()}


class CorpusRows:
    """A corpus's rows read lazily by position: the byte offset where each row starts (held in memory or
    memory-mapped from the index folder) and one ``pread`` per row asked for, so a corpus of millions of
    passages is never held in Python objects. ``bytes_read`` counts what was read (tests and benchmarks)."""

    def __init__(self, path: str | Path, offsets):
        self.path, self.offsets = Path(path), offsets  # n + 1 offsets: row i is offsets[i]..offsets[i + 1]
        self._fd = os.open(self.path, os.O_RDONLY)
        self.bytes_read = 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> dict:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        raw = os.pread(self._fd, end - start, start)
        self.bytes_read += len(raw)
        return json.loads(raw)

    def doc(self, i: int) -> Doc:
        return _doc_from_row(self.row(i), f"{self.path}, row {i + 1}")

    def __getitem__(self, i: int) -> Doc:
        return self.doc(i)

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


class _CorpusScan:
    """Chunks of the rows' "title text" strings, reading the file once; ``offsets`` holds where each row
    starts (and, after the last chunk, where the file ends). Blank lines are skipped; a row that is not JSON,
    or has no title and text, is an error naming its line."""

    def __init__(self, path: Path, chunk: int):
        self.path, self.chunk = path, chunk
        self.offsets = array("q")  # 8 bytes a row, not a Python int each

    def __iter__(self):
        texts, position = [], 0
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if raw.strip():
                    try:
                        doc = _doc_from_row(json.loads(raw), f"{self.path}, row {n}")
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{self.path}, line {n}: not valid JSON ({e.msg})") from None
                    self.offsets.append(position)
                    texts.append(f"{doc.title} {doc.text}")
                    if len(texts) == self.chunk:
                        yield texts
                        texts = []
                position += len(raw)
        self.offsets.append(position)
        if texts:
            yield texts


class BM25Engine:
    """BM25 (bm25s) over a corpus JSONL; ``index_dir`` caches the index across runs, notebooks and processes.

    At scale: the corpus is read once and indexed in chunks with bounded memory (``bm25_index``); a
    cached index opens from the folder alone (``fingerprint`` checks the corpus without reading it) with
    its arrays memory-mapped, so processes on one machine share it through the page cache; documents are
    read from the corpus by byte offset when a search returns them (``CorpusRows``); a batch of queries is
    scored on ``threads`` threads (0: one per core)."""

    def __init__(self, corpus_path: str | Path, index_dir: str | Path | None = None, threads: int = 0,
                 chunk: int = 50_000):
        import bm25s
        import numpy as np

        self._bm25s = bm25s
        self.threads = threads or os.cpu_count() or 1
        corpus_path = Path(corpus_path)
        if not corpus_path.exists():
            raise FileNotFoundError(f"{corpus_path}: no corpus there (search.corpus_path)")
        stamp = Path(index_dir) / "stamp.json" if index_dir else None
        expected = fingerprint(corpus_path)
        if stamp is not None and stamp.exists() and json.loads(stamp.read_text()) == expected:
            self.retriever = bm25s.BM25.load(str(index_dir), mmap=True, show_progress=False)
            offsets = np.load(Path(index_dir) / "offsets.npy", mmap_mode="r")
        elif stamp is None:
            offsets = self._build(corpus_path, chunk, None)
        else:  # built whole in a folder of this process's own, then renamed: a reader, or another process
            index_dir = Path(index_dir)  # building the same index, never sees half of one
            tmp = index_dir.with_name(f"{index_dir.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "parts").mkdir(parents=True)
            offsets = self._build(corpus_path, chunk, tmp / "parts")
            shutil.rmtree(tmp / "parts")
            self.retriever.save(str(tmp), show_progress=False)
            np.save(tmp / "offsets.npy", offsets)
            (tmp / "stamp.json").write_text(json.dumps(expected))
            shutil.rmtree(index_dir, ignore_errors=True)
            os.replace(tmp, index_dir)
        self.docs = CorpusRows(corpus_path, offsets)

    def _build(self, corpus_path: Path, chunk: int, parts_dir: Path | None):
        """Index the corpus (``bm25_index.build``, bounded memory); returns the rows' byte offsets."""
        import numpy as np

        from .bm25_index import build

        scan = _CorpusScan(corpus_path, chunk)
        tokenized = (self._bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)
                     for texts in scan)
        self.retriever = build(tokenized, parts_dir)
        if self.retriever is None:
            raise ValueError(f"{corpus_path}: the corpus is empty")
        return np.frombuffer(scan.offsets, dtype=np.int64)

    def retrieve(self, queries: list[str], topk: int) -> list[list[tuple[int, float]]]:
        """(row, score) of the best ``topk`` rows per query, best first; rows no query word matched
        (score 0) are left out, as a real engine returns nothing there."""
        if not queries:
            return []
        tokens = self._bm25s.tokenize(list(queries), stopwords="en", return_ids=False, show_progress=False)
        k = min(topk, len(self.docs))
        threads = min(self.threads, len(queries))
        ids, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=threads if threads > 1 else 0)
        return [[(i, s) for i, s in zip(row_ids, row_scores) if s > 0]
                for row_ids, row_scores in zip(ids.tolist(), scores.tolist())]

    def search(self, queries: list[str], topk: int) -> list[list[Doc]]:
        return [[self.docs[i] for i, _ in hits] for hits in self.retrieve(queries, topk)]


class WebSearchError(RuntimeError):
    pass


class WebSearchEngine:
    """A web search API (Serper- or SerpAPI-style JSON) with cache and retries.

    ``provider="serper"``: POST ``{"q", "num"}`` with header ``X-API-KEY``; results under
    ``organic``. ``provider="serpapi"``: GET with ``q``, ``num``, ``api_key``; results under
    ``organic_results``. Each result's ``title`` and ``snippet`` become a ``Doc``.
    """

    def __init__(self, url: str, api_key_env: str = "SERPER_API_KEY", provider: str = "serper",
                 cache_dir: str | Path | None = None, max_retries: int = 4, backoff_s: float = 1.0,
                 timeout_s: float = 20.0, workers: int = 8):
        if provider not in WEB_PROVIDERS:
            raise ValueError(f"provider must be 'serper' or 'serpapi', got {provider!r}")
        self.url, self.api_key_env, self.provider = url, api_key_env, provider
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.max_retries, self.backoff_s, self.timeout_s, self.workers = max_retries, backoff_s, timeout_s, workers
        self.calls = 0  # HTTP requests actually sent (cache hits excluded): the API bill

    def _key(self) -> str:
        key = os.environ.get(self.api_key_env)
        if not key:
            raise WebSearchError(f"set the environment variable {self.api_key_env} to your API key")
        return key

    def _cache_path(self, query: str, topk: int) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(json.dumps([self.provider, self.url, query, topk]).encode()).hexdigest()
        return self.cache_dir / f"{digest}.json"

    def _request(self, query: str, topk: int) -> dict:
        import requests
        key = self._key()
        for attempt in range(self.max_retries + 1):
            try:
                if self.provider == "serper":
                    r = requests.post(self.url, json={"q": query, "num": topk},
                                      headers={"X-API-KEY": key}, timeout=self.timeout_s)
                else:
                    r = requests.get(self.url, params={"q": query, "num": topk, "api_key": key},
                                     timeout=self.timeout_s)
                self.calls += 1
            except requests.RequestException as e:
                failure = f"{type(e).__name__}"
            else:
                if r.status_code == 200:
                    return r.json()
                if r.status_code in (401, 403):
                    raise WebSearchError(f"{self.url} refused the key in {self.api_key_env} "
                                         f"(HTTP {r.status_code}): check the key")
                if 400 <= r.status_code < 500 and r.status_code != 429:
                    raise WebSearchError(f"{self.url} rejected the query {query!r} (HTTP {r.status_code})")
                failure = f"HTTP {r.status_code}"
            if attempt < self.max_retries:
                time.sleep(self.backoff_s * 2 ** attempt)
        raise WebSearchError(f"{self.url}: no answer after {self.max_retries + 1} tries (last: {failure})")

    def _search_one(self, query: str, topk: int) -> list[Doc]:
        path = self._cache_path(query, topk)
        if path is not None and path.exists():
            payload = json.loads(path.read_text())
        else:
            payload = self._request(query, topk)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(payload))
                tmp.replace(path)
        results = payload.get("organic" if self.provider == "serper" else "organic_results", [])
        return [Doc(str(r.get("title", "")), str(r.get("snippet", ""))) for r in results[:topk]]

    def search(self, queries: list[str], topk: int) -> list[list[Doc]]:
        if len(queries) <= 1:
            return [self._search_one(q, topk) for q in queries]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(lambda q: self._search_one(q, topk), queries))


class RetrieverError(RuntimeError):
    pass


class RetrieverEngine:
    """The field's retrieval server (Search-R1's, also called by verl's and SkyRL's search examples): e5 and
    FAISS over wiki-18, or BM25, behind ``POST <url>`` with ``{"queries", "topk", "return_scores"}``. It
    answers, per query, ``{"document": {"id", "contents"}, "score"}`` entries (plain documents without
    ``return_scores``), ``contents`` being the title line and the text.

    One request per ``search`` call (a rollout turn's queries). A timeout, a dropped connection or a 5xx
    answer is tried again ``retries`` times with doubling pauses; then, or at once for a 4xx answer or an
    answer in another shape, the error names the URL."""

    def __init__(self, url: str, timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 0.5):
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s
        self.calls = 0  # requests answered

    def _post(self, body: dict) -> dict:
        answer = post_json(self.url, body, server="retrieval server", error=RetrieverError,
                           hint="Start it (python -m zslib.serve_retriever --profile P, or Search-R1's "
                                "retrieval_server.py), or set search.url", timeout_s=self.timeout_s, retries=self.retries,
                           backoff_s=self.backoff_s)
        self.calls += 1
        return answer

    def search(self, queries: list[str], topk: int) -> list[list[Doc]]:
        if not queries:
            return []
        answer = self._post({"queries": list(queries), "topk": topk, "return_scores": True})
        results = answer.get("result") if isinstance(answer, dict) else None
        if not isinstance(results, list) or len(results) != len(queries):
            raise RetrieverError(f"retrieval server {self.url}: expected {{\"result\": [one list per query]}} for "
                                 f"{len(queries)} queries, got {str(answer)[:300]}")
        return [[self._doc(entry, q) for entry in row[:topk]] for q, row in zip(queries, results)]

    def _doc(self, entry, query: str) -> Doc:
        document = entry.get("document", entry) if isinstance(entry, dict) else None
        try:
            return _doc_from_row(document, "")
        except (TypeError, ValueError):
            raise RetrieverError(f"retrieval server {self.url}: a result for {query!r} has no document with "
                                 f"'contents' (or 'title' and 'text'): {str(entry)[:300]}") from None


# ``search.engine``: (the profile's search section, corpus path, index folder) -> an engine.
ENGINES = Registry("search.engine", {
    "bm25": lambda cfg, corpus_path, index_dir: BM25Engine(corpus_path or cfg.corpus_path, index_dir, cfg.threads),
    "web": lambda cfg, corpus_path, index_dir: WebSearchEngine(cfg.web_url, cfg.web_api_key_env, cfg.web_provider,
                                                               cfg.web_cache_dir),
    "retriever": lambda cfg, corpus_path, index_dir: RetrieverEngine(cfg.url, cfg.timeout_s, cfg.retries),
    "none": lambda cfg, corpus_path, index_dir: NullEngine(),
})
WEB_PROVIDERS = ("serper", "serpapi")  # search.web_provider
_SHARED: dict = {}  # this process's engines, by what built them


def make_engine(cfg, corpus_path: str | Path | None = None, index_dir: str | Path | None = None) -> SearchEngine:
    """The engine a profile's ``search`` section names (``ENGINES``): the one place engines are built.

    One engine per process for the same settings: a notebook's steps, validation and evaluation share it
    (a BM25 index over wiki-18 is opened once, not once per caller). A changed corpus gets a new engine."""
    corpus = corpus_path or cfg.corpus_path
    stamp = json.dumps(fingerprint(corpus)) if cfg.engine == "bm25" and corpus and Path(corpus).exists() else ""
    key = (repr(cfg), str(corpus), str(index_dir), stamp)
    if key not in _SHARED:
        _SHARED[key] = ENGINES[cfg.engine](cfg, corpus_path, index_dir)
    return _SHARED[key]


def profile_engine(profile) -> SearchEngine:
    """The profile's real engine (``search:``), its BM25 index cached in ``outputs/<profile>/bm25``."""
    return make_engine(profile.search, profile.corpus_path, profile.out / "bm25")
