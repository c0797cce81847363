"""Beam search with vLLM's names and shapes: `BeamSearchParams`, `BeamSearchSequence`, `BeamSearchOutput`.

`LLM.beam_search` runs it over the engine the way vLLM does: every step, each live beam is one
request for a single token asking for its `2 * beam_width` best logprobs; the candidates of all
beams of a prompt are scored and the best `beam_width` survive. A beam's request is its parent's
tokens plus one, so the prefix cache hands it every full block of its parent (forked beams share
all full blocks of their common prefix) and only the last, partial block is computed again: beam
width 4 holds about the blocks of one sequence plus one partial block per beam, not four copies.

Scoring (`get_beam_search_score`, vLLM's): `cum_logprob / len(tokens) ** length_penalty`, where
`tokens` include the prompt and a final EOS does not count. Every candidate of a step has the same
length, so the survivors of a step are the beams of highest cumulative logprob, as in
`transformers`' beam search; only the ranking of beams finished at different lengths differs
between the two conventions (transformers divides by the generated length only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class BeamSearchParams:
    """vLLM's `BeamSearchParams`.

    Raises:
        ValueError: a beam width below 1, max_tokens below 1, or a temperature other than 0:
            candidates are ranked by the model's raw logprobs, which a temperature would not
            change, so one is refused rather than ignored.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam_width must be a positive integer, got {self.beam_width!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens!r}")
        if self.temperature != 0:
            raise ValueError(
                f"temperature must be 0 for beam search (beams are ranked by raw logprobs), "
                f"got {self.temperature}"
            )


@dataclass
class BeamSearchSequence:
    """One beam: its tokens (the prompt's included), each generated token's logprobs (the
    candidates the step saw), the cumulative logprob, and once returned its text."""

    tokens: list[int]
    logprobs: list[dict[int, Any]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def sample_logprobs(self, num_generated: int, num_top: int) -> list[dict[int, Any]]:
        """Per token of the last `num_generated`: its own logprob first, then the `num_top`
        best of its step, the shape sampled requests' logprobs have."""
        steps = self.logprobs[len(self.logprobs) - num_generated :]
        tokens = self.tokens[len(self.tokens) - num_generated :]
        ordered = []
        for token, step in zip(tokens, steps, strict=True):
            top = sorted(step.items(), key=lambda item: -item[1].logprob)[:num_top]
            ordered.append({token: step[token], **{t: lp for t, lp in top if t != token}})
        return ordered


@dataclass
class BeamSearchOutput:
    """The best `beam_width` sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def get_beam_search_score(
    tokens: list[int], cumulative_logprob: float, eos_token_id: int | None, length_penalty: float
) -> float:
    """vLLM's beam score: the cumulative logprob over the sequence length (prompt included, a
    final EOS not) to the power `length_penalty`."""
    length = len(tokens)
    if eos_token_id is not None and tokens and tokens[-1] == eos_token_id:
        length -= 1
    return cumulative_logprob / (length**length_penalty)


class BeamSearch:
    """The search state of a batch of prompts, driven by whoever runs the engine (`LLM`
    synchronously, the completions server over `AsyncLLM`): `requests()` are the live beams to
    extend by one token, each with `step_params()`; `advance()` takes their outputs' logprobs;
    `outputs()` ranks what finished and what is still live.

    Args:
        prompts: each prompt's token ids.
        eos_token_id: the token that finishes a beam (None: ignore EOS).
        num_logprobs: also keep this many top logprobs per generated token in each beam's
            `logprobs` (for a response that asks for them); the search itself always weighs
            the 2 * beam_width best candidates of each beam, whatever this is.
    """

    def __init__(
        self,
        prompts: list[list[int]],
        params: BeamSearchParams,
        eos_token_id: int | None,
        num_logprobs: int = 0,
    ) -> None:
        self.params = params
        self.num_logprobs = num_logprobs
        self.eos = None if params.ignore_eos else eos_token_id
        self.steps_done = 0
        self.live: list[list[BeamSearchSequence]] = [
            [BeamSearchSequence(tokens=list(prompt))] for prompt in prompts
        ]
        self.done: list[list[BeamSearchSequence]] = [[] for _ in prompts]

    def score(self, beam: BeamSearchSequence) -> float:
        return get_beam_search_score(
            beam.tokens, beam.cum_logprob, self.eos, self.params.length_penalty
        )

    def requests(self) -> list[tuple[int, BeamSearchSequence]]:
        """`(prompt index, beam)` of every beam to extend next; empty once the search is over."""
        if self.steps_done >= self.params.max_tokens:
            return []
        return [(owner, beam) for owner, beams in enumerate(self.live) for beam in beams]

    def step_params(self) -> Any:
        """The sampling parameters of each beam's one-token request."""
        from pagoda.sampling_params import SamplingParams

        return SamplingParams(
            max_tokens=1,
            logprobs=max(2 * self.params.beam_width, self.num_logprobs),
            temperature=0.0,
            ignore_eos=True,
        )

    def advance(
        self, requests: list[tuple[int, BeamSearchSequence]], logprobs: list[dict[int, Any]]
    ) -> None:
        """Extend each requested beam by each of its candidates (`logprobs[i]`: token ->
        Logprob), keep the best `beam_width` per prompt, set finished beams aside."""
        candidates: list[list[BeamSearchSequence]] = [[] for _ in self.live]
        width = self.params.beam_width
        for (owner, parent), step in zip(requests, logprobs, strict=True):
            # The 2 * width best of the step (more are there only when the response shows them).
            best = sorted(step.items(), key=lambda item: -item[1].logprob)[: 2 * width]
            for token, logprob in best:
                beam = BeamSearchSequence(
                    tokens=[*parent.tokens, token],
                    logprobs=[*parent.logprobs, step],
                    cum_logprob=parent.cum_logprob + logprob.logprob,
                )
                if self.eos is not None and token == self.eos:
                    beam.finish_reason = "stop"
                    self.done[owner].append(beam)
                else:
                    candidates[owner].append(beam)
        self.live = [sorted(beams, key=self.score, reverse=True)[:width] for beams in candidates]
        self.steps_done += 1

    def outputs(self, decode: Any) -> list[BeamSearchOutput]:
        """Per prompt, its best `beam_width` sequences (finished or not), with `decode(tokens)`
        as their text (a final EOS left out of it unless `include_stop_str_in_output`)."""
        results = []
        for live, done in zip(self.live, self.done, strict=True):
            for beam in live:
                beam.finish_reason = "length"
            best = sorted(done + live, key=self.score, reverse=True)[: self.params.beam_width]
            for beam in best:
                keep_eos = beam.finish_reason != "stop" or self.params.include_stop_str_in_output
                beam.text = decode(beam.tokens if keep_eos else beam.tokens[:-1])
            results.append(BeamSearchOutput(sequences=best))
        return results
