"""Build a fast Hugging Face tokenizer from the vocabulary stored in a GGUF file.

A GGUF has no tokenizer.json: llama.cpp stores the tokens, their types, the BPE merges (or
SentencePiece scores), the special-token ids, the pre-tokenizer's name and the chat template as
metadata. `gguf_tokenizer` rebuilds the equivalent `tokenizers` pipeline directly from those
fields (an order of magnitude faster than transformers' GGUF converter) and wraps it in a
`PreTrainedTokenizerFast`, which the engine uses like any tokenizer loaded from a model directory.

Two vocabulary kinds (`tokenizer.ggml.model`):
- "gpt2": byte-level BPE (SmolLM2, Llama 3, Qwen2, GPT-2). The pre-tokenizer is chosen by
  `tokenizer.ggml.pre`, a name llama.cpp's converter picks by recognising the HF tokenizer.
- "llama": SentencePiece BPE (Llama 2, Mistral v0.1): merges are recovered from token scores, with
  byte fallback through the `<0xNN>` tokens. Gemma files (`general.architecture` gemma, gemma2,
  gemma3) say "llama" too but need their own reading, as transformers' GGUF converter does: runs
  of spaces are stored as real spaces, and merge priority follows token order, not scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gguf import TokenType
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from pagoda.loader.gguf import read_gguf

# Pre-tokenization regexes, as the original Hugging Face tokenizers (and llama.cpp) define them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # ByteLevel's own regex is GPT-2's: 's|'t|... | ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # NOTE: SmolLM/StarCoder isolate every digit *before* the GPT-2 split (llama.cpp: "\p{N}",
    # then the GPT-2 regex), so "x  42" is [x, "  ", 4, 2], not [x, " ", " 4", 2]. transformers'
    # GGUF converter (5.x) leaves the digit step out and differs on whitespace before digits.
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _gpt2_pre_tokenizer()]
    )


def _regex_pre_tokenizer(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return build


# `tokenizer.ggml.pre` -> (pre-tokenizer, ignore_merges). Names follow llama.cpp's converter; a
# name shares a row with the others llama.cpp splits by the same regex. Llama 3 encodes a chunk
# that is a whole vocabulary entry as that entry before trying merges (HF's `ignore_merges`).
_BYTE_LEVEL_PRE_TOKENIZERS: dict[str, tuple[Callable[[], pre_tokenizers.PreTokenizer], bool]] = {
    # No name (old converters) means the plain GPT-2 byte-level split.
    "default": (_gpt2_pre_tokenizer, False),
    "gpt-2": (_gpt2_pre_tokenizer, False),
    "gpt2": (_gpt2_pre_tokenizer, False),
    "mpt": (_gpt2_pre_tokenizer, False),
    "olmo": (_gpt2_pre_tokenizer, False),
    "smollm": (_digits_then_gpt2_pre_tokenizer, False),
    "starcoder": (_digits_then_gpt2_pre_tokenizer, False),
    "refact": (_digits_then_gpt2_pre_tokenizer, False),
    "codeshell": (_digits_then_gpt2_pre_tokenizer, False),
    "llama-bpe": (_regex_pre_tokenizer(_LLAMA3_SPLIT), True),
    "llama3": (_regex_pre_tokenizer(_LLAMA3_SPLIT), True),
    "llama-v3": (_regex_pre_tokenizer(_LLAMA3_SPLIT), True),
    "falcon3": (_regex_pre_tokenizer(_LLAMA3_SPLIT), True),
    "smaug-bpe": (_regex_pre_tokenizer(_LLAMA3_SPLIT), False),
    "dbrx": (_regex_pre_tokenizer(_LLAMA3_SPLIT), False),
    # NOTE: HF's Qwen2 tokenizer also NFC-normalizes; llama.cpp does not, and neither do we.
    "qwen2": (_regex_pre_tokenizer(_QWEN2_SPLIT), False),
    "deepseek-r1-qwen": (_regex_pre_tokenizer(_QWEN2_SPLIT), False),
}

SPIECE_UNDERLINE = "\u2581"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level vocabularies are spelled in.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, NBSP, soft
    hyphen) take the characters from U+0100 upwards, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def _byte_level_model(metadata: dict[str, Any]) -> tuple[Tokenizer, bool]:
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    token_types: Sequence[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    pre_name = metadata.get("tokenizer.ggml.pre", "default")
    if pre_name not in _BYTE_LEVEL_PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF pre-tokenizer {pre_name!r} is not supported; supported: "
            f"{', '.join(sorted(_BYTE_LEVEL_PRE_TOKENIZERS))}"
        )
    build_pre_tokenizer, ignore_merges = _BYTE_LEVEL_PRE_TOKENIZERS[pre_name]
    byte_to_char = bytes_to_unicode()
    alphabet = set(byte_to_char.values())
    vocab: dict[str, int] = {}
    for token_id, (token, token_type) in enumerate(zip(tokens, token_types, strict=True)):
        # Added tokens (control, user-defined) are stored as raw text and matched as such; a
        # normal entry outside the byte alphabet is raw text too and needs the byte spelling.
        if token_type == TokenType.NORMAL and not set(token) <= alphabet:
            token = "".join(byte_to_char[byte] for byte in token.encode("utf-8"))
        vocab.setdefault(token, token_id)
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", ())]
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False)
    )
    tokenizer.pre_tokenizer = build_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    # llama.cpp adds no BOS to a BPE vocabulary unless the file says so (Llama 3 files do).
    return tokenizer, False


def _sentencepiece_merges(
    tokens: Sequence[str], scores: Sequence[float], token_types: Sequence[int]
) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a normal token into two
    normal tokens, the best-scoring result first (SentencePiece merges by the merged piece's
    score). Control and byte tokens never take part: `<s>` must not be built from `<` + `s>`."""
    normal = {
        token: token_id
        for token_id, (token, token_type) in enumerate(zip(tokens, token_types, strict=True))
        if token_type == TokenType.NORMAL
    }
    candidates: list[tuple[float, int, int, int, str, str]] = []
    for token, token_id in normal.items():
        for split in range(1, len(token)):
            left, right = token[:split], token[split:]
            if left in normal and right in normal:
                candidates.append(
                    (-scores[token_id], token_id, normal[left], normal[right], left, right)
                )
    candidates.sort()
    return [(left, right) for *_, left, right in candidates]


def _sentencepiece_model(metadata: dict[str, Any]) -> tuple[Tokenizer, bool]:
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    scores: Sequence[float] = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    token_types: Sequence[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_sentencepiece_merges(tokens, scores, token_types),
            unk_token=tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None,
            fuse_unk=True,
            # Text the pieces cannot spell is encoded as its UTF-8 bytes, the <0xNN> tokens.
            byte_fallback=True,
        )
    )
    # SentencePiece's dummy prefix: "Hello" is encoded as "▁Hello", like " Hello" mid-sentence.
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPIECE_UNDERLINE,
        prepend_scheme="first" if add_space_prefix else "never",
        split=False,
    )
    steps: list[decoders.Decoder] = [
        decoders.Replace(SPIECE_UNDERLINE, " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
    ]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
    return tokenizer, True


def _gemma_model(metadata: dict[str, Any]) -> tuple[Tokenizer, bool]:
    # NOTE: a vocabulary entry of two or more spaces is stored as real spaces ("  "), while the
    # text is looked up with spaces turned into "\u2581"; spell those entries "\u2581\u2581" too.
    tokens = [
        SPIECE_UNDERLINE * len(token) if " " in token and not token.strip() else token
        for token in metadata["tokenizer.ggml.tokens"]
    ]
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    # Gemma's scores do not follow its merge order; the token order does. Every split of a token
    # into two vocabulary entries is a merge, earlier tokens first, longer left parts first.
    merges = [
        (token[:split], token[split:])
        for token in tokens
        for split in range(len(token) - 1, 0, -1)
        if token[:split] in vocab and token[split:] in vocab
    ]
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    # No dummy prefix and no pre-tokenization: the whole text, spaces spelled "\u2581", is one word.
    tokenizer.normalizer = normalizers.Replace(" ", SPIECE_UNDERLINE)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tokenizer, True


_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")

_VOCABULARY_BUILDERS: dict[str, Callable[[dict[str, Any]], tuple[Tokenizer, bool]]] = {
    "gpt2": _byte_level_model,
    "llama": _sentencepiece_model,
}


def _add_token_types(
    tokenizer: Tokenizer, tokens: Sequence[str], token_types: Sequence[int]
) -> None:
    # Control and unknown tokens (<|im_start|>, <s>, <unk>) are special: matched whole in the raw
    # text and dropped by decode(skip_special_tokens=True). User-defined ones are matched whole too
    # but decode as text. Both keep their vocabulary ids, as they are already in the vocab; a
    # user-defined entry the model spells differently (Gemma's runs of spaces) is left to it.
    special = [
        AddedToken(token, special=True, normalized=False)
        for token, token_type in zip(tokens, token_types, strict=True)
        if token_type in (TokenType.CONTROL, TokenType.UNKNOWN)
    ]
    user_defined = [
        AddedToken(token, special=False, normalized=False)
        for token, token_type in zip(tokens, token_types, strict=True)
        if token_type == TokenType.USER_DEFINED and tokenizer.token_to_id(token) is not None
    ]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user_defined)


def _template_processor(
    bos: tuple[str, int] | None, eos: tuple[str, int] | None
) -> processors.TemplateProcessing:
    prefix = [bos[0]] if bos else []
    suffix = [eos[0]] if eos else []
    return processors.TemplateProcessing(
        single=[*prefix, "$A", *suffix],
        pair=[*prefix, "$A", *suffix, *prefix, "$B:1", *suffix],
        special_tokens=[token for token in (bos, eos) if token is not None],
    )


def gguf_tokenizer(path: str | Path) -> Any:
    """A `transformers.PreTrainedTokenizerFast` for the vocabulary in the GGUF file at `path`.

    Special tokens are the file's control tokens; bos/eos/unk/pad come from
    `tokenizer.ggml.*_token_id`. BOS (EOS) is added to encoded text only when
    `tokenizer.ggml.add_bos_token` (`add_eos_token`) says so, or, with the flag absent, when
    llama.cpp would (SentencePiece vocabularies). The chat template is `tokenizer.chat_template`.

    Raises:
        NotImplementedError: a `tokenizer.ggml.model` other than "gpt2" and "llama".
        ValueError: the file has no vocabulary, or a byte-level pre-tokenizer name we do not know.
    """
    from transformers import PreTrainedTokenizerFast

    gguf_file = read_gguf(path)
    metadata = gguf_file.metadata
    tokens: list[str] | None = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{gguf_file.path} has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    model_type = metadata.get("tokenizer.ggml.model")
    builder = _VOCABULARY_BUILDERS.get(str(model_type))
    if model_type == "llama" and gguf_file.architecture in _GEMMA_ARCHITECTURES:
        builder = _gemma_model
    if builder is None:
        raise NotImplementedError(
            f"{gguf_file.path}: GGUF tokenizer model {model_type!r} is not supported; supported: "
            f"{', '.join(sorted(_VOCABULARY_BUILDERS))}"
        )
    try:
        tokenizer, add_bos_by_default = builder(metadata)
    except ValueError as error:
        raise ValueError(f"{gguf_file.path}: {error}") from error
    token_types = metadata.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    _add_token_types(tokenizer, tokens, token_types)

    # transformers' names for the special tokens -> their ids in the file, where it has them.
    special_ids: dict[str, int] = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            special_ids[f"{name}_token"] = int(token_id)
    bos_id, eos_id = special_ids.get("bos_token"), special_ids.get("eos_token")
    add_bos = bos_id is not None and bool(
        metadata.get("tokenizer.ggml.add_bos_token", add_bos_by_default)
    )
    add_eos = eos_id is not None and bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    tokenizer.post_processor = _template_processor(
        (tokens[bos_id], bos_id) if add_bos and bos_id is not None else None,
        (tokens[eos_id], eos_id) if add_eos and eos_id is not None else None,
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        chat_template=metadata.get("tokenizer.chat_template"),
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=False,
        **{name: tokens[token_id] for name, token_id in special_ids.items()},
    )
