"""fairseq-interactive latency per sentence: stock vs fast, in one process, same threads.

    python -m benchmarks.interactive [--data-bin DIR --path CKPT --spm-model M] [--sentences 32]
                                     [--beam 5] [--threads 1] [--repeats 3]

Each run is a whole ``fairseq_cli.interactive.main`` on the same input file with
``--buffer-size 1`` (one sentence per request, as a live service sees them). fairseq prints
each batch's decoding time on its ``W-`` line; reported is the median of those per-sentence
latencies, stock and fast alternating, and whether the hypotheses are identical. The
defaults use the bundled Spanish-English Bible model on the first test verses.
"""

import argparse
import contextlib
import io
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from fairseq import options
from fairseq_cli import interactive

from fairseq_fastseq.demo import read_lines

from .pipeline import BIBLE, PLUGIN
from .search import cpu_name

VARIANTS = {"stock": [], "fast": [*PLUGIN, "--generator", "fast"]}


def run_variant(common: Sequence[str], extra: Sequence[str]) -> Tuple[List[float], List[str]]:
    """(per-sentence decoding seconds from the W- lines, the H- lines)."""
    parser = options.get_interactive_generation_parser()
    args = options.parse_args_and_arch(parser, input_args=[*common, *extra])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        interactive.main(args)
    lines = printed.getvalue().splitlines()
    latencies = [float(line.split("\t")[1]) for line in lines if line.startswith("W-")]
    return latencies, [line for line in lines if line.startswith("H-")]


def bench(common: Sequence[str], repeats: int) -> Dict:
    latencies: Dict[str, List[float]] = {label: [] for label in VARIANTS}
    hypotheses: Dict[str, List[str]] = {}
    for _ in range(repeats):
        for label, extra in VARIANTS.items():
            seconds, hypotheses[label] = run_variant(common, extra)
            latencies[label].extend(seconds)
    median = {label: statistics.median(values) for label, values in latencies.items()}
    return {
        "latency_ms": {label: 1000 * value for label, value in median.items()},
        "ratio": median["stock"] / median["fast"],
        "identical": hypotheses["stock"] == hypotheses["fast"],
        "sentences": len(hypotheses["stock"]),
    }


def markdown(result: Dict, threads: int, repeats: int, description: str) -> str:
    return "\n".join(
        [
            f"{description}; torch {torch.__version__}, threads {threads} (`torch.get_num_threads()`), "
            f"{cpu_name()}, {result['sentences']} sentences x {repeats} repeats, stock and fast alternating in one process",
            "",
            "| case | stock ms/sentence | fast ms/sentence | fast/stock | identical |",
            "|---|---|---|---|---|",
            f"| interactive, --buffer-size 1 | {result['latency_ms']['stock']:.1f} | {result['latency_ms']['fast']:.1f} "
            f"| {result['ratio']:.2f}x | {'yes' if result['identical'] else 'NO'} |",
        ]
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-bin", default=str(BIBLE))
    parser.add_argument("--path", default=str(BIBLE / "model.pt"))
    parser.add_argument("--spm-model", default=str(BIBLE / "spm.model"))
    parser.add_argument(
        "--input", default=str(BIBLE.parent / "data" / "test.es.gz"), help="raw source sentences, one per line (.gz too)"
    )
    parser.add_argument("--source-lang", default="es")
    parser.add_argument("--target-lang", default="en")
    parser.add_argument("--sentences", type=int, default=32)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.WARNING)
    lines = read_lines(Path(args.input), args.sentences)
    with tempfile.TemporaryDirectory() as workdir:
        input_file = Path(workdir) / "input.txt"
        input_file.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        common = [
            args.data_bin, "--path", args.path, "--input", str(input_file), "--buffer-size", "1",
            *(["--cpu"] if args.device == "cpu" else []),
            "--source-lang", args.source_lang, "--target-lang", args.target_lang, "--beam", str(args.beam),
            "--bpe", "sentencepiece", "--sentencepiece-model", args.spm_model,
        ]  # fmt: skip
        result = bench(common, args.repeats)
    device = f"cuda ({torch.cuda.get_device_name()})" if args.device == "cuda" else "cpu"
    description = f"`{Path(args.path).name}`, beam {args.beam}, sentencepiece, device {device}"
    print(markdown(result, torch.get_num_threads(), args.repeats, description))


if __name__ == "__main__":
    main()
