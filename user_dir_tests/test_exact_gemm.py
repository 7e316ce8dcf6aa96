"""``exact``'s linear layers through the native kernel (``step/exact_gemm.py``): MKL's bits on
every shape, through the kernel only where the check found them equal."""

import logging
import os
import time

import pytest
import torch
import torch.nn.functional as F

from fairseq_fastseq.step import exact_gemm, kernels, native
from fairseq_fastseq.step.cpu import CPU_VENDOR
from fairseq_fastseq.step.exact_gemm import NativeLinear, mkl_blocks, native_linear, same_bits

pytestmark = pytest.mark.skipif(native.exact_gemm() is None, reason="no AVX-512 or the kernel could not be built here")


def mkl(weight, bias):
    return kernels.exact_linear(weight, bias)


def linear_of(weight, bias, fallback=None):
    packed = native.exact_gemm().pack(weight)
    return NativeLinear(native.exact_gemm(), packed, weight, bias, fallback or mkl(weight, bias))


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    """Fresh checks; the kernel wherever it gives MKL's bits (the speed choice has its own test)."""
    monkeypatch.setattr(exact_gemm, "_SAME_BITS", {})
    monkeypatch.setattr(exact_gemm, "_MKL_FASTER_FROM", {})
    monkeypatch.setattr(NativeLinear, "mkl_faster_from", lambda self, order: float("inf"))


@pytest.mark.parametrize("inner", [256, 512, 1024])
def test_mkl_blocks_are_found_on_this_cpu(inner):
    """The decoder's inner dimensions (model and feed-forward widths) have a block order here:
    without it the kernel never runs."""
    assert mkl_blocks(inner, torch.get_num_threads())


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 32, 160])
@pytest.mark.parametrize("inner, outputs, bias", [(256, 768, True), (1024, 256, True), (256, 8008, False), (512, 40, True)])
def test_every_call_has_mkls_bits_and_the_kernel_runs_where_checked(rows, inner, outputs, bias):
    torch.manual_seed(rows)
    weight, x = torch.randn(outputs, inner) * 0.05, torch.randn(rows, inner)
    b = torch.randn(outputs) if bias else None
    linear, want = linear_of(weight, b), F.linear(x, weight, b)
    for _ in range(2):  # the check's call, then the kernel's (or MKL's where it differs)
        assert same_bits(linear(x), want)
    if rows >= 5:  # MKL's own paths at these rows are the kernel's on the AVX-512 CPUs measured
        assert exact_gemm._SAME_BITS[(rows, inner, outputs, bias, torch.get_num_threads())] is not None


def test_a_shape_where_the_bits_differ_stays_on_the_fallback():
    """A fallback that rounds otherwise (here: one ulp up) stands for an MKL path the kernel
    does not reproduce: after the check, every call at that shape is the fallback's."""
    torch.manual_seed(0)
    weight, bias, x = torch.randn(64, 256), torch.randn(64), torch.randn(16, 256)
    calls = []

    def other(x, out=None):
        calls.append(x.size(0))
        return torch.nextafter(F.linear(x, weight, bias), torch.tensor(float("inf")))

    linear, want = linear_of(weight, bias, other), other(x)
    assert same_bits(linear(x), want)  # the check
    assert exact_gemm._SAME_BITS[(16, 256, 64, True, torch.get_num_threads())] is None
    calls.clear()
    for _ in range(3):
        assert same_bits(linear(x), want)
    assert calls == [16, 16, 16]


def test_a_check_compares_enough_outputs_to_tell_orders_apart(monkeypatch):
    """One row onto 8 outputs is 8 numbers: two summation orders can agree on them by chance
    (the fuzzer found such a call). The check adds random operands of the same shape, here
    (16 rows x 32 outputs, a shape where the kernel gives MKL's bits) 8 draws."""
    torch.manual_seed(4)
    weight, x = torch.randn(32, 64), torch.randn(16, 64)
    probes = []
    original = exact_gemm.NativeLinear._kernel

    def counting(self, x, *order_and_out):
        probes.append(x.size(0))
        return original(self, x, *order_and_out)

    monkeypatch.setattr(exact_gemm.NativeLinear, "_kernel", counting)
    linear_of(weight, None)(x)
    assert len(probes) == 1 + (exact_gemm.CHECKED_ELEMENTS - 16 * 32) // (16 * 32)
    assert exact_gemm.order_name(exact_gemm._SAME_BITS[(16, 64, 32, False, torch.get_num_threads())]) == "blocks"


def test_out_rows_at_a_stride_are_written_in_place():
    """The self-attention keys/values are written into a slice of the cache's rows."""
    torch.manual_seed(1)
    weight, bias, x = torch.randn(48, 256), torch.randn(48), torch.randn(10, 256)
    cache = torch.zeros(10, 100)
    linear = linear_of(weight, bias)
    for _ in range(2):
        got = linear(x, out=cache[:, 20:68])
        assert got.data_ptr() == cache[:, 20:68].data_ptr()
        assert same_bits(cache[:, 20:68], F.linear(x, weight, bias))
    assert cache[:, :20].eq(0).all() and cache[:, 68:].eq(0).all()


def test_kernels_repack_a_weight_changed_in_place():
    torch.manual_seed(2)
    module, x = torch.nn.Linear(256, 64), torch.randn(8, 256)
    tier = kernels.ExactKernels()
    before = tier.linear(module)(x)
    with torch.no_grad():
        module.weight.mul_(2)
    after = tier.linear(module)(x)
    assert same_bits(before, F.linear(x, module.weight / 2, module.bias))
    assert same_bits(after, F.linear(x, module.weight, module.bias))


def test_the_output_projection_writes_the_buffer_with_one_mms_bits():
    torch.manual_seed(3)
    weight, features = torch.randn(8008, 256) * 0.05, torch.randn(40, 256)
    project = kernels.ExactKernels().buffered_output_projection(weight)
    buffer = torch.empty(40, 8008)
    for _ in range(2):
        assert project(features, buffer) is buffer
        assert same_bits(buffer, torch.mm(features, weight.t()))


def test_without_the_kernel_exact_is_mkl_itself(monkeypatch):
    monkeypatch.setattr(native, "exact_gemm", lambda: None)
    weight, fallback = torch.randn(8, 16), mkl(torch.randn(8, 16), None)
    assert native_linear(weight, None, fallback, packed=lambda: pytest.fail("nothing to pack")) is fallback


def test_no_block_order_found_means_mkl_and_a_log_line(monkeypatch, caplog):
    monkeypatch.setattr(exact_gemm, "candidate_blocks", lambda inner: [(0, 100, inner)])
    with caplog.at_level(logging.INFO, logger="fairseq_fastseq.step.exact_gemm"):
        assert mkl_blocks.__wrapped__(256, 1) == ()
    assert "no block order of 256 inner terms gives MKL's bits on this CPU; MKL there" in caplog.text


def test_a_failed_build_says_what_exact_runs_instead(failing_build, caplog):
    with caplog.at_level(logging.WARNING, logger="fairseq_fastseq.step.native"):
        assert native.exact_gemm() is None
    assert "native exact linear kernel is unavailable (RuntimeError: Error building extension" in caplog.text
    assert "exact runs MKL's addmm instead (slower, the same bits)" in caplog.text


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core")
def test_native_kernels_split_their_work_over_torchs_threads():
    """at::parallel_for in an extension built without OpenMP runs on one thread, silently."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert native.exact_gemm().threads_used(64) == 2
    finally:
        torch.set_num_threads(before)


def test_a_split_sums_the_second_chain_from_zero_and_adds_it_last():
    """``split``: the blocks from there on are a chain of their own (MKL's halves of the inner
    dimension on two threads), the same bits as each half's product added at the end."""
    torch.manual_seed(5)
    kernels = native.exact_gemm()
    weight, bias, x = torch.randn(40, 512), torch.randn(40), torch.randn(9, 512)
    halves = []
    for part, part_bias in ((slice(0, 256), bias), (slice(256, 512), None)):
        out = torch.empty(9, 40)
        kernels.linear_into(x[:, part].contiguous(), kernels.pack(weight[:, part].contiguous()), part_bias, [0, 128, 256], 0, out)
        halves.append(out)
    got = torch.empty(9, 40)
    kernels.linear_into(x, kernels.pack(weight), bias, [0, 128, 256, 384, 512], 2, got)
    assert same_bits(got, halves[0] + halves[1])
    assert not same_bits(got, F.linear(x, weight, bias))  # one chain rounds otherwise


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core")
@pytest.mark.skipif(CPU_VENDOR != "GenuineIntel", reason="MKL's two-thread orders were read off an Intel Xeon")
@pytest.mark.parametrize("rows", [160, 600])
def test_at_two_threads_the_feed_forward_output_runs_the_kernel(rows):
    """On two threads MKL splits 1024 inner terms into two halves at 160 rows, not at 600 (on
    the Intel Xeon measured): with one of the two orders the layer stayed on MKL there."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(6)
        weight, bias, x = torch.randn(256, 1024) * 0.05, torch.randn(256), torch.randn(rows, 1024)
        linear = linear_of(weight, bias)
        for _ in range(2):
            assert same_bits(linear(x), F.linear(x, weight, bias))
        assert exact_gemm._SAME_BITS[(rows, 1024, 256, True, 2)] is not None
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("wrong_row", [0, 100, 199])
def test_a_check_of_many_rows_compares_a_sample_that_holds_the_edges_and_the_middle(monkeypatch, wrong_row):
    """A reference that differs from the kernel in one row only (the first, the middle one
    where a second thread's rows start, the last) keeps the shape on the fallback; the
    kernel itself ran on the sample's rows only."""
    torch.manual_seed(7)
    weight, bias, x = torch.randn(256, 256) * 0.05, torch.randn(256), torch.randn(200, 256)

    def reference(x, out=None):
        result = F.linear(x, weight, bias)
        if x.size(0) == 200:
            result[wrong_row] = torch.nextafter(result[wrong_row], torch.tensor(float("inf")))
        return out.copy_(result) if out is not None else result

    rows_run = []
    original = exact_gemm.NativeLinear._kernel
    monkeypatch.setattr(exact_gemm.NativeLinear, "_kernel", lambda self, x, *rest: rows_run.append(x.size(0)) or original(self, x, *rest))
    linear = NativeLinear(native.exact_gemm(), native.exact_gemm().pack(weight), weight, bias, reference)
    linear(x)
    assert exact_gemm._SAME_BITS[(200, 256, 256, True, torch.get_num_threads())] is None
    assert rows_run and max(rows_run) == len(exact_gemm.sampled_rows(200, 256)) < 200


def test_the_output_projection_checks_against_one_mm_not_its_column_blocks(monkeypatch):
    """Where the kernel gives one ``mm``'s bits, the column-blocked fallback is never run
    (nor its own check)."""
    from fairseq_fastseq.step import column_blocks

    monkeypatch.setattr(column_blocks.BlockedProjection, "__call__", lambda *args, **kwargs: pytest.fail("the fallback ran"))
    torch.manual_seed(8)
    weight, features = torch.randn(8008, 256) * 0.05, torch.randn(160, 256)
    project, buffer = kernels.ExactKernels().buffered_output_projection(weight), torch.empty(160, 8008)
    for _ in range(2):
        assert same_bits(project(features, buffer), torch.mm(features, weight.t()))


@pytest.mark.parametrize("order", ["blocks", "split", "lanes"])
@pytest.mark.parametrize("then", ["scale", "relu", "residual"])
@pytest.mark.parametrize("rows", [3, 9, 17])
def test_the_epilogue_gives_the_bits_of_atens_pass_after_the_product(order, then, rows):
    """What the native layer step does to a linear layer's output in the kernel's registers
    (``exact_layer.cpp``): times the queries' scaling, ReLU, plus the residual, each the bits of
    ATen's ``mul_``, ``relu_``, ``add_`` over the output after it (a row of NaN, which ReLU
    keeps; a residual row stride of its own; 40 outputs: a partial panel)."""
    torch.manual_seed(rows)
    kernels = native.exact_gemm()
    weight, bias, x = torch.randn(40, 512), torch.randn(40), torch.randn(rows, 512)
    x[0, 0] = float("nan")
    residual = torch.randn(rows, 64)[:, 8:48]
    extra = {"scale": {"scale": 0.125}, "relu": {"relu": True}, "residual": {"residual": residual}}[then]

    def run(**epilogue):
        out = torch.empty(rows, 40)
        if order == "lanes":
            kernels.lanes_into(x, weight, bias, out, **epilogue)
        else:
            bounds, split = ([0, 128, 256, 384, 512], 2) if order == "split" else ([0, 256, 512], 0)
            kernels.linear_into(x, kernels.pack(weight), bias, bounds, split, out, **epilogue)
        return out

    want = run()
    {"scale": lambda: want.mul_(0.125), "relu": want.relu_, "residual": lambda: want.add_(residual)}[then]()
    got = run(**extra)
    assert same_bits(got, want)
    if then == "relu":
        assert got[0].isnan().all() and (got[1:] == 0).any() and (got[1:] > 0).any()


def test_from_the_rows_where_mkl_was_faster_a_shape_stays_on_mkl(monkeypatch):
    """Both give MKL's bits, so only time decides: each layer shape is timed against MKL once
    (64, 128, 256, ... rows, until MKL is faster) and from those rows on MKL runs. Here MKL is
    made 2 ms slower below 256 rows and the kernel 2 ms slower from there on."""
    monkeypatch.undo()
    monkeypatch.setattr(exact_gemm, "_SAME_BITS", {})
    monkeypatch.setattr(exact_gemm, "_MKL_FASTER_FROM", {})
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 64), torch.randn(48)
    mkl_call = mkl(weight, bias)

    def reference(x, out=None):
        time.sleep(0.002 if x.size(0) < 256 else 0.0)
        return mkl_call(x, out=out)

    class SlowFromRow256(NativeLinear):
        def _kernel(self, x, order, out=None):
            time.sleep(0.002 if x.size(0) >= 256 else 0.0)
            return super()._kernel(x, order, out)

    kernels = native.exact_gemm()
    linear = SlowFromRow256(kernels, kernels.pack(weight), weight, bias, mkl_call, reference)
    threads = torch.get_num_threads()
    for rows in (100, 300):
        x = torch.randn(rows, 64)
        assert same_bits(linear(x), mkl_call(x))
    assert exact_gemm._MKL_FASTER_FROM == {(64, 48, True, threads): 256}
    assert exact_gemm._SAME_BITS[(100, 64, 48, True, threads)] is not None  # the kernel
    assert exact_gemm._SAME_BITS[(300, 64, 48, True, threads)] is None  # MKL
