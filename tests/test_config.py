import pytest

from zslib.config import CONFIG_DIR, ConfigError, load_profile


def test_tiny_profile_defaults():
    p = load_profile("tiny")
    assert p.name == "tiny" and p.is_tiny
    assert p.search.engine == "bm25" and p.search.topk == 3
    assert p.out.name == "tiny" and p.out.parent.name == "outputs"


@pytest.mark.parametrize("name,model", [("qwen3-0.6b", "Qwen/Qwen3-0.6B"), ("qwen3-1.7b", "Qwen/Qwen3-1.7B"),
                                        ("qwen3-4b", "Qwen/Qwen3-4B")])
def test_gpu_profiles_name_qwen3(name, model):
    p = load_profile(name)
    assert p.models.policy == model and not p.is_tiny
    assert p.policy_path == model
    assert "nq" in p.data.train_sets and "bamboogle" in p.data.eval_sets


def test_profile_by_path_and_overrides(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("name: mine\ntiny:\n  policy_steps: 7\n")
    p = load_profile(str(f), overrides={"tiny.lr": 1, "rollout.max_turns": 2})
    assert p.name == "mine" and p.tiny.policy_steps == 7
    assert p.tiny.lr == 1.0 and isinstance(p.tiny.lr, float)
    assert p.rollout.max_turns == 2


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("tiny:\n  polcy_steps: 7\n")
    with pytest.raises(ConfigError, match=r"typo.yaml.*unknown key tiny\.polcy_steps"):
        load_profile(str(f))


def test_unknown_override_is_named():
    with pytest.raises(ConfigError, match=r"unknown key rollout\.max_turn\b"):
        load_profile("tiny", overrides={"rollout.max_turn": 3})


@pytest.mark.parametrize("key,value", [("tiny.policy_steps", "many"), ("tiny.bf16_autocast", 1),
                                       ("rollout.max_turns", 2.5), ("search.topk", True), ("world", 3)])
def test_wrong_type_is_named(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_profile("tiny", overrides={key: value})


def test_a_float_written_without_a_dot_is_a_float_in_an_override_and_in_a_file(tmp_path):
    """PyYAML reads ``4e-4`` as a string (YAML 1.1 wants ``4.0e-4``); a researcher typing ``-p rl.lr=4e-4``
    means the number. Only float fields take it: an int field and a word are still errors."""
    from zslib.pipeline import parse_overrides
    assert parse_overrides(["rl.lr=4e-4"]) == {"rl.lr": "4e-4"}  # the trap, as YAML reads it
    rl = load_profile("tiny", parse_overrides(["rl.lr=4e-4", "rl.kl_coef=+5E-2"])).rl
    assert (rl.lr, rl.kl_coef) == (0.0004, 0.05)
    f = tmp_path / "sci.yaml"
    f.write_text("extends: tiny\nrl:\n  lr: 3e-5\n")
    assert load_profile(str(f)).rl.lr == pytest.approx(3e-5)
    for key, value in (("rl.steps", "1e3"), ("rl.lr", "4e-4x"), ("rl.lr", "e-4")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_profile("tiny", {key: value})


def test_missing_profile_lists_known_ones():
    with pytest.raises(ConfigError, match="tiny"):
        load_profile("no-such-profile")


def test_every_shipped_profile_loads():
    for path in CONFIG_DIR.glob("*.yaml"):
        load_profile(path.stem)


def _choice_fields():
    """Every (dotted key, allowed names) of a choice field in the profile's sections."""
    import dataclasses
    import typing

    from zslib import config
    sections = typing.get_type_hints(config.Profile).items()
    return [(f"{name}.{f.name}", f.metadata["choices"]) for name, cls in sections if dataclasses.is_dataclass(cls)
            for f in dataclasses.fields(cls) if "choices" in f.metadata]


def test_every_choice_is_checked_against_the_registry_the_code_runs():
    """The names a profile may give are the keys of the mapping the code looks them up in."""
    from zslib import algos, curriculum, labeling, prompts, reward, search, simulator
    from zslib.generation import backends
    registries = dict(_choice_fields())
    assert registries["rl.algorithm"] is algos.ALGORITHMS and registries["rl.agg"] is algos.AGGREGATIONS
    assert registries["rl.kl_kind"] is algos.KL_KINDS and registries["rl.reward"] is reward.REWARDS
    assert registries["rl.curriculum"] is curriculum.SCHEDULES and registries["labeling.metric"] is reward.METRICS
    assert registries["labeling.judge"] is labeling.JUDGES and registries["search.engine"] is search.ENGINES
    assert registries["rollout.backend"] is backends.BACKENDS and registries["simulator.serve"] is simulator.TRANSPORTS
    assert registries["simulator.prompt"] is prompts.SIMULATOR_PROMPTS
    assert len(registries) >= 14


@pytest.mark.parametrize("key", [key for key, _ in _choice_fields()])
def test_an_unknown_name_fails_at_load_time_listing_the_known_ones(key):
    names = dict(_choice_fields())[key]
    value = ["no-such-name"] if key.endswith(".memory_relations") else "no-such-name"
    with pytest.raises(ConfigError) as e:
        load_profile("tiny", {key: value})
    message = str(e.value)
    assert f"{key} must be one of " in message and "not 'no-such-name'" in message
    assert all(str(name) in message for name in names), message


@pytest.mark.parametrize("key, value, allowed", [
    ("rl.group_size", 0, ">= 1"), ("rl.questions_per_step", 0, ">= 1"), ("rl.mini_batch_size", 0, ">= 1"),
    ("rl.lr", -1, "> 0"), ("rl.lr", 0, "> 0"), ("rl.critic_lr", -1e-5, "> 0"), ("simulator.lr", -1, "> 0"),
    ("tiny.lr", 0, "> 0"), ("rl.p_start", -0.1, r"in \[0, 1\]"), ("rl.p_end", 1.5, r"in \[0, 1\]"),
    ("tiny.known_fraction", 2, r"in \[0, 1\]"), ("labeling.threshold", 1.01, r"in \[0, 1\]"),
    ("rollout.top_p", 0, r"in \(0, 1\]"), ("rl.gamma", 1.5, r"in \[0, 1\]"), ("rl.clip_c", 1, "> 1"),
    ("rollout.max_turns", 0, ">= 1"), ("rollout.max_tokens_per_turn", 0, ">= 1"), ("rl.steps", 0, ">= 1"),
    ("rollout.temperature", -0.5, ">= 0"), ("simulator.retries", -1, ">= 0"), ("vllm.max_model_len", 8, ">= 16"),
    ("vllm.gpu_memory_utilization", 1.5, r"in \(0, 1\]"), ("world.n_people", 0, ">= 1"),
])
def test_an_impossible_value_fails_at_load_time_naming_key_value_and_range(key, value, allowed):
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')} must be {allowed}, not {value!r}"):
        load_profile("tiny", {key: value})


@pytest.mark.parametrize("overrides, message", [
    ({"rollout.max_context": 64}, r"rollout.max_context \(64\) must be above rollout.max_tokens_per_turn \(64\)"),
    ({"tiny.hidden_size": 250}, r"tiny.hidden_size \(250\) must be a multiple of tiny.num_heads \(4\)"),
    ({"simulator.max_steps": 0}, "simulator.max_steps must be -1"),
    ({"world.split_fractions": [0.7, 0.2, 0.2]}, "world.split_fractions must be three shares"),
    ({"rollout.backend": "vllm", "vllm.max_model_len": 512},
     r"vllm.max_model_len \(512\) must be at least rollout.max_context \(1024\)"),
])
def test_settings_that_contradict_each_other_fail_at_load_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_profile("tiny", overrides)


def test_the_checked_sections_check_when_built_in_code_too():
    from zslib.config import RLConfig
    with pytest.raises(ConfigError, match="rl.group_size must be >= 1, not 0"):
        RLConfig(group_size=0)
    assert RLConfig(group_size=1).group_size == 1


@pytest.mark.parametrize("fast", [True, False])
def test_auto_bf16_follows_the_machine_and_explicit_values_stay(monkeypatch, fast):
    from zslib import config
    from zslib.generation import models
    monkeypatch.setattr(models, "fast_bf16", lambda device: (fast, "stand-in"))
    for name in ("micro", "tiny"):  # auto for all three (the tiny recipe holds in both precisions)
        p = load_profile(name)
        assert (p.tiny.bf16_autocast, p.simulator.bf16, p.rl.bf16_autocast) == (fast, fast, fast)
    assert config.TinyConfig().bf16_autocast is fast and config.SimulatorConfig().bf16 is fast  # the code defaults
    p = load_profile("micro", {"tiny.bf16_autocast": True, "simulator.bf16": False, "rl.bf16_autocast": True})
    assert (p.tiny.bf16_autocast, p.simulator.bf16, p.rl.bf16_autocast) == (True, False, True)
    line = config.describe(p, "tiny", "rl").splitlines()[-1]
    assert line == "precision: tiny.bf16_autocast=True, rl.bf16_autocast=True (stand-in)"


@pytest.mark.parametrize("key", ["tiny.bf16_autocast", "simulator.bf16", "rl.bf16_autocast"])
def test_a_bf16_switch_other_than_true_false_or_auto_is_named(key):
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')} must be true, false or auto, not 'yes'"):
        load_profile("tiny", {key: "yes"})


def test_fast_bf16_agrees_with_the_cpu_flags():
    """Independent of torch: bf16 kernels need AVX512 (BW) or AMX on x86; a CPU with AVX512-BF16 has them."""
    from pathlib import Path

    from zslib.generation.models import fast_bf16
    info = Path("/proc/cpuinfo")
    flags = set(info.read_text().split()) if info.exists() else set()
    if "avx2" not in flags:
        pytest.skip("not an x86 Linux machine: no /proc/cpuinfo flags to compare with")
    fast, why = fast_bf16("cpu")
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        assert fast, why
    if not {"avx512bw", "amx_bf16"} & flags:
        assert not fast, why


def test_a_micro_batch_larger_than_its_mini_batch_is_an_error():
    with pytest.raises(ConfigError, match=r"rl.micro_batch_size \(8\) must be at most rl.mini_batch_size \(4\)"):
        load_profile("tiny", {"rl.mini_batch_size": 4, "rl.micro_batch_size": 8})
    assert load_profile("tiny", {"rl.mini_batch_size": 4, "rl.micro_batch_size": 4}).rl.micro_batch_size == 4


def test_the_simulators_engine_settings_are_vllms_with_its_own_keys_in_place():
    import dataclasses
    plain = load_profile("tiny")
    assert dataclasses.asdict(plain.simulator_vllm_config) == dataclasses.asdict(plain.vllm), "no section: as vllm:"
    p = load_profile("tiny", {"vllm.max_model_len": 2048, "vllm.sleep_mode": True,
                              "simulator_vllm": {"gpu_memory_utilization": 0.6, "sleep_mode": False}})
    sim = p.simulator_vllm_config
    assert (sim.gpu_memory_utilization, sim.sleep_mode, sim.max_model_len) == (0.6, False, 2048)
    assert (p.vllm.gpu_memory_utilization, p.vllm.sleep_mode) == (0.3, True), "the policy's engine keeps its own"


@pytest.mark.parametrize("key, value, message", [
    ("simulator_vllm.gpu_memory_utilization", 1.5, r"simulator_vllm[.]gpu_memory_utilization must be in \(0, 1\], not 1.5"),
    ("simulator_vllm.tensor_parallel_size", 0, r"simulator_vllm[.]tensor_parallel_size must be >= 1, not 0"),
    ("simulator_vllm.dtype", "float8", r"simulator_vllm[.]dtype must be one of auto, float32"),
    ("simulator_vllm.sleep_mode", "yes", r"simulator_vllm[.]sleep_mode: expected true/false"),
    ("simulator_vllm.gpu_share", 0.5, r"unknown key simulator_vllm[.]gpu_share \(known: .*gpu_memory_utilization"),
    ("vllm.tensor_parallel_size", 0, r"vllm[.]tensor_parallel_size must be >= 1, not 0"),
    ("vllm.data_parallel_size", 0, r"vllm[.]data_parallel_size must be >= 1, not 0"),
    ("simulator.url", [], r"simulator[.]url must be a URL or a non-empty list of URLs"),
])
def test_a_bad_simulator_engine_setting_fails_at_load_time_naming_its_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_profile("tiny", {key: value})


def test_data_parallel_engines_are_for_the_simulator_server_only():
    with pytest.raises(ConfigError, match=r"vllm.data_parallel_size \(2\) must be 1 with rollout.backend: vllm"):
        load_profile("tiny", {"rollout.backend": "vllm", "vllm.data_parallel_size": 2})
    with pytest.raises(ConfigError, match=r"simulator_vllm.data_parallel_size \(2\) must be 1 with simulator.serve: inprocess"):
        load_profile("tiny", {"rollout.backend": "vllm", "simulator_vllm.data_parallel_size": 2})
    served = load_profile("tiny", {"rollout.backend": "vllm", "simulator.serve": "http",
                                   "simulator_vllm.data_parallel_size": 2})
    assert served.simulator_vllm_config.data_parallel_size == 2 and served.vllm.data_parallel_size == 1


def test_simulator_url_takes_one_url_or_several():
    assert load_profile("tiny").simulator.urls == ["http://127.0.0.1:8001/v1"]
    many = ["http://10.0.0.1:8001/v1", "http://10.0.0.2:8001/v1"]
    assert load_profile("tiny", {"simulator.url": many}).simulator.urls == many


@pytest.mark.parametrize("name", ["qwen3-0.6b", "qwen3-1.7b", "qwen3-4b"])
def test_gpu_profiles_generate_on_vllm_with_a_sleeping_policy_engine_and_a_simulator_engine_of_its_own(name):
    p = load_profile(name)
    sim = p.simulator_vllm_config
    assert p.rollout.backend == "vllm" and p.vllm.sleep_mode and not sim.sleep_mode
    assert p.vllm.kv_cache_memory_bytes == 0 and sim.kv_cache_memory_bytes == 0, "both sized by their GPU share"
    assert sim.gpu_memory_utilization != p.vllm.gpu_memory_utilization
    assert p.vllm.gpu_memory_utilization + sim.gpu_memory_utilization <= 0.6, "room left for the trainer"
    assert sim.max_model_len >= p.rollout.max_context and sim.dtype == p.vllm.dtype == "bfloat16"


@pytest.mark.parametrize("setting", [{"rl.lora": True}, {"rl.algorithm": "ppo"}, {"rl.micro_batch_tokens": 4096}])
def test_fsdp_with_what_it_does_not_shard_yet_is_an_error(setting):
    with pytest.raises(ConfigError, match="rl.fsdp shards a fully fine-tuned policy without a critic"):
        load_profile("tiny", {"rl.fsdp": True, **setting})
    assert load_profile("tiny", {"rl.fsdp": True}).rl.fsdp
