"""best_of through the engine on a tiny random-weight Llama: of best_of seeded sequences, the n
with the highest cumulative logprob come back, best first; each is the sequence its seed draws
alone; bad combinations are refused naming best_of."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from pagoda.sampling_params import RequestOutputKind
from tests.tiny_llama import make_tiny_llama


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    return LLM(str(make_tiny_llama(tmp_path_factory.mktemp("tiny"))), max_model_len=128)


def test_best_of_returns_the_n_most_likely_of_its_sequences(llm: LLM) -> None:
    common = dict(temperature=1.0, seed=11, max_tokens=6, ignore_eos=True)
    (everything,) = llm.generate(
        ["Once upon a time"], SamplingParams(n=5, logprobs=0, **common), use_tqdm=False
    )
    ranked = sorted(everything.outputs, key=lambda o: -(o.cumulative_logprob or 0.0))
    (best,) = llm.generate(
        ["Once upon a time"], SamplingParams(n=2, best_of=5, **common), use_tqdm=False
    )
    assert [o.index for o in best.outputs] == [0, 1]
    assert [list(o.token_ids) for o in best.outputs] == [list(o.token_ids) for o in ranked[:2]]
    # Logprobs were only used to rank: not asked for, not returned.
    assert all(o.logprobs is None and o.cumulative_logprob is None for o in best.outputs)
    # Asked for, they come with the chosen sequences.
    (scored,) = llm.generate(
        ["Once upon a time"], SamplingParams(n=1, best_of=5, logprobs=1, **common), use_tqdm=False
    )
    assert scored.outputs[0].cumulative_logprob == pytest.approx(ranked[0].cumulative_logprob)
    assert len(scored.outputs[0].logprobs) == 6


def test_best_of_smaller_than_n_or_streamed_is_refused() -> None:
    with pytest.raises(ValueError, match="best_of must be greater than or equal to n"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match="best_of > n cannot be streamed"):
        SamplingParams(best_of=2, output_kind=RequestOutputKind.DELTA)
    assert SamplingParams(n=2, best_of=2, output_kind=RequestOutputKind.DELTA).num_sequences == 2
