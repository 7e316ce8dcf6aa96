"""fairseq's beam search step with the running scores added in place.

``BeamSearch.step`` adds each hypothesis' score to its (beam x vocabulary) log-probabilities
in a new tensor: at batch 128, beam 5 and a 32k vocabulary another 82 MB allocation per
step, which on CPU costs page faults (see ``ensemble.py``). The fast loop owns the
log-probabilities it passes and does not read them afterwards, so the sum can overwrite
them. The rest is fairseq's step: the same top-k over the same values (``topk.top_k``: the
result of ``torch.topk``, from the chunks that can hold it). On CPUs with AVX-512 each sum is
made in a register instead, in one read of the row that keeps the best (``native/beam_top_k.cpp``;
nothing written), wherever the best ``k + 1`` sums are distinct: ``torch.topk``'s result then
has one answer (BENCHMARKS.md, "Candidates in one pass").
"""

import math
from typing import Optional, Tuple

import torch
from fairseq.search import BeamSearch, Search
from torch import Tensor

from .step import native
from .topk import top_k


def adds_in_place(search: Search, step: int) -> bool:
    """Whether ``beam_step_in_place`` gives this search's step: plain beam search after step 0
    (step 0 keeps one beam per sentence, a small copy)."""
    return type(search) is BeamSearch and step > 0


def nan_to_minus_infinity(lprobs: Tensor) -> Tensor:
    """fairseq's ``lprobs[lprobs != lprobs] = -inf`` in one pass, in place: NaN -> -inf, infinities kept."""
    return lprobs.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def beam_step_in_place(lprobs: Tensor, scores: Tensor, step: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``BeamSearch.step`` for ``step > 0``: ``lprobs`` (bsz, beam, vocab) may be overwritten with
    the cumulative scores; returns candidate scores, tokens and beams, each (bsz, 2 * beam).
    NaNs in ``lprobs`` count as -inf, as fairseq's loop makes them before the step (the
    loop leaves that to this step: ``logit_edits.py``)."""
    bsz, beam_size, vocab_size = lprobs.size()
    k, running = min(2 * beam_size, beam_size * vocab_size - 1), scores[:, :, step - 1]
    found = _in_one_pass(lprobs, running, k)  # None where a sum is NaN
    if found is not None:
        cand_scores, flat_indices = found
    else:
        cumulative = nan_to_minus_infinity(lprobs).add_(running.unsqueeze(-1)).view(bsz, -1)
        cand_scores, flat_indices = top_k(cumulative, k)
    cand_beams = torch.div(flat_indices, vocab_size, rounding_mode="trunc")
    return cand_scores, flat_indices.fmod(vocab_size), cand_beams


def _in_one_pass(lprobs: Tensor, running: Tensor, k: int) -> Optional[Tuple[Tensor, Tensor]]:
    """``torch.topk`` of ``lprobs + running`` per sentence from one read of ``lprobs``, nothing
    written (``native/beam_top_k.cpp``); None where the kernel is not built, the operands
    are not CPU float32, or a sentence's best ``k + 1`` tie (``torch.topk``'s order decides)."""
    kernels = native.beam_top_k() if lprobs.device.type == "cpu" else None
    if kernels is None or lprobs.dtype != torch.float32 or running.dtype != torch.float32 or not lprobs.is_contiguous():
        return None
    return kernels.added_top_k(lprobs, running, k)
