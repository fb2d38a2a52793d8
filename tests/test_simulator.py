import re
from pathlib import Path

import pytest

from zslib import prompts
from zslib.config import SimulatorConfig, TinyConfig
from zslib.search import Doc, format_docs
from zslib.simulator import InProcessTransport, SimulatedEngine, contains_answer, parse_docs


def test_parse_docs_reads_numbered_documents_and_cuts_after_k():
    docs = [Doc("Alpha", "Alpha is a city."), Doc("Beta (film)", "Beta is a film."), Doc("Gamma", "G."),
            Doc("Delta", "D.")]
    parsed, ok = parse_docs(format_docs(docs), 3)
    assert ok and parsed[:2] == [Doc("Alpha", "Alpha is a city."), Doc("Beta (film)", "Beta is a film.")]
    assert len(parsed) == 3 and parsed[2] == Doc("Gamma", "G.")


def test_parse_docs_round_trips_the_formatter():
    docs = [Doc("Xo Ba", "Xo Ba was born in Tavin."), Doc("Tavin", "Tavin is a city.")]
    assert parse_docs(format_docs(docs), 2) == (docs, True)


def test_parse_docs_never_raises_on_malformed_output():
    assert parse_docs("Doc 1(Title: A) a\nDoc 2(Title: B) b", 3) == ([Doc("A", "a"), Doc("B", "b")], False)
    assert parse_docs("first line\n\nsecond line\nthird\nfourth", 3) == (
        [Doc("", "first line"), Doc("", "second line"), Doc("", "third")], False)
    assert parse_docs("", 3) == ([], False)
    for junk in ("Doc 1(Title: unclosed", "Doc Doc ((( Title:", ")))", "Doc 7(Title: ) "):
        docs, ok = parse_docs(junk, 3)
        assert isinstance(docs, list) and not ok


def test_contains_answer_matches_whole_normalised_words():
    docs = [Doc("Xo Ba", "Xo Ba was born in the city of Tavin.")]
    assert contains_answer(docs, ["tavin"]) and contains_answer(docs, ["The Tavin"])
    assert not contains_answer(docs, ["Tav"]) and not contains_answer(docs, ["Quo"])
    assert contains_answer(docs, ["Quo", "Xo Ba"]) and not contains_answer(docs, [""])


def test_useful_and_noisy_prompts_differ_only_in_the_keyword():
    useful = prompts.simulator_user_message("Xo Ba born", "Where was Xo Ba born?", "Tavin", True, k=5, words=30)
    noisy = prompts.simulator_user_message("Xo Ba born", "Where was Xo Ba born?", "Tavin", False, k=5, words=30)
    assert useful.replace("useful", "noisy").replace("Useful", "Noisy") == noisy
    assert useful.count("useful") == 1 and useful.endswith("Useful Output:")
    for part in ("Query: Xo Ba born", "question: Where was Xo Ba born?", "The answer is Tavin.", " 5 ", "30 words"):
        assert part in useful


def test_prompt_only_noisy_variant_hides_question_and_answer():
    args = ("Xo Ba born", "Where was Xo Ba born?", "Tavin")
    useful = prompts.simulator_user_message(*args, True, k=3, words=20, variant="prompt_only")
    noisy = prompts.simulator_user_message(*args, False, k=3, words=20, variant="prompt_only")
    assert "Where was Xo Ba born?" in useful and "Tavin" in useful
    assert "Where was Xo Ba born?" not in noisy and "Tavin" not in noisy
    for p in (useful, noisy):
        assert prompts.PROMPT_ONLY_DEMO in p and p.endswith("Query: Xo Ba born\nOutput:")
    with pytest.raises(ValueError, match="simulator.prompt must be one of finetuned, prompt_only, not .other."):
        prompts.simulator_user_message(*args, True, k=3, words=20, variant="other")


def test_simulated_engine_returns_k_or_fewer_docs_and_counts_tokens(tokenizer):
    from zslib.tiny import pretraining
    model = pretraining.build_model(tokenizer, TinyConfig(hidden_size=64, intermediate_size=128, num_layers=2,
                                                   num_heads=2, num_kv_heads=1), seed=0).eval()
    engine = SimulatedEngine(InProcessTransport(model, tokenizer, batch_calls=2), tokenizer, SimulatorConfig(max_new_tokens=12))
    out = engine.search(["a", "b", "c"], 3, noisy=[False, True, False], questions=["qa", "qb", "qc"],
                        answers=["x", "y", "z"], temperature=1.0)
    assert len(out) == 3 and all(len(docs) <= 3 for docs in out)
    assert engine.calls == 3 and 3 <= engine.generated_tokens <= 36
    with pytest.raises(ValueError, match="2 noisy flags"):
        engine.search(["a", "b", "c"], 3, noisy=[False, True])


@pytest.mark.parametrize("lora", [True, False])
def test_sft_trains_saves_and_loads_through_the_auto_classes(tokenizer, tmp_path, lora):
    import torch

    from zslib import config, labeling, simulator
    from zslib.tiny import pretraining

    P = config.load_profile("tiny", {"simulator.lora": lora, "simulator.max_steps": 4, "simulator.batch_size": 4,
                                     "simulator.lr": 1e-2, "simulator.bf16": False})
    base = tmp_path / "base"
    model = pretraining.build_model(tokenizer, TinyConfig(hidden_size=64, intermediate_size=128, num_layers=2,
                                                   num_heads=2, num_kv_heads=1), seed=0)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    P.models.simulator = str(base)
    pairs = [{"question": f"Where was Xo{i} born?", "golden_answers": ["Tavin"], "query": f"Xo{i} born",
              "docs": [["Xo", "Xo was born in Tavin."]] * 2, "useful": i % 2 == 0, "source": "trajectory"}
             for i in range(16)]
    out = tmp_path / "sim"
    result = simulator.train_simulator(P, labeling.sft_rows(pairs, tokenizer, 30), out)
    assert (out / ("adapter_config.json" if lora else "config.json")).exists()
    expected_trainable = sum(p.numel() for p in model.parameters())
    assert (result["trainable"] < expected_trainable / 2) == lora, "LoRA trains a small share of the weights"
    tuned, tok = simulator.load_simulator(P, finetuned=True, device="cpu", path=out)
    assert type(tuned).__name__ == "Qwen3ForCausalLM" and tok.padding_side == "left"
    ids = tok("Doc 1(Title: Xo)", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(tuned(ids).logits, model.eval()(ids).logits), "training changed the weights"


def _saved_base(tokenizer, folder, **sizes):
    """A small simulator base saved with its tokenizer, for SFT to load by path."""
    from zslib.tiny import pretraining

    pretraining.build_model(tokenizer, TinyConfig(num_heads=2, num_kv_heads=1, **sizes), seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_sft_without_gradient_checkpointing_trains_the_same_weights(tokenizer, tmp_path):
    """Turning checkpointing off (the tiny profile) only skips the recomputation: same weights after 3 steps."""
    import torch
    from safetensors.torch import load_file

    from zslib import config, labeling, simulator

    base = _saved_base(tokenizer, tmp_path / "base", hidden_size=64, intermediate_size=128, num_layers=2)
    pairs = [{"question": f"Where was Xo{i} born?", "golden_answers": ["Tavin"], "query": f"Xo{i} born",
              "docs": [["Xo", f"Xo{i} was born in Tavin."]] * 2, "useful": i % 2 == 0, "source": "trajectory"}
             for i in range(12)]
    weights = {}
    for checkpointing in (True, False):
        P = config.load_profile("tiny", {"simulator.lora": False, "simulator.max_steps": 3, "simulator.batch_size": 4,
                                         "simulator.lr": 1e-2, "simulator.bf16": False,
                                         "simulator.gradient_checkpointing": checkpointing})
        P.models.simulator = str(base)
        simulator.train_simulator(P, labeling.sft_rows(pairs, tokenizer, 30), tmp_path / str(checkpointing))
        weights[checkpointing] = load_file(str(tmp_path / str(checkpointing) / "model.safetensors"))
    start = load_file(str(base / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(weights[True][name], start[name]), "three steps at lr 1e-2 moved the weights"
    for key, value in weights[True].items():
        torch.testing.assert_close(weights[False][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_a_fine_tuned_simulator_is_kept_for_its_recipe_and_refused_for_another(tokenizer, tmp_path, monkeypatch):
    from zslib import config, labeling, simulator

    monkeypatch.setattr(config.Profile, "out", property(lambda self: tmp_path / self.name))
    base = _saved_base(tokenizer, tmp_path / "base", hidden_size=32, intermediate_size=64, num_layers=1)
    pairs = [{"question": f"Where was Xo{i} born?", "golden_answers": ["Tavin"], "query": f"Xo{i} born",
              "docs": [["Xo", f"Xo{i} was born in Tavin."]] * 2, "useful": i % 2 == 0, "source": "trajectory"}
             for i in range(8)]
    rows = labeling.sft_rows(pairs, tokenizer, 30)

    def tune(rows, retrain=False, **edits):
        P = config.load_profile("tiny", {"simulator.lora": False, "simulator.max_steps": 2, "simulator.batch_size": 4,
                                         "simulator.bf16": False, "models.simulator": str(base), **edits})
        return P, simulator.fine_tune(P, rows, retrain=retrain)

    P, result = tune(rows)
    assert result["trainable"] > 0 and (P.simulator_dir / "recipe.json").exists()
    assert tune(rows)[1] is None, "the same recipe: kept"
    assert tune(rows, **{"simulator.temperature": 0.5, "simulator.gradient_checkpointing": False})[1] is None, \
        "decoding and memory settings do not make another simulator"
    before = {p: p.read_bytes() for p in sorted(P.simulator_dir.rglob("*")) if p.is_file()}
    for edit, named in (({"simulator.lr": 1e-3}, r"simulator\.lr: [0-9.e-]+ -> 0\.001\)"),
                        ({"seed": 3}, "seed: 0 -> 3"), ({}, "sft_rows: ")):
        with pytest.raises(ValueError, match=rf"simulator/recipe\.json: .*{named}.*retrain = True"):
            tune(rows if edit else rows[:-1], **edit)  # no edit: the rows of new labels
    assert {p: p.read_bytes() for p in sorted(P.simulator_dir.rglob("*")) if p.is_file()} == before, "nothing touched"
    P, result = tune(rows[:-1], retrain=True)
    assert result is not None and tune(rows[:-1])[1] is None, "retrained: the new rows' simulator is kept"


def test_sft_grouped_by_length_pads_less_than_random_batches(tokenizer, tmp_path):
    from zslib import config, labeling, simulator

    base = _saved_base(tokenizer, tmp_path / "base", hidden_size=32, intermediate_size=64, num_layers=1)
    # Half the completions 1 short document, half 6 long ones: random batches of 4 mostly mix them.
    pairs = [{"question": f"Where was Xo{i} born?", "golden_answers": ["Tavin"], "query": f"Xo{i} born",
              "docs": [["Xo", f"Xo{i} was born in Tavin." * (1 if i % 2 else 12)]] * (1 if i % 2 else 6),
              "useful": True, "source": "trajectory"} for i in range(64)]
    rows = labeling.sft_rows(pairs, tokenizer, 30)
    tokens = {}
    for grouped in (False, True):
        P = config.load_profile("tiny", {"simulator.max_steps": 8, "simulator.batch_size": 4, "simulator.bf16": False,
                                         "simulator.group_by_length": grouped, "simulator.max_length": 2048})
        P.models.simulator = str(base)
        tokens[grouped] = simulator.train_simulator(P, rows, tmp_path / str(grouped))["padded_tokens"]
    lengths = sorted(len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) for r in rows)
    assert tokens[True] >= 8 * 4 * lengths[0]
    assert tokens[True] < 0.8 * tokens[False], tokens


def test_simulator_search_fn_passes_each_rows_question_answer_and_noisy_draw():
    import torch

    from zslib.rollout import Trajectory
    from zslib.simulator import simulator_search_fn

    class Recorder:
        def search(self, queries, topk, noisy, questions, answers):
            self.seen = (queries, topk, noisy, questions, answers)
            return [[Doc(q, "x")] for q in queries]

    engine = Recorder()
    trajs = [Trajectory("Where was Xo born?", ["Tavin", "T"]), Trajectory("Who wrote Y?", ["Mern"])]
    for p, expected in ((0.0, [False, False]), (1.0, [True, True])):
        docs, flags = simulator_search_fn(engine, 3, p, torch.Generator().manual_seed(0))(["xo", "y"], trajs)
        assert flags == expected and engine.seen == (["xo", "y"], 3, expected, ["Where was Xo born?", "Who wrote Y?"],
                                                     ["Tavin", "Mern"])
        assert docs == [[Doc("xo", "x")], [Doc("y", "x")]]


def test_hop_answer_follows_the_hop_the_query_names():
    from zslib.simulator import hop_answer

    hops = ["Teabe College", "Masa"]  # "In which city did X study?": X -> Teabe College -> Masa
    assert hop_answer("where did Paibrios Miorol study", "Masa", hops) == "Teabe College"
    assert hop_answer("In which city is Teabe College?", "Masa", hops) == "Masa"
    assert hop_answer("teabe college city", "Masa", hops) == "Masa"  # normalised: case, punctuation
    assert hop_answer("Teabe Collegeville city", "Masa", hops) == "Teabe College"  # whole words only
    assert hop_answer("anything", "Masa", []) == "Masa"  # no hop answers: the final answer
    assert hop_answer("anything", "Masa", ["Masa"]) == "Masa"
    three = ["A Bo", "C Do", "E"]  # each hop names the previous hop's answer
    assert [hop_answer(q, "E", three) for q in ("x", "about a bo", "c do", "a bo and c do")] == \
        ["A Bo", "C Do", "E", "E"]


def test_simulator_search_fn_with_hop_hints_tells_each_call_its_hop_answer():
    import torch

    from zslib.rollout import Trajectory
    from zslib.simulator import simulator_search_fn

    class Recorder:
        def search(self, queries, topk, noisy, questions, answers):
            self.answers = answers
            return [[] for _ in queries], [True] * len(queries)

    engine = Recorder()
    two_hop = Trajectory("In which city did Xo study?", ["Masa"], hop_answers=["Teabe College", "Masa"])
    one_hop = Trajectory("Where did Xo study?", ["Teabe College"])
    queries = ["where did xo study", "city of teabe college", "where did xo study"]
    trajs = [two_hop, two_hop, one_hop]
    simulator_search_fn(engine, 3, 0.0, torch.Generator(), hop_hints=True)(queries, trajs)
    assert engine.answers == ["Teabe College", "Masa", "Teabe College"]
    simulator_search_fn(engine, 3, 0.0, torch.Generator())(queries, trajs)  # off: the original's final answer
    assert engine.answers == ["Masa", "Masa", "Teabe College"]


def test_evaluate_engine_counts_answers_per_kind_and_parse_rate():
    from zslib.simulator import evaluate_engine

    triples = [{"query": f"q{i}", "question": f"Q{i}?", "golden_answers": [f"Ans{i}"]} for i in range(10)]

    def search(queries, noisy, questions, answers):
        # useful calls: the answer in 8 of 10; noisy calls: in 1 of 10; 3 of the 20 outputs malformed
        docs, ok = [], []
        for q, bad, a in zip(queries, noisy, answers):
            i = int(q[1:])
            holds = (i == 0) if bad else (i < 8)
            docs.append([Doc("t", f"text {a if holds else 'other'}")])
            ok.append(not (bad and i < 3))
        return docs, ok

    r = evaluate_engine(search, triples, topk=1)
    assert r == {"useful_contains_answer": 0.8, "noisy_contains_answer": 0.1, "parse_rate": 17 / 20, "n": 10}


class _StubServer:
    """A local HTTP server standing in for the simulator's: each request gets the next scripted
    reply, ("sleep", seconds) or (status, body). ``echo``: a default reply names this server and each
    prompt's first token; ``prompts`` records the prompts it received."""

    def __init__(self, replies, echo: str | None = None):
        import http.server
        import threading
        self.replies, self.requests, self.prompts = list(replies), 0, []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                import json
                import time
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests += 1
                stub.prompts += body["prompt"]
                kind, value = stub.replies.pop(0) if stub.replies else (200, None)
                if kind == "sleep":
                    time.sleep(value)
                    kind = 200
                if value is None and echo:
                    value = {"choices": [{"index": i, "text": f"Doc 1(Title: {echo}) token {p[0]}"}
                                         for i, p in enumerate(body["prompt"])],
                             "usage": {"completion_tokens": len(body["prompt"])}}
                if value is None:
                    value = {"choices": [{"index": i, "text": f"Doc 1(Title: T{i}) text {i}"}
                                         for i in range(len(body["prompt"]))], "usage": {"completion_tokens": 7}}
                data = json.dumps(value).encode() if kind == 200 else str(value).encode()
                self.send_response(kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _transport(url, **kw):
    from zslib.simulator import HTTPTransport
    return HTTPTransport(url, "simulator", **{"timeout_s": 2.0, "retries": 2, "backoff_s": 0.01, **kw})


def test_http_transport_retries_a_5xx_and_a_timeout_then_answers_in_order():
    stub = _StubServer([(503, "busy"), ("sleep", 1.0)])
    try:
        transport = _transport(stub.url, timeout_s=0.3, batch_calls=2)
        texts = transport.complete([[1, 2], [3], [4, 5]], 1, 10, 0.0, 1.0)  # 2 requests: 2 prompts, then 1
        assert texts == ["Doc 1(Title: T0) text 0", "Doc 1(Title: T1) text 1", "Doc 1(Title: T0) text 0"]
        assert stub.requests == 4 and transport.generated_tokens == 14
    finally:
        stub.close()


@pytest.mark.parametrize("replies, error", [
    ([("sleep", 1.0)] * 3, r"/completions did not answer within 0.3 s \(3 tries\)"),
    ([(500, "boom")] * 3, r"/completions answered HTTP 500: boom \(3 tries\)"),
    ([(400, "bad prompt")], r"/completions refused the request: HTTP 400: bad prompt"),
])
def test_http_transport_errors_name_the_url(replies, error):
    from zslib.simulator import SimulatorServerError
    stub = _StubServer(replies)
    try:
        with pytest.raises(SimulatorServerError, match=re.escape(stub.url) + error):
            _transport(stub.url, timeout_s=0.3).complete([[1, 2]], 1, 10, 0.0, 1.0)
        assert stub.requests == len(replies), "a 4xx is not tried again; the others are, retries times"
    finally:
        stub.close()


def test_http_transport_says_when_the_server_is_down():
    import socket

    from zslib.simulator import SimulatorServerError
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(SimulatorServerError, match=re.escape(url) + r"/completions is not reachable .*3 tries.*"
                                                   r"python -m zslib.serve_simulator"):
        _transport(url).complete([[1]], 1, 10, 0.0, 1.0)


def test_http_transport_spreads_chunks_over_several_servers_and_keeps_the_order():
    a, b = _StubServer([], echo="A"), _StubServer([], echo="B")
    try:
        transport = _transport([a.url, b.url], batch_calls=2, threads=2)
        texts = transport.complete([[i] for i in range(5)], 1, 10, 0.0, 1.0)  # chunks [0, 1] [2, 3] [4]
        assert texts == [f"Doc 1(Title: {s}) token {i}" for i, s in enumerate("AABBA")]
        assert a.prompts == [[0], [1], [4]] and b.prompts == [[2], [3]]
        assert transport.generated_tokens == 5
        # The turn goes on across calls: a call of one chunk does not always land on the first server.
        assert transport.complete([[7]], 1, 10, 0.0, 1.0) == ["Doc 1(Title: B) token 7"]
    finally:
        a.close()
        b.close()


def test_http_transport_with_one_server_down_names_that_server():
    import socket

    from zslib.simulator import SimulatorServerError
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    up = _StubServer([], echo="A")
    try:
        with pytest.raises(SimulatorServerError, match=re.escape(down) + r"/completions is not reachable .*3 tries"):
            _transport([up.url, down], batch_calls=1).complete([[1], [2], [3]], 1, 10, 0.0, 1.0)
        assert up.prompts and all(p in ([1], [3]) for p in up.prompts), "no fallback: the down server's share stays its own"
    finally:
        up.close()


def test_the_profile_gives_the_http_transport_every_url():
    from zslib import config, simulator
    urls = ["http://127.0.0.1:8101/v1", "http://127.0.0.1:8102/v1/"]
    P = config.load_profile("tiny", {"simulator.serve": "http", "simulator.url": urls})
    transport = simulator.TRANSPORTS["http"](P, True, (None, object()), None)[0]
    assert transport.urls == ["http://127.0.0.1:8101/v1", "http://127.0.0.1:8102/v1"]


def test_the_server_command_takes_the_simulators_engine_settings_and_parallelism(tmp_path):
    import json

    from zslib import config, serve_simulator
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    P = config.load_profile("tiny", {
        "simulator.url": ["http://127.0.0.1:8201/v1", "http://127.0.0.1:8202/v1"], "vllm.kv_cache_memory_bytes": 0,
        "vllm.gpu_memory_utilization": 0.3, "vllm.max_model_len": 2048, "simulator_vllm.gpu_memory_utilization": 0.6,
        "simulator_vllm.tensor_parallel_size": 2, "simulator_vllm.data_parallel_size": 4})
    flags = dict(zip(cmd := serve_simulator.command(P, folder=full), cmd[1:]))
    assert flags["--gpu-memory-utilization"] == "0.6", "the simulator's own share, not the policy engine's"
    assert flags["--max-model-len"] == "2048", "what simulator_vllm does not set comes from vllm"
    assert flags["--tensor-parallel-size"] == "2" and flags["--data-parallel-size"] == "4"
    assert flags["--port"] == "8201", "the first URL unless told a port"
    assert dict(zip(cmd := serve_simulator.command(P, port=8202, folder=full), cmd[1:]))["--port"] == "8202"
    plain = serve_simulator.command(config.load_profile("tiny"), folder=full)
    flags = dict(zip(plain, plain[1:]))
    assert flags["--tensor-parallel-size"] == "1" and flags["--data-parallel-size"] == "1"
    assert flags["--kv-cache-memory-bytes"] == "268435456"


def test_the_in_process_simulator_gives_vllm_its_folder_dtype_and_own_engine_settings(tokenizer, tmp_path,
                                                                                      monkeypatch):
    """What the transport hands the vLLM backend (a stand-in records it; test_vllm.py runs the real one)."""
    import json

    from zslib import config, simulator
    from zslib.generation import backends, vllm_backend
    made = []

    class Recorder:
        def __init__(self, model, tokenizer, stop_strings, cfg, **options):
            made.append((model, stop_strings, cfg, options))
            self.generated_tokens = 0

        def generate(self, prompts, max_new_tokens, temperature, top_p, continuing=False):
            return [[] for _ in prompts]

    monkeypatch.setattr(vllm_backend, "VLLMBackend", Recorder)
    tuned = tmp_path / "sim"
    tuned.mkdir()
    (tuned / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    tokenizer.save_pretrained(str(tuned))
    monkeypatch.setattr(config.Profile, "simulator_dir", property(lambda self: tuned))
    P = config.load_profile("tiny", {"rollout.backend": "vllm", "models.dtype": "bfloat16",
                                     "simulator_vllm.gpu_memory_utilization": 0.5, "simulator_vllm.max_model_len": 2048})
    simulator.engine_for(P, device="cuda").search(["q"], 3)
    model, stops, cfg, options = made[-1]
    assert model == str(tuned) and stops == ["Doc 4("] and options["dtype"] == "bfloat16"
    assert cfg.gpu_memory_utilization == 0.5 and cfg.max_model_len == 2048 and P.vllm.max_model_len == 1024
    assert simulator.simulator_dtype(P, "cpu") == "float32"
    backends.make_backend("vllm", torch_model := object(), tokenizer, vllm_cfg=P.vllm, dtype="bfloat16")
    assert made[-1][0] is torch_model and "dtype" not in made[-1][3], "an in-memory model's engine keeps vllm.dtype"


def test_a_lora_simulator_is_merged_into_a_folder_once_for_engines_that_load_checkpoints(tokenizer, tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from zslib import config, simulator
    base = _saved_base(tokenizer, tmp_path / "base", hidden_size=64, intermediate_size=128, num_layers=2)
    P = config.load_profile("tiny", {"models.simulator": str(base)})
    adapter = tmp_path / "adapter"

    def save_adapter(seed):
        torch.manual_seed(seed)
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        peft.save_pretrained(str(adapter))
        tokenizer.save_pretrained(str(adapter))

    save_adapter(0)
    folder = Path(simulator.simulator_checkpoint(P, path=adapter))
    assert folder.parent == adapter and folder.name.startswith("merged-")
    ids = tokenizer("Doc 1(Title: Xo)", return_tensors="pt")["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(folder)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))
    plain = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, reference(ids).logits, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, plain(ids).logits, atol=1e-3)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert Path(simulator.simulator_checkpoint(P, path=adapter)) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp, "not merged again"
    save_adapter(1)  # notebook 03 trained again
    again = Path(simulator.simulator_checkpoint(P, path=adapter))
    assert again != folder and not folder.exists() and [p.name for p in adapter.glob("merged-*")] == [again.name]
    assert simulator.simulator_checkpoint(P, finetuned=False) == str(base)
    bf16 = Path(simulator.simulator_checkpoint(P, dtype="bfloat16", path=adapter))
    assert bf16 != again and AutoModelForCausalLM.from_pretrained(bf16).dtype == torch.bfloat16


def test_the_server_command_serves_a_full_model_or_the_base_with_its_adapter(tmp_path):
    import json

    from zslib import config, serve_simulator
    base, full, adapter = tmp_path / "base", tmp_path / "full", tmp_path / "adapter"
    for folder, cfg in ((base, {"dtype": "bfloat16"}), (full, {"torch_dtype": "float32"})):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg))
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    P = config.load_profile("tiny", {"models.simulator": str(base), "simulator.url": "http://127.0.0.1:8123/v1",
                                     "vllm.kv_cache_memory_bytes": 0, "vllm.gpu_memory_utilization": 0.5})
    cmd = serve_simulator.command(P, folder=full)
    flags = dict(zip(cmd, cmd[1:]))
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and flags["--model"] == str(full)
    assert flags["--served-model-name"] == "simulator" and flags["--port"] == "8123"
    assert flags["--dtype"] == "float32", "fp32 weights are served in fp32, not vLLM's 16-bit 'auto'"
    assert flags["--gpu-memory-utilization"] == "0.5" and "--kv-cache-memory-bytes" not in flags
    lora = serve_simulator.command(P, folder=adapter)
    flags = dict(zip(lora, lora[1:]))
    assert flags["--model"] == str(base) and flags["--served-model-name"] == "simulator-base"
    assert flags["--lora-modules"] == f"simulator={adapter}" and flags["--max-lora-rank"] == "8"
    assert flags["--dtype"] == "bfloat16"
    with pytest.raises(FileNotFoundError, match="run notebook 03 first"):
        serve_simulator.command(P, folder=tmp_path / "nothing")
