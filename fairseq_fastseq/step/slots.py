"""Self-attention histories that stay where they were written: the lean step's hypothesis
rows held in slots of the caches.

A beam reorder in fairseq copies every hypothesis's self-attention keys and values to its new
row, each step and layer: on the Bible model's test set at batch 128 that copy was 16% of the
``int8`` tier's search. Yet most hypotheses continue a parent that no other one continues.
Here the first child of a parent takes over the parent's slot as it is, and only the other
children of a parent get a copy of its history, into the slot of a hypothesis that no child
continues, in the same sentence's block of ``beams`` slots (the encoder-attention caches
hold one entry per sentence and block). When sentences leave the batch, the blocks of the
sentences past the new end move into the blocks that left. Beam 5 on the Bible test set:
18-19% of the histories are copied (batches of 32 and 128) instead of all of them
(BENCHMARKS.md, "Self-attention histories in slots").

The layers compute in slot order, a permutation of the rows (every row's values are the same:
each kernel computes a row alone), and the decoder permutes its input tokens into slot order
and its features back into row order before the output projection: the search outside sees
the rows as before.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor


@dataclass
class SlotMove:
    """What the caches do for one reorder: copy the histories in slots ``sources`` to slots
    ``destinations`` (no slot is both) and keep the first ``rows`` slots; the encoder caches'
    block ``k`` continues their old block ``kept_blocks[k]``."""

    sources: np.ndarray
    destinations: np.ndarray
    kept_blocks: Tensor
    rows: int


class RowSlots:
    """Which slot of the CPU caches holds each hypothesis row's history.

    The bookkeeping is a few dozen operations on at most a few hundred integers a step, in
    NumPy (which shares the CPU tensors' memory): about 60 microseconds a step at 160 rows,
    where each torch call would cost several microseconds of dispatch alone."""

    def __init__(self, beams: int) -> None:
        self.beams = beams
        self.slot_of_row: Optional[Tensor] = None  # (rows,); None while it is the identity
        self.row_of_slot: Optional[Tensor] = None
        self._slots: Optional[np.ndarray] = None  # ``slot_of_row``'s memory (``.numpy()`` costs operator calls)

    def to_slots(self, per_row: Tensor) -> Tensor:
        """A per-row tensor (rows, ...) in slot order."""
        return per_row if self.row_of_slot is None else per_row.index_select(0, self.row_of_slot)

    def to_rows(self, per_slot: Tensor) -> Tensor:
        """A per-slot tensor (rows, ...) in row order."""
        return per_slot if self.slot_of_row is None else per_slot.index_select(0, self.slot_of_row)

    def follow(self, order: Tensor, rows_before: int) -> Optional[SlotMove]:
        """Row ``i`` continues old row ``order[i]`` (beams of one sentence, sentences in the
        order they keep): the move that puts every new row's history in a slot. None where the
        rows grow (from one row per sentence to its beams): the caches then copy every row
        into row order, and the slots start again from the identity."""
        rows, beams = order.numel(), self.beams
        if rows > rows_before:
            if self.slot_of_row is not None:
                raise RuntimeError("the lean step's rows grew after beams were reordered in slots")
            return None
        parents = order.numpy() if self._slots is None else self._slots[order.numpy()]
        old_blocks = parents[::beams] // beams
        if (parents.reshape(-1, beams) // beams != old_blocks[:, None]).any():
            # A beam search's parents are beams of the same sentence; a row continuing another
            # sentence's beam would attend to the wrong source, so it stops here.
            raise RuntimeError("a reorder moved a hypothesis to another sentence, which the lean step's slots cannot follow")
        new_blocks, held = _blocks(old_blocks, rows // beams)
        moved = np.repeat(new_blocks != old_blocks, beams)
        row_index = np.arange(rows)
        # The first child (lowest row) of each parent that stays in its block keeps its slot.
        keeps = np.zeros(rows, dtype=bool)
        keeps[np.unique(parents, return_index=True)[1]] = True
        keeps &= ~moved
        slots = np.where(keeps, parents, np.repeat(new_blocks, beams) * beams + row_index % beams)
        # The other children of staying parents: the slots of their block that no child
        # continues, matched block by block (both sorted by block).
        extra = np.flatnonzero(~keeps & ~moved)
        if extra.size > 0:
            continued = np.zeros(rows_before, dtype=bool)
            continued[parents] = True
            free = np.flatnonzero(~continued[:rows] & np.repeat(held, beams))
            slots[extra[np.argsort(parents[extra], kind="stable")]] = free
        copied = np.flatnonzero(slots != parents)
        kept_blocks = np.empty_like(old_blocks)
        kept_blocks[new_blocks] = old_blocks
        row_of_slot = np.empty_like(slots)
        row_of_slot[slots] = row_index
        self._slots, self.slot_of_row, self.row_of_slot = slots, torch.from_numpy(slots), torch.from_numpy(row_of_slot)
        return SlotMove(parents[copied], slots[copied], torch.from_numpy(kept_blocks), rows)


def _blocks(old_blocks: np.ndarray, sentences: int) -> Tuple[np.ndarray, np.ndarray]:
    """Each kept sentence's block: its own where it lies below the new end, else one that no
    staying sentence holds; and which blocks staying sentences hold."""
    stays = old_blocks < sentences
    held = np.zeros(sentences, dtype=bool)
    held[old_blocks[stays]] = True
    new_blocks = old_blocks.copy()
    new_blocks[~stays] = np.flatnonzero(~held)
    return new_blocks, held
