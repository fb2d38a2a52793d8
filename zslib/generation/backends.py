"""The one place generation backends are built (``rollout.backend`` in the profile).

A backend turns a batch of token-id prompts into new token ids, each row stopping at a stop string
or EOS. Collection, RL, evaluation, the LLM judge and the in-process simulator all get theirs from
``make_backend``, so a new inference engine is one entry of ``BACKENDS`` here.

- ``hf``: ``hf_backend.HFBackend``, transformers with our own batched decoding loop (the default;
  runs everywhere);
- ``vllm``: ``vllm_backend.VLLMBackend``, a vLLM engine in this process's care (its CPU build on a
  laptop and in CI, the CUDA build on a GPU), its settings from the profile's ``vllm:`` section (the
  simulator's from ``Profile.simulator_vllm_config``). It can also start from a checkpoint folder
  (``FROM_FOLDER``), so no transformers copy of a model it only serves is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..prompts import STOP_STRINGS
from ..registry import Registry


class BackendError(RuntimeError):
    pass


class GenerationBackend(Protocol):
    """What ``rollout.rollout`` and the simulator need of an inference engine."""

    generated_tokens: int  # every token generated so far (the cost a simulator reports)
    # Per row of the last ``generate`` call, the log-prob of each token it returned, as the engine
    # sampled it (vLLM); an empty list when the backend does not report them (HF).
    last_logprobs: list[list[float]]

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 top_p: float, continuing: bool = False) -> list[list[int]]:
        """New token ids per prompt, ending at a stop string or EOS (inclusive). ``continuing``:
        each prompt extends one of the previous call's rows (same weights), so a backend may
        reuse what it computed for them."""

    def release(self) -> None:
        """Finished rows: drop whatever was kept for them between turns."""

    def load_weights(self) -> None:
        """The model's weights changed (a policy update): generate with the new ones from now on."""

    def sleep(self) -> None:
        """No generation until ``wake_up``: free what the engine holds (RL calls it after the rollouts,
        so the update has the memory). Weights kept by the engine may be lost: ``load_weights`` follows."""

    def wake_up(self) -> None:
        """Ready for ``load_weights`` (RL calls it just before the weight sync); ``generate`` wakes a
        sleeping backend itself."""


def _hf(model, tokenizer, stop_strings, vllm_cfg, **options):
    from .hf_backend import HFBackend
    return HFBackend(model, tokenizer, stop_strings, **options)


def _vllm(model, tokenizer, stop_strings, vllm_cfg, **options):
    try:
        from .vllm_backend import VLLMBackend
    except ImportError as e:
        raise BackendError(f"rollout.backend: vllm needs the vllm package ({e}); `make install` installs "
                           "its CPU build, or use rollout.backend: hf") from None
    if vllm_cfg is None:
        raise BackendError("a vllm backend needs the profile's vllm settings (P.vllm, or config.VLLMConfig())")
    options.pop("reuse_cache", None)  # vLLM's prefix cache decides what to reuse
    if not isinstance(model, (str, Path)):
        # An in-memory model's engine runs in vllm.dtype, or the model's own with auto; a folder's
        # stored dtype says nothing of how it is meant to be served, so there the option counts.
        options.pop("dtype", None)
    return VLLMBackend(model, tokenizer, stop_strings, vllm_cfg, **options)


# ``rollout.backend``: (model, tokenizer, stop strings, vllm settings, options) -> a GenerationBackend.
BACKENDS = Registry("rollout.backend", {"hf": _hf, "vllm": _vllm})
# Backends that also take a checkpoint folder (or hub id) as ``model`` and load it themselves, with a
# ``dtype`` option: a caller that only generates need not build a transformers model for them.
FROM_FOLDER = {"vllm"}


def make_backend(kind: str, model, tokenizer, stop_strings: list[str] | None = None, vllm_cfg=None, **options):
    """A generation backend of ``kind`` (``BACKENDS``) for ``model`` (an in-memory transformers model, or
    for a kind in ``FROM_FOLDER`` a checkpoint folder).

    ``vllm_cfg``: the profile's ``vllm`` section (needed for ``vllm``). ``options`` go to the
    backend: for ``hf``, ``reuse_cache`` (and the benchmark switches of ``HFBackend``); for
    ``vllm``, ``logprobs`` (return each generated token's log-prob, default True) and ``dtype`` (a
    folder's, when ``vllm.dtype`` is ``auto``)."""
    if kind not in BACKENDS:
        raise BackendError(f"rollout.backend must be one of {', '.join(BACKENDS)}, not {kind!r}")
    return BACKENDS[kind](model, tokenizer, stop_strings or STOP_STRINGS, vllm_cfg, **options)


def backend_for(profile, model, tokenizer, stop_strings: list[str] | None = None, **options):
    """The profile's backend (``rollout.backend``, settings from ``vllm:``) for ``model``, decoding in
    ``models.dtype``."""
    options.setdefault("dtype", profile.models.dtype)
    return make_backend(profile.rollout.backend, model, tokenizer, stop_strings, profile.vllm, **options)
