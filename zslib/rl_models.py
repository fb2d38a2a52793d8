"""The models RL trains and reads (docs/method.md §9): policy, reference and critic, and the token
tensors and log-probs the loss is computed on.

Token tensors are ``[batch, tokens - 1]``: position j holds the log-prob of token j + 1 given the
tokens up to j, and ``mask`` is the rollout's ``loss_mask`` shifted the same way (1 only on tokens
the policy generated), so prompt, ``<information>`` blocks and padding carry no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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
    if cfg.lora:
        from peft import LoraConfig, get_peft_model
        policy = get_peft_model(policy, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear",
                                                   task_type="CAUSAL_LM"))
        reference = None
    else:
        dtype = getattr(torch, profile.models.dtype) if device == "cuda" else torch.float32
        reference = AutoModelForCausalLM.from_pretrained(profile.policy_path, dtype=dtype)
        reference = reference.to(device).eval().requires_grad_(False)
    critic = None
    if needs_critic:
        backbone = AutoModel.from_pretrained(cfg.critic_model or profile.policy_path, dtype=torch.float32)
        critic = Critic(backbone).to(device)
    return PolicyModels(tokenizer, policy, reference, critic, device)


def batch_tensors(trajs, pad_id: int, loss_mask: bool = True, multiple: int = 64) -> dict:
    """Right-padded ``input_ids`` ``[B, T]``, the shifted ``mask`` ``[B, T-1]`` and each row's
    real ``lengths`` ``[B]``.

    Padding goes on the right, after every real token, so the causal mask alone keeps it out of
    every real token's attention: no attention mask is needed (with one, CPU attention takes a
    slower path). The width is rounded up to a ``multiple`` so kernels see few distinct shapes.
    With ``loss_mask=False`` (the ablation) every response token is trained, documents included;
    the prompt and padding never are.
    """
    width = -(-max(len(t.token_ids) for t in trajs) // multiple) * multiple
    ids = torch.full((len(trajs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, t in enumerate(trajs):
        n = len(t.token_ids)
        ids[r, :n] = torch.tensor(t.token_ids)
        mask[r, :n] = torch.tensor(t.loss_mask) if loss_mask else 1
        if not loss_mask:
            mask[r, :t.prompt_len] = 0
    lengths = torch.tensor([len(t.token_ids) for t in trajs])
    return {"input_ids": ids, "mask": mask[:, 1:], "lengths": lengths}


def token_logprobs(model, input_ids, with_entropy: bool = False):
    """log pi(token j+1 | tokens <= j) for every position (right-padded rows), and optionally the
    entropy there."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    if not with_entropy:
        return torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1), None
    # One log-softmax serves both (cheaper than algos.entropy_from_logits, the same value).
    all_logp = torch.log_softmax(logits, -1)
    entropy = -(all_logp.exp() * all_logp).sum(-1)
    return all_logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1), entropy


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
