"""The vLLM generation backend (``rollout.backend: vllm``), colocated with the trainer.

``VLLMBackend`` takes token ids in and gives token ids out (nothing is re-tokenised between
turns), stops at the protocol's stop strings, samples with the profile's temperature and top-p,
and records each generated token's log-prob (``last_logprobs``). The engine runs in its own
processes, started from the in-memory model (saved to a temporary folder) or from a checkpoint folder
(the in-process simulator: no transformers model is built); after a policy update ``load_weights()``
sends the new weights (a LoRA adapter merged first) into the running engine: no restart.

With ``vllm.sleep_mode`` the colocated policy engine frees its GPU memory while the trainer updates:
``sleep()`` after the rollouts, ``wake_up()`` before the weight sync (``SLEEP_LEVEL`` says why level 2).

Engines are shared: one per (architecture, dtype, ``vllm:`` settings) for the life of the process,
so tests, evaluation and validation do not pay the start (30-40 s on a CPU) again. When a second
model of the same architecture uses a shared engine, its weights are loaded first (a fraction of
a second for a tiny model); a backend whose weights are not the engine's loads its own again before it
generates.

The CPU build needs three things (docs/method.md §17): an explicit KV-cache size, folders of its
own for its sockets and compile caches (set here before vLLM starts), and the re-packing of the
tied output layer after a weight load (``WeightSync``). It has no sleep mode: it refuses the
engine flag, so the flag is left out there, and ``sleep()``/``wake_up()`` only pause and resume the
engine (its worker ignores the request to free memory).
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch

from .. import distributed
from ..files import ROOT

# key -> {"llm", "owner" (the backend whose weights it holds), "dir" (a temporary folder or None),
# "asleep" (the sleeping parts: "weights", "kv_cache")}
_ENGINES: dict[str, dict] = {}

# Level 2 discards the weights instead of copying them to host memory (level 1): the policy's weights
# are replaced after every update anyway, so a host copy would cost the copy both ways and host memory
# for nothing; ``load_weights()`` right after ``wake_up()`` fills them again.
SLEEP_LEVEL = 2


def prepare_environment() -> None:
    """Folders vLLM writes to: compile caches under ``outputs/.vllm-cache`` (kept between runs, so
    the second start skips compiling), sockets in a fresh temporary folder. Quiet logs unless
    ``VLLM_LOGGING_LEVEL`` says otherwise."""
    cache = Path(os.environ.get("ZS_VLLM_CACHE", ROOT / "outputs" / ".vllm-cache"))
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache / "vllm"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    if "VLLM_RPC_BASE_PATH" not in os.environ:
        os.environ["VLLM_RPC_BASE_PATH"] = tempfile.mkdtemp(prefix="zs-vllm-rpc-")
    Path(os.environ["VLLM_RPC_BASE_PATH"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def engine_args(cfg, dtype: str) -> dict:
    """The engine's keyword arguments from the profile's ``vllm`` section (the server launcher turns
    the same dict into command-line flags)."""
    args = {"dtype": dtype, "max_model_len": cfg.max_model_len, "enforce_eager": cfg.enforce_eager,
            "enable_prefix_caching": cfg.enable_prefix_caching, "max_num_seqs": cfg.max_num_seqs,
            "seed": cfg.seed, "tensor_parallel_size": cfg.tensor_parallel_size,
            "data_parallel_size": cfg.data_parallel_size}
    if cfg.kv_cache_memory_bytes:
        args["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
    else:
        args["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    return args


def sleep_mode_available() -> bool:
    """Whether this vLLM build can free memory while asleep (CUDA, ROCm, XPU; not the CPU build, which
    refuses ``enable_sleep_mode``)."""
    from vllm.platforms import current_platform
    return current_platform.is_sleep_mode_available()


def checkpoint_dtype(folder: str | Path) -> str:
    """The dtype a checkpoint was saved in (``config.json``), ``bfloat16`` when it does not say (vLLM's
    ``auto`` would serve fp32 weights in 16 bits)."""
    local = Path(folder) / "config.json"
    if local.exists():
        config = json.loads(local.read_text())
    else:  # a hub id
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(str(folder)).to_dict()
    return str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").removeprefix("torch.")


def model_dtype(model, cfg) -> str:
    return str(model.dtype).removeprefix("torch.") if cfg.dtype == "auto" else cfg.dtype


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights vLLM loads, under the checkpoint's names: a peft model's LoRA merged in (and taken
    out again afterwards), a tied output layer left out (it is the embedding)."""
    if hasattr(model, "merge_adapter"):
        model.merge_adapter()
        try:
            state = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v.detach().clone()
                     for k, v in model.state_dict().items() if "lora_" not in k}
        finally:
            model.unmerge_adapter()
    else:
        state = {k: v.detach() for k, v in distributed.full_state_dict(model).items()}  # whole, under rl.fsdp
    config = model.config
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.contiguous().cpu() for k, v in state.items()}


def _weights(model, dtype: str) -> dict[str, torch.Tensor]:
    target = getattr(torch, dtype)
    return {k: v.to(target) for k, v in merged_state_dict(model).items()}


class WeightSync:
    """A vLLM worker extension (``LLM(worker_extension_cls=...)``): loads weights sent as
    safetensors bytes (tensors passed straight through ``collective_rpc`` do not arrive on the CPU).

    On the CPU, vLLM keeps a pre-packed copy of each weight matrix for its GEMM kernels; the reload
    re-packs the linear layers but not a tied output layer, whose log-probs then come out wrong
    (mean |Δ| 1.7e-2): re-running its post-load step restores agreement to fp32 level."""

    def zs_load_weights(self, blob: bytes) -> int:
        from safetensors.torch import load
        weights = load(blob)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        self._zs_repack_head()
        return len(weights)

    def zs_load_folder(self, folder: str) -> None:
        """The weights of a checkpoint folder (each worker reads its own share from disk)."""
        self.model_runner.reload_weights(weights_path=folder)
        self._zs_repack_head()

    def _zs_repack_head(self) -> None:
        head = getattr(self.model_runner.get_model(), "lm_head", None)
        method = getattr(head, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(head)


# Config entries that say where a model came from or how it was stored, not what it is.
_NOT_ARCHITECTURE = ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype")


def _engine(model, tokenizer, cfg, dtype: str, folder: str | None = None) -> tuple[dict, bool]:
    """The shared engine for this architecture, dtype and settings, and whether it was just started
    from these weights: the in-memory ``model``'s, or (``model`` None) those of the checkpoint in
    ``folder`` (a local folder or a hub id), which the engine then loads itself."""
    if model is not None:
        config = model.config
    else:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(folder)
    arch = {k: v for k, v in config.to_dict().items() if k not in _NOT_ARCHITECTURE}
    prepare_environment()
    # The CPU build refuses enable_sleep_mode (ValueError at start): there the engine starts without it
    # and sleep()/wake_up() still run, only pausing and resuming it; so its engines differ in nothing.
    sleep_mode = cfg.sleep_mode and sleep_mode_available()
    settings = {**dataclasses.asdict(cfg), "sleep_mode": sleep_mode}
    key = json.dumps([arch, dtype, settings], sort_keys=True, default=str)
    if key in _ENGINES:
        return _ENGINES[key], False
    from vllm import LLM

    temporary = None
    if model is not None:
        from safetensors.torch import save_file
        folder = temporary = Path(tempfile.mkdtemp(prefix="zs-vllm-model-"))
        config = copy.deepcopy(model.config)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config.architectures = [type(base).__name__]  # what vLLM picks its model class by (unset in a model built in memory)
        config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        save_file(_weights(model, dtype), str(folder / "model.safetensors"))
        tokenizer.save_pretrained(folder)
    llm = LLM(model=str(folder), tokenizer=str(folder), worker_extension_cls="zslib.generation.vllm_backend.WeightSync",
              enable_sleep_mode=sleep_mode, **engine_args(cfg, dtype))
    if not _ENGINES:
        # Stop the engines while the interpreter is whole: left to vLLM's finalizers at exit, the
        # engine process dies first and the C++ side can abort the process (exit 134) after a run.
        atexit.unregister(shutdown_engines)
        atexit.register(shutdown_engines)
    _ENGINES[key] = {"llm": llm, "owner": None, "dir": temporary, "asleep": set()}
    return _ENGINES[key], True


def shutdown_engines() -> None:
    """Stop every shared engine (their processes and memory)."""
    import gc
    import shutil
    for entry in _ENGINES.values():
        try:
            entry["llm"].llm_engine.engine_core.shutdown()
        finally:
            if entry["dir"] is not None:
                shutil.rmtree(entry["dir"], ignore_errors=True)
    _ENGINES.clear()
    gc.collect()


class VLLMBackend:
    """``GenerationBackend`` on a shared vLLM engine; see the module's docstring.

    ``model``: an in-memory transformers model, or a checkpoint folder (or hub id) that the engine
    loads itself, generating in ``dtype`` (with ``vllm.dtype: auto``; default: the checkpoint's). A
    folder's weights never change: ``load_weights()`` then re-reads the folder, for when another
    backend's weights took the shared engine."""

    def __init__(self, model, tokenizer, stop_strings: list[str], cfg, logprobs: bool = True, dtype: str | None = None):
        self.tokenizer, self.stop_strings, self.cfg = tokenizer, list(stop_strings), cfg
        self.logprobs = logprobs
        if isinstance(model, (str, Path)):
            self.model, self.folder = None, str(model)
            self.dtype = cfg.dtype if cfg.dtype != "auto" else (dtype or checkpoint_dtype(self.folder))
            # The engine reads its end of sequence from the folder; the tokenizer we were given may have
            # had it corrected (models.check_special_tokens), so say it too.
            self.stop_token_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        else:
            self.model, self.folder = model, None
            self.dtype = model_dtype(model, cfg)
            self.stop_token_ids = []  # the engine's folder has this model's own generation settings
        self.entry, fresh = _engine(self.model, tokenizer, cfg, self.dtype, self.folder)
        self.llm = self.entry["llm"]
        if fresh:
            self.entry["owner"] = self
        else:
            self.load_weights()
        self.generated_tokens = 0
        self.last_logprobs: list[list[float]] = []  # per row of the last call, one per generated token

    def load_weights(self) -> None:
        """Send the model's current weights into the running engine (waking it first if it sleeps)."""
        self.wake_up()
        if self.model is None:
            self.llm.collective_rpc("zs_load_folder", args=(self.folder,))
        else:
            from safetensors.torch import save
            self.llm.collective_rpc("zs_load_weights", args=(save(_weights(self.model, self.dtype)),))
        self.entry["owner"] = self
        self._wake_cache()
        self.llm.reset_prefix_cache()  # cached keys and values were computed with the old weights

    def sleep(self) -> None:
        """With ``vllm.sleep_mode``: free the engine's GPU memory (weights and KV cache, ``SLEEP_LEVEL``)
        until ``wake_up``; call it when no request is running (after the rollouts). Without it: nothing."""
        if not self.cfg.sleep_mode or self.entry["asleep"]:
            return
        self.llm.sleep(level=SLEEP_LEVEL)
        self.entry["asleep"] = {"weights", "kv_cache"}
        # Level 2 left the weights' memory without its content: whichever backend uses the engine next
        # must load its weights first (generate() does, if load_weights() was not called).
        self.entry["owner"] = None

    def wake_up(self) -> None:
        """Memory for the weights again, before ``load_weights()`` fills it; the KV cache's memory comes
        back after the weights are in (``load_weights``, or the next ``generate``), so the two never need
        room at the same time as the trainer's last allocations."""
        if "weights" in self.entry["asleep"]:
            self.llm.wake_up(tags=["weights"])
            self.entry["asleep"].discard("weights")

    def _wake_cache(self) -> None:
        if "kv_cache" in self.entry["asleep"]:
            self.llm.wake_up(tags=["kv_cache"])  # fully awake: the engine schedules requests again
            self.entry["asleep"].discard("kv_cache")

    def _ready(self) -> None:
        """Awake, with this backend's weights in the engine."""
        if self.entry["owner"] is not self:  # another model's weights, or none since a sleep
            self.load_weights()
        self.wake_up()
        self._wake_cache()

    def release(self) -> None:
        """Nothing to drop: vLLM's prefix cache frees finished rows itself."""

    def _params(self, prompt_len: int, max_new_tokens: int, temperature: float, top_p: float):
        from vllm import SamplingParams
        room = self.cfg.max_model_len - prompt_len
        if room < 1:
            raise ValueError(f"a prompt of {prompt_len} tokens leaves no room under vllm.max_model_len "
                             f"{self.cfg.max_model_len}")
        # A seed per row from torch's generator: a row's sample does not depend on its batch, and a
        # resumed RL run (which restores torch's RNG state) draws the same samples again.
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,))) if temperature > 0 else None
        return SamplingParams(
            temperature=temperature, top_p=top_p if temperature > 0 else 1.0, max_tokens=min(max_new_tokens, room),
            stop=self.stop_strings, include_stop_str_in_output=True, logprobs=0 if self.logprobs else None,
            seed=seed, skip_special_tokens=True, stop_token_ids=self.stop_token_ids)

    def generate(self, prompts, max_new_tokens, temperature, top_p, continuing=False):
        from vllm.inputs import TokensPrompt
        self._ready()
        params = [self._params(len(p), max_new_tokens, temperature, top_p) for p in prompts]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        new = [list(o.outputs[0].token_ids) for o in outs]
        self.generated_tokens += sum(len(row) for row in new)
        self.last_logprobs = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, row)]
                              if o.outputs[0].logprobs else [] for o, row in zip(outs, new)]
        return new

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """The engine's log-prob of each token of each sequence given the tokens before it (one
        fewer than the sequence's length): to compare with the trainer's ``token_logprobs``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        self._ready()
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False)
        return [[step[t].logprob for step, t in zip(o.prompt_logprobs[1:], s[1:])] for o, s in zip(outs, sequences)]
