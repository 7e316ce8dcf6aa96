"""``fused``'s linear layers on AMX (``native/split_bf16.cpp``): each float32 product as three
bfloat16 products, within their error bound of the exact product, far inside a plain bfloat16
product's, and what the tier runs wherever this CPU has AMX."""

import pytest
import torch
from torch import nn

from fairseq_fastseq.step import kernels, native
from fairseq_fastseq.step.split_linear import split_bf16_linear

pytestmark = pytest.mark.skipif(native.split_bf16() is None, reason="no AMX (or not permitted) on this CPU")

# x_high.w_high + x_high.w_low + x_low.w_high misses x_low.w_low and the bits past each
# operand's 16th: at most ~3 * 2^-17 of each |x||w| term, plus float32 sums; 2^-14 leaves room.
BOUND = 2.0**-14
SHAPES = [(1, 8, 1), (5, 256, 8008), (16, 32, 32), (17, 33, 47), (40, 300, 100), (160, 256, 768), (3, 1024, 256)]


def _product(rows, inner, outputs, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(rows, inner, generator=generator), torch.randn(outputs, inner, generator=generator)
    return x, weight, torch.randn(outputs, generator=generator) if bias else None


def _error_and_scale(got, x, weight, bias):
    exact = x.double() @ weight.double().t() + (0 if bias is None else bias.double())
    scale = x.double().abs() @ weight.double().abs().t() + (0 if bias is None else bias.double().abs())
    return (got.double() - exact).abs(), scale


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows, inner, outputs", SHAPES, ids=[f"{r}x{i}->{o}" for r, i, o in SHAPES])
def test_three_bfloat16_products_are_within_their_bound_of_the_exact_product(rows, inner, outputs, threads):
    """Padded rows, inner terms and columns (none of 16, 32, 32 multiples) included."""
    split = native.split_bf16()
    x, weight, bias = _product(rows, inner, outputs)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = split.linear(x, split.pack(weight), outputs, bias, False)
    finally:
        torch.set_num_threads(before)
    error, scale = _error_and_scale(got, x, weight, bias)
    assert got.shape == (rows, outputs) and (error <= BOUND * scale).all()


def test_the_low_parts_count():
    """Without them (one bfloat16 product, bfloat16's 8 bits) the error is ~100x larger."""
    split = native.split_bf16()
    x, weight, bias = _product(40, 300, 100)
    got = split.linear(x, split.pack(weight), 100, bias, False)
    error, scale = _error_and_scale(got, x, weight, bias)
    plain = x.bfloat16().double() @ weight.bfloat16().double().t() + bias.double()
    plain_error, _ = _error_and_scale(plain, x, weight, bias)
    assert (error / scale).max() * 50 < (plain_error / scale).max()


def test_relu_no_bias_and_any_layout_of_the_rows():
    split = native.split_bf16()
    x, weight, _ = _product(20, 64, 40, bias=False)
    packed = split.pack(weight)
    plain = split.linear(x, packed, 40)
    assert torch.equal(split.linear(x, packed, 40, None, True), torch.relu(plain))
    columns_apart = x.t().contiguous().t()  # rows 1 apart, columns 20 apart
    assert torch.equal(split.linear(columns_apart, packed, 40), plain)
    assert torch.equal(split.linear(x.view(4, 5, 64), packed, 40), plain.view(4, 5, 40))
    error, scale = _error_and_scale(plain, x, weight, None)
    assert (error <= BOUND * scale).all()


def test_rows_with_infinities_or_nan_are_left_to_float32():
    """A split infinity's parts make inf - inf and inf * 0 (NaN where float32 gives inf): the
    kernel declines such rows (None) and ``fused`` runs ``F.linear`` on them; an infinite
    weight keeps its layer on the float32 kernels."""
    split = native.split_bf16()
    linear, tier = nn.Linear(64, 40), kernels.FusedKernels()
    x = torch.randn(4, 64)
    for value in (float("inf"), float("-inf"), float("nan")):
        bad = x.clone()
        bad[2, 9] = value
        assert split.linear(bad, split.pack(linear.weight.detach()), 40) is None
        with torch.no_grad():
            got, want = tier.linear(linear)(bad), linear(bad)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert split.linear(x, split.pack(linear.weight.detach()), 40) is not None
    with torch.no_grad():
        linear.weight[3, 5] = float("inf")
    assert split_bf16_linear(linear.weight, linear.bias, False, tier.prepared, linear) is None


def test_bad_operands_are_refused_with_the_reason():
    split = native.split_bf16()
    x, weight, _ = _product(4, 64, 40)
    packed = split.pack(weight)
    with pytest.raises(RuntimeError, match="shapes"):
        split.linear(torch.randn(4, 96), packed, 40)
    with pytest.raises(RuntimeError, match="x"):
        split.linear(torch.randn(()), packed, 40)
    with pytest.raises(RuntimeError, match="float32"):
        split.linear(x.double(), packed, 40)
    with pytest.raises(RuntimeError, match="bias"):
        split.linear(x, packed, 40, torch.randn(39))


@pytest.mark.parametrize("activation", ["none", "relu"])
def test_fused_runs_its_linear_layers_there_and_repacks_a_changed_weight(activation):
    torch.manual_seed(0)
    linear, x, tier, split = nn.Linear(64, 96), torch.randn(3, 5, 64), kernels.FusedKernels(), native.split_bf16()
    relu = activation == "relu"

    def project():
        with torch.no_grad():
            layer = tier.feed_forward_in(linear, torch.nn.functional.relu) if relu else tier.linear(linear)
            return layer(x)

    def direct():
        return split.linear(x.reshape(15, 64), split.pack(linear.weight.detach()), 96, linear.bias.detach(), relu).view(3, 5, 96)

    assert torch.equal(project(), direct())
    with torch.no_grad():
        linear.weight.mul_(2)  # a new version: packed again
    assert torch.equal(project(), direct())
