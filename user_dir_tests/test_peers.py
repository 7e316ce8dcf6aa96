"""benchmarks/peers.py (CTranslate2 as a peer): table math, and the runs without CTranslate2.

None of these needs ctranslate2: its absence and a failing converter are simulated."""

import logging
import sys
import types

import pytest
import torch

from benchmarks import peers
from benchmarks.peers import CT2_FP32, CT2_INT8, FAST, NOT_INSTALLED, STOCK


def test_differ_share():
    assert peers.differ_share(["a", "b", "c", "d"], ["a", "b", "c", "d"]) == 0.0
    assert peers.differ_share(["a", "b", "c", "d"], ["a", "x", "c", "y"]) == 0.5
    assert peers.differ_share(["a", "b", "c", "d"], ["a", "b", "c"]) == 0.25  # a missing output differs
    assert peers.differ_share([], []) == 0.0


def test_batched_keeps_order_and_last_partial_batch():
    assert peers.batched(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]


def test_summarize_medians_ratios_and_missing_engines():
    times = {STOCK: [2.0, 4.0, 9.0], FAST: [2.0, 3.0, 5.0], CT2_FP32: [1.0, 1.0, 0.5]}
    outputs = {STOCK: ["a", "b", "c", "d"], FAST: ["a", "b", "c", "d"], CT2_FP32: ["a", "b", "x", "d"]}
    rows = peers.summarize(times, outputs, 8, {STOCK: 30.0}, {CT2_INT8: "conversion failed: X"})
    assert [row.engine for row in rows] == [STOCK, FAST, *peers.FAST_TIERS, CT2_FP32, CT2_INT8]
    stock, fast, fused, quantized, ct2, int8 = rows
    assert fused.sent_s is None and quantized.note == "not run"  # an engine that did not run
    assert stock.sent_s == 2.0 and stock.ratio == 1.0 and stock.differs == 0.0 and stock.bleu == 30.0
    assert fast.sent_s == 8 / 3 and fast.ratio == pytest.approx(4 / 3) and fast.differs == 0.0
    assert ct2.sent_s == 8.0 and ct2.ratio == 4.0 and ct2.differs == 0.25 and ct2.bleu is None
    assert int8.sent_s is None and int8.ratio is None and int8.note == "conversion failed: X"

    table = peers.markdown(rows, "header")
    lines = table.splitlines()
    assert lines[0] == "header" and len(lines) == 4 + len(peers.ENGINES)
    assert f"| {STOCK} | 2.00 | 1.00x | 0.0% | 30.00 |  |" in lines
    assert f"| {CT2_FP32} | 8.00 | 4.00x | 25.0% | - |  |" in lines
    assert f"| {CT2_INT8} | - | - | - | - | conversion failed: X |" in lines


def test_failure_note_is_one_table_cell():
    note = peers.failure("conversion failed", ValueError("a | b\nc" + "x" * 400))
    assert note.startswith("conversion failed: ValueError: a / b c") and "|" not in note and "\n" not in note
    assert len(note) <= 300


def test_converter_failure_goes_into_the_rows(monkeypatch, tmp_path):
    class FailingConverter:
        def __init__(self, *args, **kwargs):
            pass

        def convert(self, *args, **kwargs):
            raise NotImplementedError("architecture not supported")

    fake = types.ModuleType("ctranslate2")
    fake.__version__ = "0.0-fake"
    converters = types.ModuleType("ctranslate2.converters")
    converters.FairseqConverter = FailingConverter
    fake.converters = converters
    monkeypatch.setitem(sys.modules, "ctranslate2", fake)
    monkeypatch.setitem(sys.modules, "ctranslate2.converters", converters)
    engines = peers.ct2_engines("model.pt", "data", tmp_path, beam=5, threads=1)
    assert [e.name for e in engines] == [CT2_FP32, CT2_INT8]
    assert all(e.translate is None for e in engines)
    assert all(e.note == "conversion failed: NotImplementedError: architecture not supported" for e in engines)


def test_engine_failing_mid_run_is_reported_not_raised():
    def broken(batch):
        raise RuntimeError("boom")

    good = peers.Engine(STOCK, lambda batch: [[w.upper() for w in s] for s in batch])
    bad = peers.Engine(CT2_FP32, broken)
    peers.run([good, bad], [[["a"], ["b"]], [["c"]]], repeats=2)
    assert len(good.times) == 2 and good.outputs == [["A"], ["B"], ["C"]]
    assert bad.times == [] and bad.note == "failed: RuntimeError: boom"


def test_main_without_ctranslate2_runs_fairseq_and_says_how_to_install(monkeypatch, capsys):
    # An entry of None in sys.modules makes `import ctranslate2` raise ImportError.
    monkeypatch.setitem(sys.modules, "ctranslate2", None)
    monkeypatch.setitem(sys.modules, "ctranslate2.converters", None)
    level, threads = logging.getLogger().level, torch.get_num_threads()
    try:
        peers.main(["--sentences", "3", "--batch-size", "2", "--beam", "2", "--repeats", "1"])
    finally:  # main sets these process-wide
        logging.getLogger().setLevel(level)
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert NOT_INSTALLED == "ctranslate2 is not installed: pip install .[peers]"
    assert NOT_INSTALLED in captured.err
    rows = {line.split(" | ")[0].lstrip("| "): line for line in captured.out.splitlines() if line.startswith("| ")}
    for engine in (CT2_FP32, CT2_INT8):
        assert rows[engine] == f"| {engine} | - | - | - | - | {NOT_INSTALLED} |"
    assert "| 1.00x | 0.0% |" in rows[STOCK]
    assert "| 0.0% |" in rows[FAST] and "same subword tokens as stock: 3/3" in rows[FAST]
    assert "ctranslate2 not installed" in captured.out and "first 3 test verses, batch 2, beam 2" in captured.out


def test_fast_engines_are_built_as_fairseq_generate_builds_them(monkeypatch):
    """The peers time what fairseq-generate runs: fast generators that keep no attention over
    the source (its output prints none, nor does CTranslate2's by default)."""
    from fairseq_fastseq import choice

    built, accelerate = [], choice.accelerate
    monkeypatch.setattr(choice, "accelerate", lambda stock, knobs: built.append(accelerate(stock, knobs)) or built[-1])
    engines = peers.fairseq_engines(str(peers.bible.CHECKPOINT), str(peers.bible.MODEL_DIR), 2, [[["▁Y"], ["▁En"]]])
    assert [engine.name for engine in engines] == [STOCK, FAST, *peers.FAST_TIERS]
    assert len(built) == 3 and not any(generator.need_attention for generator in built)
