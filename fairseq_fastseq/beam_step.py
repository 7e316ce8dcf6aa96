"""fairseq's beam search step with the running scores added in place.

``BeamSearch.step`` adds each hypothesis' score to its (beam x vocabulary) log-probabilities
in a new tensor: at batch 128, beam 5 and a 32k vocabulary another 82 MB allocation per
step, which on CPU costs page faults (see ``ensemble.py``). The fast loop owns the
log-probabilities it passes and does not read them afterwards, so the sum can overwrite
them. The rest is fairseq's step: the same top-k over the same values (``topk.top_k``: the
result of ``torch.topk``, from the chunks that can hold it).
"""

from typing import Tuple

import torch
from fairseq.search import BeamSearch, Search
from torch import Tensor

from .topk import top_k


def adds_in_place(search: Search, step: int) -> bool:
    """Whether ``beam_step_in_place`` gives this search's step: plain beam search after step 0
    (step 0 keeps one beam per sentence, a small copy)."""
    return type(search) is BeamSearch and step > 0


def beam_step_in_place(lprobs: Tensor, scores: Tensor, step: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``BeamSearch.step`` for ``step > 0``: ``lprobs`` (bsz, beam, vocab) is overwritten with the
    cumulative scores; returns candidate scores, tokens and beams, each (bsz, 2 * beam)."""
    bsz, beam_size, vocab_size = lprobs.size()
    cumulative = lprobs.add_(scores[:, :, step - 1].unsqueeze(-1)).view(bsz, -1)
    cand_scores, flat_indices = top_k(cumulative, min(2 * beam_size, cumulative.size(1) - 1))
    cand_beams = torch.div(flat_indices, vocab_size, rounding_mode="trunc")
    return cand_scores, flat_indices.fmod(vocab_size), cand_beams
