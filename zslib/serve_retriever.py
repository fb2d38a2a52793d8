"""Serve the profile's BM25 index over HTTP with Search-R1's retrieval protocol.

    python -m zslib.serve_retriever --profile tiny [--host 127.0.0.1] [--port 8000] [--index-dir D] [-p key=value ...]

``POST /retrieve`` with ``{"queries": [...], "topk": k, "return_scores": true}`` answers
``{"result": [[{"document": {"id", "contents"}, "score"}, ...], ...]}`` (plain documents without
``return_scores``), ``contents`` being the title line and the text, as Search-R1's own server and
the verl and SkyRL search examples expect. ``GET /health`` says how many passages it serves.

One server holds one index for every trainer process, notebook and node that points
``search.engine: retriever`` and ``search.url`` at it; the index is the one the in-process engine caches
(``outputs/<profile>/bm25``), memory-mapped, built on first use. It listens where ``search.url`` says
unless ``--host``/``--port`` say otherwise (``--port 0``: any free port, printed). Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from . import config
from .search import BM25Engine, make_engine

MAX_TOPK = 100  # a request asking for more is an error, not a slow answer


class RequestError(ValueError):
    """A request the server answers with 422 (the message says what is wrong)."""


def answer(engine: BM25Engine, body) -> dict:
    """The protocol's answer to one request body (a ``RequestError`` for a malformed one)."""
    if not isinstance(body, dict) or not isinstance(body.get("queries"), list) \
            or not all(isinstance(q, str) for q in body["queries"]):
        raise RequestError('the body needs "queries": a list of strings')
    topk = body.get("topk", 3)
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= MAX_TOPK:
        raise RequestError(f'"topk" must be an integer in 1..{MAX_TOPK}, got {topk!r}')
    with_scores = bool(body.get("return_scores", False))
    result = []
    for hits in engine.retrieve(body["queries"], topk):
        documents = [_document(engine, i) for i, _ in hits]
        result.append([{"document": d, "score": s} for d, (_, s) in zip(documents, hits)] if with_scores
                      else documents)
    return {"result": result}


def _document(engine: BM25Engine, i: int) -> dict:
    """A corpus row as the protocol's document: its own ``id`` and ``contents`` when it has them (wiki-18's
    rows do), else the row number and ``"title"`` + newline + text."""
    row = engine.docs.row(i)
    contents = row.get("contents")
    if contents is None:
        doc = engine.docs.doc(i)
        contents = f'"{doc.title}"\n{doc.text}'
    return {"id": str(row.get("id", i)), "contents": contents}


def make_server(engine: BM25Engine, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A threaded HTTP server answering the protocol from ``engine`` (not yet serving: call
    ``serve_forever``, or use ``serve_in_thread``). ``port`` 0 takes any free port (``server_address``)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            if urlparse(self.path).path != "/retrieve":
                return self._send(404, {"detail": f"no {self.path} here: POST /retrieve"})
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                self._send(200, answer(engine, body))
            except (json.JSONDecodeError, RequestError) as e:
                self._send(422, {"detail": str(e)})

        def do_GET(self):
            if urlparse(self.path).path == "/health":
                return self._send(200, {"status": "ok", "passages": len(engine.docs)})
            self._send(404, {"detail": f"no {self.path} here: POST /retrieve, GET /health"})

        def _send(self, status: int, payload: dict):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # one line per request would drown a training log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve_in_thread(engine: BM25Engine, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """(the server, its ``/retrieve`` URL), serving from a background thread: for a notebook or a test in one
    process. ``server.shutdown()`` stops it."""
    server = make_server(engine, host, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}/retrieve"


def served_engine(profile, index_dir=None) -> BM25Engine:
    """The engine the server answers from: BM25 over the profile's corpus (also when the profile itself
    asks a retrieval server, which may be this one)."""
    if profile.search.engine not in ("bm25", "retriever"):
        raise ValueError(f"zslib.serve_retriever serves BM25 over a corpus; search.engine is {profile.search.engine!r}")
    bm25 = dataclasses.replace(profile.search, engine="bm25")
    return make_engine(bm25, profile.corpus_path, index_dir or profile.out / "bm25")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zslib.serve_retriever", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--index-dir", help="where the index is cached (default outputs/<profile>/bm25)")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                    help="override a profile value (YAML syntax), e.g. -p search.corpus_path=wiki-18.jsonl")
    args = ap.parse_args(argv)
    from .pipeline import parse_overrides
    profile = config.load_profile(args.profile, parse_overrides(args.param))
    url = urlparse(profile.search.url)
    host = args.host or url.hostname or "127.0.0.1"
    port = args.port if args.port is not None else url.port or 8000
    engine = served_engine(profile, args.index_dir)
    server = make_server(engine, host, port)
    print(f"serving {len(engine.docs):,} passages of {profile.corpus_path} at "
          f"http://{host}:{server.server_address[1]}/retrieve", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
