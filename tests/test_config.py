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


def test_missing_profile_lists_known_ones():
    with pytest.raises(ConfigError, match="tiny"):
        load_profile("no-such-profile")


def test_every_shipped_profile_loads():
    for path in CONFIG_DIR.glob("*.yaml"):
        load_profile(path.stem)


@pytest.mark.parametrize("key, value, message", [
    ("simulator.serve", "grpc", "simulator.serve must be inprocess or http, not 'grpc'"),
    ("simulator.retries", -1, "simulator.retries >= 0"),
    ("vllm.dtype", "int8", "vllm.dtype must be auto, float32, bfloat16 or float16, not 'int8'"),
    ("vllm.gpu_memory_utilization", 1.5, r"vllm.gpu_memory_utilization in \(0, 1\]"),
])
def test_out_of_range_serving_settings_fail_at_load_time(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_profile("tiny", {key: value})


@pytest.mark.parametrize("fast", [True, False])
def test_auto_bf16_follows_the_machine_and_explicit_values_stay(monkeypatch, fast):
    from zslib import config, models
    monkeypatch.setattr(models, "fast_bf16", lambda device: (fast, "stand-in"))
    p = load_profile("micro")  # auto for all three
    assert (p.tiny.bf16_autocast, p.simulator.bf16, p.rl.bf16_autocast) == (fast, fast, fast)
    assert config.TinyConfig().bf16_autocast is fast and config.SimulatorConfig().bf16 is fast  # the code defaults
    p = load_profile("tiny")  # the measured recipe pins bf16 on every machine
    assert (p.tiny.bf16_autocast, p.simulator.bf16, p.rl.bf16_autocast) == (True, True, True)
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

    from zslib.models import fast_bf16
    info = Path("/proc/cpuinfo")
    flags = set(info.read_text().split()) if info.exists() else set()
    if "avx2" not in flags:
        pytest.skip("not an x86 Linux machine: no /proc/cpuinfo flags to compare with")
    fast, why = fast_bf16("cpu")
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        assert fast, why
    if not {"avx512bw", "amx_bf16"} & flags:
        assert not fast, why
