"""Every prompt the workbench uses, in one place to read and change.

The policy protocol follows Search-R1 (docs/method.md §3) in our own words: reason in <think>,
search with <search>, read results in <information>, answer in <answer>.
"""

from __future__ import annotations

from .registry import Registry
from .search import Doc, format_docs

# Generation stops at the end of an action: the policy's turn is over once it searches or answers.
STOP_STRINGS = ["</search>", "</answer>"]

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
    return f"{POLICY_INSTRUCTION} Question: {_question(question)}"


def information_block(docs: list[Doc] | str) -> str:
    """The observation appended after a search; the tags are part of it (and of its mask-0 span)."""
    text = docs if isinstance(docs, str) else format_docs(docs)
    return f"\n\n<information>{text}</information>\n\n"


def render_policy_prompt(tokenizer, question: str, enable_thinking: bool = True) -> str:
    """The chat-formatted prompt up to the assistant's first token.

    Qwen3's template adds an empty <think></think> when ``enable_thinking`` is False; the
    protocol wants the model's own <think>, so thinking stays enabled by default (``thinking.policy``).
    """
    return render_user_prompt(tokenizer, policy_user_message(question), enable_thinking)


# ---------------------------------------------------------------- baselines (notebook 05)

# For instruct models (GPU profiles). The tiny policy never saw these: on the tiny profile
# ``direct`` is the protocol with an engine that finds nothing, and ``rag`` the protocol with the
# question's documents already in an <information> block (``evaluate.method_prompts``).
DIRECT_INSTRUCTION = (
    "Answer the given question from your own knowledge, without searching. Write only the short "
    "final answer inside <answer> and </answer>, for example <answer> Paris </answer>."
)
RAG_INSTRUCTION = (
    "Answer the given question using the documents below. Write only the short final answer "
    "inside <answer> and </answer>, for example <answer> Paris </answer>."
)


def _question(question: str) -> str:
    q = question.strip()
    return q if q.endswith("?") else q + "?"


def direct_user_message(question: str) -> str:
    return f"{DIRECT_INSTRUCTION} Question: {_question(question)}"


def rag_user_message(question: str, docs: list[Doc]) -> str:
    return f"{RAG_INSTRUCTION}\n\nDocuments:\n{format_docs(docs)}\n\nQuestion: {_question(question)}"


def render_user_prompt(tokenizer, message: str, enable_thinking: bool = True) -> str:
    """Any user message, chat-formatted up to the assistant's first token."""
    messages = [{"role": "user", "content": message}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             enable_thinking=enable_thinking)
    return message + "\n"


# ---------------------------------------------------------------- simulator (docs/method.md §5)

# Fine-tuned variant. The useful and noisy prompts differ only in the keyword, which appears
# twice: in the instruction and in the output cue. The gold answer is in the prompt so a useful
# document can state it and a noisy one can avoid it. It is not quoted: a byte-level tokenizer
# spells "Tavin differently from " Tavin", and copying is easiest when the tokens match.
SIMULATOR_INSTRUCTION = (
    "You are a search engine. Write {k} {label} documents for the query below, about {words} "
    "words each, one per line as Doc i(Title: title) text. The query was written while "
    "answering this question: {question} The answer is {answer}."
)

# Prompt-only variant (no fine-tuning): one demonstration shows the format. The useful prompt
# asks for documents that help find the answer; the noisy prompt gives neither question nor
# answer and asks for documents that do not answer the query.
PROMPT_ONLY_USEFUL = (
    "You are a search engine. Write {k} documents for the query below, about {words} words "
    "each, one per line as Doc i(Title: title) text. The documents must help answer this "
    "question: {question} The answer is {answer}."
)
PROMPT_ONLY_NOISY = (
    "You are a search engine. Write {k} documents for the query below, about {words} words "
    "each, one per line as Doc i(Title: title) text. The documents look related to the query "
    "but must not answer it."
)
PROMPT_ONLY_DEMO = (
    "Example.\nQuery: tallest mountain in Africa\nOutput:\n"
    "Doc 1(Title: Kilimanjaro) Kilimanjaro in Tanzania is the tallest mountain in Africa, rising "
    "5,895 metres above sea level.\n"
    "Doc 2(Title: Mount Kenya) Mount Kenya is the second highest mountain in Africa.\n"
)


def _finetuned_message(query: str, question: str, answer: str, useful: bool, k: int, words: int) -> str:
    label = "useful" if useful else "noisy"
    head = SIMULATOR_INSTRUCTION.format(k=k, label=label, words=words, question=question, answer=answer)
    return f"{head}\nQuery: {query}\n{label.capitalize()} Output:"


def _prompt_only_message(query: str, question: str, answer: str, useful: bool, k: int, words: int) -> str:
    template = PROMPT_ONLY_USEFUL if useful else PROMPT_ONLY_NOISY
    head = template.format(k=k, words=words, question=question, answer=answer)
    return f"{head}\n\n{PROMPT_ONLY_DEMO}\nQuery: {query}\nOutput:"


# ``simulator.prompt``: the simulator's request for one search call, by variant.
SIMULATOR_PROMPTS = Registry("simulator.prompt", {"finetuned": _finetuned_message, "prompt_only": _prompt_only_message})


def simulator_user_message(query: str, question: str, answer: str, useful: bool, k: int, words: int,
                           variant: str = "finetuned") -> str:
    """The simulator's request for one search call, in the ``variant`` of ``SIMULATOR_PROMPTS``."""
    return SIMULATOR_PROMPTS[variant](query, question, answer, useful, k, words)


def render_simulator_prompt(tokenizer, message: str, thinking: bool = False) -> str:
    """Chat-formatted, thinking off by default (``thinking.simulator``): the simulator writes
    documents, not reasoning. The same rendering for its SFT rows and when it serves."""
    return render_user_prompt(tokenizer, message, thinking)
