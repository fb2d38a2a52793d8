"""Search engines behind one interface: ``search(queries, topk) -> list[list[Doc]]``.

- ``BM25Engine``: a real local engine (bm25s) over a corpus JSONL, the tiny world's articles
  or a Wikipedia dump in Search-R1's ``{"id", "contents"}`` form. The index is built once and
  saved next to a fingerprint of the corpus, so a changed corpus is re-indexed.
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
import time
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


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class BM25Engine:
    """BM25 over a corpus; ``index_dir`` caches the index across runs and notebooks."""

    def __init__(self, corpus_path: str | Path, index_dir: str | Path | None = None):
        import bm25s

        self._bm25s = bm25s
        corpus_path = Path(corpus_path)
        self.docs = read_corpus(corpus_path)
        if not self.docs:
            raise ValueError(f"{corpus_path}: the corpus is empty")
        fingerprint = _fingerprint(corpus_path)
        stamp = Path(index_dir) / "corpus.sha256" if index_dir else None
        if stamp is not None and stamp.exists() and stamp.read_text() == fingerprint:
            self.retriever = bm25s.BM25.load(str(index_dir), show_progress=False)
            return
        self.retriever = bm25s.BM25()
        tokens = bm25s.tokenize([f"{d.title} {d.text}" for d in self.docs], stopwords="en",
                                show_progress=False)
        self.retriever.index(tokens, show_progress=False)
        if stamp is not None:
            Path(index_dir).mkdir(parents=True, exist_ok=True)
            self.retriever.save(str(index_dir), show_progress=False)
            stamp.write_text(fingerprint)  # written last: a half-saved index is rebuilt

    def search(self, queries: list[str], topk: int) -> list[list[Doc]]:
        if not queries:
            return []
        tokens = self._bm25s.tokenize(list(queries), stopwords="en", return_ids=False,
                                      show_progress=False)
        k = min(topk, len(self.docs))
        ids, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        # A score of 0 means no query word matched: a real engine returns nothing there.
        return [[self.docs[i] for i, s in zip(row_ids, row_scores) if s > 0]
                for row_ids, row_scores in zip(ids.tolist(), scores.tolist())]


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
                           hint="Start it (Search-R1's retrieval_server.py, for one), "
                                "or set search.url", timeout_s=self.timeout_s, retries=self.retries,
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
    "bm25": lambda cfg, corpus_path, index_dir: BM25Engine(corpus_path or cfg.corpus_path, index_dir),
    "web": lambda cfg, corpus_path, index_dir: WebSearchEngine(cfg.web_url, cfg.web_api_key_env, cfg.web_provider,
                                                               cfg.web_cache_dir),
    "retriever": lambda cfg, corpus_path, index_dir: RetrieverEngine(cfg.url, cfg.timeout_s, cfg.retries),
    "none": lambda cfg, corpus_path, index_dir: NullEngine(),
})
WEB_PROVIDERS = ("serper", "serpapi")  # search.web_provider


def make_engine(cfg, corpus_path: str | Path | None = None, index_dir: str | Path | None = None) -> SearchEngine:
    """The engine a profile's ``search`` section names (``ENGINES``): the one place engines are built."""
    return ENGINES[cfg.engine](cfg, corpus_path, index_dir)
