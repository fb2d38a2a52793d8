"""The GPU memory estimator (zslib/memory.py) against what the code really allocates: parameter counts of
built models, peaks measured with torch's MemTracker on the RL trainer (real tensors) and on Qwen3's own
widths (fake tensors), and the command line."""

import importlib.util
import json

import pytest
import torch

from zslib import memory
from zslib.config import load_profile
from zslib.files import ROOT

spec = importlib.util.spec_from_file_location("memory_benchmark", ROOT / "benchmarks" / "memory.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

GiB = memory.GiB
TOLERANCE = 0.25


def _within(estimated: int, measured: int) -> bool:
    return abs(estimated / measured - 1) <= TOLERANCE


def _check(profile, shape, measured: dict, label: str) -> None:
    """Each phase's estimate within 25% of its measured peak, in total and beyond the weights and optimiser
    state (the part the formulas for activations and logits make)."""
    for name, phase, est, got, est_x, got_x in bench.compare(label, profile, shape, measured):
        print(f"{name} {phase}: estimated {est / GiB:.3f} GiB, measured {got / GiB:.3f} GiB ({est / got:.2f}); "
              f"beyond state {est_x / GiB:.3f} vs {got_x / GiB:.3f} ({est_x / got_x:.2f})")
        assert _within(est, got), f"{name}, {phase}: estimated {est / GiB:.3f} GiB, measured {got / GiB:.3f} GiB"
        assert _within(est_x, got_x), f"{name}, {phase}: beyond state {est_x / GiB:.3f} vs {got_x / GiB:.3f} GiB"


# ---------------------------------------------------------------- shapes and parameter counts

def test_parameter_counts_equal_the_built_models(tokenizer, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    from zslib.tiny import pretraining

    P = load_profile("tiny")
    model = pretraining.build_model(tokenizer, P.tiny, seed=0)
    model.save_pretrained(str(tmp_path / "policy-base"))
    shape = memory.model_shape(str(tmp_path / "policy-base"))
    assert memory.parameter_count(shape) == sum(p.numel() for p in model.parameters())
    # Before notebook 00 has built it, the profile's tiny: section and its BPE merges give the same shape.
    assert memory.model_shape("tiny", P) == shape
    for name in ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-4B", "smollm2-135m-instruct"):
        config = json.loads((memory.MODEL_CONFIGS / memory.PACKAGED_CONFIGS.get(name, name.split("/")[-1] + ".json"))
                            .read_text())
        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
        assert memory.parameter_count(memory.model_shape(name)) == sum(p.numel() for p in built.parameters()), name
    qwen = memory.model_shape("Qwen/Qwen3-1.7B")
    assert (qwen["num_hidden_layers"], qwen["hidden_size"], qwen["num_key_value_heads"], qwen["head_dim"],
            qwen["intermediate_size"], qwen["vocab_size"], qwen["tie_word_embeddings"]) == (28, 2048, 8, 128, 6144,
                                                                                            151936, True)


def test_the_qwen3_configs_build_models_with_transformers():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    for name in ("Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B"):
        config = Qwen3Config(**json.loads((memory.MODEL_CONFIGS / f"{name}.json").read_text()))
        with torch.device("meta"):
            model = Qwen3ForCausalLM(config)
        assert model.lm_head.weight is model.model.embed_tokens.weight, "tied embeddings"
        assert config.rope_parameters["rope_theta"] == 1000000 and config.rms_norm_eps == 1e-6


def test_lora_parameters_are_the_adapters_peft_makes():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM

    shape = {**bench.LARGE_VOCAB, "vocab_size": 512}
    model = get_peft_model(Qwen3ForCausalLM(bench.qwen3_config(shape)),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert memory.lora_parameter_count(memory._shape_of(shape), 8) == trainable


# ---------------------------------------------------------------- measured peaks

@pytest.fixture(scope="module")
def large_vocabulary_peaks():
    """A 2-layer Qwen3 with Qwen3's 151,936-word vocabulary: RLTrainer.logprobs and update on 4 made-up rows
    of 256 tokens (one mini-batch), in one pass and in micro-batches of one row with 128-position log-prob
    chunks. 4 x 256, not 4 x 512: the one-pass update alone is 3 GiB here (6 GiB at 512 tokens). bf16 autocast
    where this CPU has bf16 kernels, fp32 where torch would emulate bf16 (minutes slower, the same check)."""
    batch = bench.made_up_batch(4, 256, bench.LARGE_VOCAB["vocab_size"])
    out = {}
    for micro, chunk in ((0, 0), (1, 128)):
        profile = bench.profile_for(4, 256, micro, chunk, autocast="auto")
        out[micro, chunk] = profile, bench.trainer_peaks(profile, *bench.large_vocab_models(), batch)
    return out


def test_a_large_vocabulary_updates_under_a_bound_the_one_pass_exceeds(large_vocabulary_peaks):
    bound = 1 * GiB
    one_pass, chunked = (max(peaks[phase]["total"] for phase in ("logprobs", "update"))
                         for _, peaks in (large_vocabulary_peaks[0, 0], large_vocabulary_peaks[1, 128]))
    print(f"\nvocabulary 151,936, 4 rows x 256 tokens, RL logprobs + update: one pass {one_pass / GiB:.3f} GiB, "
          f"micro_batch_size 1 + logprob_chunk 128 {chunked / GiB:.3f} GiB (bound {bound / GiB:.1f} GiB)")
    assert chunked <= bound < one_pass


def test_the_trainer_frees_gradients_after_an_update_as_the_estimate_assumes(large_vocabulary_peaks):
    for _, measured in large_vocabulary_peaks.values():
        assert measured["after_update"]["gradients"] == memory.KEEPS_GRADIENTS


def test_the_estimate_is_within_25_percent_of_the_large_vocabulary_peaks(large_vocabulary_peaks):
    for (micro, chunk), (profile, measured) in large_vocabulary_peaks.items():
        _check(profile, bench.LARGE_VOCAB, measured, f"\nvocab 151,936, micro {micro}, chunk {chunk}")


def test_the_estimate_is_within_25_percent_of_the_tiny_profile(tokenizer):
    """The tiny profile at its own RL settings (32 rollouts in one mini-batch and one pass) on a made-up batch of
    full-length rows (rollout.max_context), its model built as notebook 00 builds it; bf16 autocast where this
    CPU has bf16 kernels, fp32 where torch would emulate bf16 (minutes slower, the same check)."""
    from zslib.tiny import pretraining

    P = load_profile("tiny", {"rl.engine": "bm25", "rl.validate_every": 0,  # no simulator in this measurement
                              "rl.bf16_autocast": "auto"})
    torch.manual_seed(0)
    policy = pretraining.build_model(tokenizer, P.tiny, seed=0)
    reference = pretraining.build_model(tokenizer, P.tiny, seed=0).eval().requires_grad_(False)
    rows = P.rl.questions_per_step * P.rl.group_size
    measured = bench.trainer_peaks(P, policy, reference, bench.made_up_batch(rows, P.rollout.max_context,
                                                                             len(tokenizer)), tokenizer)
    _check(P, memory.model_shape("tiny", P), measured, f"\ntiny profile, {rows} x {P.rollout.max_context}")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_estimate_is_within_25_percent_of_qwen3_widths_on_fake_tensors(checkpointing):
    """Qwen3-0.6B's widths, heads and vocabulary with 8 of its 28 layers (quick); benchmarks/memory.py
    measures the full 0.6B and 1.7B. One micro-batch of 2 x 1,024 tokens, log-probs in 256-position chunks."""
    shape = {**memory.model_shape("Qwen/Qwen3-0.6B"), "num_hidden_layers": 8}
    measured = bench.fake_phases(shape, 2, 1024, 256, checkpointing)
    _check(bench.profile_for(2, 1024, 0, 256, checkpointing), shape, measured,
           f"\nQwen3-0.6B widths, 8 layers, checkpointing {checkpointing}")


@pytest.mark.parametrize("kind, checkpointing", [("ppo", False), ("lora", True)])
def test_the_estimate_is_within_25_percent_with_a_critic_and_with_lora(kind, checkpointing):
    """RLTrainer on a small Qwen3: PPO with its critic (two epochs, so old log-probs and values are a pass of
    their own), and a LoRA policy with checkpointing (its reference is the policy without the adapter). Rows of
    128 tokens: MemTracker inspects every live tensor at each operation, and GAE's loop is one per token."""
    profile, measured = bench.variant_peaks(kind, rows=4, tokens=128, micro=2, checkpointing=checkpointing)
    _check(profile, bench.SMALL, measured, f"\n{kind}, 4 x 128, micro-batches of 2, checkpointing {checkpointing}")


# ---------------------------------------------------------------- how the parts follow the settings

def test_the_parts_follow_the_settings():
    base = load_profile("qwen3-1.7b", {"rl.micro_batch_size": 1, "rl.logprob_chunk": 512})
    est = memory.estimate(base, advice=False)
    params = memory.parameter_count(memory.model_shape("Qwen/Qwen3-1.7B"))
    assert est.parts["policy"] == 4 * params and est.parts["optimizer"] == 8 * params
    assert est.peak == max(est.phases.values()) == sum(est.by_phase[est.peak_phase].values())

    sharded = memory.estimate(base, gpus=4, fsdp=True, advice=False)
    for part in ("policy", "optimizer", "reference", "gradients"):
        assert sharded.parts[part] == est.parts[part] // 4
    ddp = memory.estimate(base, gpus=4, advice=False)
    assert ddp.parts["policy"] == est.parts["policy"]

    lora = memory.estimate(load_profile("qwen3-1.7b", {"rl.micro_batch_size": 1, "rl.lora": True}), advice=False)
    assert lora.parts["reference"] == 0 and lora.parts["gradients"] < est.parts["gradients"] / 50

    ppo = memory.estimate(load_profile("qwen3-1.7b", {"rl.micro_batch_size": 1, "rl.algorithm": "ppo"}), advice=False)
    assert ppo.parts["critic"] > 15 * params

    engine = {"rollout.backend": "vllm", "vllm.gpu_memory_utilization": 0.3, "vllm.kv_cache_memory_bytes": 0}
    awake = memory.estimate(load_profile("qwen3-1.7b", {**engine, "vllm.sleep_mode": False}), advice=False)
    asleep = memory.estimate(load_profile("qwen3-1.7b", {**engine, "vllm.sleep_mode": True}), advice=False)
    assert awake.by_phase["update"]["rollout"] == int(0.3 * 80 * GiB)
    assert "rollout" not in asleep.by_phase["update"] and asleep.by_phase["rollout"]["rollout"] > 0

    hf = memory.estimate(load_profile("qwen3-1.7b", {"rollout.backend": "hf", "rollout.batch_size": 64}), advice=False)
    kv = 64 * 4096 * 2 * 28 * 8 * 128 * 2  # rows x context x K and V x layers x KV heads x head dim x bf16
    assert hf.by_phase["rollout"]["rollout"] >= kv + 2 * params  # the cache and the bf16 decoding copy

    http = memory.estimate(load_profile("qwen3-1.7b", {"simulator.serve": "http"}), advice=False)
    assert http.parts["simulator"] == 0


# ---------------------------------------------------------------- the command line

def test_the_command_prints_every_part_and_whether_it_fits(capsys):
    memory.main(["--profile", "qwen3-1.7b", "--gpu-gb", "80"])
    out = capsys.readouterr().out
    print(out)
    for label in memory.PARTS.values():
        assert label in out
    assert ("\nfits: peak" in out) != ("\nDOES NOT FIT: peak" in out)


def test_a_setting_that_cannot_fit_gets_advice_naming_settings(capsys):
    assert memory.main(["--profile", "qwen3-1.7b", "--gpu-gb", "8"]) == 1
    out = capsys.readouterr().out
    print(out)
    assert "DOES NOT FIT" in out and "Settings that lower the peak" in out
    advice = out.split("Settings that lower the peak")[1]
    assert "rl.micro_batch_size" in advice or "rl.micro_batch_tokens" in advice
    assert "--fsdp --gpus" in advice and "saves" in advice
