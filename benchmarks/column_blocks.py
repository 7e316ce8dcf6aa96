"""The output projection in column blocks (``fairseq_fastseq/step/column_blocks.py``) against
fairseq's one ``mm``, on a model's own output weight: time per call, speed-up, same bits.

    python -m benchmarks.column_blocks [--model {bible,base}] [--rows 5 40 80 160 320 640]
                                       [--budget 0.2] [--repeats 7] [--threads 1]

Random features of each row count; one call and the blocks alternate in each timing round,
so that a busy machine slows both alike. "Blocks used" says whether the generator would use
them at that row count: the blocks gave one call's bits there and the count is at most
``MAX_ROWS_PER_THREAD`` per thread. Figures: ``BENCHMARKS.md`` ("Output projection in column blocks").
"""

import argparse
import tempfile
from pathlib import Path
from typing import Dict, List

import torch

from fairseq_fastseq.step import column_blocks
from fairseq_fastseq.step.column_blocks import BlockedProjection

from .kernel_swaps import add_timing_arguments, alternating_seconds, check_counts, load_model
from .search import cpu_name
from .tables import markdown_table


def measure(weight: torch.Tensor, row_counts: List[int], budget: float, repeats: int) -> List[Dict]:
    project = BlockedProjection(weight)
    if project.blocks is None:
        raise ValueError(f"a vocabulary of {weight.size(0)} is less than two blocks: one call, nothing to compare")
    vocabulary, dim = weight.shape
    generator = torch.Generator().manual_seed(0)
    results = []
    with torch.no_grad():
        for rows in row_counts:
            features = torch.randn(rows, dim, generator=generator)
            one, blocked = torch.empty(rows, vocabulary), torch.empty(rows, vocabulary)
            torch.mm(features, weight.t(), out=one)
            same = torch.equal(project.in_blocks(features, blocked), one)
            seconds = alternating_seconds(
                {"one": lambda: torch.mm(features, weight.t(), out=one), "blocks": lambda: project.in_blocks(features, blocked)},
                budget, repeats,
            )  # fmt: skip
            results.append(
                {
                    "rows": rows, "dim": dim, "vocabulary": vocabulary, "width": project.blocks[0].stop, "same": same,
                    "used": same and column_blocks.blocks_help(rows, torch.get_num_threads()),
                    "one_ms": seconds["one"] * 1e3, "blocks_ms": seconds["blocks"] * 1e3,
                    "gflops": 2 * rows * dim * vocabulary / seconds["one"] / 1e9,
                }
            )  # fmt: skip
    return results


def markdown(results: List[Dict], title: str) -> str:
    columns = ("rows", "dim -> vocabulary", "block width", "same bits", "blocks used", "one call ms", "one call GFLOP/s", "blocks ms", "speed-up")
    rows = [
        (
            r["rows"], f"{r['dim']} -> {r['vocabulary']}", r["width"], "yes" if r["same"] else "NO", "yes" if r["used"] else "no",
            f"{r['one_ms']:.3f}", f"{r['gflops']:.1f}", f"{r['blocks_ms']:.3f}", f"{r['one_ms'] / r['blocks_ms']:.2f}x",
        )
        for r in results
    ]  # fmt: skip
    return title + "\n\n" + markdown_table(columns, rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["bible", "base"], default="bible")
    parser.add_argument("--rows", type=int, nargs="+", default=[5, 40, 80, 160, 320, 640], help="rows (sentences x beams)")
    add_timing_arguments(parser, budget=0.2, repeats=7)
    args = parser.parse_args(argv)
    check_counts(parser, args, "--rows", args.rows)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        model, described = load_model(args.model, Path(workdir))
        weight = model.decoder.output_projection.weight.detach()
        results = measure(weight, args.rows, args.budget, args.repeats)
    title = f"{described}, threads {torch.get_num_threads()}, {cpu_name()}, torch {torch.__version__}, median of {args.repeats}"
    print(markdown(results, title))


if __name__ == "__main__":
    main()
