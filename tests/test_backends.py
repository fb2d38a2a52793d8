"""The generation seam: one factory builds every backend, chosen by the profile."""

import re
from pathlib import Path

import pytest

from zslib import config
from zslib.generation import backends
from zslib.generation.hf_backend import HFBackend


def test_the_factory_builds_the_profiles_backend_with_its_stop_strings(tokenizer, protocol_model):
    model, _ = protocol_model
    default = backends.backend_for(config.load_profile("tiny"), model, tokenizer)
    assert isinstance(default, HFBackend) and default.stop_strings == ["</search>", "</answer>"]
    judge = backends.make_backend("hf", model, tokenizer, ["\n"], reuse_cache=False)
    assert judge.stop_strings == ["\n"] and judge.reuse_cache is False
    with pytest.raises(backends.BackendError, match="must be one of hf, vllm, not 'tgi'"):
        backends.make_backend("tgi", model, tokenizer)
    with pytest.raises(config.ConfigError, match="rollout.backend must be one of hf, vllm, not 'tgi'"):
        config.load_profile("tiny", {"rollout.backend": "tgi"})


def test_no_module_builds_a_backend_around_the_factory():
    """Collection, RL, evaluation, the judge and the simulator all go through zslib/generation/backends.py."""
    root = Path(__file__).resolve().parent.parent
    offenders = [str(p.relative_to(root)) for p in sorted((root / "zslib").rglob("*.py")) + sorted((root / "notebooks").glob("*.ipynb"))
                 if p.name not in ("backends.py", "hf_backend.py") and re.search(r"(HF|VLLM)Backend\(", p.read_text())]
    assert offenders == []
