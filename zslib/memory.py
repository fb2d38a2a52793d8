"""How much GPU memory an RL run needs: the peak per GPU, by part and by phase, from a profile and
its models' shapes, and which settings to change when it does not fit.

    python -m zslib.memory --profile qwen3-1.7b [--gpu-gb 80] [--gpus 4] [--fsdp] [-p rl.micro_batch_size=2]

    est = memory.estimate(P)     # est.parts, est.phases, est.peak, est.fits, est.advice, est.table()

The counts follow what the trainer's code keeps alive (``trainer.RLTrainer``, ``rl_models.token_logprobs``),
tensor by tensor, and were checked against peaks measured with torch's ``MemTracker`` on the CPU and on
fake tensors (tests/test_memory.py, benchmarks/memory.py); ``tracked_peak`` is that measurement. An
estimate is of live tensors, as ``torch.cuda.max_memory_allocated`` counts them: the CUDA context and
the allocator's fragmentation come on top, which is why a run "fits" only within ``USABLE`` of the GPU.
Rollout figures are upper bounds (every row at ``rollout.max_context``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .files import ROOT
from .rl_models import padded_width

GiB = 2 ** 30
USABLE = 0.9  # of the GPU: the rest is for the CUDA context, allocator fragmentation and NCCL buffers
MODEL_CONFIGS = ROOT / "configs" / "models"  # config.json of models named by hub id, for machines without the hub
PACKAGED_CONFIGS = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct.json"}
PHASES = ("rollout", "logprobs", "update")
PARTS = {  # key: the label the table prints
    "policy": "policy weights (fp32)",
    "gradients": "gradients (fp32)",
    "optimizer": "optimiser state (AdamW)",
    "reference": "reference (fp32)",
    "critic": "critic (weights, grads, AdamW)",
    "activations": "activations (one micro-batch)",
    "logprobs": "log-prob chunks (fp32 logits)",
    "temporaries": "update temporaries",
    "rollout": "rollout",
    "simulator": "simulator",
}
SHORT = {"backward starts": "bwd start", "backward ends": "bwd end", "forward ends": "fwd end",
         "optimizer step": "opt step", "top layer recomputed": "top layer", "bottom layer recomputed": "low layer",
         "critic pass": "critic", "output layer": "head"}  # the moments as the table names them
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TINY_BASE_VOCAB = 256 + 3 + 8  # byte alphabet, special tokens, protocol tags (zslib/tiny/tokenizer.py)
SIMULATOR_PROMPT = 256  # tokens of a simulator prompt (instruction and query), for its KV cache
# Whether gradients outlive the update: ``RLTrainer.update`` frees them after its last optimizer step, so the
# rollouts and the log-probs hold none (tests/test_memory.py checks the trainer still does).
KEEPS_GRADIENTS = False


# ---------------------------------------------------------------- model shapes

def _shape_of(config: dict) -> dict:
    """The fields of a transformers config.json that memory depends on, with its defaults filled in."""
    heads = config["num_attention_heads"]
    return {
        "model_type": config.get("model_type", "qwen3"),
        "hidden_size": config["hidden_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "intermediate_size": config["intermediate_size"],
        "vocab_size": config["vocab_size"],
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "attention_bias": bool(config.get("attention_bias", False)),
        "dtype": str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", ""),
    }


def _read_config(path: Path) -> dict:
    return _shape_of(json.loads(path.read_text()))


def _tiny_shape(profile, folder: Path) -> dict:
    """The shape ``tiny.pretraining.build_model`` gives the profile's tiny models; the vocabulary is the
    built tokenizer's when notebook 00 has made it, else what ``tiny.bpe_merges`` merges make."""
    t, vocab = profile.tiny, TINY_BASE_VOCAB + profile.tiny.bpe_merges
    tokenizer = folder / "tokenizer.json"
    if tokenizer.exists():
        data = json.loads(tokenizer.read_text())
        ids = set(data["model"]["vocab"].values()) | {tok["id"] for tok in data.get("added_tokens", [])}
        vocab = max(ids) + 1
    return _shape_of({"model_type": "qwen3", "hidden_size": t.hidden_size, "num_hidden_layers": t.num_layers,
                      "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
                      "head_dim": t.hidden_size // t.num_heads, "intermediate_size": t.intermediate_size,
                      "vocab_size": vocab, "tie_word_embeddings": True, "dtype": "float32"})


def model_shape(name_or_path: str, profile=None) -> dict:
    """A model's shape (hidden size, layers, heads, KV heads, head dim, FFN, vocabulary, tied, dtype):
    from ``config.json`` in a local folder; for ``tiny`` from the profile's built model, else from its
    ``tiny:`` section; for a packaged model from its converted folder, else ``configs/models/``; for a hub
    id (``Qwen/Qwen3-1.7B``) from ``configs/models/<name>.json``."""
    folder = Path(name_or_path)
    if (folder / "config.json").exists():
        return _read_config(folder / "config.json")
    if profile is not None:
        if name_or_path == "tiny":
            return _tiny_shape(profile, profile.models_dir / "policy-base")
        if folder.parent == profile.models_dir and folder.name in ("policy-base", "simulator-base"):
            base = profile.models.policy if folder.name == "policy-base" else profile.models.simulator
            return _tiny_shape(profile, folder) if base == "tiny" else model_shape(base, profile)
        source = Path(profile.model_source(name_or_path))
        if (source / "config.json").exists():
            return _read_config(source / "config.json")
    known = MODEL_CONFIGS / PACKAGED_CONFIGS.get(folder.name, f"{folder.name}.json")
    if known.exists():
        return _read_config(known)
    try:  # a hub model notebook 00 has downloaded: its config in the local cache
        from transformers import AutoConfig
        return _shape_of(AutoConfig.from_pretrained(name_or_path).to_dict())
    except (OSError, ValueError, KeyError):
        pass
    raise FileNotFoundError(f"no shape for {name_or_path!r}: not a folder with config.json, not in the hub "
                            f"cache, and no {known.relative_to(ROOT)} (add the model's config.json there)")


def _dims(s: dict) -> tuple[int, ...]:
    h, heads, kv_heads, d = s["hidden_size"], s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]
    return h, heads * d, kv_heads * d, s["intermediate_size"], s["vocab_size"], heads, kv_heads


def layer_linear_parameters(s: dict) -> int:
    """Weights of one decoder layer's linear maps (attention and MLP): what autocast casts to bf16."""
    h, q, kv, f, *_ = _dims(s)
    return h * q + 2 * h * kv + q * h + 3 * h * f + (q + 2 * kv + h if s["attention_bias"] else 0)


def parameter_count(s: dict, head: bool = True) -> int:
    """Parameters of a causal LM of shape ``s`` (``head=False``: the backbone alone, as ``AutoModel``)."""
    h, _, _, _, vocab, *_ = _dims(s)
    norms = 2 * h + (2 * s["head_dim"] if s["model_type"] == "qwen3" else 0)  # Qwen3 norms q and k per head
    untied_head = vocab * h if head and not s["tie_word_embeddings"] else 0
    return vocab * h + s["num_hidden_layers"] * (layer_linear_parameters(s) + norms) + h + untied_head


def lora_parameter_count(s: dict, r: int) -> int:
    """A rank-``r`` adapter on every linear map of every layer (peft's ``all-linear``: not the output layer)."""
    h, q, kv, f, *_ = _dims(s)
    pairs = [(h, q), (h, kv), (h, kv), (q, h), (h, f), (h, f), (f, h)]
    return s["num_hidden_layers"] * r * sum(a + b for a, b in pairs)


# ---------------------------------------------------------------- activations, per token

def layer_activation_bytes(s: dict, autocast: bool, lora: bool = False, lora_r: int = 16) -> int:
    """Bytes one decoder layer keeps for the backward pass, per token.

    Under bf16 autocast the residual stream stays fp32 (its norms upcast and keep fp32 input and output),
    each linear map keeps its own bf16 copy of its input (q, k and v cast the same input three times),
    Qwen3's q/k norms keep an fp32 copy and a bf16 result, attention keeps q, k, v, its output (which is
    o_proj's input) and the log-sum-exp, and the MLP keeps four tensors of FFN width. In fp32 the copies
    are shared and everything is 4 bytes. With LoRA the frozen weights need no input kept: each adapter
    keeps the input cast instead, and the norms' frozen scales keep nothing. Counted from the tensors
    autograd saves, and checked against measured peaks (tests/test_memory.py)."""
    h, q, kv, f, _, heads, kv_heads = _dims(s)
    qk_norm = s["model_type"] == "qwen3"
    if autocast:
        total = 26 * h + 4 * q + 4 * kv + 8 * f + 4 * heads + 8
        total += (6 * q + 4 * heads + 6 * kv + 4 * kv_heads) if qk_norm else 0
        if lora:  # norms keep no output; o_proj's adapter casts its input again; the adapters' rank-r inputs
            total += -8 * h - (2 * kv if qk_norm else -2 * q) + 14 * lora_r
    else:
        total = 24 * h + 8 * q + 8 * kv + 16 * f + 4 * heads + 8
        total += (8 * q + 4 * heads + 8 * kv + 4 * kv_heads) if qk_norm else 0
        if lora:
            total += -8 * h - (4 * q + 4 * kv if qk_norm else 0) + 28 * lora_r
    return total


def _outside_layers_bytes(s: dict, autocast: bool, chunked: bool) -> int:
    """Per token, what the forward keeps outside the layers: the final norm's input and output, the
    output layer's input (a bf16 copy, or the fp32 slice the chunks read), the rotary cos and sin."""
    h = s["hidden_size"]
    return 8 * h + 4 + (4 * h if chunked or not autocast else 2 * h) + 8 * s["head_dim"]


def _no_grad_bytes(s: dict, autocast: bool) -> int:
    """Per token, the largest set of tensors alive at once inside a layer without gradient."""
    h, q, kv, f, *_ = _dims(s)
    b = 2 if autocast else 4
    return 8 * h + b * (q + 2 * kv) + 3 * b * f


# Full-vocabulary tensors per position (bytes per position and vocabulary entry), measured on
# ``token_logprobs`` (tests/test_memory.py): with gradient and entropy, five fp32 tensors at the start of
# their backward pass (the log-softmax and its exp, kept, and three gradients), one pass or a recomputed
# chunk alike; four in the forward pass (the logits, log-softmax, exp and their product). Without gradient
# or entropy: the fp32 logits and their log-softmax.
LOGITS_GRAD = 20
RECOMPUTE = 1.25  # with checkpointing: a recomputed layer's activations and its backward pass's gradients
LOGITS_FORWARD = 16
LOGITS_NO_GRAD = 8


# ---------------------------------------------------------------- the estimate

@dataclass
class Estimate:
    """Bytes per GPU. ``by_phase[phase][part]``: what is alive at that phase's peak; ``phases``: their
    sums; ``parts``: each part's largest size over the phases."""
    profile: str
    gpus: int
    gpu_gb: float
    fsdp: bool
    by_phase: dict[str, dict[str, int]]
    moments: dict[str, str]         # phase -> the moment of its peak (e.g. "backward starts")
    notes: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    @property
    def phases(self) -> dict[str, int]:
        return {p: sum(parts.values()) for p, parts in self.by_phase.items()}

    @property
    def parts(self) -> dict[str, int]:
        return {k: max(self.by_phase[p].get(k, 0) for p in PHASES) for k in PARTS}

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def usable(self) -> int:
        return int(self.gpu_gb * GiB * USABLE)

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable

    def table(self) -> str:
        """The estimate as the CLI prints it: GiB with one decimal, a column per phase."""
        def gib(n):
            return "-" if not n else "<0.1" if n < 0.05 * GiB else f"{n / GiB:.1f}"
        setup = f"{self.gpus} GPU{'s' if self.gpus > 1 else ''} of {self.gpu_gb:g} GiB" + (
            ", FSDP" if self.fsdp else (", DDP" if self.gpus > 1 else ""))
        lines = [f"Estimated peak GPU memory per GPU, profile {self.profile} ({setup}), GiB", *self.notes, "",
                 f"{'part':<34}" + "".join(f"{p:>10}" for p in PHASES)]
        for key, label in PARTS.items():
            lines.append(f"{label:<34}" + "".join(f"{gib(self.by_phase[p].get(key, 0)):>10}" for p in PHASES))
        lines.append(f"{'total':<34}" + "".join(f"{gib(self.phases[p]):>10}" for p in PHASES))
        moments = [SHORT.get(self.moments[p], self.moments[p]) for p in PHASES]
        lines.append(f"{'  (the moment of the peak)':<34}" + "".join(f"{m:>10}" for m in moments))
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"\n{verdict}: peak {_size(self.peak)} in the {self.peak_phase} phase, "
                     f"{self.usable / GiB:.1f} GiB usable ({USABLE:.0%} of {self.gpu_gb:g} GiB)")
        if self.advice:
            lines += ["", "Settings that lower the peak, the largest saving first:", *[f"  {a}" for a in self.advice]]
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= 0.1 * GiB else f"{n / 2 ** 20:.0f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _vllm_share(cfg, gpu_bytes: int, weights: int) -> int:
    """A vLLM engine's memory: its share of the GPU, or a fixed KV cache and the weights."""
    if cfg.kv_cache_memory_bytes:
        return cfg.kv_cache_memory_bytes + weights
    return int(cfg.gpu_memory_utilization * gpu_bytes)


def _engine_dtype_bytes(cfg, s: dict) -> int:
    return BYTES[s["dtype"] if cfg.dtype == "auto" else cfg.dtype]


def _kv_bytes_per_token(s: dict, dtype_bytes: int) -> int:
    return 2 * s["num_hidden_layers"] * s["num_key_value_heads"] * s["head_dim"] * dtype_bytes


def estimate(profile, gpus: int = 1, gpu_gb: float = 80.0, fsdp: bool | None = None, shape: dict | None = None,
             device: str = "cuda", advice: bool = True) -> Estimate:
    """The peak memory per GPU of one RL step of ``profile`` on ``gpus`` GPUs of ``gpu_gb`` GiB (data parallel,
    or with ``fsdp``, default ``rl.fsdp``, the policy, its gradients, optimiser state and reference split over
    them).
    ``shape``: the policy's shape (default ``model_shape`` of the profile's policy). ``device="cpu"``
    counts AdamW's per-tensor step, as on a CPU, instead of the multi-tensor step of a GPU (for checks
    against CPU measurements)."""
    fsdp = profile.rl.fsdp if fsdp is None else fsdp
    est = _estimate(profile, gpus, gpu_gb, fsdp, shape, device)
    if advice and not est.fits:
        est.advice = _advice(profile, gpus, gpu_gb, fsdp, shape, device, est)
    return est


def _policy_shape(profile) -> dict:
    return model_shape(profile.policy_path, profile)


def _estimate(profile, gpus, gpu_gb, fsdp, shape, device) -> Estimate:
    from .algos import ALGORITHMS

    rl, ro = profile.rl, profile.rollout
    s = _shape_of(shape) if shape else _policy_shape(profile)
    gpu_bytes = int(gpu_gb * GiB)
    h, vocab, layers = s["hidden_size"], s["vocab_size"], s["num_hidden_layers"]
    ac, ckpt, lora = bool(rl.bf16_autocast), rl.gradient_checkpointing, rl.lora
    shard = gpus if fsdp else 1

    # Parameters: fp32 master weights; with LoRA the base stays fp32 and only the adapter trains.
    total = parameter_count(s)
    adapter = lora_parameter_count(s, rl.lora_r) if lora else 0
    trainable = adapter or total
    head_params = vocab * h
    linear = layers * layer_linear_parameters(s) + head_params  # cast to bf16 by autocast
    static = {"policy": 4 * (total + adapter) // shard, "optimizer": 8 * trainable // shard,
              "reference": 0 if lora else 4 * total // shard}
    grads = 4 * trainable // shard

    critic_shape = None
    if ALGORITHMS[rl.algorithm].needs_critic:
        critic_shape = model_shape(rl.critic_model, profile) if rl.critic_model else s
        critic_params = parameter_count(critic_shape, head=False) + critic_shape["hidden_size"] + 1
        static["critic"] = 16 * critic_params // shard  # weights, gradients, two moments (no gradients outside
        critic_no_grads = 12 * critic_params // shard   # the update unless KEEPS_GRADIENTS)

    # Rows and micro-batches per GPU (each process takes its share of the questions and of a mini-batch).
    rows = math.ceil(rl.questions_per_step * rl.group_size / gpus)
    mini_rows = max(1, rl.mini_batch_size // gpus)
    width = padded_width(ro.max_context)
    if rl.micro_batch_tokens:  # a part holds the budget's padded tokens (a longer row alone), at most its rows
        budget = max(rl.micro_batch_tokens, width)
        positions, lp_positions = min(budget, min(mini_rows, rows) * width), min(budget, rows * width)
        several = min(mini_rows, rows) * width > rl.micro_batch_tokens
    else:
        micro_rows = min(rl.micro_batch_size or mini_rows, rows)
        positions = lp_positions = micro_rows * width
        several = micro_rows < min(mini_rows, rows)
    # Update and log-probs phases (whose parts span the whole batch, not a mini-batch): the positions of a
    # part, and how many of them have full-vocabulary logits at once.
    chunked, lp_chunked = 0 < rl.logprob_chunk < positions, 0 < rl.logprob_chunk < lp_positions
    at_once = rl.logprob_chunk if chunked else positions
    lp_at_once = rl.logprob_chunk if lp_chunked else lp_positions
    off_policy = rl.ppo_epochs > 1 or rows > mini_rows  # then the old log-probs are a pass of their own

    notes = [f"policy {profile.models.policy}: {_count(total)} parameters ({layers} layer{'s' * (layers > 1)}, "
             f"hidden {h}, vocabulary {vocab:,})"
             + (f", LoRA r {rl.lora_r}: {_count(adapter)} trainable" if lora else "")
             + ("; critic of the same backbone" if critic_shape is not None else ""),
             f"{rows} rollouts per GPU, generated {min(ro.batch_size, rows)} at a time; micro-batches of "
             f"{positions:,} positions (padded to {width:,} per row)"
             + (f", log-probs {rl.logprob_chunk} positions at a time" if chunked else ", log-probs in one pass")
             + (", activation checkpointing" if ckpt else "") + (", bf16 autocast" if ac else ", fp32")]

    # What each phase holds besides the training state: engines and the simulator.
    engine_parts, rollout_only = _engines(profile, s, gpu_bytes, gpus, total, notes)

    def state(grad_bytes, critic_grads=True):
        out = {**static, "gradients": grad_bytes, **engine_parts}
        if critic_shape is not None and not critic_grads:
            out["critic"] = critic_no_grads
        return out

    # Update (phase 6): the peak is one of these moments of a micro-batch's pass or the optimizer step.
    act = layer_activation_bytes(s, ac, lora, rl.lora_r)
    outside = _outside_layers_bytes(s, ac, chunked)
    saved = positions * ((4 * h if ckpt else act) * layers + outside)
    # bf16 weight copies under autocast: those of trainable weights are cached until the forward ends; those
    # the backward pass needs (every layer's, or with checkpointing the output layer's) are kept until then.
    cast_saved = 2 * (head_params if ckpt else linear) if ac else 0
    cast_cached = 2 * (adapter if lora else linear) if ac else 0
    cast_forward = cast_saved + cast_cached if lora else cast_cached
    gathered = 4 * (head_params + 2 * layer_linear_parameters(s)) if fsdp and gpus > 1 else 0  # FSDP's unsharded units
    head_trainable = not lora
    # With chunks the output layer's weight gradient (bf16 under autocast) adds up over them before it
    # reaches the fp32 one; earlier micro-batches of the mini-batch have left their gradients.
    head_sum = (2 if ac else 4) * head_params if chunked and head_trainable else 0
    logits_grad = LOGITS_GRAD * at_once * vocab + head_sum
    moments = {
        "forward ends": {**state(grads if several else 0), "activations": saved + cast_forward,
                         "logprobs": LOGITS_FORWARD * at_once * vocab, "temporaries": gathered},
        "backward starts": {**state(grads if several else 0), "activations": saved + cast_saved,
                            "logprobs": logits_grad, "temporaries": gathered},
        "backward ends": {**state(grads), "temporaries": gathered + (
            4 * head_params if s["tie_word_embeddings"] and head_trainable else 0)},  # the embedding's own gradient
        # AdamW's multi-tensor step (a GPU's) holds a copy of every trainable weight; the per-tensor step (a
        # CPU's) two of the largest one.
        "optimizer step": {**state(grads), "temporaries": 4 * trainable // shard if device == "cuda"
                           else 8 * (head_params if head_trainable else 0)},
    }
    if ckpt:  # a layer recomputed and its backward pass: the top one, with every layer's input still kept
        # and (besides earlier micro-batches') only the output layer's gradient; the bottom one, all gradients made
        recompute = int(RECOMPUTE * act) * positions
        moments["top layer recomputed"] = {
            **state(grads if several else 4 * head_params * head_trainable // shard),
            "activations": positions * 4 * h * layers + recompute, "temporaries": gathered}
        moments["bottom layer recomputed"] = {**state(grads), "activations": positions * 4 * h + recompute,
                                              "temporaries": gathered}
    if critic_shape is not None:  # the critic's pass follows the policy's backward in each micro-batch
        c_act = positions * ((4 * critic_shape["hidden_size"] if ckpt else layer_activation_bytes(critic_shape, ac))
                             * critic_shape["num_hidden_layers"] + _outside_layers_bytes(critic_shape, ac, True))
        c_linear = critic_shape["num_hidden_layers"] * layer_linear_parameters(critic_shape)
        moments["critic pass"] = {**state(grads), "activations": c_act + (2 * c_linear if ac else 0)}
    update_at = max(moments, key=lambda m: sum(moments[m].values()))
    by_phase = {"update": moments[update_at]}

    # Old and reference log-probs (phase 4), no gradient.
    kept = grads if KEEPS_GRADIENTS else 0
    cache = (2 * linear if ac and off_policy and not lora else 0)  # the policy's weights, cached by autocast
    critic_cache = 0  # the critic's, cached in its pass, after the policy's and reference's
    if critic_shape is not None and ac:
        critic_cache = 2 * critic_shape["num_hidden_layers"] * layer_linear_parameters(critic_shape)
    # Its peak is inside a layer, or at the output layer: the last hidden states and one chunk's logits,
    # after the bf16 copy of a frozen output layer that made them (a cached one is in ``cache``).
    inside = {**state(kept, KEEPS_GRADIENTS), "activations": cache + critic_cache
              + lp_positions * _no_grad_bytes(s, ac) + gathered}
    logits = max(LOGITS_NO_GRAD * lp_at_once * vocab, 2 * (head_params + lp_at_once * vocab) if ac else 0)
    at_head = {**state(kept, KEEPS_GRADIENTS), "activations": cache + lp_positions * (4 * h if lp_chunked else 0)
               + gathered, "logprobs": logits}
    logprobs_at = "layers" if sum(inside.values()) > sum(at_head.values()) else "output layer"
    by_phase["logprobs"] = inside if logprobs_at == "layers" else at_head

    # Rollouts (phases 1-2): the generation engine at its largest.
    by_phase["rollout"] = {**state(kept, KEEPS_GRADIENTS), **rollout_only}
    moments_named = {"update": update_at, "logprobs": logprobs_at, "rollout": "decoding"}
    return Estimate(profile.name, gpus, gpu_gb, fsdp, {p: by_phase[p] for p in PHASES}, moments_named, notes)


def _sleeps(profile) -> bool:
    return bool(getattr(profile.vllm, "sleep_mode", False))


def _engines(profile, s, gpu_bytes, gpus, total, notes) -> tuple[dict, dict]:
    """(parts held in every phase, parts held during the rollouts only): the policy's generation engine
    and the simulator's."""
    ro, rl = profile.rollout, profile.rl
    everywhere, rollout = {}, {}
    rows = min(ro.batch_size, math.ceil(rl.questions_per_step * rl.group_size / gpus))
    width = ro.max_context
    if ro.backend == "vllm":
        share = _vllm_share(profile.vllm, gpu_bytes, total * _engine_dtype_bytes(profile.vllm, s))
        (rollout if _sleeps(profile) else everywhere)["rollout"] = share
        notes.append(f"rollout: vLLM, {_size(share)}, " + ("released by sleep mode after the rollouts"
                                                            if _sleeps(profile) else "kept in every phase"))
    else:
        b = BYTES[profile.models.dtype]
        # HFBackend's decoding copy in models.dtype (else it decodes with the fp32 policy itself) lives as long
        # as the backend; its KV cache is dropped after the rollouts (``sleep``).
        copy_bytes = total * b if b != 4 else 0
        kv = rows * width * _kv_bytes_per_token(s, b)
        new = min(width, ro.max_obs_tokens + ro.max_tokens_per_turn + 64)  # positions a later turn's prefill adds
        prefill = rows * new * (_no_grad_bytes(s, b == 2) + 3 * width)  # activations and the padding mask
        if copy_bytes:
            everywhere["rollout"] = copy_bytes
        rollout["rollout"] = copy_bytes + kv + prefill
        notes.append(f"rollout: HF, dense KV cache {_size(kv)} ({rows} rows x {width:,} tokens)"
                     + (f"; a {profile.models.dtype} decoding copy, {_size(copy_bytes)}, in every phase"
                        if copy_bytes else ""))
    if rl.simulated and profile.simulator.serve == "inprocess":
        sim = model_shape(profile.simulator_path, profile)
        sim_params = parameter_count(sim)
        if ro.backend == "vllm":
            cfg = getattr(profile, "simulator_vllm_config", profile.vllm)
            everywhere["simulator"] = _vllm_share(cfg, gpu_bytes, sim_params * _engine_dtype_bytes(cfg, sim))
            notes.append(f"simulator {profile.models.simulator}: in-process vLLM, {_size(everywhere['simulator'])}")
        else:
            b = BYTES[profile.models.dtype]
            calls = profile.simulator.batch_calls
            everywhere["simulator"] = sim_params * b
            kv = calls * (SIMULATOR_PROMPT + profile.simulator.max_new_tokens) * _kv_bytes_per_token(sim, b)
            rollout["simulator"] = sim_params * b + kv + calls * SIMULATOR_PROMPT * _no_grad_bytes(sim, b == 2)
            notes.append(f"simulator {profile.models.simulator}: in-process HF, {_count(sim_params)} parameters "
                         f"in {profile.models.dtype}")
    return everywhere, rollout


# ---------------------------------------------------------------- what to change

def _applied(profile, gpus: int, fsdp: bool, changes: dict):
    """(profile, gpus, fsdp) with ``changes`` made: dotted profile keys, and ``--gpus``/``--fsdp``."""
    out = copy.deepcopy(profile)
    for dotted, value in changes.items():
        if dotted == "--gpus":
            gpus = value
        elif dotted == "--fsdp":
            fsdp = value
        else:
            section, key = dotted.split(".")
            setattr(getattr(out, section), key, value)
    return out, gpus, fsdp


def _options(profile, gpus: int, fsdp: bool) -> list[tuple[str, list[tuple[dict, str]]]]:
    """Each setting that can lower the peak, with its values mildest first: ``(name, [(changes, text)])``."""
    rl, ro, width = profile.rl, profile.rollout, padded_width(profile.rollout.max_context)
    out = []
    if rl.micro_batch_tokens:
        out.append(("rl.micro_batch_tokens", [({"rl.micro_batch_tokens": n * width},
                                               f"rl.micro_batch_tokens: {n * width}")
                                              for n in (16, 8, 4, 2, 1) if n * width < rl.micro_batch_tokens]))
    else:
        current = rl.micro_batch_size or max(1, rl.mini_batch_size // gpus)
        out.append(("rl.micro_batch_size", [({"rl.micro_batch_size": n}, f"rl.micro_batch_size: {n} "
                                             f"(or rl.micro_batch_tokens: {n * width})")
                                            for n in (32, 16, 8, 4, 2, 1) if n < current]))
    out.append(("rl.logprob_chunk", [({"rl.logprob_chunk": c}, f"rl.logprob_chunk: {c}")
                                     for c in (2048, 1024, 512, 256) if not rl.logprob_chunk or c < rl.logprob_chunk]))
    if not rl.gradient_checkpointing:
        out.append(("rl.gradient_checkpointing", [({"rl.gradient_checkpointing": True},
                                                   "rl.gradient_checkpointing: true")]))
    if not rl.bf16_autocast:
        out.append(("rl.bf16_autocast", [({"rl.bf16_autocast": True}, "rl.bf16_autocast: true")]))
    if ro.backend == "hf":
        out.append(("rollout.batch_size", [({"rollout.batch_size": n}, f"rollout.batch_size: {n}")
                                           for n in (128, 64, 32, 16, 8) if n < ro.batch_size]))
        out.append(("rollout.backend", [({"rollout.backend": "vllm", "vllm.sleep_mode": True},
                                         "rollout.backend: vllm with vllm.sleep_mode: true")]))
    else:
        if not _sleeps(profile):
            out.append(("vllm.sleep_mode", [({"vllm.sleep_mode": True}, "vllm.sleep_mode: true")]))
        if not profile.vllm.kv_cache_memory_bytes:
            out.append(("vllm.gpu_memory_utilization", [
                ({"vllm.gpu_memory_utilization": u}, f"vllm.gpu_memory_utilization: {u} (a smaller KV cache)")
                for u in (0.25, 0.2, 0.15, 0.1) if u < profile.vllm.gpu_memory_utilization]))
    if not rl.lora:
        out.append(("rl.lora", [({"rl.lora": True}, "rl.lora: true (a LoRA adapter, not a full fine-tune)")]))
    if rl.simulated and profile.simulator.serve == "inprocess":
        out.append(("simulator.serve", [({"simulator.serve": "http"}, "simulator.serve: http (the simulator on "
                                                                      "GPUs of its own)")]))
    out.append(("--gpus", [({"--gpus": n}, f"--gpus {n} (data parallel: fewer rows per GPU)")
                           for n in (2, 4, 8) if n > gpus]))
    out.append(("--fsdp", [({"--fsdp": True, "--gpus": n}, f"--fsdp --gpus {n} (rl.fsdp: true, sharded over {n})")
                           for n in (2, 4, 8) if n > gpus or (n == gpus and not fsdp)]))
    return [(name, values) for name, values in out if values]


# Settings that change what is trained or the hardware, not only how the step is computed: a
# combination takes them only when the others are not enough.
_NOT_FREE = {"rl.lora", "--gpus", "--fsdp", "simulator.serve", "rl.bf16_autocast"}


def _advice(profile, gpus, gpu_gb, fsdp, shape, device, est: Estimate) -> list[str]:
    """One line per setting (its mildest value that fits, else its largest saving), the largest saving
    first; then, when no single one is enough, a combination that fits if there is one."""
    def peak(changes):
        p, n, f = _applied(profile, gpus, fsdp, changes)
        return _estimate(p, n, gpu_gb, f, shape, device).peak

    options = _options(profile, gpus, fsdp)
    singles = []
    for name, values in options:
        peaks = [peak(changes) for changes, _ in values]
        fitting = [i for i, pk in enumerate(peaks) if pk <= est.usable]
        i = fitting[0] if fitting else min(range(len(values)), key=peaks.__getitem__)
        if peaks[i] < est.peak:
            singles.append((peaks[i], values[i][1]))
    singles.sort()
    lines = [f"{text:<60} peak {pk / GiB:6.1f} GiB (saves {(est.peak - pk) / GiB:5.1f})"
             + ("  fits" if pk <= est.usable else "") for pk, text in singles]
    if any(pk <= est.usable for pk, _ in singles):
        return lines
    # Greedy: add the setting whose strongest value lowers the peak most (those that leave the method as
    # it is first) until it fits; then relax each to its mildest value that still fits with the others.
    chosen: dict[str, list] = {}
    for free in (True, False):
        while peak(_union(chosen)) > est.usable:
            here, best = peak(_union(chosen)), None
            for name, values in options:
                if name not in chosen and (name not in _NOT_FREE) == free:
                    pk = peak({**_union(chosen), **values[-1][0]})
                    if pk < here and (best is None or pk < best[0]):
                        best = (pk, name, values)
            if best is None:
                break
            chosen[best[1]] = [best[2], len(best[2]) - 1]
    if not chosen:
        return lines
    for name, pick in chosen.items():
        for i in range(pick[1]):
            trial = {**chosen, name: [pick[0], i]}
            if peak(_union(trial)) <= est.usable:
                pick[1] = i
                break
    final = peak(_union(chosen))
    lines.append(("together: " if final <= est.usable else "together, still too much: ")
                 + ", ".join(values[i][1] for values, i in chosen.values()) + f" -> peak {final / GiB:.1f} GiB")
    return lines


def _union(chosen: dict) -> dict:
    out = {}
    for values, i in chosen.values():
        out.update(values[i][0])
    return out


# ---------------------------------------------------------------- measuring

def tracked_peak(fn, *tracked) -> dict:
    """Run ``fn()`` under torch's ``MemTracker`` and return the peak of live tensor bytes on the device
    that had the most, by kind (``param``, ``grad``, ``act``, ``temp``, ``opt``, ``oth``) and ``total``.
    ``tracked``: modules, optimizers and tensors made before (they count from the start). Works on
    real and on fake tensors (``FakeTensorMode``), so a model too large for this machine can be measured."""
    tracker = _tracker_class()()
    tracker.track_external(*tracked)
    with tracker:
        fn()
    snapshot = tracker.get_tracker_snapshot("peak")
    if not snapshot:
        return {"total": 0}
    device = max(snapshot, key=lambda d: snapshot[d]["Total"])
    return {("total" if str(k) == "Total" else str(k).split(".")[-1].lower()): v for k, v in snapshot[device].items()}


def _tracker_class():
    """``MemTracker`` taught two things the trainer does: run frozen modules (the reference, a LoRA base),
    whose parameters cannot take gradient hooks, and call a top-level module again (one call per
    micro-batch or log-prob chunk), which it refuses as "multiple iterative calls"."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class _NoHook:
        def remove(self):
            pass

    class Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            for p in module.parameters():
                if not p.requires_grad and p not in self._param_to_grad_hook_handles:
                    self._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _pre_fw_hook(self, module, inputs):
            name = self._mod_tracker.get_known_fqn(module)
            if (module in self.memory_tracking and not self._mod_tracker.is_bw
                    and set(self._mod_tracker.parents) - {name} == {"Global"}):
                del self.memory_tracking[module]  # a new top-level call: its module statistics start again
            super()._pre_fw_hook(module, inputs)

    return Tracker


# ---------------------------------------------------------------- command line

def main(argv=None) -> int:
    from .config import load_profile
    from .pipeline import parse_overrides

    ap = argparse.ArgumentParser(prog="python -m zslib.memory", description=__doc__.split("\n\n")[0],
                                 epilog="The exit status is 1 when the estimate does not fit.")
    ap.add_argument("--profile", default="tiny", help="a name in configs/ or a path to a YAML profile")
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU in GiB (an H100 80GB: 80)")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs the trainer runs on, one process each (data "
                    "parallel: each rolls out and trains on its share of the rows)")
    ap.add_argument("--fsdp", action="store_true", help="shard the policy, gradients, optimiser state and reference "
                    "over the GPUs (as -p rl.fsdp=true)")
    ap.add_argument("-p", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a profile override, e.g. -p rl.micro_batch_size=2 (repeatable)")
    args = ap.parse_args(argv)
    profile = load_profile(args.profile, parse_overrides(args.overrides))
    est = estimate(profile, gpus=args.gpus, gpu_gb=args.gpu_gb, fsdp=args.fsdp or None)
    print(est.table())
    return 0 if est.fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
