"""The tiny profile's tokenizer: byte-level BPE trained on the world, wrapped as a transformers tokenizer.

About 1k merges, so a name never seen in training splits into pieces the way seen names do; the
protocol tags are atomic tokens here (Qwen3 spells them with several, and nothing downstream relies
on either); a Qwen-style chat template. Saved with ``save_pretrained``, so ``AutoTokenizer`` loads
it as it loads a hub tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from ..prompts import INVALID_ACTION, POLICY_INSTRUCTION, TAGS

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD, EOS = "<|endoftext|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(texts: list[str], merges: int, out_dir: str | Path):
    """Byte-level BPE with ``merges`` merges; saved so ``AutoTokenizer`` loads it like a hub one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + len(SPECIAL_TOKENS) + merges,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   padding_side="left", chat_template=CHAT_TEMPLATE)
    fast.add_tokens(list(TAGS))  # atomic here; Qwen3 spells them with several tokens
    fast.save_pretrained(str(out_dir))
    return fast


def tokenizer_texts(articles: list[dict], questions: list[dict]) -> list[str]:
    """Articles, questions and protocol text, with the fixed protocol phrases repeated so their
    words become whole tokens (they occur in every demonstration)."""
    protocol = [POLICY_INSTRUCTION, INVALID_ACTION, "I need to search for this.", "The documents give the answer.",
                "The answer is not here. I will search again.", "I could not find it, so I will guess.",
                "I think I know this.", "I found it. Now I need to search for it.", "Doc 1(Title: x)"]
    return ([f"{a['title']}\n{a['text']}" for a in articles] + [q["question"] for q in questions]
            + protocol * 200)
