"""The grammar libraries behind structured output: xgrammar (the default) and llguidance.

A backend compiles a `GrammarSpec` for the model's vocabulary once (`compile`, thread-safe, called
off the step loop) and makes a fresh matcher per request from the result (`matcher`). A matcher
fills its row of the step's token bitmask (int32 words, bit t of row r set when token t is
allowed: xgrammar's layout, which llguidance's torch helpers share), accepts each sampled token,
and says when its grammar is complete.

xgrammar takes JSON schemas, JSON objects, regexes, choices and EBNF; Lark grammars and what its
JSON compiler rejects go to llguidance under the `auto` backend (see manager.py).
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import torch

from pagoda.structured_output.spec import GrammarSpec, choice_regex, guidance_grammar


class Matcher(Protocol):
    """One request's position in its grammar."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Set row `row` of `bitmask` to the tokens the grammar allows next."""

    def accept_token(self, token_id: int) -> bool:
        """Advance by `token_id`; False when the grammar does not allow it."""

    def is_terminated(self) -> bool:
        """Whether the grammar is complete (its stop token accepted, or nothing may follow)."""


class XgrammarBackend:
    """xgrammar: compiled grammars cached by the compiler, matchers over them."""

    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        import xgrammar

        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        # One compiler thread: compilation runs beside the step loop on a machine whose cores
        # the step already uses.
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=True)

    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar of `spec`. Raises RuntimeError (or ValueError) if xgrammar
        cannot compile it."""
        compiler = self._compiler
        if spec.kind == "json":
            if spec.whitespace_pattern is not None:
                raise ValueError("xgrammar has no whitespace_pattern option")
            return compiler.compile_json_schema(
                spec.text,
                any_whitespace=spec.any_whitespace,
                strict_mode=not spec.additional_properties,
            )
        if spec.kind == "json_object":
            return compiler.compile_builtin_json_grammar()
        if spec.kind == "regex":
            return compiler.compile_regex(spec.text)
        if spec.kind == "choice":
            return compiler.compile_regex(choice_regex(json.loads(spec.text)))
        if spec.kind == "grammar":
            if "::=" not in spec.text:
                raise ValueError("xgrammar takes EBNF grammars (rule ::= ...), not Lark")
            return compiler.compile_grammar(spec.text)
        raise ValueError(f"xgrammar does not compile {spec.kind}")

    def matcher(self, compiled: Any) -> Matcher:
        return _XgrammarMatcher(self._xgr.GrammarMatcher(compiled))


class _XgrammarMatcher:
    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept_token(self, token_id: int) -> bool:
        return bool(self._matcher.accept_token(token_id))

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())


class GuidanceBackend:
    """llguidance: grammar definitions checked at compile time, a matcher per request."""

    name = "guidance"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self._llg = llguidance
        self._tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=vocab_size, eos_token=stop_token_ids or None
        )

    def compile(self, spec: GrammarSpec) -> Any:
        grammar = guidance_grammar(spec)
        is_error, messages = self._llg.LLMatcher.validate_grammar_with_warnings(
            grammar, self._tokenizer
        )
        if is_error:
            raise ValueError(messages[0] if messages else "llguidance rejected the grammar")
        return grammar

    def matcher(self, compiled: Any) -> Matcher:
        return _GuidanceMatcher(self._llg, self._llg.LLMatcher(self._tokenizer, compiled))


class _GuidanceMatcher:
    def __init__(self, llg: Any, matcher: Any) -> None:
        self._llg = llg
        self._matcher = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._llg.torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    def accept_token(self, token_id: int) -> bool:
        return bool(self._matcher.consume_token(token_id)) and not self._matcher.is_error()

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_stopped())


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An all-allowed int32 bitmask [rows, ceil(vocab_size / 32)]."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set to -inf, in place, the logits of row rows[i] whose bit is clear in bitmask[i].

    xgrammar's kernel where it is installed (on CPU 5x faster than the tensor ops below, which
    cost 7% of a 16-request decode step), else those tensor ops.
    """
    xgrammar: Any
    try:
        import xgrammar
    except ImportError:
        xgrammar = None
    if xgrammar is not None and logits.is_contiguous():
        # xgrammar reads row r of the mask for row r of the logits: spread the rows out.
        full = allocate_bitmask(logits.shape[0], logits.shape[-1])
        full[rows] = bitmask
        xgrammar.apply_token_bitmask_inplace(logits, full.to(logits.device), indices=rows)
        return
    vocab_size = logits.shape[-1]
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().view(bitmask.shape[0], -1)
    index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    masked = logits.index_select(0, index)
    masked.masked_fill_(~allowed[:, :vocab_size].to(logits.device), float("-inf"))
    logits.index_copy_(0, index, masked)
