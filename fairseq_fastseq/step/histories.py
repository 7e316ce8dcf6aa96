"""Self-attention histories read where they were written, for the tiers whose self-attention
is the C++ kernel (``native``): a beam reorder copies no keys or values at all.

Each step writes hypothesis row ``r``'s keys and values into row ``r`` of its time slice and
never moves them. A table says, for every current row and past time slice, which cache row
holds that row's entry: its own for the newest slice, its ancestor's for the older ones. A
beam reorder gathers the table's columns (a few thousand integers shared by all layers)
instead of copying histories of keys and values per layer, as the slots of ``slots.py`` do
for ``exact`` (whose ``bmm`` reads a row's history as one strided matrix); sentences that
leave the batch leave their entries behind, unread. Figures: ``BENCHMARKS.md`` ("the tiers'
encoder on real source positions, histories read where written").
"""

from typing import Optional

import torch
from torch import Tensor


class Histories:
    """Which cache row holds each hypothesis row's entry of each time slice so far, shared by
    the self-attention caches of one decoder (``caches.IndexedSelfAttentionCache``)."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self.length = 0  # time slices so far
        self.rows = 0  # hypothesis rows
        self._table: Optional[Tensor] = None  # (max_steps, columns) int64
        self._identity: Optional[Tensor] = None  # arange(columns)

    def open_step(self, rows: int, device: torch.device) -> None:
        """The next time slice, which each of ``rows`` rows writes at its own row."""
        self._hold(rows, device)
        self._table[self.length, :rows] = self._identity[:rows]
        self.length, self.rows = self.length + 1, rows

    def table(self) -> Tensor:
        """(length, rows): the cache row holding row ``r``'s entry of slice ``t`` (unit stride along rows)."""
        return self._table[: self.length, : self.rows]

    def follow(self, order: Tensor) -> None:
        """Row ``i`` continues old row ``order[i]`` (its history is that row's)."""
        rows = order.numel()
        self._hold(rows, order.device)
        self._table[: self.length, :rows] = self._table[: self.length].index_select(1, order)
        self.rows = rows

    def _hold(self, rows: int, device: torch.device) -> None:
        """Columns for ``rows`` rows (the rows grow once, from one per sentence to its beams)."""
        columns = 0 if self._table is None else self._table.size(1)
        if rows <= columns:
            return
        table = torch.empty(self.max_steps, rows, dtype=torch.long, device=device)
        if self._table is not None:
            table[: self.length, :columns] = self._table[: self.length]
        self._table, self._identity = table, torch.arange(rows, device=device)
