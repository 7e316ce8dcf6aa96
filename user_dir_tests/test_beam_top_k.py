"""``native/beam_top_k.cpp`` through ``beam_step.beam_step_in_place``: ``torch.topk`` of the
log-probabilities plus the running scores, from one read and nothing written, and no answer
(the add and ``torch.topk`` then) wherever equal sums or a NaN leave the result to the heap."""

import math

import pytest
import torch

from fairseq_fastseq import beam_step
from fairseq_fastseq.beam_step import beam_step_in_place
from fairseq_fastseq.step import native

pytestmark = pytest.mark.skipif(native.beam_top_k() is None, reason="no AVX-512 or the kernel could not be built here")


def step_operands(sentences: int, beams: int, vocab: int, seed: int = 0):
    """Log-probabilities (sentences, beams, vocab) and running scores (sentences, beams, steps)."""
    generator = torch.Generator().manual_seed(seed)
    lprobs = torch.log_softmax(torch.randn(sentences * beams, vocab, generator=generator) * 3, dim=-1)
    return lprobs.view(sentences, beams, vocab), torch.randn(sentences, beams, 4, generator=generator)


def stocks_candidates(lprobs: torch.Tensor, scores: torch.Tensor, step: int):
    """fairseq's ``BeamSearch.step`` after step 0: the sum, ``torch.topk``, tokens and beams."""
    sentences, beams, vocab = lprobs.size()
    best = torch.topk((lprobs + scores[:, :, step - 1].unsqueeze(-1)).view(sentences, -1), 2 * beams)
    return best.values, best.indices.fmod(vocab), torch.div(best.indices, vocab, rounding_mode="trunc")


@pytest.mark.parametrize("vocab", [8008, 37, 32003])  # whole vectors of 16 and a tail
@pytest.mark.parametrize("sentences,beams", [(1, 5), (32, 5), (3, 2)])
def test_one_pass_gives_fairseqs_candidates_and_writes_nothing(vocab, sentences, beams):
    lprobs, scores = step_operands(sentences, beams, vocab, seed=vocab + sentences)
    before, expected = lprobs.clone(), stocks_candidates(lprobs, scores, 3)
    found = native.beam_top_k().added_top_k(lprobs, scores[:, :, 2], 2 * beams)
    assert found is not None and torch.equal(lprobs, before)  # answered from registers
    for got, want in zip(beam_step_in_place(lprobs, scores, 3), expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", ["tie inside the top k", "tie at the k-th place", "NaN", "too few finite sums"])
def test_ties_and_nan_are_left_to_torch_topk(case, monkeypatch):
    lprobs, scores = step_operands(4, 5, 8008, seed=1)
    row = lprobs[2].view(-1)
    if case == "tie inside the top k":  # equal best sums in one beam (the same running score)
        row[[3, 900, 5000]] = 0.0
    elif case == "tie at the k-th place":
        sums = (lprobs[2] + scores[2, :, 2].unsqueeze(-1)).view(-1)
        tenth = torch.topk(sums, 10).indices[9]
        beam, token = divmod(int(tenth), 8008)
        other = (beam + 1) % 5
        row[other * 8008 + 77] = (sums[tenth] - scores[2, other, 2]).item()
        assert (row[other * 8008 + 77] + scores[2, other, 2]) == sums[tenth]  # the same sum, exactly
    elif case == "NaN":
        row[12345] = math.nan
    else:
        row[:] = -math.inf
        row[[7, 4000]] = 0.0
    assert native.beam_top_k().added_top_k(lprobs, scores[:, :, 2], 10) is None
    # fairseq's loop makes NaN -inf before the step; the fast loop leaves that to this step
    expected = stocks_candidates(beam_step.nan_to_minus_infinity(lprobs.clone()), scores, 3)
    for got, want in zip(beam_step_in_place(lprobs, scores, 3), expected):
        assert torch.equal(got, want)


def test_without_the_kernel_the_add_and_topk_give_the_same(monkeypatch):
    lprobs, scores = step_operands(8, 5, 8008, seed=2)
    with_kernel = beam_step_in_place(lprobs.clone(), scores, 2)
    monkeypatch.setattr(beam_step.native, "beam_top_k", lambda: None)
    for got, want in zip(beam_step_in_place(lprobs, scores, 2), with_kernel):
        assert torch.equal(got, want)
