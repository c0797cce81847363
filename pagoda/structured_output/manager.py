"""The engine core's side of structured output: compile off the step loop, mask, advance.

`submit` starts compiling a request's grammar on a worker thread (once per distinct spec: later
requests with the same spec share the future); the scheduler leaves the request waiting until
`ready` says its grammar is compiled, so a slow compile delays that request only. `bitmask` fills
one row per constrained request that samples in the step, all in one tensor the model runner
applies before sampling; `accept` advances a request's matcher by its sampled token and says when
its grammar is complete. Preemption needs no rollback: a preempted request keeps its output
tokens, and its matcher has accepted exactly those. A request of a reasoning model may be
constrained only after its reasoning: until the token that ends it is sampled, the request has
no bitmask row and its tokens do not advance the matcher.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from pagoda.structured_output.backends import (
    GuidanceBackend,
    Matcher,
    XgrammarBackend,
    allocate_bitmask,
)
from pagoda.structured_output.spec import GrammarSpec

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "xgrammar", "guidance")
# Compiled grammars kept for reuse (by spec); the oldest are dropped beyond this.
MAX_CACHED_GRAMMARS = 512


class GrammarError(ValueError):
    """A spec that no backend could compile (the reason names the library's message)."""


class StructuredOutputManager:
    """Grammars and matchers of the engine core's constrained requests.

    Args:
        load_tokenizer: returns the model's Hugging Face tokenizer (called once, on first use).
        vocab_size: the logits' width (the model's vocabulary, padding included).
        stop_token_ids: the tokens that end a request (EOS and generation_config's).
        backend: "auto" (xgrammar, then llguidance for what it rejects), "xgrammar", "guidance".
    """

    def __init__(
        self,
        load_tokenizer: Callable[[], Any],
        vocab_size: int,
        stop_token_ids: list[int],
        backend: str = "auto",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(
                f"structured outputs backend must be one of {BACKENDS}, got {backend!r}"
            )
        self.backend_name = backend
        self.vocab_size = vocab_size
        self._load_tokenizer = load_tokenizer
        self._tokenizer: Any = None
        self._stop_token_ids = stop_token_ids
        self._backends: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._compiled: dict[GrammarSpec, Future[tuple[Any, Any]]] = {}
        self._pending: dict[str, Future[tuple[Any, Any]]] = {}
        self._matchers: dict[str, Matcher] = {}
        # Requests still reasoning: the token whose sampling starts their constraint.
        self._reasoning_until: dict[str, int] = {}
        # Per-step figures for the stats: seconds spent compiling and filling masks.
        self.compile_seconds = 0.0
        self.mask_seconds = 0.0

    # --- compilation ------------------------------------------------------------------------

    def submit(
        self, request_id: str, spec: GrammarSpec, reasoning_end_token_id: int | None = None
    ) -> None:
        """Start compiling `spec` for `request_id` (or share a compile already made); with
        `reasoning_end_token_id`, the constraint starts after that token."""
        if reasoning_end_token_id is not None:
            self._reasoning_until[request_id] = reasoning_end_token_id
        with self._lock:
            future = self._compiled.get(spec)
            if future is None:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="pagoda-grammar")
                future = self._executor.submit(self._compile, spec)
                self._compiled[spec] = future
                while len(self._compiled) > MAX_CACHED_GRAMMARS:
                    self._compiled.pop(next(iter(self._compiled)))
        self._pending[request_id] = future

    def ready(self, request_id: str) -> bool:
        """Whether `request_id`'s grammar is compiled (or failed: `error` says), so it may run."""
        future = self._pending.get(request_id)
        if future is None:
            return True
        if not future.done():
            return False
        if future.exception() is None:
            backend, compiled = future.result()
            self._matchers[request_id] = backend.matcher(compiled)
            del self._pending[request_id]
        return True

    def error(self, request_id: str) -> str | None:
        """Why `request_id`'s grammar could not be compiled, once `ready` is True; else None."""
        future = self._pending.get(request_id)
        if future is None or not future.done() or future.exception() is None:
            return None
        return str(future.exception())

    def _backend(self, name: str) -> Any:
        backend = self._backends.get(name)
        if backend is None:
            if self._tokenizer is None:
                self._tokenizer = self._load_tokenizer()
            cls = XgrammarBackend if name == "xgrammar" else GuidanceBackend
            start = time.perf_counter()
            backend = cls(self._tokenizer, self.vocab_size, self._stop_token_ids)
            logger.info(
                "Structured output: %s ready for a %d-token vocabulary in %.2f s",
                name,
                self.vocab_size,
                time.perf_counter() - start,
            )
            self._backends[name] = backend
        return backend

    def _compile(self, spec: GrammarSpec) -> tuple[Any, Any]:
        start = time.perf_counter()
        names = ["xgrammar", "guidance"] if self.backend_name == "auto" else [self.backend_name]
        if spec.disable_fallback:
            names = names[:1]
        reasons = []
        try:
            for name in names:
                try:
                    backend = self._backend(name)
                    return backend, backend.compile(spec)
                except (RuntimeError, ValueError, TypeError, ImportError) as exc:
                    # ImportError: xgrammar not installed (pip install without make): llguidance.
                    reasons.append(f"{name}: {exc}")
            raise GrammarError(f"{spec.field} could not be compiled ({'; '.join(reasons)})")
        finally:
            self.compile_seconds += time.perf_counter() - start

    # --- steps ------------------------------------------------------------------------------

    def has_matcher(self, request_id: str) -> bool:
        """Whether `request_id`'s next token is constrained (compiled, and past any reasoning)."""
        return request_id in self._matchers and request_id not in self._reasoning_until

    def bitmask(self, request_ids: list[str]) -> torch.Tensor | None:
        """The bitmask rows of `request_ids` (in order), or None when none is constrained."""
        matchers = [self._matchers.get(r) if self.has_matcher(r) else None for r in request_ids]
        if all(m is None for m in matchers):
            return None
        start = time.perf_counter()
        bitmask = allocate_bitmask(len(request_ids), self.vocab_size)
        for row, matcher in enumerate(matchers):
            if matcher is not None:
                matcher.fill_bitmask(bitmask, row)
        self.mask_seconds += time.perf_counter() - start
        return bitmask

    def accept(self, request_id: str, token_id: int) -> bool:
        """Advance `request_id`'s matcher by `token_id`; True when the request is complete: its
        grammar ended and `token_id` is the stop token that ends it.

        Where the grammar has ended, its mask allows only the stop tokens, so the request ends as
        an unconstrained one does, on EOS (whose text is not output), even under ignore_eos.
        A token the grammar refuses also ends the request.
        """
        end = self._reasoning_until.get(request_id)
        if end is not None:
            if token_id == end:
                del self._reasoning_until[request_id]
            return False
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return False
        if not matcher.accept_token(token_id):
            logger.warning("%s: the grammar refused token %d; stopping", request_id, token_id)
            return True
        return token_id in self._stop_token_ids and matcher.is_terminated()

    def remove(self, request_id: str) -> None:
        self._pending.pop(request_id, None)
        self._reasoning_until.pop(request_id, None)
        self._matchers.pop(request_id, None)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
