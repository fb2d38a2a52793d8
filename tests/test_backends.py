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


def test_the_profiles_backend_decodes_in_its_dtype_and_follows_the_live_weights(tokenizer, protocol_model):
    """fp32 master weights decode through a bf16 copy (``models.dtype``), the same tokens as a model
    loaded in bf16; after an update, ``load_weights`` gives the copy the new weights."""
    import copy

    import torch
    model = copy.deepcopy(protocol_model[0])
    profile = config.load_profile("tiny", {"models.dtype": "bfloat16"})
    backend = backends.backend_for(profile, model, tokenizer)
    assert next(backend.model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    prompts = [tokenizer(q["question"], add_special_tokens=False)["input_ids"] for q in protocol_model[1][:4]]
    bf16 = backends.make_backend("hf", copy.deepcopy(model).to(torch.bfloat16), tokenizer)
    assert backend.generate(prompts, 12, 0.0, 1.0) == bf16.generate(prompts, 12, 0.0, 1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    backend.load_weights()
    for live, copied in zip(model.parameters(), backend.model.parameters()):
        assert torch.equal(copied, live.to(torch.bfloat16))
    same = backends.backend_for(config.load_profile("tiny"), model, tokenizer)  # float32: no copy
    assert same.model is model
