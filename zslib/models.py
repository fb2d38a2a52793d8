"""Loading models and tokenizers the same way for the tiny profile and for Qwen3 from the hub."""

from __future__ import annotations

import torch


def load_causal_lm(path_or_id: str, dtype: str = "float32", device: str | None = None):
    """``(model, tokenizer)`` through the Auto classes, left padding, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=getattr(torch, dtype))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
