"""``torch.topk`` of a beam step's candidate scores, the same values and indices, from a
fraction of the row.

Beam search picks the best ``2 * beam`` of ``beam * vocabulary`` scores per sentence
(40,040 on the bundled model). ``torch.topk`` on CPU copies every (value, index) pair of a
row into a heap: 1.5 ms per step at batch 32, beam 5, where CTranslate2 spends 0.5 ms
(BENCHMARKS.md, "Top-k from the best chunks"). Here a row is cut into chunks of
``CHUNK`` scores; one vectorized pass takes each chunk's maximum, and only the ``k + 1``
chunks with the largest maxima (and the short tail after the last whole chunk) go into
``torch.topk``. No score outside them can beat the ``k + 1``-th best inside them: each of
those chunks holds a score at least as large as every score of an unchosen chunk.

Equal scores are where two correct top-k routines can disagree (which of two equal scores
comes first is the heap's business, and a tie at the k-th place chooses which one is in).
So the result is taken only where the best ``k + 1`` candidates are strictly decreasing,
which makes the top ``k`` unique, values and order; on any tie (or NaN, or a row with fewer
than ``k + 1`` finite scores) the whole batch goes through ``torch.topk`` as before.
"""

from typing import Tuple

import torch
from torch import Tensor

# Scores per chunk: small enough that ``k + 1`` chunks are a few percent of a row, large
# enough that the maxima pass stays one vectorized reduction.
CHUNK = 128


def top_k(scores: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """``torch.topk(scores, k)`` (largest, sorted) of ``scores`` (rows, n): the same values and indices."""
    rows, n = scores.size()
    chunks = n // CHUNK
    if scores.device.type != "cpu" or not scores.is_floating_point() or chunks < 4 * (k + 1):
        return torch.topk(scores, k)
    candidates = candidate_indices(scores, k + 1)
    values, positions = scores.gather(1, candidates).topk(k + 1)
    if not bool((values[:, :-1] > values[:, 1:]).all()):  # a tie or NaN: the heap's own order
        return torch.topk(scores, k)
    return values[:, :k].contiguous(), candidates.gather(1, positions[:, :k])


def candidate_indices(scores: Tensor, chunks_kept: int) -> Tensor:
    """(rows, chunks_kept * CHUNK + tail) indices: every score of the ``chunks_kept`` whole
    chunks with the largest maxima of each row, then the tail after the last whole chunk."""
    rows, n = scores.size()
    whole = n // CHUNK * CHUNK
    maxima = scores[:, :whole].view(rows, -1, CHUNK).amax(dim=2)
    starts = maxima.topk(chunks_kept, sorted=False).indices.mul_(CHUNK)  # (rows, chunks_kept)
    offsets = torch.arange(CHUNK, device=scores.device)
    indices = (starts.unsqueeze(2) + offsets).view(rows, -1)
    if whole == n:
        return indices
    tail = torch.arange(whole, n, device=scores.device).expand(rows, -1)
    return torch.cat([indices, tail], dim=1)
