"""The one place generation backends are built (``rollout.backend`` in the profile).

A backend turns a batch of token-id prompts into new token ids, each row stopping at a stop string
or EOS (``rollout.GenerationBackend``). Collection, RL, evaluation, the LLM judge and the in-process
simulator all get theirs from ``make_backend``, so a new inference engine is one branch here.

- ``hf``: ``rollout.HFBackend``, transformers with our own batched decoding loop (the default;
  runs everywhere);
- ``vllm``: not built yet (issue 17): asking for it is an error that says so.
"""

from __future__ import annotations

from .rollout import STOP_STRINGS, HFBackend

BACKENDS = ("hf", "vllm")


class BackendError(RuntimeError):
    pass


def make_backend(kind: str, model, tokenizer, stop_strings: list[str] | None = None, **options):
    """A generation backend of ``kind`` for ``model``; ``options`` go to the backend (for ``hf``:
    ``reuse_cache`` and the other switches of ``HFBackend``)."""
    if kind == "hf":
        return HFBackend(model, tokenizer, stop_strings or STOP_STRINGS, **options)
    if kind == "vllm":
        raise BackendError("rollout.backend: vllm is not implemented yet (issue 17); use rollout.backend: hf")
    raise BackendError(f"rollout.backend must be one of {', '.join(BACKENDS)}, not {kind!r}")


def backend_for(profile, model, tokenizer, stop_strings: list[str] | None = None, **options):
    """The profile's backend (``rollout.backend``) for ``model``."""
    return make_backend(profile.rollout.backend, model, tokenizer, stop_strings, **options)
