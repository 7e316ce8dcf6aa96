"""``python -m benchmarks`` (benchmarks/suite.py): rows, ratios, files and the BENCHMARKS.md
section, on cut-down cases (no speed is asserted)."""

import json
import logging

import pytest
import torch

from benchmarks import suite
from benchmarks.memory import RssPeak, highest, peak_rss
from benchmarks.search import Case
from benchmarks.suite import FAST, STOCK, Job, Row


def test_every_case_of_benchmark_md_is_in_the_full_suite():
    full = suite.jobs()
    cases = {(job.name, job.case.model, job.case.batch_size) for job in full if job.case}
    for name in ("mt-greedy", "mt-beam5"):
        for model in ("real-mt", "mt-base"):
            assert {(name, model, batch) for batch in (1, 32, 128)} <= cases
    for model in ("sum-base", "sum-bart"):
        assert {("sum-beam4-ngram3", model, 8), ("sum-beam4-ngram3", model, 32)} <= cases
    assert {("lm-greedy", "lm-base", 1), ("lm-beam4", "lm-base", 32), ("lm-top-p", "lm-base", 32)} <= cases
    assert {job.kind for job in full} == {"search", "e2e", "peers"}
    assert len(suite.jobs(quick=True)) < len(full)


def test_search_rows_take_ratios_and_agreement_from_the_result():
    job = Job("mt-beam5", "search", Case("mt-base", 4, 8, (1, 2), dict(beam=5)))
    result = {
        "sent_s": {"stock": 2.0, "fast": 3.0},
        "tokens_s": {"stock": 20.0, "fast": 30.0},
        "ratio": {"stock": 1.0, "fast": 1.5},
        "identical": False,
        "same_tokens": 0.875,
        "bleu": None,
        "rss": {"stock": RssPeak(100.0, 5.0), "fast": RssPeak(90.0, 1.0)},
        "options": "beam=5",
    }
    stock, fast = suite.search_rows(job, result)
    assert (stock.engine, stock.ratio, stock.identical) == (STOCK, 1.0, "reference")
    assert (fast.engine, fast.sent_s, fast.tokens_s, fast.ratio) == (FAST, 3.0, 30.0, 1.5)
    assert fast.identical == "87.5% (NOT identical)"  # a difference is never reported as a pass
    assert fast.rss == RssPeak(90.0, 1.0) and fast.batch == "4" and fast.sentences == 8
    result["identical"] = None  # n-gram blocking: stock bans nothing, so not compared
    assert suite.search_rows(job, result)[1].identical == suite.NGRAM_NOT_COMPARED


def test_e2e_rows_read_bleu_from_each_score_line():
    job = Job("e2e-pipeline", "e2e")
    labels = list(suite.PIPELINE_VARIANTS)  # stock, fast, then the tiers that round differently
    seconds = dict(zip(labels, (10.0, 8.0, 6.0, 5.0)))
    result = {
        "seconds": seconds,
        "ratio": {label: 10.0 / value for label, value in seconds.items()},
        "loop_seconds": {label: value / 2 for label, value in seconds.items()},
        "loop_ratio": {label: 10.0 / value for label, value in seconds.items()},
        "identical": dict(zip(labels, (True, True, False, False))),
        "rss": {label: RssPeak() for label in labels},
        "score_line": dict(zip(labels, ("Generate test with beam=5: BLEU = 36.75 70.1/44.0", "BLEU = 36.75 x", "BLEU = 36.76", "BLEU = 36.5"))),
    }
    stock, fast, fused, int8 = suite.e2e_rows(job, result, 1004, "--max-tokens 4096")
    assert stock.sent_s == pytest.approx(100.4) and fast.sent_s == pytest.approx(125.5)
    assert stock.bleu == fast.bleu == 36.75 and fast.identical.startswith("100%")
    assert fused.bleu == 36.76 and int8.bleu == 36.5 and int8.identical == "file differs (rounds differently)"
    assert "--fast-kernels int8" in int8.note and "generation loop 2.5 s, 2.00x stock's" in int8.note


def test_peak_rss_sees_memory_allocated_inside_the_block():
    import mmap

    with peak_rss() as peak:  # fresh pages (malloc could reuse freed, still resident ones)
        block = mmap.mmap(-1, 64 * 2**20)
        for offset in range(0, len(block), mmap.PAGESIZE):
            block[offset] = 1  # touched: resident
    block.close()
    if peak.mib is None:
        pytest.skip("no resettable RSS high-water mark on this system")
    assert peak.growth_mib >= 60 and peak.mib >= peak.growth_mib
    assert highest([RssPeak(1.0, 0.5), RssPeak(3.0, 0.2)]) == RssPeak(3.0, 0.5)
    assert highest([RssPeak(1.0, 0.5), RssPeak()]) == RssPeak()


def test_replace_section_keeps_the_rest_of_the_document(tmp_path):
    document = tmp_path / "BENCHMARKS.md"
    document.write_text("# Benchmarks\n\nolder tables\n")
    suite.replace_section(document, "first")
    suite.replace_section(document, "second")
    text = document.read_text()
    assert text.count(suite.BEGIN) == 1 and "second" in text and "first" not in text
    assert text.startswith("# Benchmarks\n") and text.endswith("older tables\n")


def test_a_failing_case_becomes_a_row_and_the_others_still_run(caplog):
    def runner(job):
        if job.name == "broken":
            raise RuntimeError("out of disk")
        return [Row(job.name, "m", "1", 1, STOCK, ratio=1.0), Row(job.name, "m", "1", 1, FAST, ratio=2.0)]

    with caplog.at_level(logging.ERROR):
        rows = suite.run([Job("broken", "e2e"), Job("fine", "e2e")], runner)
    assert [(row.case, row.engine) for row in rows] == [("broken", "-"), ("fine", STOCK), ("fine", FAST)]
    assert rows[0].note == "failed: RuntimeError: out of disk"
    assert "benchmark case broken failed" in caplog.text


@pytest.fixture
def small_suite(monkeypatch):
    """Three real cases cut to seconds: real-mt search, the end-to-end pipeline, the peers."""
    small = [
        Job("mt-beam5", "search", Case("real-mt", 2, 3, None, dict(beam=2))),
        Job("e2e-pipeline", "e2e", sentences=4),
        Job("peers", "peers", sentences=3, batch=2),
    ]
    monkeypatch.setattr(suite, "jobs", lambda quick=False: small)
    level, threads = logging.getLogger().level, torch.get_num_threads()
    yield small
    logging.getLogger().setLevel(level)  # main sets these process-wide
    torch.set_num_threads(threads)


def test_suite_writes_table_json_chart_and_benchmarks_section(small_suite, tmp_path, capsys):
    document = tmp_path / "BENCHMARKS.md"
    document.write_text("# Benchmarks\n\nearlier figures\n")
    assert suite.main(["--out", str(tmp_path / "results"), "--benchmarks-md", str(document), "--repeats", "1"]) == 0
    out = capsys.readouterr().out

    data = json.loads((tmp_path / "results" / "cpu.json").read_text())
    assert data["environment"]["threads"] == "1" and data["environment"]["mode"] == "full"
    rows = data["rows"]
    by_case = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["engine"]] = row
    assert set(by_case) == {"mt-beam5", "e2e-pipeline", "peers"}
    for case, engines in by_case.items():
        stock, fast = engines[STOCK], engines[FAST]
        assert stock["ratio"] == 1.0 and stock["identical"] == "reference", case
        assert fast["ratio"] == pytest.approx(fast["sent_s"] / stock["sent_s"]), case
        assert fast["identical"].startswith("100"), case
        assert fast["bleu"] == stock["bleu"] is not None, case
    assert {"CTranslate2 fp32", "CTranslate2 int8"} <= set(by_case["peers"])  # measured, or why not

    png = tmp_path / "results" / "cpu.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "results" / "cpu.md").read_text()
    assert table.count("\n| mt-beam5 | real-mt | 2 | 3 |") == 2 and "![speed vs stock](cpu.png)" in table
    section = document.read_text()
    assert suite.BEGIN in section and "earlier figures" in section
    assert "![speed vs stock](results/cpu.png)" in section
    assert "| e2e-pipeline | real-mt | --max-tokens 4096 | 4 | fairseq fast |" in out


def test_quick_run_leaves_benchmarks_md_alone(small_suite, tmp_path):
    document = tmp_path / "BENCHMARKS.md"
    document.write_text("# Benchmarks\n")
    small_suite[:] = small_suite[:1]
    assert suite.main(["--quick", "--out", str(tmp_path), "--benchmarks-md", str(document)]) == 0
    assert document.read_text() == "# Benchmarks\n"
    assert json.loads((tmp_path / "cpu-quick.json").read_text())["environment"]["repeats"] == "1"


def test_rerun_rows_replace_the_previous_runs_rows_in_place():
    old = [Row("a", "m", "1", 1, STOCK, ratio=1.0), Row("a", "m", "1", 1, FAST, ratio=1.1), Row("b", "m", "1", 1, STOCK)]
    new = [Row("a", "m", "1", 1, STOCK, ratio=1.0), Row("a", "m", "1", 1, FAST, ratio=1.3)]
    out = suite.merged(old, new)
    assert [(row.case, row.engine, row.ratio) for row in out] == [("a", STOCK, 1.0), ("a", FAST, 1.3), ("b", STOCK, None)]


def test_only_reruns_matching_cases_and_merges_them(small_suite, tmp_path):
    small_suite[:] = [small_suite[0], Job("other", "search", Case("real-mt", 1, 2, None, dict(beam=1)))]
    results = tmp_path / "results"
    assert suite.main(["--out", str(results), "--benchmarks-md", "", "--repeats", "1"]) == 0
    first = json.loads((results / "cpu.json").read_text())
    assert suite.main(["--out", str(results), "--benchmarks-md", "", "--repeats", "1", "--only", "real-mt b2"]) == 0
    second = json.loads((results / "cpu.json").read_text())
    assert [(r["case"], r["engine"]) for r in second["rows"]] == [(r["case"], r["engine"]) for r in first["rows"]]
    assert second["rows"][2:] == first["rows"][2:]  # the other case's rows kept from the first run
    assert second["environment"]["rerun"].startswith("'real-mt b2' at commit ")
    assert suite.main(["--out", str(results), "--benchmarks-md", "", "--repeats", "1", "--only", "other"]) == 0
    third = json.loads((results / "cpu.json").read_text())["environment"]["rerun"]
    assert third.startswith(second["environment"]["rerun"] + "; 'other' at commit ")  # the earlier rerun is kept
    with pytest.raises(SystemExit):
        suite.main(["--out", str(results), "--only", "no such case"])
