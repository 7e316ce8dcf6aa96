"""``topk.top_k``: ``torch.topk``'s values and indices from the best chunks of a row, and
``torch.topk`` itself wherever equal scores leave the order to its heap."""

import math

import pytest
import torch

from fairseq_fastseq import topk
from fairseq_fastseq.topk import CHUNK, candidate_indices, top_k


def beam_scores(sentences: int, beams: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """A beam step's cumulative scores (sentences, beams * vocab): log-probabilities plus a
    running score per beam."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(sentences * beams, vocab, generator=generator) * 3
    running = torch.randn(sentences, beams, 1, generator=generator)
    return (torch.log_softmax(logits, dim=-1).view(sentences, beams, vocab) + running).view(sentences, -1)


def assert_same_as_torch(scores: torch.Tensor, k: int) -> None:
    expected = torch.topk(scores, k)
    values, indices = top_k(scores, k)
    torch.testing.assert_close(values, expected.values, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(indices, expected.indices)


@pytest.mark.parametrize("vocab", [8008, 8000, 32003])  # rows with and without a tail after the last chunk
@pytest.mark.parametrize("sentences,beams", [(1, 5), (32, 5), (7, 4), (3, 1)])
def test_top_k_gives_torch_topk(vocab, sentences, beams):
    assert_same_as_torch(beam_scores(sentences, beams, vocab, seed=vocab + sentences), 2 * beams)


def test_without_ties_only_the_best_chunks_reach_topk(monkeypatch):
    scores = beam_scores(16, 5, 8008)
    expected = torch.topk(scores, 10)

    def whole_rows(*args, **kwargs):
        raise AssertionError("torch.topk on whole rows")

    monkeypatch.setattr(topk.torch, "topk", whole_rows)
    values, indices = top_k(scores, 10)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)


def test_candidates_hold_every_score_that_can_be_in_the_top_k():
    scores = beam_scores(4, 5, 8008)
    candidates = candidate_indices(scores, 11)
    assert candidates.size(1) == 11 * CHUNK + 8008 * 5 % CHUNK  # the chosen chunks, then the tail
    best = torch.topk(scores, 11).indices
    for row in range(scores.size(0)):
        assert set(best[row].tolist()) <= set(candidates[row].tolist())


@pytest.mark.parametrize("case", ["tie inside the top k", "tie at the k-th place", "NaN", "too few finite scores"])
def test_equal_scores_nan_and_minus_inf_take_torch_topk(case):
    scores = beam_scores(4, 5, 8008, seed=1)
    row = scores[2]
    if case == "tie inside the top k":  # equal best scores in chunks far apart
        row[[3, 900, 17000, 39000]] = 5.0
    elif case == "tie at the k-th place":
        best = torch.topk(row, 10).indices
        row[[100, 20000, 30000]] = row[best[9]].item()
    elif case == "NaN":
        row[12345] = math.nan
    else:
        row[:] = -math.inf
        row[[7, 4000]] = 0.0
    assert_same_as_torch(scores, 10)


def test_small_rows_and_integers_take_torch_topk():
    assert_same_as_torch(beam_scores(2, 5, 100), 10)
    integers = torch.randint(0, 1000, (3, 40000), generator=torch.Generator().manual_seed(0))
    expected = torch.topk(integers, 10)
    values, indices = top_k(integers, 10)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
