"""A tiny random-weight Llama checkpoint (weights, config, generation config, tokenizer) for tests.

`make_tiny_llama(path)` writes a directory that looks like a Hugging Face model download: any test
that needs a real model directory (loader, engine, server) can build one in a temp dir in well under
a second. The tokenizer is a 512-entry byte-level BPE trained on a fixed corpus, so token ids are
the same on every machine and run.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_VOCAB_SIZE = 512

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs.",
    "How vexingly quick daft zebras jump!",
    "Once upon a time there was a small language model that lived in a test suite.",
    "It answered every question with the same few words, but it always answered quickly.",
    "The engine schedules requests, the cache keeps their keys and values, and the sampler "
    "chooses the next token for each of them.",
    "A paged cache splits memory into blocks of sixteen tokens; a request holds a table of blocks.",
    "Hello, world! Hello, Pagoda! What is the capital of France? The capital of France is Paris.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 512 1024 2048 4096 3.14159 2.71828",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    '{"role": "user", "content": "Tell me a story about a dragon."}',
    "Rain falls on the mountains, rivers run to the sea, and the sea rises into clouds again.",
    "Tokens, tokens everywhere, and not a byte to spare.",
    "Attention is all you need; rotary position embeddings rotate queries and keys.",
    "She sells sea shells by the sea shore; the shells she sells are surely sea shells.",
    "In the beginning the universe was created. This has made a lot of people very angry.",
    "Questions? Answers! Lists: apples, bananas, cherries, dates, elderberries, figs, grapes.",
    "Über café naïve résumé — déjà vu. 你好，世界。こんにちは。안녕하세요. Привет, мир!",
    "user assistant system the of and to in is it that was for on are with as his they be at",
]


@functools.cache
def _tokenizer_json() -> str:
    # Trained once per process: many tests build checkpoints, and training is the slow part.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer.to_str()


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The tiny ChatML tokenizer (eos = bos = pad = `<|endoftext|>`)."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
    )


def make_tiny_llama(
    path: Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    max_position_embeddings: int = 512,
    shard_size: str | None = None,
    seed: int = 0,
) -> Path:
    """Write a random-weight float32 `LlamaForCausalLM` checkpoint with tokenizer to `path`.

    Args:
        rope_scaling: a Hugging Face rope scaling dict (`{"rope_type": "linear", "factor": 2.0}`).
        shard_size: `max_shard_size` for `save_pretrained` (e.g. "40KB") to get a sharded
            checkpoint with `model.safetensors.index.json`; None for one `model.safetensors`.

    Returns `path`.
    """
    path = Path(path)
    tokenizer = make_tokenizer()
    eos_id = tokenizer.eos_token_id
    assert isinstance(eos_id, int)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie_word_embeddings,
        # transformers 5 calls it rope_parameters; rope_theta defaults to 10000.
        rope_parameters=dict(rope_scaling) if rope_scaling else None,
        # Larger than Llama's 0.02 so the logits are O(1) and a wrong op shows at 1e-4.
        initializer_range=0.1,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        architectures=["LlamaForCausalLM"],
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    # HF initialises norms to ones, which would hide a missing or misplaced norm.
                    param.copy_(1 + 0.1 * torch.randn_like(param))
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if shard_size is not None:
        save_kwargs["max_shard_size"] = shard_size
    model.save_pretrained(path, **save_kwargs)
    generation_config = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    (path / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    tokenizer.save_pretrained(path)
    return path
