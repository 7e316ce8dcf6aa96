"""The source positions that hold tokens, for the position-wise work of the tiers that round
differently (``fused``, ``int8``): their encoder layers and encoder keys/values.

A batch of sources is padded to its longest one: in the Bible test set's batches of 32 in
file order about half of the positions are padding. fairseq's encoder runs its linear
layers over every position, and the decoder projects every position to keys and values,
although attention masks the padded ones out (their keys get no weight). CTranslate2 does
the position-wise work on the real positions only; the tiers do too: the linear layers, norms
and residuals take the real rows, and only the attention's products see the padded layout,
with zeros at padded positions. ``exact`` keeps fairseq's shapes (a product's last bit can
depend on its row count). Figures: ``BENCHMARKS.md`` ("the tiers' encoder on
real source positions, histories read where written").
"""

from typing import Callable, Optional

from torch import Tensor


class SourceRows:
    """The time-major rows (``position * sentences + sentence``) of a (sentences, src_len)
    padding mask that hold tokens."""

    def __init__(self, padding: Tensor) -> None:
        sentences, src_len = padding.shape
        self.total = sentences * src_len
        self.real = padding.t().reshape(-1).logical_not().nonzero().squeeze(1)

    @staticmethod
    def of(padding: Optional[Tensor]) -> Optional["SourceRows"]:
        """The rows for ``padding``, or None where no position is padded (nothing to leave out)."""
        return SourceRows(padding) if padding is not None and bool(padding.any()) else None

    def take(self, rows: Tensor) -> Tensor:
        """The real rows of (total, ...) time-major rows."""
        return rows.index_select(0, self.real)

    def spread(self, real_rows: Tensor) -> Tensor:
        """(real, ...) rows back in the padded layout (total, ...), zeros at padded positions."""
        return real_rows.new_zeros(self.total, *real_rows.shape[1:]).index_copy_(0, self.real, real_rows)


def projected(project: Callable[[Tensor], Tensor], time_major: Tensor, source_rows: Optional[SourceRows]) -> Tensor:
    """``project`` of time-major (src_len, sentences, dim) rows, in that order: of the real
    rows only, zeros at padded positions (whose keys attention masks out); of every row,
    fairseq's call, without ``source_rows``."""
    if source_rows is None:
        return project(time_major.contiguous())
    return source_rows.spread(project(source_rows.take(time_major.reshape(-1, time_major.size(2)))))
