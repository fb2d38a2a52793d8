"""Loading models and tokenizers the same way for the tiny profile and for Qwen3 from the hub."""

from __future__ import annotations

import functools
from pathlib import Path

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


class TokenizerError(ValueError):
    pass


# ---------------------------------------------------------------- pad and end of sequence
# The one place they are decided. Real tokenizers get them wrong in both directions: SmolLM2's GGUF
# tokenizer has no pad token and calls <|im_start|> its end of sequence (docs/guide.md, "A real model on a laptop").

def end_of_turn(tokenizer) -> str | None:
    """The special token the chat template closes an assistant message with (``<|im_end|>`` for
    Qwen3 and SmolLM2), or None when there is no template or it closes with none."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "zs-end-of-turn-probe"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # a template that refuses this conversation says nothing about its end token
        return None
    if marker not in text:
        return None
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    after = tokenizer(text[text.rindex(marker) + len(marker):], add_special_tokens=False)["input_ids"]
    return next((tokenizer.convert_ids_to_tokens(i) for i in after if i in special), None)


def _spare_special_token(tokenizer) -> str | None:
    """A special token that is neither end of sequence, nor beginning, nor used by the chat template:
    padding with it can never be mistaken for content or for a turn's end."""
    template = tokenizer.chat_template or ""
    taken = {tokenizer.eos_token, tokenizer.bos_token}
    for _, token in sorted(tokenizer.added_tokens_decoder.items()):
        if token.special and token.content not in taken and token.content not in template:
            return token.content
    return None


def check_special_tokens(tokenizer, model=None, source: str = "the tokenizer") -> list[str]:
    """Make ``tokenizer`` (and ``model``'s generation settings) agree on pad and end of sequence;
    returns a line for each thing corrected. ``source`` names the model in messages.

    - The end of sequence must be the token the chat template ends an assistant turn with: when it
      is not, it is corrected (generation would otherwise never stop at a turn's end).
    - A tokenizer without a pad token gets a spare special token (``_spare_special_token``), or the
      end of sequence when it has none; padding is always masked out, so either is safe.
    - Padding goes on the left (batched generation), and the model stops at the end of sequence."""
    notes = []
    eot = end_of_turn(tokenizer)
    if eot is not None and tokenizer.eos_token != eot:
        notes.append(f"{source}: end of sequence {tokenizer.eos_token!r} corrected to {eot!r}, the token its "
                     "chat template ends an assistant turn with")
        tokenizer.eos_token = eot
    if tokenizer.eos_token_id is None:
        raise TokenizerError(f"{source}: the tokenizer has no end-of-sequence token, and no chat template "
                             "to take one from; set eos_token in its tokenizer_config.json")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = _spare_special_token(tokenizer) or tokenizer.eos_token
        notes.append(f"{source}: no pad token; padding with {tokenizer.pad_token!r}")
    tokenizer.padding_side = "left"
    if model is not None:
        settings = model.generation_config
        eos = settings.eos_token_id
        eos = [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
        if tokenizer.eos_token_id not in eos:
            notes.append(f"{source}: the model also stops at {tokenizer.eos_token!r} (generation config had {eos})")
            settings.eos_token_id = [tokenizer.eos_token_id] + eos if eos else tokenizer.eos_token_id
        settings.pad_token_id = model.config.pad_token_id = tokenizer.pad_token_id
    return notes


def special_token_ids(model, tokenizer) -> tuple[int, set[int]]:
    """(pad id, end-of-sequence ids) for a backend: the tokenizer's pad, and every id the model's
    generation settings or the tokenizer call the end of sequence."""
    if tokenizer.pad_token_id is None:
        raise TokenizerError(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')!s} has no pad token: load it "
                             "with zslib.generation.models.load_tokenizer, which gives it one")
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return tokenizer.pad_token_id, ids - {None}


def load_tokenizer(path_or_id: str):
    """A model's tokenizer with its pad and end-of-sequence tokens checked (``check_special_tokens``),
    padding on the left."""
    import warnings

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    for note in check_special_tokens(tokenizer, source=str(path_or_id)):
        warnings.warn(note, stacklevel=2)
    return tokenizer


def load_causal_lm(path_or_id: str, dtype: str = "float32", device: str | None = None):
    """``(model, tokenizer)`` through the Auto classes, left padding, in eval mode."""
    from transformers import AutoModelForCausalLM

    quiet_loading()
    tokenizer = load_tokenizer(path_or_id)
    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=getattr(torch, dtype))
    check_special_tokens(tokenizer, model, str(path_or_id))
    device = device or default_device()
    return model.to(device).eval(), tokenizer


def convert_gguf(gguf_path: str | Path, out: str | Path) -> tuple[Path, list[str]]:
    """A GGUF model file as an ordinary model folder (fp32 safetensors, config, tokenizer), so every
    later step loads it with ``from_pretrained(folder)`` as it would a hub model. Returns the folder
    and what ``check_special_tokens`` corrected.

    transformers de-quantises a GGUF file to fp32 on loading (the ``gguf`` package), but refuses to
    save the result ("quantized with GGUF"): the weights move to a plain model built from the same
    configuration without its quantisation entry."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..files import write_folder_atomic

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    quiet_loading()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.clean_up_tokenization_spaces = False  # a BPE tokenizer's decoding must not touch spaces
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    settings = {k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "model_type")}
    config = AutoConfig.for_model(loaded.config.model_type, **settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # a tied output layer is the embedding
        raise ValueError(f"{gguf_path}: the de-quantised weights do not fit {type(model).__name__} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.generation_config = loaded.generation_config
    notes = check_special_tokens(tokenizer, model, gguf_path.name)
    config.architectures = [type(model).__name__]

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_folder_atomic(out, write), notes


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
