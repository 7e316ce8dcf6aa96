"""The output projection in column blocks (``step/column_blocks.py``): fairseq's ``mm`` bits,
checked per shape before blocks are used, and one call wherever they differ."""

import logging

import pytest
import torch

from fairseq_fastseq.step import column_blocks, native
from fairseq_fastseq.step.column_blocks import COLUMN_ALIGNMENT, BlockedProjection, column_blocks as blocks_of

from .equivalence import assert_fast_matches_stock


@pytest.fixture(autouse=True)
def no_verdicts(monkeypatch):
    """Each test checks its shapes afresh."""
    monkeypatch.setattr(column_blocks, "_SAME_BITS", {})


@pytest.mark.parametrize("vocabulary, dim", [(8008, 256), (32000, 512), (50000, 768), (32000, 1000)])
def test_blocks_cover_the_vocabulary_in_aligned_widths(vocabulary, dim):
    blocks = blocks_of(vocabulary, dim, 4)
    assert blocks[0].start == 0 and blocks[-1].stop == vocabulary
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
    width = blocks[0].stop
    assert width % COLUMN_ALIGNMENT == 0 and width * dim * 4 <= column_blocks.BLOCK_BYTES
    assert all(block.stop - block.start == width for block in blocks[:-1])


def test_a_small_vocabulary_is_one_call():
    assert blocks_of(1000, 512, 4) is None
    weight = torch.randn(1000, 512)
    assert BlockedProjection(weight).blocks is None


@pytest.mark.parametrize("vocabulary, dim", [(8008, 256), (32000, 512)])
def test_blocks_give_the_bits_of_one_call(vocabulary, dim):
    torch.manual_seed(vocabulary)
    weight = torch.randn(vocabulary, dim) * 0.05
    project = BlockedProjection(weight)
    verdicts = []
    for rows in (1, 2, 3, 4, 5, 7, 8, 10, 16, 33, 160):
        features = torch.randn(rows, dim)
        want = torch.mm(features, weight.t())
        first, again = (project(features, torch.empty(rows, vocabulary)) for _ in range(2))
        assert torch.equal(first, want) and torch.equal(again, want)
        verdicts.append(column_blocks._SAME_BITS[(rows, dim, vocabulary, project.blocks[0].stop, torch.get_num_threads())])
    # On the AMD EPYC of BENCHMARKS.md every one of these shapes is blocked; a CPU where none
    # is would get one call everywhere (still fairseq's bits), and lose the speed-up.
    assert any(verdicts)


def test_a_shape_whose_blocks_differ_keeps_one_call_with_one_log_line(monkeypatch, caplog):
    torch.manual_seed(0)
    weight, features = torch.randn(8008, 256), torch.randn(5, 256)
    project = BlockedProjection(weight)
    block = project._block
    calls = []

    def off_by_a_bit(features, out, columns):  # as if this CPU's kernel summed a block in another order
        calls.append(columns.start)
        logits = block(features, out, columns)
        return logits.mul_(1 + 2**-20) if columns.start == 4096 else logits

    monkeypatch.setattr(project, "_block", off_by_a_bit)
    want = torch.mm(features, weight.t())
    with caplog.at_level(logging.INFO, logger=column_blocks.__name__):
        for _ in range(3):
            assert torch.equal(project(features, torch.empty(5, 8008)), want)
    assert calls == [0, 4096, 7168]  # the first, a middle and the last block, checked once; one call from then on
    assert [r.getMessage() for r in caplog.records if "differ from one call" in r.getMessage()] == [
        "output projection: blocks of 1024 columns differ from one call at 5 rows x 256 -> 8008 (1 threads) on this CPU; one call there"
    ]


def test_more_rows_than_the_blocks_help_are_one_call(monkeypatch):
    weight = torch.randn(8008, 256)
    project = BlockedProjection(weight)
    monkeypatch.setattr(project, "in_blocks", lambda features, out: pytest.fail("blocks above MAX_ROWS_PER_THREAD"))
    rows = column_blocks.MAX_ROWS_PER_THREAD * torch.get_num_threads() + 1
    features = torch.randn(rows, 256)
    assert torch.equal(project(features, torch.empty(rows, 8008)), torch.mm(features, weight.t()))


def test_the_row_limit_grows_with_the_threads():
    limit = column_blocks.MAX_ROWS_PER_THREAD
    assert column_blocks.blocks_help(limit, 1) and not column_blocks.blocks_help(limit + 1, 1)
    assert column_blocks.blocks_help(2 * limit, 2) and not column_blocks.blocks_help(2 * limit + 1, 2)


@pytest.mark.parametrize("name", ["transformer", "bart"])
def test_searches_with_blocks_equal_stock(toy_models, monkeypatch, name):
    """Blocks of 16 columns over the toy vocabularies (56 words of 32 dimensions): shapes this
    small go through other MKL kernels, whose blocks can differ from one call (on the AMD EPYC
    of BENCHMARKS.md most did). Each shape is checked; the search is stock's either way. (The
    native kernel of ``exact_gemm.py`` comes first where it runs: off here, for the blocks.)"""
    monkeypatch.setattr(native, "exact_gemm", lambda: None)
    monkeypatch.setattr(column_blocks, "COLUMN_ALIGNMENT", 16)
    monkeypatch.setattr(column_blocks, "BLOCK_BYTES", 16 * 32 * 4)
    assert_fast_matches_stock(toy_models[name], beam=3, max_len_b=20)
    assert column_blocks._SAME_BITS  # the output projection went through the blocks' check
