"""Every prompt the workbench uses, in one place to read and change.

The policy protocol follows Search-R1 (DESIGN §2) in our own words: reason in <think>,
search with <search>, read results in <information>, answer in <answer>.
"""

from __future__ import annotations

from .search import Doc, format_docs

TAGS = ("<think>", "</think>", "<search>", "</search>", "<information>", "</information>",
        "<answer>", "</answer>")

POLICY_INSTRUCTION = (
    "Answer the given question. Every time you receive new information, reason about it "
    "inside <think> and </think>. If you lack some knowledge, call a search engine with "
    "<search> query </search>; its results come back between <information> and "
    "</information>. You may search as many times as you want. When you are done, write only "
    "the short final answer inside <answer> and </answer>, for example <answer> Paris </answer>."
)

# Appended (mask 0) when a turn holds neither a complete <search> nor <answer>.
INVALID_ACTION = ("\nInvalid action. To search, write <search> query </search>. "
                  "To answer, write <answer> answer </answer>.\n")


def policy_user_message(question: str) -> str:
    q = question.strip()
    if not q.endswith("?"):
        q += "?"
    return f"{POLICY_INSTRUCTION} Question: {q}"


def information_block(docs: list[Doc] | str) -> str:
    """The observation appended after a search; the tags are part of it (and of its mask-0 span)."""
    text = docs if isinstance(docs, str) else format_docs(docs)
    return f"\n\n<information>{text}</information>\n\n"


def render_policy_prompt(tokenizer, question: str, enable_thinking: bool = True) -> str:
    """The chat-formatted prompt up to the assistant's first token.

    Qwen3's template adds an empty <think></think> when ``enable_thinking`` is False; the
    protocol wants the model's own <think>, so thinking stays enabled by default.
    """
    messages = [{"role": "user", "content": policy_user_message(question)}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             enable_thinking=enable_thinking)
    return messages[0]["content"] + "\n"
