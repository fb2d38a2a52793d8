"""Loading models and tokenizers the same way for the tiny profile and for Qwen3 from the hub."""

from __future__ import annotations

import functools

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def fast_bf16(device: str) -> tuple[bool, str]:
    """Whether bf16 autocast is fast on ``device`` ("cpu" or "cuda"), and a line saying why.

    A GPU: when it supports bf16. A CPU: when oneDNN has bf16 kernels for it (AVX512 or AMX on x86,
    BF16 on Arm); elsewhere torch emulates bf16, many times slower than fp32 (``benchmarks/precision.py``;
    docs/results.md has the figure)."""
    if device.startswith("cuda"):
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, f"the GPU {'supports' if ok else 'does not support'} bf16"
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        ok = False
    if ok:
        return ok, f"this CPU ({capability}) has fast bf16 kernels"
    return ok, f"this CPU ({capability}) has no fast bf16 kernels: bf16 autocast is emulated, many times slower than fp32"


def quiet_loading() -> None:
    """transformers draws a "Loading weights" bar for every model it loads (five in notebook 04), noise
    in a saved notebook: its own bars go, the hub's download bars (GPU profiles) stay."""
    import huggingface_hub.utils
    from transformers.utils import logging

    logging.disable_progress_bar()
    huggingface_hub.utils.enable_progress_bars()


def load_tokenizer(path_or_id: str):
    """A model's tokenizer, padding on the left (for batched generation), with a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path_or_id: str, dtype: str = "float32", device: str | None = None):
    """``(model, tokenizer)`` through the Auto classes, left padding, in eval mode."""
    from transformers import AutoModelForCausalLM

    quiet_loading()
    tokenizer = load_tokenizer(path_or_id)
    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=getattr(torch, dtype))
    device = device or default_device()
    return model.to(device).eval(), tokenizer


def sdpa_with_grouped_kv(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         is_causal=None, **kwargs):
    """transformers' SDPA attention, but always letting torch handle grouped key/value heads.

    transformers copies the K/V heads up to the query heads whenever there is a padding mask
    (CUDA's fast kernels need that), so batched generation on the CPU copied the whole KV cache
    in every layer at every step. Torch's CPU kernel takes the grouped heads and the mask as they
    are: the same output, much faster (docs/results.md, "Figures behind the code").
    """
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=query.shape[2] > 1 and attention_mask is None and causal, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


GROUPED_SDPA = "sdpa_grouped_kv"


def use_grouped_sdpa_on_cpu(model) -> None:
    """Switch a CPU model from SDPA to ``sdpa_with_grouped_kv`` (a no-op elsewhere)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if model.device.type != "cpu" or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(GROUPED_SDPA, sdpa_with_grouped_kv)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_SDPA, sdpa_mask)  # the same masks as SDPA
    model.set_attn_implementation(GROUPED_SDPA)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
