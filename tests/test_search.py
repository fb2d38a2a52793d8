import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from zslib.evaluate import retrieval_recall
from zslib.search import BM25Engine, Doc, WebSearchEngine, WebSearchError, format_docs


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
