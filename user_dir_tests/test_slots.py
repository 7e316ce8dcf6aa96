"""The lean step's rows in slots (``fairseq_fastseq/step/slots.py``): every row finds its own
history in its slot through beam reorders and sentences leaving, copying only the histories
of a parent's second and later children; the encoder caches' blocks follow the moves."""

import pytest
import torch

from fairseq_fastseq.step import native
from fairseq_fastseq.step.caches import SelfAttentionCache
from fairseq_fastseq.step.slots import RowSlots

from .equivalence import random_beam_order


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("beams", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # NumPy has no bfloat16
@pytest.mark.parametrize("copies", ["native", "numpy"])
def test_each_row_reads_its_own_history(seed, beams, dtype, copies, monkeypatch):
    """A cache of one-number keys (a step's value names the row and step) against the
    histories reordered row by row, as fairseq reorders them; the moves' copies by the
    native ``copy_rows`` or, without it, through NumPy."""
    if copies == "numpy":
        monkeypatch.setattr(native, "exact_attention", lambda: None)
    elif native.exact_attention() is None:
        pytest.skip("no AVX-512 or the kernel could not be built here")
    rng = torch.Generator().manual_seed(seed)
    sentences, steps = 7, 12
    cache, slots = SelfAttentionCache(heads=1, head_dim=1, max_steps=steps), RowSlots(beams)
    history = torch.empty(sentences * beams, 0, dtype=dtype)
    for step in range(steps):
        rows = history.size(0)
        new = (torch.arange(rows) + 1000 * step).to(dtype)
        history = torch.cat([history, new.unsqueeze(1)], dim=1)
        keys, _ = cache.append(slots.to_slots(new.unsqueeze(1)), slots.to_slots(new.unsqueeze(1)), None)
        assert torch.equal(slots.to_rows(keys.reshape(rows, -1)), history)
        order, _ = random_beam_order(rng, rows // beams, beams, drop=torch.rand(1, generator=rng).item() < 0.4)
        move = slots.follow(order, cache.rows)
        cache.move(move.sources, move.destinations, move.rows)
        history = history[order]
        blocks = slots.slot_of_row.view(-1, beams) // beams
        assert (blocks == blocks[:, :1]).all()  # a sentence's rows share one block


def test_a_permutation_of_beams_copies_nothing():
    slots = RowSlots(beams=3)
    order = torch.tensor([2, 0, 1, 3, 5, 4])
    move = slots.follow(order, rows_before=6)
    assert move.sources.size == 0 and move.destinations.size == 0
    assert slots.slot_of_row.tolist() == order.tolist()  # each row stays where its parent was
    assert move.kept_blocks.tolist() == [0, 1]


def test_only_the_later_children_of_a_parent_are_copied():
    slots = RowSlots(beams=4)
    # sentence 0: rows 0, 1, 2 continue old row 1, row 3 old row 2; old rows 0 and 3 end
    move = slots.follow(torch.tensor([1, 1, 1, 2]), rows_before=4)
    assert slots.slot_of_row.tolist() == [1, 0, 3, 2]
    assert sorted(zip(move.sources.tolist(), move.destinations.tolist())) == [(1, 0), (1, 3)]


def test_sentences_past_the_end_move_into_the_blocks_that_left():
    slots = RowSlots(beams=2)
    # three sentences; sentence 0 leaves: sentence 2 (slots 4, 5) moves into block 0
    move = slots.follow(torch.tensor([3, 2, 5, 5]), rows_before=6)
    assert move.rows == 4
    assert slots.slot_of_row.tolist() == [3, 2, 0, 1]
    assert move.kept_blocks.tolist() == [2, 1]  # block 0 holds old block 2's sentence now
    assert sorted(zip(move.sources.tolist(), move.destinations.tolist())) == [(5, 0), (5, 1)]


def test_rows_that_grow_are_left_to_a_full_copy():
    slots = RowSlots(beams=3)
    assert slots.follow(torch.tensor([0, 0, 0, 1, 1, 1]), rows_before=2) is None  # step 0 per sentence
    slots.follow(torch.tensor([1, 0, 2]), rows_before=3)
    with pytest.raises(RuntimeError, match="grew"):
        slots.follow(torch.tensor([0, 0, 0, 1, 1, 1]), rows_before=3)


def test_a_parent_in_another_sentence_is_an_error():
    slots = RowSlots(beams=2)
    with pytest.raises(RuntimeError, match="another sentence"):
        slots.follow(torch.tensor([0, 2, 2, 3]), rows_before=4)  # row 1 would continue sentence 1's beam


def test_moves_reuse_one_numpy_view_per_buffer_until_the_buffers_change():
    cache = SelfAttentionCache(heads=1, head_dim=1, max_steps=4)
    cache.append(torch.arange(4.0).view(4, 1), torch.arange(4.0).view(4, 1), None)
    views = cache._bits()
    cache.move(torch.tensor([3]).numpy(), torch.tensor([0]).numpy(), rows=4)
    assert [id(view) for view in cache._bits()] == [id(view) for view in views]  # made once
    assert cache.keys[0, :, 0, 0].tolist() == [3.0, 1.0, 2.0, 3.0]  # moved through them
    cache.append(torch.zeros(4, 1), torch.zeros(4, 1), torch.tensor([False, True, False, False]))  # padding: a third buffer
    assert len(cache._bits()) == 3
    cache.reorder(torch.tensor([1, 0, 3, 2]), None)  # new buffers: new views
    address = lambda view: view.__array_interface__["data"][0]  # noqa: E731
    assert [address(view) for view in cache._bits()[:2]] == [cache.keys.data_ptr(), cache.values.data_ptr()]
    assert not any(address(new) == address(old) for new, old in zip(cache._bits(), views))
