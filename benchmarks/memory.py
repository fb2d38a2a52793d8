"""The memory estimator (``zslib.memory``) against measured peaks: live tensor bytes counted by torch's
``MemTracker`` (``memory.tracked_peak``), phase by phase, on this machine's CPU.

- the real Qwen3-0.6B and 1.7B configurations (``configs/models/``) on fake tensors, which have shapes
  and no storage: one micro-batch of the old/reference log-probs and of the update (log-probs and entropy
  with gradient, backward, gradient clipping, AdamW step), with chunked log-probs, checkpointing on and off;
- with ``--real``, also the RL trainer itself (``RLTrainer.logprobs`` and ``update`` on a made-up batch) on
  a small Qwen3 with Qwen3's 151,936-word vocabulary, one pass and chunked; on the tiny profile's model
  at its own RL settings; and PPO with its critic and a LoRA policy on a small Qwen3, checkpointing on and
  off (real tensors: up to about 3.5 GB).

    .venv/bin/python benchmarks/memory.py [--rows 2] [--tokens 1024] [--chunk 256] [--models Qwen3-0.6B ...] [--real]

The ratio is estimated / measured. The estimate is taken with ``device="cpu"``: AdamW's per-tensor step as
here (a GPU's multi-tensor step holds one more fp32 copy of the trainable weights; the estimator counts it).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zslib import memory, rl_models, trainer  # noqa: E402
from zslib.config import load_profile  # noqa: E402

LARGE_VOCAB = {"model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 1, "head_dim": 32, "intermediate_size": 128, "vocab_size": 151936,
               "tie_word_embeddings": True}


def qwen3_config(shape: dict):
    from transformers import Qwen3Config
    return Qwen3Config(**{k: v for k, v in shape.items() if k not in ("model_type", "dtype")})


def profile_for(rows: int, tokens: int, micro: int, chunk: int, checkpointing: bool = False, base: str = "tiny",
                autocast: bool = True):
    """A profile whose RL step is ``rows`` made-up rows of ``tokens`` tokens, one mini-batch, on-policy,
    no simulator (the measurements hold none)."""
    return load_profile(base, {"rl.engine": "bm25", "rl.validate_every": 0, "rl.questions_per_step": rows,
                               "rl.group_size": 1, "rl.mini_batch_size": rows, "rl.micro_batch_size": micro,
                               "rl.logprob_chunk": chunk, "rl.gradient_checkpointing": checkpointing,
                               "rl.bf16_autocast": autocast, "rl.lora": False, "rollout.max_context": tokens,
                               "rollout.backend": "hf"})


def made_up_batch(rows: int, tokens: int, vocab: int, device=None) -> trainer.Batch:
    """Rows of random tokens at full length, the last two thirds under mask 1, GRPO groups of two."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (rows, tokens), generator=g)
    mask = torch.zeros(rows, tokens - 1)
    mask[:, tokens // 3:] = 1
    return trainer.Batch(ids, mask, torch.rand(rows, generator=g).round(), torch.arange(rows) // 2,
                         lengths=torch.full((rows,), tokens))


# ---------------------------------------------------------------- the trainer, real tensors

def trainer_peaks(profile, policy, reference, batch, tokenizer=None, critic=None) -> dict:
    """Peak bytes of ``RLTrainer.logprobs`` (with advantages) and of ``RLTrainer.update``, measured apart,
    after one update on a single short row: the optimiser state there, and whatever the update leaves
    (``after_update``: whether gradients outlive it)."""
    tokenizer = tokenizer or SimpleNamespace(pad_token_id=0)
    models = rl_models.PolicyModels(tokenizer, policy, reference, critic, "cpu")
    if not profile.rl.lora:
        rl_models._checkpointing(policy, profile.rl.gradient_checkpointing)
    with tempfile.TemporaryDirectory() as run_dir:
        t = trainer.RLTrainer(profile, run_dir, models=models, engine=object(), questions=[], validation={},
                              backend=lambda model, tok: None)
        short = batch.rows(torch.arange(1))
        short = trainer.Batch(**{k: v[:, :64 - (k != "input_ids")] if torch.is_tensor(v) and v.dim() == 2 else v
                                 for k, v in vars(short).items()})
        short.lengths, short.mask = torch.tensor([64]), torch.ones_like(short.mask)
        t.update(t.advantages(t.logprobs(short)))
        kept = any(p.grad is not None for p in t.policy.parameters())
        tracked = (t.policy, t.optimizer, t.reference, t.critic, getattr(t, "critic_optimizer", None),
                   *[v for v in vars(batch).values() if torch.is_tensor(v)])
        out = {"logprobs": memory.tracked_peak(lambda: t.advantages(t.logprobs(batch)), *tracked)}
        out["update"] = memory.tracked_peak(lambda: t.update(batch), *tracked)
        out["after_update"] = {"gradients": kept}
    return out


SMALL = {**LARGE_VOCAB, "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}


def variant_peaks(kind: str, rows: int = 8, tokens: int = 512, micro: int = 2, checkpointing: bool = False):
    """``RLTrainer`` on a small Qwen3 (``SMALL``) as PPO with its critic (two epochs: old log-probs and values
    too) or with a LoRA policy (the reference is the policy without its adapter): (profile, peaks)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM, Qwen3Model

    profile = profile_for(rows, tokens, micro, 0, checkpointing)
    torch.manual_seed(0)
    policy, reference, critic = Qwen3ForCausalLM(qwen3_config(SMALL)), None, None
    if kind == "ppo":
        profile.rl.algorithm, profile.rl.ppo_epochs = "ppo", 2
        reference = Qwen3ForCausalLM(qwen3_config(SMALL)).eval().requires_grad_(False)
        critic = rl_models.Critic(rl_models._checkpointing(Qwen3Model(qwen3_config(SMALL)), checkpointing))
    else:
        profile.rl.lora = True
        rl_models._checkpointing(policy, checkpointing)
        policy = get_peft_model(policy, LoraConfig(r=profile.rl.lora_r, lora_alpha=profile.rl.lora_alpha,
                                                   target_modules="all-linear", task_type="CAUSAL_LM"))
    return profile, trainer_peaks(profile, policy, reference, made_up_batch(rows, tokens, SMALL["vocab_size"]),
                                  critic=critic)


def large_vocab_models(seed: int = 0):
    from transformers import Qwen3ForCausalLM
    torch.manual_seed(seed)
    policy = Qwen3ForCausalLM(qwen3_config(LARGE_VOCAB))
    reference = Qwen3ForCausalLM(qwen3_config(LARGE_VOCAB)).eval().requires_grad_(False)
    reference.load_state_dict(policy.state_dict())
    return policy, reference


# ---------------------------------------------------------------- fake tensors

def fake_phases(shape: dict, rows: int, tokens: int, chunk: int, checkpointing: bool, autocast: bool = True) -> dict:
    """Peak bytes of the old/reference log-probs and of one update of a model of ``shape`` on fake tensors:
    the same calls as ``RLTrainer`` for one micro-batch (``token_logprobs``, a loss over log-probs and
    entropy, backward, gradient clipping, AdamW), without the statistics that read values."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import Qwen3ForCausalLM

    def amp():
        return torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    with FakeTensorMode(allow_non_fake_inputs=True):
        policy = Qwen3ForCausalLM(qwen3_config(shape)).train()
        reference = Qwen3ForCausalLM(qwen3_config(shape)).eval().requires_grad_(False)
        rl_models._checkpointing(policy, checkpointing)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.0)
        for p in policy.parameters():  # the optimiser state exists, as after a step (which changes no weight)
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=not memory.KEEPS_GRADIENTS)  # as RLTrainer.update leaves them
        ids = torch.randint(0, shape["vocab_size"], (rows, tokens))
        mask = torch.ones(rows, tokens - 1)

        def logprobs():
            with torch.no_grad(), amp():
                rl_models.token_logprobs(reference, ids, chunk=chunk)

        def update():
            optimizer.zero_grad(set_to_none=True)
            with amp():
                logp, entropy = rl_models.token_logprobs(policy, ids, True, chunk)
            ((-logp - 0.001 * entropy) * mask).sum().div(mask.sum()).backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()

        tracked = (policy, optimizer, reference, ids, mask)
        return {"logprobs": memory.tracked_peak(logprobs, *tracked), "update": memory.tracked_peak(update, *tracked)}


# ---------------------------------------------------------------- the table

STATE = ("policy", "reference", "optimizer", "critic")  # weights and optimiser state: known exactly


def compare(name: str, profile, shape: dict, measured: dict) -> list[tuple]:
    """(case, phase, estimated, measured, estimated and measured beyond weights and optimiser state)."""
    est = memory.estimate(profile, shape=shape, device="cpu", advice=False)
    out = []
    for phase in ("logprobs", "update"):
        got, parts = measured[phase], est.by_phase[phase]
        # The critic's weights and moments are state, its gradients (a quarter of the part) are not.
        critic_grads = parts.get("critic", 0) // 4 if phase == "update" or memory.KEEPS_GRADIENTS else 0
        state = sum(parts.get(k, 0) for k in STATE) - critic_grads
        out.append((f"{name} [{est.moments[phase]}]", phase, est.phases[phase], got["total"],
                    est.phases[phase] - state, got["total"] - got["param"] - got["opt"]))
    return out


def print_rows(rows: list[tuple]) -> None:
    """GiB; "beyond state": the peak less weights and optimiser state (activations, logits, gradients)."""
    print(f"{'case [estimated moment of the peak]':<66}{'phase':>9}{'estimated':>11}{'measured':>10}{'ratio':>7}"
          f"   beyond state: {'est.':>7}{'meas.':>7}{'ratio':>7}")
    for name, phase, est, got, est_x, got_x in rows:
        print(f"{name:<66}{phase:>9}{est / memory.GiB:>11.3f}{got / memory.GiB:>10.3f}{est / got:>7.2f}   "
              f"{'':>14}{est_x / memory.GiB:>7.3f}{got_x / memory.GiB:>7.3f}{est_x / max(got_x, 1):>7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--models", nargs="*", default=["Qwen3-0.6B", "Qwen3-1.7B"],
                    help="Qwen3 configurations in configs/models/ (none: skip the fake-tensor cases)")
    ap.add_argument("--real", action="store_true", help="also the trainer on real tensors (large vocabulary, tiny)")
    args = ap.parse_args()
    rows = []
    for model in args.models:
        shape = memory.model_shape(f"Qwen/{model}")
        for ckpt in (False, True):
            t0 = time.time()
            measured = fake_phases(shape, args.rows, args.tokens, args.chunk, ckpt)
            profile = profile_for(args.rows, args.tokens, 0, args.chunk, ckpt)
            name = f"{model}, {args.rows}x{args.tokens}, chunk {args.chunk}, ckpt {'on' if ckpt else 'off'}"
            rows += compare(name, profile, shape, measured)
            print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr)
    if args.real:
        batch = made_up_batch(4, 256, LARGE_VOCAB["vocab_size"])
        for micro, chunk in ((0, 0), (1, 128)):
            profile = profile_for(4, 256, micro, chunk)
            measured = trainer_peaks(profile, *large_vocab_models(), batch)
            rows += compare(f"vocab 151,936, 4x256, micro {micro}, chunk {chunk}", profile, LARGE_VOCAB, measured)
        tiny = load_profile("tiny", {"rl.engine": "bm25", "rl.validate_every": 0})
        shape = memory.model_shape("tiny", tiny)
        width, n = tiny.rollout.max_context, tiny.rl.questions_per_step * tiny.rl.group_size
        from transformers import Qwen3ForCausalLM
        torch.manual_seed(0)
        policy = Qwen3ForCausalLM(qwen3_config(shape))
        reference = Qwen3ForCausalLM(qwen3_config(shape)).eval().requires_grad_(False)
        measured = trainer_peaks(tiny, policy, reference, made_up_batch(n, width, shape["vocab_size"]))
        rows += compare(f"tiny profile, {n}x{width}", tiny, shape, measured)
        for kind in ("ppo", "lora"):
            for ckpt in (False, True):
                profile, measured = variant_peaks(kind, checkpointing=ckpt)
                rows += compare(f"{kind}, small Qwen3, 8x512, micro 2, ckpt {'on' if ckpt else 'off'}", profile, SMALL,
                                measured)
    print_rows(rows)


if __name__ == "__main__":
    main()
