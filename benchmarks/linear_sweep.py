"""MKL's ``F.linear`` against oneDNN's prepacked linear over a grid of shapes, and whether the
``fused`` tier's rule (``prepacked_is_faster`` in ``fairseq_fastseq/step/kernels.py``) picks
the faster of the two on this CPU.

    python -m benchmarks.linear_sweep [--rows 1 2 5 10 20 160 640] [--threads 1]
                                      [--shapes 512x512 512x1536 1024x256 256x1024 512x8008 512x32000]

The rule was set from such sweeps, one per CPU vendor (an Intel Xeon and an AMD EPYC gave
opposite answers above ~320 rows); run this on a new machine to see whether it still holds.
A shape is ``in_features x out_features``; the input has ``rows`` rows. "Bitwise" says whether
the two kernels gave the same bits (they often do not: the tier rounds differently). Figures:
``BENCHMARKS.md`` ("Kernel tiers").
"""

import argparse
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from fairseq_fastseq.step import kernels

from .kernel_swaps import add_timing_arguments, check_counts, seconds_per_call
from .search import cpu_name
from .tables import markdown_table

DEFAULT_SHAPES = ["512x512", "512x1536", "1024x256", "256x1024", "512x2048", "2048x512", "512x8008", "512x32000"]


def parse_shape(text: str) -> Tuple[int, int]:
    try:
        in_features, out_features = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected IN_FEATURESxOUT_FEATURES, e.g. 512x2048") from None
    if min(in_features, out_features) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r}: both sizes must be at least 1")
    return in_features, out_features


def measure(rows: List[int], shapes: List[Tuple[int, int]], budget: float, repeats: int) -> List[Dict]:
    """One row per (rows, shape): both kernels' time per call, and the rule's choice."""
    results = []
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for in_features, out_features in shapes:
            weight = torch.randn(out_features, in_features, generator=generator)
            bias = torch.randn(out_features, generator=generator)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 160)
            for count in rows:
                x = torch.randn(count, in_features, generator=generator)
                mkl = lambda: F.linear(x, weight, bias)  # noqa: E731
                onednn = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")  # noqa: E731
                mkl_s, onednn_s = seconds_per_call(mkl, budget, repeats), seconds_per_call(onednn, budget, repeats)
                results.append({
                    "rows": count, "in": in_features, "out": out_features,
                    "mkl_ms": mkl_s * 1e3, "onednn_ms": onednn_s * 1e3,
                    "bitwise": torch.equal(mkl(), onednn()),
                    "rule_picks_onednn": kernels.prepacked_is_faster(count, in_features, out_features),
                })  # fmt: skip
    return results


COLUMNS = ("rows x in x out", "F.linear (MKL) ms", "oneDNN prepacked ms", "oneDNN speed-up", "bitwise", "the rule picks", "faster pick")


def markdown(results: List[Dict], title: str) -> str:
    rows = []
    for r in results:
        speedup = r["mkl_ms"] / r["onednn_ms"]
        picked = "oneDNN" if r["rule_picks_onednn"] else "F.linear"
        # within 10% either pick is as good (timings this small vary that much between runs)
        verdict = "yes" if (speedup >= 1) == r["rule_picks_onednn"] or 0.9 <= speedup <= 1.1 else "**no**"
        shape, bitwise = f"{r['rows']} x {r['in']} x {r['out']}", "yes" if r["bitwise"] else "no"
        rows.append((shape, f"{r['mkl_ms']:.4f}", f"{r['onednn_ms']:.4f}", f"{speedup:.2f}x", bitwise, picked, verdict))
    return f"{title}\n\n{markdown_table(COLUMNS, rows)}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 5, 10, 20, 160, 640])
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        help="IN_FEATURESxOUT_FEATURES of each linear layer")  # fmt: skip
    add_timing_arguments(parser, budget=0.05, repeats=5)
    args = parser.parse_args(argv)
    check_counts(parser, args, "--rows", args.rows)
    if not torch.backends.mkldnn.is_available():
        parser.error("this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False): nothing to compare")
    torch.set_num_threads(args.threads)
    results = measure(args.rows, args.shapes, args.budget, args.repeats)
    title = f"F.linear vs oneDNN prepacked, threads {torch.get_num_threads()}, {cpu_name()} (vendor {kernels.CPU_VENDOR or 'unknown'}), torch {torch.__version__}"
    print(markdown(results, title))


if __name__ == "__main__":
    main()
