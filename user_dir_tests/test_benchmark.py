"""The benchmark and GPU-check code runs and reports consistent figures (no speed is asserted)."""

import pytest
import torch

from benchmarks import gpu_check, search
from benchmarks.search import FAST_VARIANTS, Case, bench_case, markdown


@pytest.fixture(scope="module")
def tiny_row():
    case = Case("mt-base", batch_size=2, sentences=3, source_tokens=(3, 6), options=dict(beam=2, max_len_a=0, max_len_b=3))
    return bench_case("tiny", case, repeats=1, models={}, variants=FAST_VARIANTS)  # the GPU variants too


def test_bench_case_reports_every_generator_and_consistent_ratios(tiny_row):
    row = tiny_row
    labels = ["stock", *FAST_VARIANTS]
    assert set(row["sent_s"]) == set(labels) == set(row["ratio"]) == set(row["model_share"])
    for label in labels:  # ratio = stock seconds / variant seconds = variant sent/s / stock sent/s
        assert abs(row["ratio"][label] - row["sent_s"][label] / row["sent_s"]["stock"]) < 1e-9
    assert row["ratio"]["stock"] == 1.0
    assert row["identical"] is True
    assert all(0 < share <= 1 for share in row["model_share"].values())
    table = markdown([row], threads=1, repeats=1)
    assert "| tiny | 2 | 3 |" in table and "| host syncs graphs |" in table
    assert table.splitlines()[2].count("|") == table.splitlines()[-1].count("|")
    assert set(row["host_syncs"]) == set(labels)
    # 4 steps: the dynamic loop syncs at each, the static-shape loop not within them
    assert row["host_syncs"]["graphs"] < row["host_syncs"]["fast"]


def test_host_syncs_are_counted_only_when_asked(monkeypatch):
    """The suite does not report them, so it does not pay the extra run of a batch."""
    counted = []
    monkeypatch.setattr(search, "syncs_of_one_batch", lambda *args: counted.append(args) or 0)
    case = Case("mt-base", batch_size=2, sentences=2, source_tokens=(3, 5), options=dict(beam=2, max_len_a=0, max_len_b=3))
    row = bench_case("tiny", case, repeats=1, models={}, variants={"fast": FAST_VARIANTS["fast"]}, count_syncs=False)
    assert row["host_syncs"] is None and not counted


def test_language_model_case_continues_prompts_identically():
    case = Case("lm-base", batch_size=2, sentences=2, source_tokens=(3, 5), options=dict(beam=2, max_len_a=0, max_len_b=8))
    row = bench_case("tiny-lm", case, repeats=1, models={})
    assert row["identical"] is True and set(row["ratio"]) == {"stock", *search.default_variants("cpu")}


def test_fp16_table_gives_the_share_of_identical_hypotheses(tiny_row):
    table = markdown([tiny_row], threads=1, repeats=1, dtype="fp16")
    assert "device cpu, dtype fp16" in table.splitlines()[0]
    assert "| 100.0% (max score diff " in table  # EL-attention (a variant) differs in the last bits


@pytest.fixture
def two_fixture_checks(monkeypatch):
    """gpu_check's fixture part cut to one model and two option sets (seconds on CPU)."""
    monkeypatch.setattr(gpu_check, "FIXTURE_MODELS", ["transformer"])
    monkeypatch.setattr(gpu_check, "NGRAM_SHAPES", gpu_check.NGRAM_SHAPES[:4])  # the naive reference is slow
    monkeypatch.setattr(gpu_check, "OPTION_SETS", {k: gpu_check.OPTION_SETS[k] for k in ("beam5_nbest2", "beam4_ngram2")})


def test_gpu_check_runs_on_cpu(toy_models, tmp_path, capsys, two_fixture_checks):
    fixtures = toy_models["transformer"].data_bin.parent  # <model>/checkpoint_last.pt and bin/
    argv = ["--device", "cpu", "--out", str(tmp_path), "--fixtures", str(fixtures), "--parts", "ngram", "fixtures"]
    status = gpu_check.main(argv)
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.count("\nPASS ") == 4 + 2 * 2 and "FAIL" not in out
    report = (tmp_path / "gpu_check.md").read_text()
    assert "| transformer | beam4_ngram2 | fast | 48 | 192/192 | 0.00e+00 |" in report
    assert "| transformer | beam4_ngram2 | graphs | 48 | 192/192 |" in report
    assert "**all checks passed**" in report


def test_gpu_check_dtype_part_runs_every_variant_in_each_dtype_on_cpu(tmp_path, capsys):
    """Part fp16 (fp32, fp16, bf16) on CPU: the tiny case, the static-shape loop among the
    variants; informational lines only."""
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--parts", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "graphs" in gpu_check.DTYPE_VARIANTS
    for dtype in ("fp32", "fp16", "bf16"):
        assert all(f"INFO {dtype} {label}: " in out for label in gpu_check.DTYPE_VARIANTS), out


def test_gpu_check_fails_on_missing_fixtures(tmp_path, capsys, two_fixture_checks):
    argv = ["--device", "cpu", "--out", str(tmp_path), "--fixtures", str(tmp_path / "missing"), "--parts", "fixtures"]
    assert gpu_check.main(argv) == 1
    assert capsys.readouterr().out.count("FAIL fixtures transformer") == 2 * 2
    assert "**4 failed:" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize(
    "main, argv, message",
    [
        (search.main, ["--device", "cuda"], "--device cuda: CUDA is not available here"),
        (gpu_check.main, ["--device", "cuda", "--out", "unused"], "--device cuda: CUDA is not available here"),
        (search.main, ["--dtype", "fp16"], "--dtype fp16 needs --device cuda"),
    ],
)
def test_cuda_options_are_refused_with_a_clear_message(main, argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_sdpa_comparison_reports_exactness_and_ratio(monkeypatch, capsys):
    from benchmarks import sdpa

    monkeypatch.setattr(sdpa, "SHAPES", [(3, 2, 5, 8)])
    threads = torch.get_num_threads()
    try:
        sdpa.main(["--repeats", "2"])
    finally:
        torch.set_num_threads(threads)
    row = capsys.readouterr().out.splitlines()[-1].split(" | ")
    assert row[:5] == ["| 3", "2", "5", "8", "yes"]  # SDPA equals fairseq's arithmetic bitwise here
    fairseq_ms, sdpa_ms, ratio = float(row[5]), float(row[6]), float(row[7].rstrip(" |").rstrip("x"))
    assert ratio == pytest.approx(fairseq_ms / sdpa_ms, rel=0.1, abs=0.05)  # of the rounded cells


def test_layout_comparison_reports_same_bits_and_ratio(monkeypatch, capsys):
    from benchmarks import layout

    monkeypatch.setattr(layout, "SHAPES", [(2, 3, 2, 7)])
    threads = torch.get_num_threads()
    try:
        layout.main([])
    finally:
        torch.set_num_threads(threads)
    row = capsys.readouterr().out.splitlines()[-1].split(" | ")
    assert row[0] == "| 2 x 3 x 2, 7" and row[4] == "yes |"
    assert float(row[3].rstrip("x")) > 0  # the cells are rounded to 0.01 ms: too coarse to recompute it
    result = layout.compare(2, 3, 2, 7, repeats=3)
    assert result["same"] and result["fairseq_ms"] > 0 and result["contiguous_ms"] > 0


def test_page_fault_table_gives_each_generator_and_the_ratio(monkeypatch, capsys):
    from benchmarks import page_faults

    tiny = Case("mt-base", batch_size=2, sentences=2, source_tokens=(3, 6), options=dict(beam=2, max_len_a=0, max_len_b=3))
    monkeypatch.setattr(page_faults, "CASES", {"tiny": tiny})
    threads = torch.get_num_threads()
    try:
        page_faults.main(["--cases", "tiny", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[-2:]]
    assert [row[1] for row in rows] == ["stock", "fast"]
    (stock_wall, fast_wall), ratio = (float(row[2]) for row in rows), float(rows[1][5].rstrip("x |"))
    assert all(int(row[3]) >= 0 for row in rows)
    assert ratio == pytest.approx(stock_wall / fast_wall, rel=0.1, abs=0.05)


def test_peak_rss_table_runs_each_generator_in_a_fresh_process(monkeypatch, capsys):
    from benchmarks import peak_rss

    monkeypatch.setitem(peak_rss.CASES, "tiny", Case("mt-base", 2, 2, (3, 5), dict(beam=2, max_len_a=0, max_len_b=3)))
    monkeypatch.setattr(peak_rss, "GENERATORS", ["stock", "fast"])  # each child builds a 60M-parameter model
    peak_rss.main(["--cases", "tiny", "--repeats", "1"])
    row = capsys.readouterr().out.splitlines()[-1]
    cells = row.split(" | ")[1:]
    assert row.startswith("| tiny |") and len(cells) == len(peak_rss.GENERATORS)
    assert all(cell.rstrip(" |").endswith(")") for cell in cells)  # "<peak> (+<rise>)" for each


def test_ngram_case_compares_the_rounding_variants_with_fast():
    """Stock bans nothing on the CPU, so grouped/EL/fused are checked against the bitwise fast,
    and int8's agreement with it is shown."""
    case = Case("mt-base", batch_size=2, sentences=2, source_tokens=(3, 5), options=dict(beam=2, max_len_a=0, max_len_b=4, no_repeat_ngram_size=2))
    row = bench_case("tiny-ngram", case, repeats=1, models={})
    assert row["identical"] is None and set(row["same_as_fast"]) == {"grouped", "el", "fused", "int8"}
    rounding = {label: row["same_as_fast"][label] for label in ("grouped", "el", "fused")}
    assert all(same == total == 2 * 2 for same, total, _ in rounding.values())  # 2 sentences x 2 beams
    cell = markdown([row], threads=1, repeats=1).splitlines()[-1]
    assert "grouped: 4/4 same tokens as fast" in cell and "el: 4/4 same tokens as fast" in cell
    assert "int8: " in cell and "/4 same tokens as fast" in cell


def test_a_variant_that_differs_is_named_in_the_table(tiny_row):
    row = dict(tiny_row, identical=False, differing={"el": (5, 6, 2e-5)}, max_score_diff=2e-5)
    cell = markdown([row], threads=1, repeats=1).splitlines()[-1]
    assert "| NO: el 5/6 same tokens; max score diff 2.0e-05" in cell


def test_int8_agreement_is_reported_beside_the_verdict_not_in_it(tiny_row):
    """int8 rounds differently by design: the identical column counts only the exact and
    rounding-only variants and names int8's share after the verdict."""
    row = dict(tiny_row, approximate={"int8": (4, 6, 0.3)})
    cell = markdown([row], threads=1, repeats=1).splitlines()[-1]
    assert "| yes; int8: 4/6 same tokens |" in cell
    assert "int8" not in tiny_row["differing"] and "int8" in tiny_row["approximate"]


def test_real_mt_bleu_scores_each_verse_against_its_own_reference():
    """Batches of the Bible test set carry the verse's line number, so that BLEU pairs each
    hypothesis with its reference (batch-local ids once gave BLEU 0.4 for a 36-BLEU model)."""
    case = Case("real-mt", batch_size=4, sentences=12, source_tokens=None, options=dict(beam=2))
    row = bench_case("tiny-real", case, repeats=1, models={}, variants={"fast": FAST_VARIANTS["fast"]})
    assert row["bleu"]["stock"] > 20


def test_perf_samples_of_generated_gemm_code_count_as_matrix_products():
    """oneDNN's and fbgemm's kernels are JIT code to perf: once filed under "other"."""
    from benchmarks.kernel_profile import OTHER, parse_perf_report

    report = "\n".join(
        [
            "    40.00%  libmkl_avx512.so.2  [.] mkl_blas_avx512_sgemm_kernel_0",
            "    20.00%  [JIT] tid 4242      [.] 0x00007f3a1c0d2000",
            "    10.00%  libtorch_cpu.so     [.] fbgemm::ReQuantizeOutput<true>::f",
            "     5.00%  [unknown]           [.] 0x00007f3a1c0d2100",
            "    25.00%  libpython3.11.so    [.] _PyEval_EvalFrameDefault",
        ]
    )
    shares = parse_perf_report(report)
    matrix = next(name for name in shares if name.startswith("matrix products"))
    assert abs(shares[matrix] - 0.75) < 1e-9 and OTHER not in shares


def test_perf_samples_of_the_native_attention_have_their_own_row():
    """The tiers' C++ attention is no ATen op: without its own category it fell into "other"."""
    from benchmarks.kernel_profile import OTHER, parse_perf_report

    report = "    30.00%  fairseq_fastseq_attention.so  [.] dot_products.arch_x86_64_v4\n    70.00%  libtorch_cpu.so  [.] at::native::add_kernel"
    shares = parse_perf_report(report)
    assert shares["native attention (fused, int8)"] == 0.30 and OTHER not in shares


def test_perf_samples_of_the_beam_top_k_flash_attention_and_amx_linear_have_their_kinds():
    """The beam step's one-pass top-k (``beam_top_k.cpp``) and the encoder's flash attention
    (its online softmax) were filed under "other" and under torch's dispatch, fused's linear
    layers on AMX (``split_bf16.cpp``) under "other"."""
    from benchmarks.kernel_profile import OTHER, parse_perf_report

    report = "\n".join(
        [
            "    20.00%  fairseq_fastseq_split_bf16_3367dd64.so  [.] linear(at::Tensor const&, at::Tensor const&, long, std::optional<at::Tensor> const&, bool)::{lambda(long, long)#1}::operator()",
            "    10.00%  fairseq_fastseq_beam_top_k_3367dd64.so  [.] added_top_k(at::Tensor const&, at::Tensor const&, long)::{lambda(long, long)#1}::operator()",
            "    30.00%  libtorch_cpu.so  [.] at::native::(anonymous namespace)::cpu_flash_attention<float, float, 32l, 512l, false>",
            "    40.00%  libtorch_cpu.so  [.] c10::impl::OperatorEntry::lookup",
        ]
    )
    shares = parse_perf_report(report)
    matrix = next(name for name in shares if name.startswith("matrix products"))
    assert shares["top-k"] == 0.10 and shares["softmax, log-softmax, exp"] == 0.30 and OTHER not in shares
    assert shares[matrix] == 0.20


def test_aten_table_counts_the_kernel_tiers_linear_layers_as_matrix_products():
    """fused's oneDNN and int8's fbgemm linear layers are matrix products too, not "other"."""
    from benchmarks.kernel_profile import aten_table

    profiles = {
        "exact": ({"aten::addmm": 3.0, "aten::mm": 1.0, "aten::topk": 1.0}, 10, 10.0),
        "fused": ({"mkldnn::_linear_pointwise": 2.0, "aten::bmm": 1.0, "aten::topk": 1.0}, 10, 8.0),
        "int8": ({"quantized::linear_dynamic": 1.0, "quantized::linear_relu_dynamic": 0.5, "aten::topk": 1.0}, 10, 5.0),
    }
    matrix_row = next(line for line in aten_table(profiles).splitlines() if line.startswith("| **matrix products"))
    assert matrix_row.split(" | ")[1:] == ["400.000", "40.0%", "300.000", "37.5%", "150.000", "30.0% |"]


def test_kernel_swaps_times_every_swapped_kernel_and_shows_its_difference():
    from benchmarks import bible, kernel_swaps

    rows = kernel_swaps.measure(bible.load()[0], batches=[2], beam=2, source_len=7, budget=1e-4, repeats=1)
    assert len(rows) == 6 and {row["rows"] for row in rows} == {4}
    assert all(row["fused_diff"] < 1e-3 for row in rows)  # fused rounds differently, no more
    assert max(row["int8_diff"] for row in rows) > 1e-3  # int8 really runs int8
    table = kernel_swaps.markdown(rows, "title").splitlines()
    assert len(table) == 4 + 6 and table[2].count("|") == table[-1].count("|")


def test_column_blocks_benchmark_times_both_and_says_where_blocks_are_used(capsys):
    from benchmarks import bible, column_blocks

    weight = bible.load()[0].decoder.output_projection.weight.detach()
    rows = column_blocks.measure(weight, row_counts=[3, 400], budget=1e-4, repeats=1)
    assert [(r["rows"], r["dim"], r["vocabulary"], r["width"]) for r in rows] == [(3, 256, 8008, 1024), (400, 256, 8008, 1024)]
    assert rows[1]["used"] is False  # above MAX_ROWS_PER_THREAD (1 thread): one call, whatever the bits
    assert rows[0]["used"] is rows[0]["same"]
    table = column_blocks.markdown(rows, "title").splitlines()
    assert len(table) == 4 + 2 and table[-1].startswith("| 400 | 256 -> 8008 | 1024 |")
    with pytest.raises(ValueError, match="less than two blocks"):
        column_blocks.measure(weight[:1000], [3], 1e-4, 1)
    with pytest.raises(SystemExit):
        column_blocks.main(["--rows", "0"])


def test_linear_sweep_flags_where_the_rule_picks_the_slower_kernel():
    from benchmarks import linear_sweep

    results = linear_sweep.measure(rows=[1, 3], shapes=[(8, 16)], budget=1e-4, repeats=1)
    assert [(r["rows"], r["in"], r["out"]) for r in results] == [(1, 8, 16), (3, 8, 16)]
    assert all(r["rule_picks_onednn"] is False for r in results)  # tiny products: F.linear on any CPU
    clear_win = dict(results[0], mkl_ms=2.0, onednn_ms=1.0)
    close_call = dict(results[0], mkl_ms=1.05, onednn_ms=1.0)
    rows = linear_sweep.markdown([clear_win, close_call, dict(clear_win, rule_picks_onednn=True)], "title").splitlines()
    assert rows[-3].endswith("| F.linear | **no** |") and rows[-2].endswith("| yes |") and rows[-1].endswith("| oneDNN | yes |")
    with pytest.raises(SystemExit):
        linear_sweep.main(["--shapes", "512"])


def test_exact_kernels_time_each_kernel_beside_the_call_whose_bits_it_keeps():
    from benchmarks import exact_kernels
    from fairseq_fastseq.step import native

    if native.exact_gemm() is None or native.exact_attention() is None:
        pytest.skip("no AVX-512 or the kernels could not be built here")
    results = exact_kernels.linear_rows([5], [(256, 40)], 1e-4, 1) + exact_kernels.attention_rows([2], [3, 9], 4, 1e-4, 1)
    assert [r["product"] for r in results] == ["linear (addmm)"] + ["scores (bmm)", "context (bmm)"] * 2
    assert all(r["same_bits"] for r in results)  # the orders exact relies on, at both of bmm's paths
    orders = {exact_kernels.bmm_order(native.exact_attention(), kind) for kind in ("scores", "context")}
    assert {r["order"] for r in results[1:]} == {exact_kernels.ORDER_NAMES[order] for order in orders}
    table = exact_kernels.markdown([dict(results[0], same_bits=False), dict(results[0], ours_ms=None, order="none", same_bits=False)], "title")
    lines = table.splitlines()
    assert lines[-2].startswith("| linear (addmm) | 5 x 256 -> 40 |") and lines[-2].endswith(f"| {results[0]['order']} | **no** |")
    assert lines[-1] == "| linear (addmm) | 5 x 256 -> 40 | - | - | - | none | **no** |"
    with pytest.raises(SystemExit):
        exact_kernels.main(["--rows", "0"])
