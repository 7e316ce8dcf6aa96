"""Both stores of finished hypotheses (``FinishedHypotheses`` and the static-shape loop's
``FinishedOnDevice``) on hand-built tensors: which hypotheses a sentence keeps (slot order),
what is stored for each, and the order of the output (ties included), as fairseq's
``finalize_hypos`` does it."""

import math

import pytest
import torch

from fairseq_fastseq.finished import FinishedHypotheses, StepEnds
from fairseq_fastseq.finished_on_device import FinishedOnDevice

EOS = 2
BEAM = 2
# Rows of 2 sentences x 2 beams. tokens[:, 0] is the BOS; row r's tokens are 10+r, 20+r, ...
TOKENS = torch.tensor([[EOS, 10 + r, 20 + r, 30 + r] for r in range(4)])
# Cumulative scores of row r after each step.
SCORES = torch.tensor([[-0.25 * (r + 1) * (s + 1) for s in range(4)] for r in range(4)])


def add(finished, step, eos_mask, eos_bbsz_idx, eos_scores, sentences, normalize=None, too_long=None):
    ends = StepEnds(
        step, torch.tensor(eos_mask), torch.tensor(eos_bbsz_idx), torch.tensor(eos_scores),
        torch.tensor(sentences), TOKENS, SCORES, None, normalize, too_long, EOS,
    )  # fmt: skip
    return finished.add(ends)


STORES = {
    "per_step_rows": lambda bsz, beam_size: FinishedHypotheses(bsz, beam_size, torch.device("cpu")),
    "device_buffers": lambda bsz, beam_size: FinishedOnDevice(bsz, beam_size, TOKENS.size(1) - 2, SCORES),
}


@pytest.fixture(params=list(STORES))
def store(request):
    return STORES[request.param]


def test_a_sentence_keeps_its_first_beam_size_hypotheses_in_candidate_order(store):
    finished = store(2, BEAM)
    # step 0: sentence 0 ends its first candidate, sentence 1 both of its candidates
    counts, ended = add(finished, 0, [[True, False], [True, True]], [[0, 1], [2, 3]], [[-1.0, -9.0], [-0.5, -0.75]], [0, 1])
    assert counts.tolist() == [1, 2] and ended.tolist() == [True, True]
    # step 1: only sentence 0 is active; both candidates end, one slot is left: the first wins
    counts, ended = add(finished, 1, [[True, True]], [[1, 0]], [[-2.0, -0.1]], [0])
    assert counts.tolist() == [2] and ended.tolist() == [True]
    assert finished.counts.tolist() == [2, 2]
    hypotheses = finished.to_hypotheses()
    assert [h["tokens"].tolist() for h in hypotheses[0]] == [[EOS], [11, EOS]]  # -1.0 before -2.0
    assert [float(h["score"]) for h in hypotheses[0]] == [-1.0, -2.0]  # the -0.1 candidate came too late
    assert [h["tokens"].tolist() for h in hypotheses[1]] == [[EOS], [EOS]]
    assert [float(h["score"]) for h in hypotheses[1]] == [-0.5, -0.75]


def test_stored_values_positional_scores_normalization_and_too_long(store):
    finished = store(1, BEAM)
    # step 2, row 1: tokens 11, 21, EOS; cumulative scores -0.5, -1.0, then the EOS score -2.0
    add(finished, 2, [[False, True]], [[0, 1]], [[-9.0, -2.0]], [0], normalize=4.0)
    (hypothesis,) = finished.to_hypotheses()[0]
    assert hypothesis["tokens"].tolist() == [11, 21, EOS]
    assert hypothesis["positional_scores"].tolist() == [-0.5, -0.5, -1.0]  # per-step differences
    assert float(hypothesis["score"]) == -0.5  # -2.0 / normalize
    assert hypothesis["attention"].numel() == 0 and hypothesis["alignment"].numel() == 0
    too_long = store(1, BEAM)
    add(too_long, 0, [[True, False]], [[0, 1]], [[-1.0, -9.0]], [0], too_long=torch.tensor([True]))
    assert float(too_long.to_hypotheses()[0][0]["score"]) == -math.inf  # --match-source-len


def test_output_is_best_first_and_ties_keep_slot_order(store):
    finished = store(1, 3)
    add(finished, 0, [[True, False]], [[0, 1]], [[-1.0, -9.0]], [0])  # slot 0: -1.0
    add(finished, 1, [[True, True]], [[1, 0]], [[-0.5, -1.0]], [0])  # slots 1, 2: -0.5, -1.0 (a tie with slot 0)
    hypotheses = finished.to_hypotheses()[0]
    assert [float(h["score"]) for h in hypotheses] == [-0.5, -1.0, -1.0]
    # the tie: slot 0 (finished at step 0, tokens [EOS]) before slot 2 (step 1, row 0)
    assert [h["tokens"].tolist() for h in hypotheses] == [[11, EOS], [EOS], [10, EOS]]
