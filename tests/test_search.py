import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from zslib.evaluate import retrieval_recall
from zslib.config import SearchConfig
from zslib import search
from zslib.search import (BM25Engine, Doc, RetrieverEngine, RetrieverError, WebSearchEngine, WebSearchError,
                          format_docs, make_engine, read_corpus)


def test_bm25_finds_the_gold_article_for_one_hop_questions(tiny_world, bm25):
    rows = [r for r in tiny_world["splits"]["test"] if r["hops"] == 1]
    recall = retrieval_recall(bm25, rows, topk=3)
    print(f"BM25 recall@3 on {len(rows)} 1-hop test questions: {recall:.3f}")
    assert recall >= 0.95


def test_bm25_returns_topk_docs_and_nothing_for_unknown_words(bm25, tiny_world):
    subject = tiny_world["splits"]["test"][0]["subject"]
    named, common, none = bm25.search([subject, "born", "qqqzzz"], topk=3)
    assert 1 <= len(named) <= 3 and named[0].title == subject
    assert len(common) == 3
    assert none == []


def test_index_is_saved_reused_and_rebuilt_when_the_corpus_changes(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "1", "contents": '"Alpha"\nalpha is a letter'}) + "\n"
                      + json.dumps({"id": "2", "title": "Beta", "text": "beta follows alpha"}) + "\n")
    first = BM25Engine(corpus, tmp_path / "index")
    assert json.loads((tmp_path / "index" / "stamp.json").read_text())["size"] == corpus.stat().st_size
    assert first.search(["letter"], 2)[0] == [Doc("Alpha", "alpha is a letter")]
    assert BM25Engine(corpus, tmp_path / "index").search(["follows"], 1)[0][0].title == "Beta"
    corpus.write_text(json.dumps({"id": "3", "title": "Gamma", "text": "gamma letter"}) + "\n")
    assert BM25Engine(corpus, tmp_path / "index").search(["letter"], 1)[0][0].title == "Gamma"


def test_bad_corpus_row_names_file_and_line(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"title": "A", "text": "a"}\n{"body": "no title"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl, row 2: a corpus row needs"):
        BM25Engine(corpus)
    corpus.write_text('{"title": "A", "text": "a"}\n{"title": "B", "te\n{"title": "C", "text": "c"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl, line 2: not valid JSON"):
        BM25Engine(corpus)


def test_format_docs():
    block = format_docs([Doc("A", "first."), Doc("B", "second.")])
    assert block == "Doc 1(Title: A) first.\nDoc 2(Title: B) second."


class _FakeSerper(BaseHTTPRequestHandler):
    """Answers like Serper; fails the first ``fail_first`` requests with HTTP 500."""
    requests_seen: list = []
    fail_first = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests_seen.append(body["q"])
        if self.headers.get("X-API-KEY") != "secret-key":
            return self._send(401, {"message": "Unauthorized"})
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            return self._send(500, {"message": "busy"})
        organic = [{"title": f"{body['q']} {i}", "snippet": f"snippet {i}"} for i in range(body["num"])]
        self._send(200, {"organic": organic})

    def _send(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def serper(monkeypatch):
    _FakeSerper.requests_seen, _FakeSerper.fail_first = [], 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeSerper)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TEST_SERPER_KEY", "secret-key")
    yield f"http://127.0.0.1:{server.server_port}/search"
    server.shutdown()


def test_web_engine_answers_and_caches(serper, tmp_path):
    engine = WebSearchEngine(serper, "TEST_SERPER_KEY", cache_dir=tmp_path / "cache", backoff_s=0.01)
    first = engine.search(["who is x", "where is y"], topk=2)
    assert [d.title for d in first[0]] == ["who is x 0", "who is x 1"]
    assert engine.calls == 2
    again = engine.search(["who is x"], topk=2)
    assert again[0] == first[0]
    assert engine.calls == 2 and len(_FakeSerper.requests_seen) == 2, "a cache hit sends no request"
    cached = "".join(p.read_text() for p in (tmp_path / "cache").iterdir())
    assert "secret-key" not in cached


def test_web_engine_retries_server_errors(serper):
    _FakeSerper.fail_first = 2
    engine = WebSearchEngine(serper, "TEST_SERPER_KEY", backoff_s=0.01, max_retries=3)
    docs = engine.search(["q"], topk=1)
    assert docs[0][0].title == "q 0"
    assert len(_FakeSerper.requests_seen) == 3


def test_web_engine_gives_up_after_max_retries(serper):
    _FakeSerper.fail_first = 10
    engine = WebSearchEngine(serper, "TEST_SERPER_KEY", backoff_s=0.01, max_retries=2)
    with pytest.raises(WebSearchError, match="3 tries.*HTTP 500"):
        engine.search(["q"], topk=1)


def test_web_engine_401_is_a_clear_error_without_the_key(serper, monkeypatch):
    monkeypatch.setenv("TEST_SERPER_KEY", "wrong-key")
    engine = WebSearchEngine(serper, "TEST_SERPER_KEY", backoff_s=0.01)
    with pytest.raises(WebSearchError) as e:
        engine.search(["q"], topk=1)
    assert "401" in str(e.value) and "TEST_SERPER_KEY" in str(e.value)
    assert "wrong-key" not in str(e.value)
    assert len(_FakeSerper.requests_seen) == 1, "a 401 is not retried"


def test_web_engine_missing_key(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(WebSearchError, match="NO_SUCH_KEY_VAR"):
        WebSearchEngine("http://127.0.0.1:9/x", "NO_SUCH_KEY_VAR").search(["q"], 1)


# ---------------------------------------------------------------- the field's retrieval server (Search-R1's protocol)

class _SearchR1StandIn(BaseHTTPRequestHandler):
    """Answers exactly as Search-R1's retrieval server does, from BM25 over the tiny corpus; ``plan`` holds
    the statuses (or "slow") to answer with before answering properly."""
    engine, plan, requests = None, [], []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        step = type(self).plan.pop(0) if type(self).plan else 200
        if step == "slow":
            time.sleep(1.0)
            step = 200
        if step != 200:
            self.send_response(step)
            self.end_headers()
            self.wfile.write(b"stand-in failure")
            return
        rows = []
        for docs in self.engine.search(body["queries"], body["topk"]):
            documents = [{"id": str(i), "contents": f'"{d.title}"\n{d.text}'} for i, d in enumerate(docs)]
            rows.append([{"document": doc, "score": 10.0 - i} for i, doc in enumerate(documents)]
                        if body.get("return_scores") else documents)
        payload = json.dumps({"result": rows}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def search_r1(bm25):
    _SearchR1StandIn.engine, _SearchR1StandIn.plan, _SearchR1StandIn.requests = bm25, [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SearchR1StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/retrieve", _SearchR1StandIn
    server.shutdown()


def test_the_retriever_engine_returns_the_servers_documents_as_bm25_in_process(search_r1, bm25, tiny_world):
    url, stand_in = search_r1
    engine = make_engine(SearchConfig(engine="retriever", url=url))
    queries = [r["question"] for r in tiny_world["splits"]["test"][:5]] + ["zzzz qqqq"]
    assert engine.search(queries, 3) == bm25.search(queries, 3)
    assert stand_in.requests == [{"queries": queries, "topk": 3, "return_scores": True}], "one request per call"
    assert engine.search([], 3) == [] and len(stand_in.requests) == 1


def test_the_retriever_engine_reads_documents_without_scores_too(search_r1):
    url, stand_in = search_r1
    engine = RetrieverEngine(url)
    entry = {"id": "7", "contents": '"Ada Lovelace"\nAda Lovelace was a mathematician.'}
    assert engine._doc(entry, "q") == engine._doc({"document": entry, "score": 1.5}, "q") == \
        Doc("Ada Lovelace", "Ada Lovelace was a mathematician.")


def test_the_retriever_engine_retries_5xx_and_then_names_the_url(search_r1):
    url, stand_in = search_r1
    engine = RetrieverEngine(url, retries=2, backoff_s=0.01)
    stand_in.plan = [503, 500]
    assert len(engine.search(["capital"], 2)) == 1 and len(stand_in.requests) == 3
    stand_in.plan = [500, 500, 500]
    with pytest.raises(RetrieverError, match=rf"retrieval server {url} answered HTTP 500.*\(3 tries\)"):
        engine.search(["capital"], 2)


def test_the_retriever_engine_does_not_retry_a_4xx_and_names_the_url(search_r1):
    url, stand_in = search_r1
    stand_in.plan = [422]
    with pytest.raises(RetrieverError, match=rf"retrieval server {url} refused the request: HTTP 422"):
        RetrieverEngine(url, backoff_s=0.01).search(["capital"], 2)
    assert len(stand_in.requests) == 1


def test_a_slow_or_absent_retriever_is_an_error_naming_the_url(search_r1):
    url, stand_in = search_r1
    stand_in.plan = ["slow", "slow"]
    with pytest.raises(RetrieverError, match=rf"{url} did not answer within 0.2 s \(2 tries\)"):
        RetrieverEngine(url, timeout_s=0.2, retries=1, backoff_s=0.01).search(["capital"], 2)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}/retrieve"
    with pytest.raises(RetrieverError, match=rf"retrieval server {down} is not reachable .*\(1 tries\)"):
        RetrieverEngine(down, retries=0).search(["capital"], 2)


def test_a_retriever_answer_of_another_shape_is_an_error_naming_the_url(search_r1, monkeypatch):
    url, _ = search_r1
    engine = RetrieverEngine(url)
    monkeypatch.setattr(engine, "_post", lambda body: {"result": [[{"score": 1.0}]]})
    with pytest.raises(RetrieverError, match=rf"{url}: a result for 'capital' has no document"):
        engine.search(["capital"], 2)
    monkeypatch.setattr(engine, "_post", lambda body: {"results": []})
    with pytest.raises(RetrieverError, match=rf"{url}: expected .* for 1 queries"):
        engine.search(["capital"], 2)


# ---------------------------------------------------------------- BM25 at scale: cached, lazy, shared


class _CountingFile:
    """A binary file whose reads are counted in ``counts`` (bytes and calls)."""

    def __init__(self, f, counts):
        self._f, self._counts = f, counts

    def read(self, *args):
        data = self._f.read(*args)
        self._counts["bytes"] += len(data)
        self._counts["reads"] += 1
        return data

    def __iter__(self):
        for line in self._f:
            self._counts["bytes"] += len(line)
            yield line

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _count_corpus_reads(monkeypatch, corpus):
    """Every byte ``zslib.search`` reads from ``corpus``, through ``open`` or ``os.pread``."""
    counts = {"bytes": 0, "reads": 0}
    real_open, real_pread = open, search.os.pread
    fd_of_corpus = set()

    def counting_open(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        return _CountingFile(f, counts) if str(path) == str(corpus) else f

    def counting_pread(fd, n, offset):
        data = real_pread(fd, n, offset)
        if fd in fd_of_corpus:
            counts["bytes"] += len(data)
            counts["reads"] += 1
        return data

    real_os_open = search.os.open

    def recording_os_open(path, *args, **kwargs):
        fd = real_os_open(path, *args, **kwargs)
        if str(path) == str(corpus):
            fd_of_corpus.add(fd)
        return fd

    monkeypatch.setattr(search, "open", counting_open, raising=False)
    monkeypatch.setattr(search.os, "pread", counting_pread)
    monkeypatch.setattr(search.os, "open", recording_os_open)
    return counts


def test_a_cached_index_opens_without_reading_the_corpus(tiny_world, tmp_path, monkeypatch):
    corpus = tiny_world["paths"]["corpus"]
    size = corpus.stat().st_size
    monkeypatch.setattr(search, "FINGERPRINT_BLOCK", 1024)
    counts = _count_corpus_reads(monkeypatch, corpus)
    BM25Engine(corpus, tmp_path / "index")
    assert counts["bytes"] >= size  # building reads it all once
    counts.update(bytes=0, reads=0)
    engine = BM25Engine(corpus, tmp_path / "index")
    print(f"corpus {size:,} bytes; opening the cached index read {counts['bytes']:,} bytes in {counts['reads']} reads")
    assert counts["bytes"] <= 3 * 1024 < size // 20  # the fingerprint's three blocks, nothing else
    assert engine.docs.bytes_read == 0
    assert type(engine.retriever.scores["data"]).__name__ == "memmap"  # the index itself is memory-mapped
    counts.update(bytes=0, reads=0)
    docs = engine.search(["born"], 3)[0]
    rows = [json.dumps(a) for a in tiny_world["articles"] if a["title"] in {d.title for d in docs}]
    assert len(docs) == 3 and counts["reads"] == 3  # one read per document returned
    assert counts["bytes"] == engine.docs.bytes_read == sum(len(r.encode()) + 1 for r in rows)


def test_lazy_documents_and_threaded_queries_equal_an_eager_in_memory_index(tiny_world, bm25):
    import bm25s
    import numpy as np

    corpus = tiny_world["paths"]["corpus"]
    eager = read_corpus(corpus)
    assert len(bm25.docs) == len(eager) and [bm25.docs[i] for i in range(len(eager))] == eager
    # the reference: one bm25s index over the passages held in memory, tokenized in one go
    reference = bm25s.BM25()
    reference.index(bm25s.tokenize([f"{d.title} {d.text}" for d in eager], stopwords="en", show_progress=False),
                    show_progress=False)  # the whole corpus at once, bm25s's own way
    questions = [r["question"] for r in tiny_world["splits"]["test"][:200]] + ["qqqzzz", "born"]
    tokens = bm25s.tokenize(questions, stopwords="en", return_ids=False, show_progress=False)
    ids, scores = reference.retrieve(tokens, k=3, show_progress=False)
    expected = [[eager[i] for i, s in zip(r, c) if s > 0] for r, c in zip(ids.tolist(), scores.tolist())]
    chunked = BM25Engine(corpus, None, threads=1, chunk=7)  # built in chunks of 7 passages, parts in memory
    assert chunked.search(questions, 3) == expected
    assert BM25Engine(corpus, None, threads=2).search(questions, 3) == expected
    assert bm25.search(questions, 3) == expected  # built with its parts on disk, opened memory-mapped
    # the chunked build is bm25s's own index, array for array, bit for bit
    for name in ("data", "indices", "indptr"):
        mine, theirs = np.asarray(chunked.retriever.scores[name]), reference.scores[name]
        assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs), name
    assert chunked.retriever.vocab_dict == reference.vocab_dict
    hits = chunked.retrieve(questions, 3)
    assert [[s for _, s in row] for row in hits] == [[s for s in c if s > 0] for c in scores.tolist()]


def test_one_engine_per_process_until_the_corpus_changes(tmp_path):
    from zslib.config import SearchConfig
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"title": "Alpha", "text": "alpha letter"}) + "\n")
    cfg = SearchConfig(engine="bm25", corpus_path=str(corpus))
    first = make_engine(cfg, None, tmp_path / "index")
    assert make_engine(cfg, None, tmp_path / "index") is first
    assert make_engine(SearchConfig(engine="bm25", corpus_path=str(corpus), topk=5), None, tmp_path / "index") is not first
    corpus.write_text(json.dumps({"title": "Gamma", "text": "gamma letter"}) + "\n")
    changed = make_engine(cfg, None, tmp_path / "index")
    assert changed is not first and changed.search(["letter"], 1)[0][0].title == "Gamma"


# ---------------------------------------------------------------- our retrieval server


@pytest.fixture
def our_server(bm25):
    from zslib.serve_retriever import serve_in_thread
    server, url = serve_in_thread(bm25)
    yield url
    server.shutdown()


def test_our_server_gives_the_in_process_documents_in_search_r1s_format(our_server, bm25, tiny_world):
    import requests
    questions = [r["question"] for r in tiny_world["splits"]["test"][:64]] + ["qqqzzz"]
    engine = RetrieverEngine(our_server)
    assert engine.search(questions, 3) == bm25.search(questions, 3) and engine.calls == 1
    raw = requests.post(our_server, json={"queries": ["born"], "topk": 2, "return_scores": True}, timeout=10).json()
    (first, second), = raw["result"]
    title = bm25.search(["born"], 2)[0][0].title
    assert first["document"]["contents"].startswith(f'"{title}"\n') and first["score"] >= second["score"] > 0
    assert first["document"]["id"] == next(a["id"] for a in tiny_world["articles"] if a["title"] == title)  # the row's own id
    plain = requests.post(our_server, json={"queries": ["born"], "topk": 2}, timeout=10).json()["result"][0]
    assert plain == [first["document"], second["document"]]
    bad = requests.post(our_server, json={"queries": "born", "topk": 2}, timeout=10)
    assert bad.status_code == 422 and "queries" in bad.json()["detail"]
    assert requests.post(our_server, json={"queries": ["x"], "topk": 0}, timeout=10).status_code == 422
    health = requests.get(our_server.replace("/retrieve", "/health"), timeout=10).json()
    assert health == {"status": "ok", "passages": len(tiny_world["articles"])}
    with pytest.raises(RetrieverError, match=r"retrieval server http://127\.0\.0\.1:\d+/nowhere .*404"):
        RetrieverEngine(our_server.replace("/retrieve", "/nowhere"), retries=0).search(["born"], 1)


def test_the_command_serves_the_profiles_corpus_and_a_profile_with_engine_retriever_asks_it(tiny_world, bm25, tmp_path):
    """``python -m zslib.serve_retriever`` as a user starts it, and a profile switched to it by ``-p``-style overrides."""
    import subprocess
    import sys

    from zslib import config
    from zslib.files import ROOT
    corpus = tiny_world["paths"]["corpus"]
    proc = subprocess.Popen([sys.executable, "-m", "zslib.serve_retriever", "--profile", "micro", "--port", "0",
                             "--index-dir", str(tmp_path / "index"), "-p", f"search.corpus_path={corpus}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {len(tiny_world['articles']):,} passages"), line
        url = line.split(" at ")[-1].strip()
        P = config.load_profile("micro", {"search": {"engine": "retriever", "url": url, "corpus_path": str(corpus)}})
        questions = [r["question"] for r in tiny_world["splits"]["test"][:32]]
        assert search.profile_engine(P).search(questions, P.search.topk) == bm25.search(questions, P.search.topk)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_chunked_build_matches_bm25s_with_empty_and_repeated_passages(tmp_path):
    import bm25s
    import numpy as np

    texts = [("Alpha", "alpha alpha beta"), ("", "the of and"), ("Beta", "beta gamma gamma gamma"), ("Gamma", "gamma"),
             ("Delta", "delta alpha the")]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"title": t, "text": x}) + "\n\n" for t, x in texts))  # blank lines too
    reference = bm25s.BM25()
    reference.index(bm25s.tokenize([f"{t} {x}" for t, x in texts], stopwords="en", show_progress=False), show_progress=False)
    for chunk in (1, 2, 50):
        engine = BM25Engine(corpus, tmp_path / f"index-{chunk}", chunk=chunk)
        engine = BM25Engine(corpus, tmp_path / f"index-{chunk}", chunk=chunk)  # the cached one
        for name in ("data", "indices", "indptr"):
            assert np.array_equal(np.asarray(engine.retriever.scores[name]), reference.scores[name]), (chunk, name)
        assert engine.retriever.vocab_dict == reference.vocab_dict
        assert [engine.docs[i] for i in range(5)] == [Doc(t, x) for t, x in texts]
        assert [d.title for d in engine.search(["gamma alpha"], 5)[0]] == ["Gamma", "Alpha", "Beta", "Delta"]
        assert engine.search(["the", "zzz"], 2) == [[], []]
