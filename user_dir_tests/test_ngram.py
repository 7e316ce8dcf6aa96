"""Vectorized n-gram blocking == the naive rule, on random histories and by hand."""

import math
import random

import pytest
import torch

from fairseq_fastseq.ngram import block_repeated_ngrams

from .naive import banned_next_tokens

PAD, EOS = 1, 2


def _blocked(history_rows, n, vocab=12):
    tokens = torch.tensor(history_rows)
    lprobs = torch.zeros(len(history_rows), vocab)
    lprobs[:, PAD] = -math.inf
    block_repeated_ngrams(tokens, lprobs, tokens.size(1) - 1, n, PAD)
    return [{t for t in range(vocab) if lprobs[r, t] == -math.inf} - {PAD} for r in range(len(history_rows))]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_matches_naive_rule_on_random_histories(n):
    rng = random.Random(n)
    for _ in range(200):
        length = rng.randint(1, 14)
        alphabet = rng.choice([[3, 4], [3, 4, 5], list(range(2, 12))])  # few symbols: many repeats
        rows = [[EOS] + [rng.choice(alphabet) for _ in range(length - 1)] for _ in range(rng.randint(1, 4))]
        assert _blocked(rows, n) == [banned_next_tokens(row, n) - {PAD} for row in rows]


def test_a_a_repeat_is_blocked():
    """The most common repetition: the last window must be checked too."""
    assert _blocked([[EOS, 5, 5]], 2) == [{5}]


def test_bigram_seen_earlier_is_blocked():
    assert _blocked([[EOS, 3, 4, 6, 3]], 2) == [{4}]
    assert _blocked([[EOS, 3, 4, 6, 3, 4]], 3) == [{6}]


def test_history_shorter_than_n_bans_nothing():
    assert _blocked([[EOS, 3]], 3) == [set()]
    assert _blocked([[EOS, 3, 3]], 4) == [set()]


def test_eos_at_start_counts_as_history():
    assert _blocked([[EOS, 3, EOS]], 2) == [{3}]
