"""Several training processes (``accelerate launch``, gloo on the CPU) train as one process on the same
global batch, write once, and resume with another number of processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from zslib import distributed

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def profile_file(protocol_model, tokenizer, tiny_world, tmp_path_factory):
    """The tiny profile on the protocol model: 4 questions a step, greedy (so a rollout does not depend on
    which process draws it), one rollout each (GRPO's advantage is then the reward), fp32. The questions are
    the 16 the protocol model was trained on, so rewards are not all 0 (on other questions they can be, on a
    CPU whose kernels round differently, and then nothing moves)."""
    folder = tmp_path_factory.mktemp("dist")
    model, rows = protocol_model
    model.save_pretrained(str(folder / "policy"))
    tokenizer.save_pretrained(str(folder / "policy"))
    (folder / "questions").mkdir()
    (folder / "questions" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    profile = {"extends": "tiny", "name": "dist-test", "models": {"policy": str(folder / "policy")},
               "data": {"train_sets": [str(folder / "questions")]},
               "search": {"corpus_path": str(tiny_world["paths"]["corpus"])},
               "rollout": {"max_turns": 2, "max_tokens_per_turn": 40, "max_obs_tokens": 96, "temperature": 0.0},
               "rl": {"engine": "bm25", "steps": 5, "questions_per_step": 4, "group_size": 1, "mini_batch_size": 4,
                      "lr": 1e-3, "warmup_steps": 0, "kl_coef": 0.1, "validate_every": 0, "checkpoint_every": 1,
                      "keep_checkpoints": 5, "bf16_autocast": False}}
    path = folder / "dist.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(profile_file, run_dir, steps, processes, overrides=()):
    args = ["-m", "zslib.train_rl", "--profile", str(profile_file), "--run-dir", str(run_dir), "--steps", str(steps)]
    args += [arg for o in overrides for arg in ("-p", o)]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())] if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _weights(run_dir, step):
    return load_file(str(Path(run_dir) / "checkpoints" / f"step-{step:06d}" / "policy" / "model.safetensors"))


def _largest_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(profile_file, tmp_path_factory):
    """The reference: 5 steps in one process."""
    run = tmp_path_factory.mktemp("one")
    _train(profile_file, run, 5, processes=1)
    return run


# Data parallel (every process holds the whole policy), and sharded (FSDP2, log-probs in chunks through it).
PARALLEL = {"ddp": [], "fsdp": ["rl.fsdp=true", "rl.logprob_chunk=50"]}


@pytest.mark.parametrize("mode", list(PARALLEL))
def test_two_processes_train_as_one_and_resume_with_one(profile_file, one_process, tmp_path, mode):
    one, two = one_process, tmp_path / "two"
    out = _train(profile_file, two, 3, processes=2, overrides=PARALLEL[mode])
    assert f"on 2 process(es){', sharded (FSDP)' if mode == 'fsdp' else ''}; policy" in out
    state = torch.load(two / "checkpoints" / "step-000003" / "trainer_state.pt", weights_only=False)
    assert ("optimizer_by_name" in state) == (mode == "fsdp"), "a sharded optimizer is saved whole, by names"
    # The same weights after 3 steps: each process rolled out 2 of the 4 questions, and the loss of each
    # was divided by the counts of all 4, so the summed gradients are one process's.
    # (Adam divides by the gradient's size, so the order of summation shows at 1e-5 where a gradient is ~0.)
    start = load_file(str(profile_file.parent / "policy" / "model.safetensors"))
    moved, apart = _largest_difference(_weights(one, 3), start), _largest_difference(_weights(one, 3), _weights(two, 3))
    assert moved > 1e-3 and apart < 5e-5, (moved, apart)
    # One metrics line per step, written by the main process, describing all 4 rollouts.
    assert [m["step"] for m in _metrics(two)] == [1, 2, 3]
    for a, b in zip(_metrics(one)[:3], _metrics(two)):
        assert b["reward_mean"] == pytest.approx(a["reward_mean"]) and b["search_calls"] == a["search_calls"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # Resumed with one process (unsharded) from the two processes' checkpoint, it ends where one process alone does.
    out = _train(profile_file, two, 5, processes=1)
    assert "step 5 of 5 on 1 process(es)" in out and [m["step"] for m in _metrics(two)] == [1, 2, 3, 4, 5]
    assert _largest_difference(_weights(one, 5), _weights(two, 5)) < 5e-5


def test_one_process_reduces_nothing():
    """Outside a launcher every collective is the identity (the notebooks' single process)."""
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.all_sum([1.5, 2.0]) == [1.5, 2.0] and distributed.gather("x") == ["x"]
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    distributed.all_reduce_grads([p])
    assert p.grad.tolist() == [2.0, 2.0, 2.0]
