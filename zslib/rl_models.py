"""The models RL trains and reads (docs/method.md §9): policy, reference and critic, and the token
tensors and log-probs the loss is computed on.

Token tensors are ``[batch, tokens - 1]``: position j holds the log-prob of token j + 1 given the
tokens up to j, and ``mask`` is the rollout's ``loss_mask`` shifted the same way (1 only on tokens
the policy generated), so prompt, ``<information>`` blocks and padding carry no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from . import distributed
from .generation.models import check_special_tokens, default_device, load_tokenizer, quiet_loading


@dataclass
class PolicyModels:
    """What ``load_models`` builds for a run: the tokenizer, the trained policy (fp32 master weights,
    or a LoRA adapter on them), the frozen reference (None with LoRA: the policy with its adapter
    disabled is the reference) and PPO's critic (None for algorithms without one)."""
    tokenizer: object
    policy: nn.Module
    reference: nn.Module | None
    critic: "Critic | None"
    device: str


def load_models(profile, needs_critic: bool, device: str | None = None) -> PolicyModels:
    """The policy base (``profile.policy_path``) as policy, reference and, if ``needs_critic``, critic
    backbone. Initialisation draws from torch's generator (LoRA, the value head): seed it first."""
    from transformers import AutoModel, AutoModelForCausalLM

    cfg, device = profile.rl, device or default_device()
    quiet_loading()
    tokenizer = load_tokenizer(profile.policy_path)
    # fp32 master weights (bf16 comes from autocast): a 1e-6 step vanishes in bf16 weights.
    policy = AutoModelForCausalLM.from_pretrained(profile.policy_path, dtype=torch.float32).to(device)
    check_special_tokens(tokenizer, policy, profile.policy_path)
    _checkpointing(policy, cfg.gradient_checkpointing)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model
        policy = get_peft_model(policy, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear",
                                                   task_type="CAUSAL_LM"))
        reference = None
    else:
        # The policy's precision (fp32 weights, the same autocast), so the KL to it is exactly 0 before the
        # first update; a bf16 copy differs already in the norm layers' products.
        reference = AutoModelForCausalLM.from_pretrained(profile.policy_path, dtype=torch.float32)
        reference = reference.to(device).eval().requires_grad_(False)
    if cfg.fsdp and distributed.active():  # each process keeps its shard of both (zslib/distributed.py)
        policy, reference = distributed.shard(policy), distributed.shard(reference)
    critic = None
    if needs_critic:
        backbone = AutoModel.from_pretrained(cfg.critic_model or profile.policy_path, dtype=torch.float32)
        critic = Critic(_checkpointing(backbone, cfg.gradient_checkpointing)).to(device)
    return PolicyModels(tokenizer, policy, reference, critic, device)


def _checkpointing(model, on: bool):
    """``rl.gradient_checkpointing``: each layer's activations are recomputed in the backward pass
    instead of kept (in training mode only), trading about a third more compute for memory."""
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def padded_width(length: int, multiple: int = 64) -> int:
    """A row's width once padded: rounded up to ``multiple``, so kernels see few distinct shapes."""
    return -(-length // multiple) * multiple


def batch_tensors(trajs, pad_id: int, loss_mask: bool = True, multiple: int = 64) -> dict:
    """Right-padded ``input_ids`` ``[B, T]``, the shifted ``mask`` ``[B, T-1]``, each row's real
    ``lengths`` ``[B]`` and the engine's ``rollout_logp`` ``[B, T-1]`` (or None).

    Padding goes on the right, after every real token, so the causal mask alone keeps it out of
    every real token's attention: no attention mask is needed (with one, CPU attention takes a
    slower path). The width is rounded up to a ``multiple`` so kernels see few distinct shapes.
    With ``loss_mask=False`` (the ablation) every response token is trained, documents included;
    the prompt and padding never are.
    """
    width = padded_width(max(len(t.token_ids) for t in trajs), multiple)
    ids = torch.full((len(trajs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, t in enumerate(trajs):
        n = len(t.token_ids)
        ids[r, :n] = torch.tensor(t.token_ids)
        mask[r, :n] = torch.tensor(t.loss_mask) if loss_mask else 1
        if not loss_mask:
            mask[r, :t.prompt_len] = 0
    lengths = torch.tensor([len(t.token_ids) for t in trajs])
    return {"input_ids": ids, "mask": mask[:, 1:], "lengths": lengths, "rollout_logp": _rollout_logprobs(trajs, width)}


def _rollout_logprobs(trajs, width: int) -> torch.Tensor | None:
    """``[B, width - 1]``: the log-prob the inference engine gave each token the policy generated, where
    ``token_logprobs`` puts that token's (NaN on every other position); None unless every rollout has them
    (vLLM records them, HF does not)."""
    if not all(t.sampled_logprobs and len(t.sampled_logprobs) == sum(t.loss_mask) for t in trajs):
        return None
    out = torch.full((len(trajs), width), float("nan"))
    for r, t in enumerate(trajs):
        out[r, :len(t.loss_mask)][torch.tensor(t.loss_mask, dtype=torch.bool)] = torch.tensor(t.sampled_logprobs)
    return out[:, 1:]


def token_logprobs(model, input_ids, with_entropy: bool = False, chunk: int = 0):
    """log pi(token j+1 | tokens <= j) for every position (right-padded rows), and optionally the
    entropy there.

    ``chunk`` > 0: the output layer and the log-softmax run on that many positions at a time, so the
    full-vocabulary logits in fp32 exist for one chunk only (Qwen3's 151,936 words make them 2.5 GB
    per 4,096-token row); with gradient, each chunk is recomputed in the backward pass instead of
    kept. The same numbers as ``chunk`` 0 (one pass over every position), at a fraction of the memory.
    """
    if not chunk:
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
        return _chosen_logprobs(logits, input_ids[:, 1:], with_entropy)
    body, head = _body_and_head(model)
    if distributed.is_sharded(model):
        # Through the root's own forward, so that FSDP gathers the embeddings and the tied output layer, with the
        # output layer made the identity for that call; it is applied below, chunk by chunk.
        head.forward = lambda h: h
        try:
            hidden = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
        finally:
            del head.forward
    else:
        hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    rows, width = hidden.shape[:2]
    hidden, targets = hidden.reshape(rows * width, -1), input_ids[:, 1:].reshape(-1)

    def part(h, t):
        return _chosen_logprobs(head(h).float(), t, with_entropy)

    outs = [torch.utils.checkpoint.checkpoint(part, h, t, use_reentrant=False) if torch.is_grad_enabled()
            else part(h, t) for h, t in zip(hidden.split(chunk), targets.split(chunk))]
    logp = torch.cat([o[0] for o in outs]).view(rows, width)
    return logp, torch.cat([o[1] for o in outs]).view(rows, width) if with_entropy else None


def _chosen_logprobs(logits, targets, with_entropy: bool):
    """The log-prob of each target under ``logits`` (fp32), and the entropy if asked."""
    all_logp = torch.log_softmax(logits, -1)
    chosen = all_logp.gather(-1, targets[..., None]).squeeze(-1)
    # One log-softmax serves both (cheaper than algos.entropy_from_logits, the same value).
    return chosen, -(all_logp.exp() * all_logp).sum(-1) if with_entropy else None


def _body_and_head(model):
    """A causal LM's transformer body and its output layer, through a peft wrapper (whose LoRA layers
    sit inside the body, so ``disable_adapter`` still applies)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder(), inner.get_output_embeddings()


class Critic(nn.Module):
    """PPO's token-level critic: a transformer backbone and a linear value head. ``values[:, j]``
    is the value of the state after token j, aligned with ``token_logprobs``."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids):
        hidden = self.backbone(input_ids=input_ids, use_cache=False).last_hidden_state
        return self.head(hidden[:, :-1]).squeeze(-1).float()
