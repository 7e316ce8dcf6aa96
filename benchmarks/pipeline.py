"""End-to-end fairseq-generate: stock vs the pipelined task, in one process, same threads.

    python -m benchmarks.pipeline [--data-bin DIR --path CKPT --spm-model M] [--threads 1]
                                  [--repeats 3] [--beam 5] [--max-tokens 4096] [--device cuda [--fp16]]

Each variant is a whole ``fairseq_cli.generate.main`` run (model loading, data loading,
decoding, sentencepiece decoding, moses detokenization, sacrebleu scoring, writing
``--results-path``), timed wall-clock; variants alternate within each repeat. The defaults
use the bundled Spanish-English Bible model (``examples/bible/model``, a data-bin of its
own) on its 1,004-verse test set, with ``--required-batch-size-multiple 1`` so that stock
fairseq generates every verse too (see the README on its dropped batches). Reported: median seconds per variant, the ratio to stock, whether each output file
is byte-identical to stock's, and the time post-processing takes (measured inside the
inline variant), i.e. what overlapping can hide at most.
"""

import argparse
import filecmp
import gc
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from fairseq import options
from fairseq.tasks.fairseq_task import FairseqTask
from fairseq_cli import generate

import fairseq_fastseq
from fairseq_fastseq import formatting

from .bible import MODEL_DIR as BIBLE
from .memory import RssPeak, highest, peak_rss
from .search import cpu_name
from .tables import markdown_table

PLUGIN = ["--user-dir", str(Path(fairseq_fastseq.__file__).parent)]

# label -> extra fairseq-generate flags
VARIANTS: Dict[str, List[str]] = {
    "stock": [],
    "pipeline (1 process)": [*PLUGIN, "--task", "translation_fast", "--postprocess-workers", "1"],
    "pipeline (1 thread)": [*PLUGIN, "--task", "translation_fast", "--postprocess-backend", "thread"],
    "pipeline, inline": [*PLUGIN, "--task", "translation_fast", "--postprocess-workers", "0"],
    "fast generator": [*PLUGIN, "--generator", "fast"],
    "pipeline + fast generator": [*PLUGIN, "--task", "translation_fast", "--generator", "fast"],
}
INLINE = "pipeline, inline"


def generate_args(
    data_bin: str,
    path: str,
    spm_model: str,
    source_lang: str = "es",
    target_lang: str = "en",
    beam: int = 5,
    max_tokens: int = 4096,
    batch_size: Optional[int] = None,
    device: str = "cpu",
    fp16: bool = False,
) -> List[str]:
    """The fairseq-generate flags every variant shares: sentencepiece + moses + sacrebleu, and
    ``--required-batch-size-multiple 1`` so that stock generates every sentence too."""
    return [
        data_bin, "--path", path, "--no-progress-bar", "--source-lang", source_lang, "--target-lang", target_lang,
        "--beam", str(beam), "--max-tokens", str(max_tokens), "--required-batch-size-multiple", "1",
        "--bpe", "sentencepiece", "--sentencepiece-model", spm_model, "--tokenizer", "moses", "--scoring", "sacrebleu",
        *(["--batch-size", str(batch_size)] if batch_size else []),
        *(["--cpu"] if device == "cpu" else ["--fp16"] if fp16 else []),
    ]  # fmt: skip


def run_variant(common: Sequence[str], extra: Sequence[str], results: Path) -> Tuple[float, float]:
    """Wall seconds of one fairseq-generate run writing ``results/generate-test.txt``, and the
    seconds of its generation loop (inside ``task.inference_step``, which fairseq times as
    "Translated N sentences ... in X s").

    A run leaves its data loader's iterator in a reference cycle; when the garbage collector
    finds it, its ``__del__`` joins the loader's worker process, which took seconds. Left to
    chance, that happened inside the next run's timed loop (found with ``py-spy dump``: a
    run in the middle of ``to_hypotheses``, waiting in ``_shutdown_workers``), so each run's
    garbage is collected here, after its timing."""
    parser = options.get_generation_parser()
    args = options.parse_args_and_arch(parser, input_args=[*common, *extra, "--results-path", str(results)])
    inference_step = FairseqTask.inference_step
    in_loop = [0.0]

    def timed(self, *step_args, **step_kwargs):
        started = time.perf_counter()
        try:
            return inference_step(self, *step_args, **step_kwargs)
        finally:
            in_loop[0] += time.perf_counter() - started

    FairseqTask.inference_step = timed
    try:
        started = time.perf_counter()
        generate.main(args)
        return time.perf_counter() - started, in_loop[0]
    finally:
        FairseqTask.inference_step = inference_step
        gc.collect()  # this run's data loader workers are joined now, not in the next run


def bench(common: Sequence[str], repeats: int, workdir: Path, variants: Optional[Dict[str, List[str]]] = None) -> Dict:
    """Each variant (default: all of ``VARIANTS``; the first is the reference) ``repeats``
    times, alternating; the post-processing time is measured when the inline one runs."""
    variants = VARIANTS if variants is None else variants
    reference = next(iter(variants))
    seconds: Dict[str, List[float]] = {label: [] for label in variants}
    loop_seconds: Dict[str, List[float]] = {label: [] for label in variants}
    peaks: Dict[str, List[RssPeak]] = {label: [] for label in variants}
    formatting_seconds: List[float] = []
    for _ in range(repeats):
        for label, extra in variants.items():
            original = formatting.BatchFormatter.__call__
            spent = [0.0]

            def timed_formatter(self, batch):
                started = time.perf_counter()
                try:
                    return original(self, batch)
                finally:
                    spent[0] += time.perf_counter() - started

            if label == INLINE:  # inline, so the formatter's time is this process's
                formatting.BatchFormatter.__call__ = timed_formatter
            try:
                with peak_rss() as peak:
                    wall, loop = run_variant(common, extra, workdir / label.replace(" ", "_"))
                seconds[label].append(wall)
                loop_seconds[label].append(loop)
                peaks[label].append(peak)
            finally:
                formatting.BatchFormatter.__call__ = original
            print(f"{label}: {seconds[label][-1]:.2f} s", flush=True)  # progress, and a partial result
            if label == INLINE:
                formatting_seconds.append(spent[0])
    results = {label: workdir / label.replace(" ", "_") / "generate-test.txt" for label in variants}
    median = {label: statistics.median(values) for label, values in seconds.items()}
    loop = {label: statistics.median(values) for label, values in loop_seconds.items()}
    return {
        "seconds": median,
        "ratio": {label: median[reference] / value for label, value in median.items()},
        "loop_seconds": loop,
        "loop_ratio": {label: loop[reference] / value for label, value in loop.items()},
        "identical": {label: filecmp.cmp(results[reference], path, shallow=False) for label, path in results.items()},
        "rss": {label: highest(values) for label, values in peaks.items()},
        "postprocess_seconds": statistics.median(formatting_seconds) if formatting_seconds else None,
        "score_line": {label: path.read_text(encoding="utf-8").splitlines()[-1] for label, path in results.items()},
    }


def markdown(result: Dict, threads: int, repeats: int, description: str) -> str:
    share = result["postprocess_seconds"] / result["seconds"]["stock"]
    lines = [
        f"{description}; torch {torch.__version__}, threads {threads} (`torch.get_num_threads()`), "
        f"{cpu_name()}, median of {repeats}, variants alternating in one process",
        "",
        f"Post-processing (string conversion, BPE removal, detokenization, scoring input) measured "
        f"inline: {result['postprocess_seconds']:.2f} s, {share:.1%} of stock's wall time.",
        f"Stock's result: `{result['score_line']['stock']}`",
        "",
    ]
    columns = ("variant", "wall s", "speed-up vs stock", "generation loop s", "loop speed-up", "output file identical to stock")
    rows = [
        (
            label, f"{result['seconds'][label]:.2f}", f"{result['ratio'][label]:.2f}x", f"{result['loop_seconds'][label]:.2f}",
            f"{result['loop_ratio'][label]:.2f}x", "yes" if result["identical"][label] else "NO",
        )  # fmt: skip
        for label in VARIANTS
    ]
    return "\n".join(lines) + "\n" + markdown_table(columns, rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-bin", default=str(BIBLE))
    parser.add_argument("--path", default=str(BIBLE / "model.pt"))
    parser.add_argument("--spm-model", default=str(BIBLE / "spm.model"))
    parser.add_argument("--source-lang", default="es")
    parser.add_argument("--target-lang", default="en")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, help="sentences per batch (default: by --max-tokens)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--fp16", action="store_true", help="with --device cuda")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.WARNING)  # fairseq logs its whole config per run
    common = generate_args(
        args.data_bin, args.path, args.spm_model, args.source_lang, args.target_lang,
        args.beam, args.max_tokens, args.batch_size, args.device, args.fp16,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as workdir:
        result = bench(common, args.repeats, Path(workdir))
    batching = f"batch {args.batch_size}" if args.batch_size else f"--max-tokens {args.max_tokens}"
    device = f"cuda ({torch.cuda.get_device_name()}, {'fp16' if args.fp16 else 'fp32'})" if args.device == "cuda" else "cpu"
    description = (
        f"`{Path(args.path).name}` on `{args.data_bin}`, beam {args.beam}, {batching}, "
        f"sentencepiece + moses + sacrebleu, device {device}"
    )
    print(markdown(result, torch.get_num_threads(), args.repeats, description))


if __name__ == "__main__":
    main()
