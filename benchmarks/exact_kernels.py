"""``exact``'s own kernels against the calls whose bits they keep, on the decoder step's shapes:
the linear layers (``step/exact_gemm.py``) against MKL's ``addmm``, and the attention products
(``step/exact_attention.py``) against ``bmm`` of one query row per matrix.

    python -m benchmarks.exact_kernels [--rows 5 40 160] [--lengths 7 30 31 100]
                                       [--shapes 256x256 256x1024 1024x256 256x8008]
                                       [--heads 4] [--threads 1]

Time per call of each, the speed-up, the kernel's order found for the shape (linear layers:
MKL's blocks or sixteen lanes; attention: this CPU's order of ``bmm``'s) and whether the two
gave the same bits on that call (they must: ``exact`` only runs a kernel on shapes where
they do; "none" is a shape where no order does, and ``exact`` runs PyTorch's call there). A linear shape is
``in_features x out_features`` on ``rows`` rows; attention is ``rows x heads`` matrices of
head size 64 against ``length`` keys, time-major as in the step's cache. Needs AVX-512 and a
compiler (``python -m fairseq_fastseq.step.native``). Figures: ``BENCHMARKS.md`` ("exact's
attention products in bmm's order").
"""

import argparse
from typing import Callable, Dict, List, Tuple

import torch

from fairseq_fastseq.step import exact_gemm, native
from fairseq_fastseq.step.exact_attention import CONTEXT, ORDER_NAMES, SCORES, bmm_order
from fairseq_fastseq.step.exact_gemm import NativeLinear, same_bits

from .kernel_swaps import add_timing_arguments, alternating_seconds, check_counts
from .linear_sweep import parse_shape
from .search import cpu_name
from .tables import markdown_table

HEAD_DIM = 64


def _pair(reference: Callable[[], torch.Tensor], ours: Callable[[], torch.Tensor], budget: float, repeats: int, order) -> Dict:
    if order is None:  # no order of the kernel's for this shape
        return {"reference_ms": None, "ours_ms": None, "order": "none", "same_bits": False}
    seconds = alternating_seconds({"reference": reference, "ours": ours}, budget, repeats)
    same = same_bits(reference(), ours())
    return {"reference_ms": seconds["reference"] * 1e3, "ours_ms": seconds["ours"] * 1e3, "order": order, "same_bits": same}


def linear_rows(rows: List[int], shapes: List[Tuple[int, int]], budget: float, repeats: int) -> List[Dict]:
    kernels, generator, results = native.exact_gemm(), torch.Generator().manual_seed(0), []
    for in_features, out_features in shapes:
        weight, bias = torch.randn(out_features, in_features, generator=generator), torch.randn(out_features, generator=generator)
        mkl = lambda x, out=None: torch.addmm(bias, x, weight.t(), out=out)  # noqa: E731
        linear = NativeLinear(kernels, kernels.pack(weight), weight, bias, mkl)
        for count in rows:
            x, out = torch.randn(count, in_features, generator=generator), torch.empty(count, out_features)
            linear(x)  # finds the order that gives MKL's bits at this shape, if any
            order = exact_gemm._SAME_BITS[(count, in_features, out_features, True, torch.get_num_threads())]
            ours = lambda: linear._kernel(x, order, out)  # noqa: E731
            shape, name = f"{count} x {in_features} -> {out_features}", exact_gemm.order_name(order) if order else None
            results.append({"product": "linear (addmm)", "shape": shape, **_pair(lambda: mkl(x), ours, budget, repeats, name)})
    return results


def attention_rows(rows: List[int], lengths: List[int], heads: int, budget: float, repeats: int) -> List[Dict]:
    kernels, generator, results = native.exact_attention(), torch.Generator().manual_seed(0), []
    orders = {kind: bmm_order(kernels, kind) for kind in (SCORES, CONTEXT)}
    named = {kind: ORDER_NAMES[order] if order is not None else None for kind, order in orders.items()}
    for count in rows:
        matrices = count * heads
        for length in lengths:
            keys, values = (torch.randn(length, matrices, HEAD_DIM, generator=generator).transpose(0, 1) for _ in range(2))
            queries = torch.randn(1, matrices, HEAD_DIM, generator=generator).transpose(0, 1)
            probs = torch.softmax(torch.randn(matrices, 1, length, generator=generator), dim=-1)
            scores, context = torch.empty(matrices, 1, length), torch.empty(matrices, 1, HEAD_DIM)
            shape = f"{matrices} x (1 x {HEAD_DIM}) @ ({HEAD_DIM} x {length})"
            scores_bmm = lambda: torch.bmm(queries, keys.transpose(1, 2))  # noqa: E731
            scores_ours = lambda: (kernels.scores_into(queries, keys, scores, orders[SCORES]), scores)[1]  # noqa: E731
            results.append({"product": "scores (bmm)", "shape": shape, **_pair(scores_bmm, scores_ours, budget, repeats, named[SCORES])})
            shape = f"{matrices} x (1 x {length}) @ ({length} x {HEAD_DIM})"
            context_bmm = lambda: torch.bmm(probs, values)  # noqa: E731
            context_ours = lambda: (kernels.context_into(probs, values, context, orders[CONTEXT]), context)[1]  # noqa: E731
            results.append({"product": "context (bmm)", "shape": shape, **_pair(context_bmm, context_ours, budget, repeats, named[CONTEXT])})
    return results


COLUMNS = ("product", "shape", "PyTorch ms", "ours ms", "speed-up", "order", "same bits")


def markdown(results: List[Dict], title: str) -> str:
    def timing(r: Dict) -> Tuple[str, str, str]:
        if r["ours_ms"] is None:
            return "-", "-", "-"
        return f"{r['reference_ms']:.4f}", f"{r['ours_ms']:.4f}", f"{r['reference_ms'] / r['ours_ms']:.2f}x"

    rows = [(r["product"], r["shape"], *timing(r), r["order"], "yes" if r["same_bits"] else "**no**") for r in results]
    return f"{title}\n\n{markdown_table(COLUMNS, rows)}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[5, 40, 160], help="decoder rows (sentences x beams)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[7, 30, 31, 100], help="keys attended (self-attention steps, source tokens)")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=[parse_shape(s) for s in ("256x256", "256x1024", "1024x256", "256x8008")],
                        help="IN_FEATURESxOUT_FEATURES of each linear layer")  # fmt: skip
    parser.add_argument("--heads", type=int, default=4)
    add_timing_arguments(parser, budget=0.05, repeats=5)
    args = parser.parse_args(argv)
    check_counts(parser, args, "--rows, --lengths and --heads", args.rows + args.lengths + [args.heads])
    if native.exact_gemm() is None or native.exact_attention() is None:
        parser.error("exact's native kernels are not available here (they need AVX-512 and a compiler: python -m fairseq_fastseq.step.native)")
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        results = linear_rows(args.rows, args.shapes, args.budget, args.repeats)
        results += attention_rows(args.rows, args.lengths, args.heads, args.budget, args.repeats)
    print(markdown(results, f"exact's kernels against MKL / bmm, threads {torch.get_num_threads()}, {cpu_name()}, torch {torch.__version__}"))


if __name__ == "__main__":
    main()
