"""Finished hypotheses in fixed device buffers, for the static-shape search loop.

``FinishedHypotheses`` keeps the rows that finished at each step, and how many there are is
a host sync (``nonzero``). Here every top candidate of every sentence is written at each
step, as whole rows with one ``index_copy_`` per buffer: an accepted hypothesis into its
sentence's next slot, any other candidate into one extra slot that is never read (where
several land, which one stays does not matter). A row's columns after its length hold
nothing of use. The values are
``FinishedHypotheses``'s (the same functions on the same rows), and so is the result.
"""

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .finished import StepEnds, best_first, final_scores, hypothesis


class FinishedOnDevice:
    """Per-sentence store of up to ``beam_size`` finished hypotheses, with ``add`` and
    ``to_hypotheses`` as ``FinishedHypotheses`` has them."""

    def __init__(self, bsz: int, beam_size: int, max_len: int, scores: Tensor) -> None:
        slots, width, device = beam_size + 1, max_len + 1, scores.device  # slot beam_size: the unread one
        self.beam_size, self.slots = beam_size, slots
        self.counts = torch.zeros(bsz, dtype=torch.long, device=device)
        self.lengths = torch.zeros(bsz, slots, dtype=torch.long, device=device)
        self.tokens = torch.zeros(bsz, slots, width, dtype=torch.long, device=device)
        self.positional = scores.new_zeros(bsz, slots, width)
        self.scores = scores.new_zeros(bsz, slots)
        self.attention: Optional[Tensor] = None  # (bsz, slots, src_len, width), once there is any

    def add(self, ends: StepEnds) -> Tuple[Tensor, Tensor]:
        """``FinishedHypotheses.add``, every top candidate written as a whole row (no host sync)."""
        counts, slots, accepted = ends.slots(self.counts, self.beam_size)
        # (sentence, slot) as a row of the flattened buffers; the unread slot unless accepted
        where = ends.sentences.unsqueeze(1).mul(self.slots).add(torch.where(accepted, slots, self.beam_size)).view(-1)
        rows, raw = ends.eos_bbsz_idx.reshape(-1), ends.eos_scores.reshape(-1)
        hypo_tokens, positional = ends.tokens_and_positional_scores(rows, raw, self.tokens.size(-1))
        self.tokens.view(-1, self.tokens.size(-1)).index_copy_(0, where, hypo_tokens)
        self.positional.view(-1, self.positional.size(-1)).index_copy_(0, where, positional)
        too_long = ends.too_long.repeat_interleave(ends.eos_mask.size(1)) if ends.too_long is not None else None
        self.scores.view(-1).index_copy_(0, where, final_scores(raw, ends.normalize, too_long))
        self.lengths.view(-1).index_fill_(0, where, ends.step + 1)
        if ends.attn is not None:
            if self.attention is None:
                self.attention = ends.attn.new_zeros(*self.positional.shape[:2], ends.attn.size(1), self.positional.size(2))
            self.attention.view(-1, *self.attention.shape[2:]).index_copy_(0, where, ends.attn.index_select(0, rows)[:, :, 1:])
        return ends.recount(self.counts, counts, accepted)

    def to_hypotheses(self) -> List[List[Dict[str, Tensor]]]:
        """fairseq's output: per sentence, its hypotheses sorted by score, best first (the
        search's last host syncs: the counts, lengths and scores)."""
        counts, lengths, scores = self.counts.tolist(), self.lengths.tolist(), self.scores.float().cpu()
        finalized = []
        for sentence, count in enumerate(counts):
            in_order = [
                hypothesis(
                    self.tokens[sentence, slot, :length],
                    self.scores[sentence, slot],
                    self.positional[sentence, slot, :length],
                    self.attention[sentence, slot, :, :length] if self.attention is not None else None,
                )
                for slot, length in enumerate(lengths[sentence][:count])
            ]
            finalized.append(best_first(in_order, scores[sentence, :count]))
        return finalized
