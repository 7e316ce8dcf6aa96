"""The benchmark code runs and reports consistent figures (no speed is asserted)."""

from benchmarks.search import FAST_VARIANTS, Case, bench_case, markdown


def test_bench_case_reports_every_generator_and_consistent_ratios():
    case = Case("mt-base", batch_size=2, sentences=3, source_tokens=(3, 6), options=dict(beam=2, max_len_a=0, max_len_b=3))
    row = bench_case("tiny", case, repeats=1, models={})
    labels = ["stock", *FAST_VARIANTS]
    assert set(row["sent_s"]) == set(labels) == set(row["ratio"]) == set(row["model_share"])
    for label in labels:  # ratio = stock seconds / variant seconds = variant sent/s / stock sent/s
        assert abs(row["ratio"][label] - row["sent_s"][label] / row["sent_s"]["stock"]) < 1e-9
    assert row["ratio"]["stock"] == 1.0
    assert row["identical"] is True
    assert all(0 < share <= 1 for share in row["model_share"].values())
    table = markdown([row], threads=1, repeats=1)
    assert "| tiny | 2 | 3 |" in table
    assert table.splitlines()[2].count("|") == table.splitlines()[-1].count("|")
