"""The GPU check runs on the CPU at its reduced size, so it is known to work before a GPU is lent."""

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_one_rl_step_per_phase_and_reports_memory_against_the_estimate(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    gpu_check.main(["--reduced", "--profiles", "qwen3-0.6b", "--out", str(tmp_path)])
    (result,) = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["reduced"] and result["rows"] == 4 and result["generated_tokens"] > 0
    phases = result["phases"]
    assert list(phases) == ["rollout", "logprobs", "update", "weight_sync"]
    assert all(p["seconds"] > 0 and p["peak_gib"] > 0 for p in phases.values())
    # The update keeps gradients and AdamW's moments on top of what the log-probs phase holds.
    assert phases["update"]["peak_gib"] > phases["logprobs"]["peak_gib"]
    assert all(phases[name]["estimate_gib"] > 0 for name in ("rollout", "logprobs", "update"))
    assert math.isfinite(result["grad_norm"]) and result["grad_norm"] > 0
    # bf16 as on the GPU, unless this CPU would emulate it (minutes for the same code path)
    from zslib.generation.models import fast_bf16
    dtype = "bfloat16" if fast_bf16("cpu")[0] else "float32"
    assert result["dtype"] == dtype
    assert f"qwen3-0.6b (reduced, cpu, {dtype})" in capsys.readouterr().out
