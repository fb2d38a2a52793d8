"""The GPU check (issue 26): one RL step of each Qwen3 profile on one GPU, with only what the lent GPU
machine has (torch with CUDA, transformers, peft, accelerate; no vLLM, TRL, datasets or model hub).

For each profile: Qwen3 built with random weights from its shape in ``configs/models/`` (memory and speed
depend on the shapes, not the values), Qwen3's tokenizer, the tiny world's questions and a BM25 index over its
corpus, and the ``RLTrainer`` at the profile's settings with the HF backend and the real engine (``rl.engine:
bm25``: the simulator is a model of its own, served apart). Per phase it prints the peak memory against
``zslib.memory``'s estimate and the seconds:

AdamW's moments are made first (one step on zero gradients), as in every step after the first.

- ``rollout``: one step's rollouts (``rl.questions_per_step`` x ``rl.group_size`` rows, ``rollout.batch_size`` at
  a time); a random model never writes an action, so each row runs ``--rollout-tokens`` tokens for one search
  turn and one answer turn (the generated tokens/s are the HF backend's);
- ``logprobs`` and ``update``: a made-up batch of the step's rows, every one ``rollout.max_context`` tokens long
  (the worst case the profile allows), through the trainer's log-prob and update phases;
- ``weight_sync``: the decoding copy takes the new weights.

On a machine without a GPU it runs at a reduced size (a two-layer model of Qwen3's vocabulary, a few short
rows) and measures with ``MemTracker``; a test runs it so, so the script is known to work before a GPU is lent.

    python benchmarks/gpu_check.py --prepare outputs/gpu_site      # here: bm25s and the tokenizer, to carry
    PYTHONPATH=.:outputs/gpu_site python benchmarks/gpu_check.py --out DIR   # there (run tool, carry outputs/gpu_site)
    python benchmarks/gpu_check.py --reduced                           # the CPU rehearsal
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROFILES = ("qwen3-0.6b", "qwen3-1.7b")
GIB = 2 ** 30
# The CPU rehearsal: Qwen3's vocabulary (the logits are the part that grows with it) on a tiny body.
REDUCED_SHAPE = {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 2,
                 "num_key_value_heads": 1, "head_dim": 64}
REDUCED_RL = {"rl.questions_per_step": 2, "rl.group_size": 2, "rl.mini_batch_size": 4, "rl.micro_batch_size": 2,
              "rl.logprob_chunk": 256, "rollout.batch_size": 4, "rollout.max_context": 384}


def prepare(folder: Path) -> None:
    """Copy what the GPU machine lacks into ``folder`` (carried with the working tree): the pure-Python
    ``bm25s`` package and Qwen3's tokenizer files."""
    import bm25s

    from zslib.generation.packaged import packaged_path
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(Path(bm25s.__file__).parent, folder / "bm25s", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(packaged_path("qwen3-tokenizer"), folder / "qwen3-tokenizer", dirs_exist_ok=True)
    print(f"prepared {folder}: bm25s and qwen3-tokenizer ({sum(f.stat().st_size for f in folder.rglob('*') if f.is_file()) / 2**20:.0f} MiB)")


def tokenizer_folder(site: Path | None) -> Path:
    if site is not None and (site / "qwen3-tokenizer").exists():
        return site / "qwen3-tokenizer"
    from zslib.generation.packaged import packaged_path
    return packaged_path("qwen3-tokenizer")


def rehearsal_dtype(device: str) -> torch.dtype:
    """bf16, as on the GPU, except on a CPU that would emulate it: there the rehearsal runs the same code in
    fp32 (emulated bf16 made the reduced check take minutes; docs/results.md, issue 27)."""
    from zslib.generation.models import fast_bf16
    return torch.bfloat16 if device == "cuda" or fast_bf16(device)[0] else torch.float32


def build_model(profile_name: str, folder: Path, tokenizer_dir: Path, reduced: bool, device: str) -> dict:
    """Qwen3 with random weights from ``configs/models/<name>.json``, saved (bf16) with the tokenizer in
    ``folder`` so that the trainer loads it as it loads any checkpoint. Returns the shape used."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from zslib.config import load_profile
    name = load_profile(profile_name).models.policy.split("/")[-1]
    shape = json.loads((ROOT / "configs" / "models" / f"{name}.json").read_text())
    if reduced:
        shape.update(REDUCED_SHAPE)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it will run: seconds on a GPU for 1.7B parameters
        model = Qwen3ForCausalLM(Qwen3Config(**shape)).to(rehearsal_dtype(device))
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(folder))
    del model
    return shape


class Meter:
    """The peak memory and seconds of each phase: the CUDA allocator's statistics on a GPU; on the CPU,
    live tensors counted by ``memory.tracked_peak`` (torch's ``MemTracker``), the models, the decoding copy
    and the optimizer counted from the start."""

    def __init__(self, device: str):
        self.device, self.results, self.externals = device, {}, []

    def phase(self, name: str, fn):
        start = time.perf_counter()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            out = fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            from zslib.memory import tracked_peak
            box = []
            peak = tracked_peak(lambda: box.append(fn()), *self.externals)["total"]
            out = box[0]
        self.results[name] = {"seconds": time.perf_counter() - start, "peak_gib": peak / GIB}
        return out


def full_length_batch(t, group, context: int, seed: int = 0):
    """The step's rows as made-up token ids, each ``context`` tokens long, the response (after a 128-token
    prompt) under mask 1, rewards 0 or 1 so that groups have advantages."""
    from zslib import trainer
    g = torch.Generator().manual_seed(seed)
    rows = len(group.trajs)
    ids = torch.randint(0, len(t.tokenizer), (rows, context), generator=g)
    mask = torch.zeros(rows, context - 1)
    mask[:, min(128, context // 4):] = 1
    return trainer.Batch(ids.to(t.device), mask.to(t.device), torch.rand(rows, generator=g).round().to(t.device),
                         group.group_ids.to(t.device), lengths=torch.full((rows,), context).to(t.device))


def check(profile_name: str, work: Path, site: Path | None, reduced: bool, rollout_tokens: int, gpu_gb: float) -> dict:
    from zslib import memory, trainer
    from zslib.config import load_profile
    from zslib.data import normalize_rows
    from zslib.files import read_jsonl
    from zslib.search import make_engine
    from zslib.tiny.world import write_world

    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = work / profile_name
    shape = build_model(profile_name, folder / "policy", tokenizer_folder(site), reduced, device)
    world = write_world(load_profile("tiny").world, folder / "world")
    overrides = {"models.policy": str(folder / "policy"), "rollout.backend": "hf", "data.train_sets": ["tiny"],
                 "data.eval_sets": ["tiny"], "search.engine": "bm25", "search.corpus_path": str(world["corpus"]),
                 "rl.engine": "bm25", "rl.validate_every": 0, "rollout.max_turns": 1,
                 "rollout.max_tokens_per_turn": rollout_tokens, **(REDUCED_RL if reduced else {})}
    if rehearsal_dtype(device) == torch.float32:
        overrides.update({"models.dtype": "float32", "rl.bf16_autocast": False})
    P = load_profile(profile_name, overrides)
    questions = normalize_rows(read_jsonl(world["train"]), str(world["train"]), "tiny", "train")
    engine = make_engine(P.search, P.corpus_path, folder / "bm25")
    t = trainer.RLTrainer(P, folder / "rl", engine=engine, real_engine=engine, questions=questions, validation={})
    meter = Meter(device)
    meter.externals = [m for m in (t.policy, t.reference, getattr(t.backend, "model", None), t.optimizer) if m is not None]

    # AdamW makes its moments at its first step: one step on zero gradients (no change to the weights) makes
    # them now, so every phase is measured in the steady state the estimate describes.
    for param in t.policy.parameters():
        param.grad = torch.zeros_like(param) if param.requires_grad else None
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    group = meter.phase("rollout", t.rollout_group)
    generated = sum(len(tr.response_ids) for tr in group.trajs)
    t.backend.sleep()
    batch = full_length_batch(t, group, P.rollout.max_context)
    meter.phase("logprobs", lambda: t.advantages(t.logprobs(batch)))
    stats = meter.phase("update", lambda: t.update(batch))
    meter.phase("weight_sync", lambda: (t.backend.wake_up(), t.sync_weights()))

    est = memory.estimate(P, gpus=1, gpu_gb=gpu_gb, shape=shape, device=device)  # "cpu": AdamW's per-tensor step
    phases = {}
    for name, got in meter.results.items():
        estimate = est.phases.get(name)
        phases[name] = {**got, "estimate_gib": None if estimate is None else estimate / GIB,
                        "ratio": None if not estimate else got["peak_gib"] * GIB / estimate}
    return {"profile": profile_name, "reduced": reduced, "device": device, "dtype": P.models.dtype,
            "parameters": sum(p.numel() for p in t.policy.parameters()),
            "rows": len(group.trajs), "context": P.rollout.max_context, "generated_tokens": generated,
            "generated_tokens_per_s": generated / meter.results["rollout"]["seconds"],
            "step_seconds": sum(r["seconds"] for r in meter.results.values()),
            "grad_norm": stats["grad_norm"], "estimate_peak_gib": est.peak / GIB, "phases": phases}


def table(result: dict) -> str:
    lines = [f"{result['profile']} ({'reduced, ' if result['reduced'] else ''}{result['device']}, {result['dtype']}): "
             f"{result['parameters'] / 1e9:.3f}B parameters, {result['rows']} rows of {result['context']} tokens, "
             f"{result['generated_tokens']} tokens generated at {result['generated_tokens_per_s']:.0f}/s, "
             f"step {result['step_seconds']:.1f} s",
             f"{'phase':<12} {'seconds':>8} {'peak GiB':>9} {'estimate':>9} {'ratio':>6}"]
    for name, p in result["phases"].items():
        est = "-" if p["estimate_gib"] is None else f"{p['estimate_gib']:.2f}"
        ratio = "-" if p["ratio"] is None else f"{p['ratio']:.2f}"
        lines.append(f"{name:<12} {p['seconds']:>8.1f} {p['peak_gib']:>9.2f} {est:>9} {ratio:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", nargs="+", default=list(PROFILES))
    ap.add_argument("--reduced", action="store_true", help="the CPU rehearsal's sizes (the default without a GPU)")
    ap.add_argument("--rollout-tokens", type=int, default=None, help="tokens per turn (default 128; 16 reduced)")
    ap.add_argument("--gpu-gb", type=float, default=80.0)
    ap.add_argument("--site", type=Path, default=ROOT / "outputs" / "gpu_site", help="what --prepare copied")
    ap.add_argument("--prepare", type=Path, help="copy bm25s and the tokenizer into this folder, then stop")
    ap.add_argument("--out", type=Path, help="write the results here as gpu_check.json")
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(args.prepare)
        return []
    reduced = args.reduced or not torch.cuda.is_available()
    tokens = args.rollout_tokens or (16 if reduced else 128)
    site = args.site if args.site.exists() else None
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.profiles:
            results.append(check(name, Path(work), site, reduced, tokens, args.gpu_gb))
            print(table(results[-1]), flush=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if args.out:  # after each profile: a later one running out of time keeps the earlier figures
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
