"""vLLM on the CPU: the same rollouts, log-probs and documents as the HF path, weight sync, the
simulator server, and RL through both. One engine serves the whole module (it takes 30-40 s to
start); the simulator server is started once too.

`make install` installs vLLM's CPU build. With ZS_NO_VLLM=1 (an install that skipped it) these
tests are skipped; without vLLM and without that switch they fail, so CI cannot lose them quietly.
"""

import copy
import json
import os
import socket

import pytest
import torch

try:
    import vllm  # noqa: F401
except ImportError:
    if os.environ.get("ZS_NO_VLLM") == "1":
        pytest.skip("ZS_NO_VLLM=1: vLLM was not installed", allow_module_level=True)
    raise

from zslib import rl_models, serve_simulator, simulator, trainer
from zslib.config import RolloutConfig, VLLMConfig, load_profile
from zslib.generation import backends
from zslib.generation.vllm_backend import VLLMBackend, shutdown_engines
from zslib.prompts import STOP_STRINGS, render_policy_prompt
from zslib.rollout import engine_search_fn, parse_action, rollout

CFG = RolloutConfig(max_turns=2, max_tokens_per_turn=40, max_obs_tokens=96)


@pytest.fixture(scope="module", autouse=True)
def engines_stopped_at_the_end():
    """The shared engines stop with this module, and the process exits cleanly after them."""
    yield
    shutdown_engines()


@pytest.fixture(scope="module")
def vllm_backend(protocol_model, tokenizer):
    return backends.make_backend("vllm", protocol_model[0], tokenizer, vllm_cfg=VLLMConfig())


@pytest.fixture(scope="module")
def model_dir(protocol_model, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm-model")
    protocol_model[0].save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """vLLM's OpenAI-compatible server with the protocol model as the "fine-tuned simulator"."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    profile = load_profile("tiny", {"simulator.url": f"http://127.0.0.1:{port}/v1", "simulator.serve": "http",
                                    "simulator.temperature": 0.0})
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w")
    process = serve_simulator.start(profile, log=log, folder=model_dir)
    try:
        serve_simulator.wait_until_ready(profile.simulator.url, 300, process)
        yield profile
    finally:
        process.terminate()
        process.wait(60)
        log.close()


def test_greedy_vllm_rollouts_equal_hf_token_for_token(protocol_model, tokenizer, bm25, vllm_backend):
    model, rows = protocol_model
    hf = rollout(backends.make_backend("hf", model, tokenizer), tokenizer, rows, engine_search_fn(bm25, 3), CFG, 0.0)
    vl = rollout(vllm_backend, tokenizer, rows, engine_search_fn(bm25, 3), CFG, 0.0)
    assert sum(len(t.calls) for t in hf) >= len(rows), "the rows search, so there are several turns"
    assert [t.token_ids for t in vl] == [t.token_ids for t in hf]
    assert [t.loss_mask for t in vl] == [t.loss_mask for t in hf]
    for t in vl:  # one log-prob per generated token, each a probability's log
        assert len(t.sampled_logprobs) == sum(t.loss_mask) and all(lp <= 0 for lp in t.sampled_logprobs)


def test_sampled_generations_stop_at_the_first_stop_string_and_parse(protocol_model, tokenizer, bm25, vllm_backend):
    model, rows = protocol_model
    torch.manual_seed(0)
    prompts = [tokenizer(render_policy_prompt(tokenizer, r["question"]), add_special_tokens=False)["input_ids"]
               for r in rows]
    outs = vllm_backend.generate(prompts * 2, 40, 1.0, 1.0)
    stopped = 0
    for row in outs:
        text = tokenizer.decode(row)
        assert not any(s in tokenizer.decode(row[:-1]) for s in STOP_STRINGS), "nothing after the first stop string"
        if any(text.endswith(s) for s in STOP_STRINGS):
            stopped += 1
    assert stopped >= len(outs) // 2
    # Sampled turns parse as often as the HF backend's do (the model's own rate at T=1, about 0.7).
    rates = {}
    for name, backend in (("vllm", vllm_backend), ("hf", backends.make_backend("hf", model, tokenizer))):
        trajs = rollout(backend, tokenizer, rows * 2, engine_search_fn(bm25, 3), CFG, 1.0)
        turns = [turn for t in trajs for turn in t.turns]
        rates[name] = sum(parse_action(turn) is not None for turn in turns) / len(turns)
    assert rates["vllm"] >= min(0.5, rates["hf"] - 0.15), rates


def test_engine_logprobs_match_the_trainer_after_a_synced_update(protocol_model, tokenizer, bm25):
    model, rows = protocol_model
    policy = copy.deepcopy(model)
    backend = backends.make_backend("vllm", policy, tokenizer, vllm_cfg=VLLMConfig())  # the shared engine, this model's weights
    seq = rollout(backend, tokenizer, rows[:1], engine_search_fn(bm25, 3), CFG, 0.0)[0].token_ids
    ids = torch.tensor([seq])

    def gap() -> tuple[float, float]:
        with torch.no_grad():
            ours = rl_models.token_logprobs(policy, ids)[0][0]
        diff = (torch.tensor(backend.sequence_logprobs([seq])[0]) - ours).abs()
        return diff.mean().item(), diff.max().item()

    assert gap()[0] < 1e-5
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    optimizer.zero_grad()
    (-rl_models.token_logprobs(policy, ids)[0].mean()).backward()  # a training update
    optimizer.step()
    stale = gap()
    backend.entry["owner"] = backend  # (pretend nobody synced: the engine still has the old weights)
    assert stale[0] > 1e-3, "the update moved the log-probs"
    backend.load_weights()
    mean, worst = gap()
    print(f"\nengine vs trainer log-probs after the sync: mean |diff| {mean:.2e}, max {worst:.2e} "
          f"(before it: mean {stale[0]:.2e})")
    assert mean < 1e-5 and worst < 1e-4


def test_the_simulator_server_writes_the_in_process_documents_at_temperature_0(protocol_model, tokenizer, server):
    model, rows = protocol_model
    local = simulator.engine_for(server, loaded=(model, tokenizer), serve="inprocess")
    remote = simulator.engine_for(server, loaded=(model, tokenizer))  # serve: http, from the profile
    queries = [r["question"] for r in rows[:6]] * 2
    kwargs = dict(noisy=[False] * 6 + [True] * 6, questions=queries, answers=["x"] * 12, temperature=0.0)
    here, there = local.generate_raw(queries, 3, **kwargs), remote.generate_raw(queries, 3, **kwargs)
    assert there == here and all(text.strip() for text in there)
    assert remote.generated_tokens > 0 and remote.calls == 12


def test_rl_with_vllm_and_the_http_simulator_runs_and_resumes(protocol_model, tokenizer, bm25, model_dir, server,
                                                              tmp_path):
    model, rows = protocol_model
    profile = load_profile("tiny", {
        "models.policy": str(model_dir), "rollout.backend": "vllm", "rollout.max_turns": 2,
        "rollout.max_tokens_per_turn": 40, "rollout.max_obs_tokens": 96, "simulator.serve": "http",
        "simulator.url": server.simulator.url, "simulator.temperature": 0.0, "rl.steps": 3, "rl.questions_per_step": 2,
        "rl.group_size": 3, "rl.mini_batch_size": 6, "rl.checkpoint_every": 2, "rl.lr": 1e-3, "rl.validate_every": 0,
        "rl.tis_cap": 2.0})  # the engine's log-probs of its samples weight the loss

    def run(folder, steps=None):
        t = trainer.RLTrainer(profile, folder, questions=rows, real_engine=bm25,
                              engine=simulator.engine_for(profile, loaded=(model, tokenizer)))
        t.train(steps=steps, resume=True)
        return t

    whole = run(tmp_path / "whole")
    assert isinstance(whole.backend, VLLMBackend)
    assert isinstance(whole.engine.transport, simulator.HTTPTransport) and whole.engine.generated_tokens > 0
    run(tmp_path / "cut", steps=2)
    resumed = run(tmp_path / "cut")
    metrics = [json.loads(line) for line in resumed.metrics_path.read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and resumed.step_count == 3
    assert all(m["search_calls"] > 0 and m["simulator_tokens"] > 0 for m in metrics)
    # The trainer's bf16 autocast against the engine's fp32: a small mismatch, weights near 1 (4e-4 measured).
    assert all(0 < abs(m["rollout_mismatch_kl"]) < 5e-3 and abs(m["tis_weight"] - 1) < 1e-2 for m in metrics), \
        [(m.get("rollout_mismatch_kl"), m.get("tis_weight")) for m in metrics]
    # The resumed engine generates with the resumed weights: its log-probs are the trainer's.
    seq = json.loads(resumed.samples_path.read_text().splitlines()[-1])["token_ids"]
    with torch.no_grad():
        ours = rl_models.token_logprobs(resumed.policy, torch.tensor([seq]))[0][0]
    assert (torch.tensor(resumed.backend.sequence_logprobs([seq])[0]) - ours).abs().mean() < 1e-5


def test_sleep_wake_up_then_new_weights_generate_as_the_updated_model(protocol_model, tokenizer, bm25):
    """The trainer's order with vllm.sleep_mode: rollouts, sleep, update, wake_up, load_weights,
    rollouts. The CPU build cannot free memory (it ignores the request), so the test does what level 2
    does to the weights on a GPU: while the engine sleeps, their content is replaced by noise."""
    import time

    from zslib.generation import vllm_backend
    model, rows = protocol_model
    policy = copy.deepcopy(model)
    backend = backends.make_backend("vllm", policy, tokenizer, vllm_cfg=VLLMConfig(sleep_mode=True))
    before = rollout(backend, tokenizer, rows[:4], engine_search_fn(bm25, 3), CFG, 0.0)

    start = time.perf_counter()
    backend.sleep()
    slept = time.perf_counter() - start
    assert backend.entry["asleep"] == {"weights", "kv_cache"} and backend.entry["owner"] is None
    noise = {k: torch.randn_like(v) for k, v in vllm_backend.merged_state_dict(policy).items()}
    from safetensors.torch import save
    backend.llm.collective_rpc("zs_load_weights", args=(save(noise),))  # what level 2 leaves behind

    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)  # the update, while the engine sleeps
    ids = torch.tensor([before[0].token_ids])
    (-rl_models.token_logprobs(policy, ids)[0].mean()).backward()
    optimizer.step()

    start = time.perf_counter()
    backend.wake_up()
    woke = time.perf_counter() - start
    assert backend.entry["asleep"] == {"kv_cache"}, "the cache's memory comes back after the weights are in"
    backend.load_weights()
    assert not backend.entry["asleep"] and backend.entry["owner"] is backend
    print(f"\nCPU build: sleep {slept * 1e3:.0f} ms, wake_up(weights) {woke * 1e3:.0f} ms "
          f"(sleep mode available: {vllm_backend.sleep_mode_available()})")

    after = rollout(backend, tokenizer, rows[:4], engine_search_fn(bm25, 3), CFG, 0.0)
    hf = rollout(backends.make_backend("hf", policy, tokenizer), tokenizer, rows[:4], engine_search_fn(bm25, 3), CFG, 0.0)
    assert [t.token_ids for t in after] == [t.token_ids for t in hf], "the engine generates with the new weights"
    seq = after[0].token_ids
    with torch.no_grad():
        ours = rl_models.token_logprobs(policy, torch.tensor([seq]))[0][0]
        old = rl_models.token_logprobs(model, torch.tensor([seq]))[0][0]
    engine = torch.tensor(backend.sequence_logprobs([seq])[0])
    assert (engine - ours).abs().mean() < 1e-5 and (engine - old).abs().mean() > 1e-3

    # Generating straight after a sleep (no wake_up, no load_weights) wakes the engine and loads first.
    backend.sleep()
    backend.llm.collective_rpc("zs_load_weights", args=(save(noise),))
    again = rollout(backend, tokenizer, rows[:4], engine_search_fn(bm25, 3), CFG, 0.0)
    assert [t.token_ids for t in again] == [t.token_ids for t in after] and not backend.entry["asleep"]


def test_sleep_does_nothing_without_sleep_mode_and_hf_sleep_drops_its_cache(protocol_model, tokenizer, vllm_backend):
    model, rows = protocol_model
    owner = vllm_backend.entry["owner"]  # (the shared engine: the last backend that loaded its weights)
    vllm_backend.sleep()
    assert not vllm_backend.entry["asleep"] and vllm_backend.entry["owner"] is owner
    hf = backends.make_backend("hf", model, tokenizer)
    prompt = tokenizer(render_policy_prompt(tokenizer, rows[0]["question"]), add_special_tokens=False)["input_ids"]
    hf.generate([prompt], 8, 0.0, 1.0)
    assert hf._kept is not None
    hf.sleep()
    hf.wake_up()
    assert hf._kept is None


def _modules_held(obj, seen=None) -> list:
    """Every torch module reachable through ``obj``'s attributes, lists and dicts (not through vLLM's engine)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or type(obj).__module__.startswith("vllm"):
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        return [obj]
    children = list(obj.values()) if isinstance(obj, dict) else list(obj) if isinstance(obj, (list, tuple, set)) \
        else list(vars(obj).values()) if hasattr(obj, "__dict__") and type(obj).__module__.startswith("zslib") else []
    return [m for child in children for m in _modules_held(child, seen)]


@pytest.mark.parametrize("adapter", [False, True])
def test_the_in_process_simulator_on_vllm_loads_its_folder_and_keeps_no_transformers_model(
        protocol_model, tokenizer, model_dir, tmp_path, monkeypatch, adapter):
    import gc
    import weakref

    from transformers import PreTrainedModel

    from zslib import config
    model, rows = protocol_model
    tuned = model_dir
    if adapter:  # a LoRA adapter with non-zero weights, as notebook 03 saves it
        from peft import LoraConfig, get_peft_model
        torch.manual_seed(0)
        peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False))
        tuned = tmp_path / "adapter"
        peft.save_pretrained(str(tuned))
        tokenizer.save_pretrained(str(tuned))
        del peft
    monkeypatch.setattr(config.Profile, "simulator_dir", property(lambda self: tuned))
    overrides = {"models.simulator": str(model_dir), "simulator.temperature": 0.0, "simulator.max_new_tokens": 60}
    queries = [r["question"] for r in rows[:6]]
    kwargs = dict(noisy=[False, True] * 3, questions=queries, answers=["x"] * 6)

    def alive() -> list:
        gc.collect()
        return [o for o in gc.get_objects() if issubclass(type(o), PreTrainedModel)]

    before = weakref.WeakSet(alive())
    engine = simulator.engine_for(load_profile("tiny", {**overrides, "rollout.backend": "vllm"}))
    served = engine.generate_raw(queries, 3, **kwargs)
    assert [m for m in alive() if m not in before] == [], "no transformers model was left behind"
    assert not _modules_held(engine.transport), "the transport holds no torch module"
    assert all(isinstance(b, VLLMBackend) and b.model is None for b in engine.transport._backends.values())
    if adapter:
        from pathlib import Path
        folder = Path(engine.transport.model)
        assert folder.parent == tuned and folder.name.startswith("merged-") and (folder / "config.json").exists()
        assert simulator.simulator_checkpoint(load_profile("tiny", overrides)) == str(engine.transport.model), \
            "merged once: the next start reuses the folder"

    hf = load_profile("tiny", {**overrides, "rollout.backend": "hf"})  # as before: HF, the adapter merged in memory
    assert served == simulator.engine_for(hf).generate_raw(queries, 3, **kwargs) and all(t.strip() for t in served)
    if adapter:
        assert served != simulator.engine_for(hf, finetuned=False).generate_raw(queries, 3, **kwargs), \
            "the adapter changes the documents, so the merged folder is not the base"
