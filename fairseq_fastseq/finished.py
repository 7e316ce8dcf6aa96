"""Finished hypotheses, collected with tensor operations over the whole batch.

fairseq's ``finalize_hypos`` loops in Python over every hypothesis that emits EOS and over
every sentence it touches. Here one call per decoding step selects all of them at once.
The result is the same: the same hypotheses, stored in the same order, with the same
values.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor


@dataclass
class _Chunk:
    """The hypotheses finished at one step (one row each)."""

    sentences: Tensor  # (k,) original batch row
    slots: Tensor  # (k,) position among that sentence's finished hypotheses
    tokens: Tensor  # (k, step+1), ends with EOS
    scores: Tensor  # (k,) final (length-normalised) score
    positional_scores: Tensor  # (k, step+1)
    attention: Optional[Tensor]  # (k, src_len, step+1)


@dataclass
class StepEnds:
    """What a step hands a store of finished hypotheses (``FinishedHypotheses``, or
    ``FinishedOnDevice`` for the static-shape loop).

    ``eos_mask``/``eos_bbsz_idx``/``eos_scores`` are (active bsz, beam): the top candidates
    that end in EOS, their hypothesis rows and raw scores. ``sentences`` maps active rows to
    original batch rows. ``normalize`` divides final scores (the length penalty);
    ``too_long`` (active bsz,) marks sentences whose hypotheses score -inf
    (``--match-source-len``). As in fairseq, a sentence keeps the first ``beam_size``
    hypotheses in candidate order.
    """

    step: int
    eos_mask: Tensor
    eos_bbsz_idx: Tensor
    eos_scores: Tensor
    sentences: Tensor
    tokens: Tensor  # (rows, max_len + 2): the hypotheses so far
    scores: Tensor  # (rows, max_len + 1): their cumulative scores
    attn: Optional[Tensor]  # (rows, src_len, max_len + 2), if kept
    normalize: Optional[float]
    too_long: Optional[Tensor]
    eos: int

    def tokens_and_positional_scores(self, rows: Tensor, eos_scores: Tensor, columns: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """The tokens (k, step + 1), ending in EOS, and per-token scores of the hypotheses
        ``rows`` (k,) that finish at this step with the cumulative scores ``eos_scores`` (k,);
        with ``columns``, that many columns (those after the step hold nothing of use)."""
        step = self.step
        columns = step + 1 if columns is None else columns
        hypo_tokens = self.tokens.index_select(0, rows)[:, 1 : columns + 1]
        hypo_tokens[:, step] = self.eos
        positional = self.scores.index_select(0, rows)[:, :columns]
        positional[:, step] = eos_scores
        positional[:, 1:] = positional[:, 1:] - positional[:, :-1]
        return hypo_tokens, positional

    def slots(self, all_counts: Tensor, beam_size: int) -> Tuple[Tensor, Tensor, Tensor]:
        """Per active sentence its count so far (active bsz,), and per top candidate the slot
        an EOS there would take and whether it is accepted (active bsz, beam): a sentence keeps
        its first ``beam_size``."""
        counts = all_counts[self.sentences]
        slots = counts.unsqueeze(1) + self.eos_mask.cumsum(1) - 1
        return counts, slots, self.eos_mask & (slots < beam_size)

    def recount(self, all_counts: Tensor, counts: Tensor, accepted: Tensor) -> Tuple[Tensor, Tensor]:
        """Store the new counts in ``all_counts``; return them and which active sentences
        finished a hypothesis at this step (what ``add`` returns)."""
        new_counts = counts + accepted.sum(1)
        all_counts[self.sentences] = new_counts
        return new_counts, self.eos_mask.any(1)


class FinishedHypotheses:
    """Per-sentence store of up to ``beam_size`` finished hypotheses."""

    def __init__(self, bsz: int, beam_size: int, device: torch.device) -> None:
        self.beam_size = beam_size
        self.counts = torch.zeros(bsz, dtype=torch.long, device=device)
        self._chunks: List[_Chunk] = []

    def add(self, ends: StepEnds) -> Tuple[Tensor, Tensor]:
        """Store this step's EOS hypotheses; return, per active sentence, how many it has
        now and whether it finished one at this step."""
        counts, slots, accepted = ends.slots(self.counts, self.beam_size)
        rows, cols = accepted.nonzero(as_tuple=True)
        if rows.numel() > 0:
            bbsz_idx, eos_scores, too_long = ends.eos_bbsz_idx[rows, cols], ends.eos_scores[rows, cols], ends.too_long
            hypo_tokens, positional = ends.tokens_and_positional_scores(bbsz_idx, eos_scores)
            self._chunks.append(
                _Chunk(
                    sentences=ends.sentences[rows],
                    slots=slots[rows, cols],
                    tokens=hypo_tokens,
                    scores=final_scores(eos_scores, ends.normalize, too_long[rows] if too_long is not None else None),
                    positional_scores=positional,
                    attention=(ends.attn.index_select(0, bbsz_idx)[:, :, 1 : ends.step + 2] if ends.attn is not None else None),
                )
            )
        return ends.recount(self.counts, counts, accepted)

    def to_hypotheses(self) -> List[List[Dict[str, Tensor]]]:
        """fairseq's output: per sentence, its hypotheses sorted by score, best first."""
        bsz = len(self.counts)
        finalized: List[List[Dict[str, Tensor]]] = [[] for _ in range(bsz)]
        slotted: List[Dict[int, Tuple[Dict[str, Tensor], float]]] = [{} for _ in range(bsz)]  # slot -> (hypothesis, score)
        # Made outside the search's inference mode: ordinary tensors leave it (``ordinary_tensors``),
        # one copy per chunk, of which each hypothesis is a view.
        with torch.inference_mode(False):
            for chunk in self._chunks:
                # each tensor's rows from one call (``unbind``: the views ``[i]`` would give)
                tokens, scores, positional = (_ordinary(t).unbind(0) for t in (chunk.tokens, chunk.scores, chunk.positional_scores))
                attention = _ordinary(chunk.attention).unbind(0) if chunk.attention is not None else None
                rows = zip(chunk.sentences.tolist(), chunk.slots.tolist(), chunk.scores.tolist())
                for i, (sentence, slot, score) in enumerate(rows):
                    found = hypothesis(tokens[i], scores[i], positional[i], attention[i] if attention is not None else None)
                    slotted[sentence][slot] = (found, score)
            for sentence, hypos in enumerate(slotted):
                in_order = [hypos[slot] for slot in sorted(hypos)]
                finalized[sentence] = best_first([found for found, _ in in_order], torch.tensor([score for _, score in in_order]))
        return finalized


def ordinary_tensors(hypotheses: List[List[Dict[str, Tensor]]]) -> List[List[Dict[str, Tensor]]]:
    """The hypotheses with copies of those tensors that were made in inference mode.

    The fast search runs in ``torch.inference_mode`` (``generator.py``): the same kernels (same
    bits) with less dispatch per operator than under fairseq's ``no_grad`` (PyTorch skips its
    autograd bookkeeping; BENCHMARKS.md, "Fewer operator calls per step"). Tensors made there
    refuse in-place changes outside it, which callers of fairseq's generator may make (a hub
    user editing ``tokens``): what leaves the generator is ordinary tensors, as stock's are
    (``FinishedHypotheses`` makes its own so already, with one copy per step's chunk)."""
    return [[{key: _ordinary(value) if isinstance(value, Tensor) else value for key, value in hypothesis.items()} for hypothesis in nbest] for nbest in hypotheses]


def _ordinary(tensor: Optional[Tensor]) -> Optional[Tensor]:
    """``tensor``, copied where it was made in inference mode."""
    return tensor.clone() if tensor is not None and tensor.is_inference() else tensor


def final_scores(eos_scores: Tensor, normalize: Optional[float], too_long: Optional[Tensor]) -> Tensor:
    """fairseq's final scores: divided by the length penalty, -inf where ``too_long``."""
    if normalize is not None:
        eos_scores = eos_scores / normalize
    if too_long is not None:
        eos_scores = torch.where(too_long, torch.tensor(-math.inf), eos_scores)
    return eos_scores


def hypothesis(tokens: Tensor, score: Tensor, positional_scores: Tensor, attention: Optional[Tensor]) -> Dict[str, Tensor]:
    """One finished hypothesis as fairseq's generator returns it."""
    return {
        "tokens": tokens,
        "score": score,
        "attention": attention if attention is not None else torch.empty(0),
        "alignment": torch.empty(0),
        "positional_scores": positional_scores,
    }


def best_first(in_order: List[Dict[str, Tensor]], scores: Tensor) -> List[Dict[str, Tensor]]:
    """A sentence's hypotheses (in the order they finished) sorted by ``scores``, their final
    scores as a float32 CPU tensor: the same call on the same values as fairseq, so ties
    break the same way."""
    _, ranking = torch.sort(scores, descending=True)
    return [in_order[r] for r in ranking]
