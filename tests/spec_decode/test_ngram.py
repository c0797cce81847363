"""The n-gram proposer's lookup and the per-request token history it reads."""

from __future__ import annotations

import numpy as np

from pagoda.spec_decode.config import SpeculativeConfig
from pagoda.spec_decode.ngram import NgramProposer, TokenHistory


def proposer(k: int = 3, lookup_min: int = 1, lookup_max: int = 3) -> NgramProposer:
    return NgramProposer(
        SpeculativeConfig.from_dict(
            {
                "method": "ngram",
                "num_speculative_tokens": k,
                "prompt_lookup_min": lookup_min,
                "prompt_lookup_max": lookup_max,
            }
        )
    )


def ids(*tokens: int) -> np.ndarray:
    return np.array(tokens, dtype=np.int64)


def test_drafts_what_followed_the_suffix_before() -> None:
    # ... 1 2 3 [4 5 6] ... 1 2 3 -> 4 5 6
    assert proposer().propose(ids(9, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3)) == [4, 5, 6]


def test_the_longest_suffix_wins_over_a_more_recent_shorter_one() -> None:
    # "2 3" -> 10 (most recent) but "1 2 3" -> 4 is longer.
    tokens = ids(1, 2, 3, 4, 0, 2, 3, 10, 1, 2, 3)
    assert proposer(k=1).propose(tokens) == [4]
    # With max n = 2 both match "2 3": the most recent one.
    assert proposer(k=1, lookup_max=2).propose(tokens) == [10]


def test_no_draft_below_the_minimum_match_or_without_one() -> None:
    assert proposer(lookup_min=3).propose(ids(5, 2, 3, 9, 1, 2, 3)) == []  # only "2 3" matches
    assert proposer().propose(ids(1, 2, 3, 4)) == []
    assert proposer().propose(ids(7)) == []


def test_drafts_stop_at_the_end_of_the_sequence_and_at_max_tokens() -> None:
    # The match's continuation runs into the suffix itself: 1 2 1 2 -> "1 2" matched at 0, then 1 2.
    assert proposer(k=5, lookup_max=2).propose(ids(1, 2, 1, 2)) == [1, 2]
    assert proposer(k=3).propose(ids(1, 2, 3, 4, 5, 6, 1, 2, 3), max_tokens=2) == [4, 5]
    assert proposer(k=3).propose(ids(1, 2, 3, 4, 5, 6, 1, 2, 3), max_tokens=0) == []


def test_a_repeating_loop_drafts_its_continuation() -> None:
    loop = [3, 1, 4, 1, 5] * 4
    assert proposer(k=4, lookup_min=2).propose(ids(*loop)) == [3, 1, 4, 1]


def test_history_appends_new_tokens_and_rebuilds_when_a_request_comes_back() -> None:
    history = TokenHistory()
    prompt = list(range(10))
    assert history.update("a", prompt, []).tolist() == prompt
    out = [11, 12]
    assert history.update("a", prompt, out).tolist() == prompt + out
    long_out = list(range(100, 300))  # grows past the first buffer
    assert history.update("a", prompt, out + long_out).tolist() == prompt + out + long_out
    history.remove("a")
    assert history.update("a", prompt, [5]).tolist() == [*prompt, 5]
