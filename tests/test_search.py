import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from zslib.evaluate import retrieval_recall
from zslib.config import SearchConfig
from zslib.search import (BM25Engine, Doc, RetrieverEngine, RetrieverError, WebSearchEngine, WebSearchError,
                          format_docs, make_engine)


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
    assert (tmp_path / "index" / "corpus.sha256").exists()
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
