"""Typed caches of the encoder-decoder attention of the lean decoder step, one per layer.

Encoder-decoder attention: keys and values projected at the first step, once per sentence
and contiguous per head (``(sentences * heads, src_len, head_dim)``, read faster than
fairseq's strided view), each beam's queries attending to them in turn (on CPU; per beam,
as fairseq keeps them, elsewhere and for tiny products), or in fairseq's layout for BART's
beam-shared attention. The beams of a sentence hold the same keys and values, so a beam
reorder leaves them alone; they are copied only when sentences leave the batch, and then
only once finished sentences make up a quarter of them.
"""

from typing import Optional

import torch
from torch import Tensor


# Per-beam encoder keys/values of finished sentences stay in the cache (their rows are
# computed and discarded) until fewer than this share of the cached sentences is live: then
# one copy compacts the cache. Dropping them at once would copy the whole cache each time a
# sentence finishes, about once a step (``BENCHMARKS.md``: "Lean decoder step").
MIN_LIVE_SHARE = 0.75


# How a layer holds the encoder keys/values: per beam; once per sentence, attended by each
# beam's queries in turn (fairseq's products, matrix by matrix); once per sentence in
# fairseq's layout (BART's, bitwise); or once per sentence for grouped queries (``fused``).
PER_BEAM, PER_SENTENCE = "per beam", "once per sentence, each beam in turn"
FAIRSEQ_SHARED, GROUPED = "shared as fairseq shares them (BART)", "grouped"


class CrossAttentionCache:
    """One layer's encoder keys and values for the whole search.

    ``PER_BEAM``: ``keys``/``values`` (cached rows * heads, src_len, head_dim) contiguous and
    ``padding`` (cached rows, 1, 1, src_len) bool; ``PER_SENTENCE``: (cached sentences * heads,
    src_len, head_dim) contiguous and ``padding`` (cached sentences, 1, 1, src_len). In both
    the cached sentences may include finished ones (``live``: which cached sentences the
    search still has, None for all). ``FAIRSEQ_SHARED`` and ``GROUPED``: (sentences * heads,
    src_len, head_dim), as fairseq's strided views or contiguous, ``padding`` (sentences, 1,
    1, 1, src_len), compact, except ``GROUPED`` read by the C++ kernel, which takes ``live``
    as ``PER_SENTENCE`` does. ``padding`` is None when no source has padding.
    """

    def __init__(
        self, keys: Tensor, values: Tensor, padding: Optional[Tensor], beams: int, heads: int, layout: str, reads_live: bool = False
    ) -> None:
        self.keys, self.values, self.padding = keys, values, padding
        self.beams, self.heads, self.layout = beams, heads, layout
        self.beam_shared = layout != PER_BEAM
        # Finished sentences stay cached until ``MIN_LIVE_SHARE`` (a copy of the cache each time
        # a sentence finishes would cost more than their wasted products); ``GROUPED`` where
        # its reader takes the live sentences (``reads_live``: the tiers' C++ kernel).
        self.lazy = layout in (PER_BEAM, PER_SENTENCE) or (layout == GROUPED and reads_live)
        self.live: Optional[Tensor] = None  # (live sentences,) indices of cached sentences
        self._live_rows: Optional[Tensor] = None  # ``PER_BEAM``: (live rows,) indices of cached rows
        self._queries: Optional[Tensor] = None  # the cached rows' queries (``all_queries``, ``queries_by_beam``)

    @property
    def cached_sentences(self) -> int:
        return self.keys.size(0) // (self.heads * (1 if self.beam_shared else self.beams))

    def keep_sentences(self, kept: Tensor) -> None:
        """Only the live sentences ``kept`` (indices among the live ones) stay live."""
        live = kept if self.live is None else self.live[kept]
        if not self.lazy or live.numel() < MIN_LIVE_SHARE * self.cached_sentences:
            self._compact(live)
            return
        self.live = live
        if self.layout == PER_BEAM:
            self._live_rows = (live.unsqueeze(1) * self.beams + torch.arange(self.beams, device=live.device)).view(-1)

    def _compact(self, live: Tensor) -> None:
        sentences = self.cached_sentences

        def select(cache: Tensor) -> Tensor:
            per_sentence = cache.reshape(sentences, -1, *cache.shape[1:])  # a view, or one copy
            return per_sentence.index_select(0, live).view(-1, *cache.shape[1:])

        self.keys, self.values = select(self.keys), select(self.values)
        if self.padding is not None:
            self.padding = select(self.padding)
        self.live = self._live_rows = self._queries = None

    def queries_by_beam(self, queries: Tensor) -> Tensor:
        """``PER_SENTENCE``: the live sentences' queries (live sentences, beams, heads, head_dim)
        as (beams, cached sentences, heads, head_dim), contiguous (the finished sentences' are
        left over from earlier steps)."""
        by_beam = queries.transpose(0, 1)
        if self.live is None:
            return by_beam.contiguous()
        return self.queries_buffer(queries).index_copy_(1, self.live, by_beam)

    def queries_buffer(self, like: Tensor) -> Optional[Tensor]:
        """``PER_SENTENCE`` with finished sentences cached: the cached sentences' queries
        (beams, cached sentences, heads, head_dim), the finished ones' left from earlier steps
        (``queries_by_beam`` writes the live ones); None while every cached sentence is live.
        ``like``: any tensor of the live sentences' queries' shape (live sentences, beams,
        heads, head_dim) and type."""
        if self.live is None:
            return None
        if self._queries is None:
            self._queries = like.new_zeros(self.beams, self.cached_sentences, *like.shape[2:])
        return self._queries

    def live_sentences(self, per_beam: Tensor) -> Tensor:
        """``PER_SENTENCE``: the live sentences of a (beams, cached sentences, ...) result."""
        return per_beam if self.live is None else per_beam.index_select(1, self.live)

    def all_queries(self, queries: Tensor) -> Tensor:
        """The live rows' queries (live rows * heads, 1, head_dim) among the cached rows'
        (the finished rows' are left over from earlier steps)."""
        if self._live_rows is None:
            return queries
        if self._queries is None:
            self._queries = queries.new_zeros(self.keys.size(0), *queries.shape[1:])
        per_row = self._queries.view(-1, self.heads, *queries.shape[1:])
        per_row.index_copy_(0, self._live_rows, queries.view(-1, self.heads, *queries.shape[1:]))
        return self._queries

    def live_part(self, per_item: Tensor) -> Tensor:
        """The live rows of a (cached rows * heads, 1, n) result."""
        if self._live_rows is None:
            return per_item
        per_row = per_item.view(-1, self.heads, *per_item.shape[1:])
        return per_row.index_select(0, self._live_rows).view(-1, *per_item.shape[1:])
