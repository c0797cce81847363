"""Fixtures for the engine tests: a tiny real byte-level BPE tokenizer, trained offline.

The tokenizer is trained at session start on a fixed corpus with the `tokenizers` library (no hub
access) and wrapped in `transformers.PreTrainedTokenizerFast`, so the detokenizer runs on the same
Rust decode path as a real model's tokenizer. Its vocabulary is small enough that most non-ASCII
characters and every emoji are split over several byte tokens.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "Hello world, this is a small test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "Once upon a time there was a little engine that could stream text.",
    "Grüße aus München! Ça va? Le garçon mange une crêpe au café.",
    "naïve façade, déjà vu, smörgåsbord, jalapeño, Straße, Ærø",
    "日本語のテキストを少し書きます。東京は大きい。",
    "中文文本测试，你好世界。",
    "Привет, мир! Как дела?",
    "emoji time 😀 🎉 👍🏽 🚀 ❤️ done",
    "numbers 12345 and 3.14159, code: def f(x): return x * 2",
]


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False,
    )
