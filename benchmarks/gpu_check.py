"""Correctness checks of the fast generator on a GPU (they also run on CPU: ``--device cpu``).

    python -m benchmarks.gpu_check --out DIR [--device cuda] [--fixtures .gpu_fixtures]
                                   [--parts ngram fixtures fp16]

- ``ngram``: ``block_repeated_ngrams`` on the device equals the naive reference
  (``user_dir_tests/naive.py``) and itself on CPU: random histories with EOS and padding,
  n = 1..4, several sizes.
- ``fixtures``: fast (the default, and the static-shape loop with CUDA graphs) vs stock
  ``SequenceGenerator`` in fp32 on the tiny fixture checkpoints
  (``FIXTURES/<model>/checkpoint_last.pt`` and the data-bin ``FIXTURES/bin``, the layout of
  ``FASTSEQ_TOY_CACHE``), for a few option sets; the references for stock bugs are the
  tests' (a correct n-gram blocker; diverse beams indexed by batch row). PASS: every
  hypothesis has the same tokens and scores (final and per token) within 1e-4. Each row
  also gives the host syncs per batch.
- ``fp16``: the random-weight transformer-base of ``benchmarks.search``, the fast variants of
  ``DTYPE_VARIANTS`` vs stock in fp32, then fp16 and bf16: the share of hypotheses with the same tokens and the largest
  score difference among them. Informational: it documents the fp16 tolerance.

One PASS/FAIL/INFO line per check on stdout; the report is ``DIR/gpu_check.md``. The exit
status is 1 if a check failed.
"""

import argparse
import logging
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import fairseq
import numpy
import torch
from fairseq import utils
from fairseq.dataclass.configs import GenerationConfig

from benchmarks.host_syncs import counting_host_syncs
from benchmarks.search import FAST_VARIANTS, ROUNDING_TOLERANCE, SCORE_TOLERANCE, Case, agreement, build_model, check_device, make_batches
from fairseq_fastseq.config import FastGeneratorConfig
from fairseq_fastseq.choice import accelerate
from fairseq_fastseq.generator import FastSequenceGenerator
from fairseq_fastseq.ngram import block_repeated_ngrams
from user_dir_tests.equivalence import assert_same_hypotheses, generate_all, load
from user_dir_tests.naive import WithoutSampleIds, banned_next_tokens, with_correct_ngram_blocking

NGRAM_SHAPES = [(1, 0), (3, 1), (5, 3), (16, 9), (64, 30), (640, 60)]  # (rows, step)
NGRAM_VOCAB = 12  # few distinct tokens: many repeated n-grams
PAD, EOS = 1, 2
FIXTURE_MODELS = ["transformer", "transformer_prenorm_2heads", "transformer_shared_8heads", "bart"]


@dataclass(frozen=True)
class OptionSet:
    options: Dict
    reference: Optional[Callable] = None  # replaces stock for a stock bug we fix
    seed: Optional[int] = None
    batch_size: int = 24


# max_len_b=60 (targets have at most 40 words) bounds the GPU time of hypotheses that never end.
OPTION_SETS = {
    "beam1": OptionSet(dict(beam=1, max_len_b=60)),
    "beam5_nbest2": OptionSet(dict(beam=5, nbest=2, max_len_b=60)),
    "beam4_ngram2": OptionSet(dict(beam=4, no_repeat_ngram_size=2, max_len_b=60), reference=with_correct_ngram_blocking),
    "sampling_topk5_seed7": OptionSet(dict(beam=3, nbest=3, sampling=True, sampling_topk=5, max_len_b=60), seed=7),
    "diverse_groups2": OptionSet(
        dict(beam=4, diverse_beam_groups=2, diverse_beam_strength=0.5, max_len_b=60), reference=WithoutSampleIds, batch_size=8
    ),
    "lenpen2_minlen6": OptionSet(dict(beam=4, lenpen=2.0, min_len=6, max_len_b=60)),
}
# Part fixtures: the generators compared with stock.
FIXTURE_GENERATORS = {"fast": FAST_VARIANTS["fast"], "graphs": FAST_VARIANTS["graphs"]}
# Part fp16: the variants compared with stock in each dtype (the module path's ablation steps
# and int8, which is fused off the CPU, left out), on a GPU-sized case, or a tiny one on CPU.
DTYPE_VARIANTS = ("fast", "fused", "grouped", "el", "graphs")
FP16_CASES = {
    "cuda": Case("mt-base", 64, 128, (10, 40), dict(beam=5, max_len_a=0, max_len_b=40)),
    "cpu": Case("mt-base", 2, 2, (5, 10), dict(beam=2, max_len_a=0, max_len_b=5)),
}


@dataclass
class Report:
    lines: List[str] = field(default_factory=list)
    failed: List[str] = field(default_factory=list)

    def table(self, title: str, intro: str, columns: List[str]) -> None:
        self.lines += ["", f"## {title}", "", intro, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]

    def check(self, status: str, name: str, detail: str, cells: List) -> None:
        """One result: a line on stdout and a table row (``cells`` then the status)."""
        print(f"{status} {name}: {detail}", flush=True)
        self.lines.append("| " + " | ".join(str(c) for c in [*cells, status]) + " |")
        if status == "FAIL":
            self.failed.append(name)


def check_ngram(report: Report, device: torch.device, args) -> None:
    report.table(
        "a. n-gram blocker vs the naive reference",
        f"`block_repeated_ngrams` on {device.type} vs `naive.banned_next_tokens` and vs itself on CPU; histories "
        f"drawn from {NGRAM_VOCAB} tokens (EOS first, padding among them).",
        ["n", "(rows, step) shapes", "rows equal to naive", "device == CPU", "status"],
    )
    rng = torch.Generator().manual_seed(0)
    for n in range(1, 5):
        equal_rows, total_rows, same_as_cpu = 0, 0, True
        for rows, step in NGRAM_SHAPES:
            tokens = torch.randint(PAD, NGRAM_VOCAB, (rows, step + 2), generator=rng)
            tokens[:, 0] = EOS
            lprobs = torch.randn(rows, NGRAM_VOCAB, generator=rng)
            lprobs[:, PAD] = -float("inf")
            expected = lprobs.clone()
            for row in range(rows):
                for token in banned_next_tokens(tokens[row, : step + 1].tolist(), n):
                    expected[row, token] = -float("inf")
            on_device = block_repeated_ngrams(tokens.to(device), lprobs.clone().to(device), step, n, PAD).cpu()
            on_cpu = block_repeated_ngrams(tokens, lprobs.clone(), step, n, PAD)
            equal_rows += int((on_device == expected).all(dim=1).sum())
            total_rows += rows
            same_as_cpu &= torch.equal(on_device, on_cpu)
        ok = equal_rows == total_rows and same_as_cpu
        report.check(
            "PASS" if ok else "FAIL", f"ngram n={n}", f"{equal_rows}/{total_rows} rows equal to naive, device == CPU: {same_as_cpu}",
            [n, " ".join(map(str, NGRAM_SHAPES)), f"{equal_rows}/{total_rows}", "yes" if same_as_cpu else "NO"],
        )  # fmt: skip


def check_fixtures(report: Report, device: torch.device, args) -> None:
    report.table(
        "b. fast vs stock on the fixture checkpoints, fp32",
        "Test split of the tiny fixture models; `fast` is the default, `graphs` the static-shape loop "
        "(`--fast-cuda-graphs on`: captured in CUDA graphs on a GPU; for a search it does not cover, the "
        "default loop). PASS: same tokens, scores (final and per token) within "
        f"{SCORE_TOLERANCE[device.type]} (`graphs`: {max(SCORE_TOLERANCE[device.type], ROUNDING_TOLERANCE['graphs'])}). "
        "Host syncs per batch: `benchmarks.host_syncs`.",
        ["model", "options", "generator", "sentences", "same tokens / hypotheses", "max abs score diff", "host syncs / batch", "seconds", "status"],
    )
    fixtures = Path(args.fixtures)
    for model_name in FIXTURE_MODELS:
        checkpoint = fixtures / model_name / "checkpoint_last.pt"
        for option_name, option_set in OPTION_SETS.items():
            for label, knobs in FIXTURE_GENERATORS.items():
                _check_fixture(report, device, checkpoint, model_name, option_name, option_set, label, knobs)


def _check_fixture(report: Report, device: torch.device, checkpoint: Path, model_name: str, option_name: str, option_set: OptionSet, label: str, knobs: FastGeneratorConfig) -> None:
    name = f"fixtures {model_name} {option_name} {label}"
    tolerance = max(SCORE_TOLERANCE[device.type], ROUNDING_TOLERANCE.get(label, 0.0))
    try:
        started = time.perf_counter()
        models, task, batches = load((str(checkpoint),), str(checkpoint.parent.parent / "bin"), option_set.batch_size)
        models = [model.to(device) for model in models]
        batches = [utils.apply_to_sample(lambda t: t.to(device), batch) for batch in batches]
        gen_cfg = GenerationConfig(**option_set.options)
        stock = task.build_generator(models, gen_cfg)
        fast = accelerate(task.build_generator(models, gen_cfg), knobs)
        assert isinstance(fast, FastSequenceGenerator), type(fast)
        if option_set.reference is not None:
            stock = option_set.reference(stock)
        with torch.no_grad():
            expected = generate_all(stock, task, models, batches, 0, option_set.seed, None)
            with counting_host_syncs() as syncs:
                actual = generate_all(fast, task, models, batches, 0, option_set.seed, None)
        same, total, worst = agreement(expected, actual)
        seconds = time.perf_counter() - started
    except Exception as error:  # noqa: BLE001  (reported as a failed check)
        traceback.print_exc()
        report.check("FAIL", name, f"{type(error).__name__}: {error}", [model_name, option_name, label, "-", "-", "-", "-", "-"])
        return
    ok = same == total and worst <= tolerance
    detail = f"{same}/{total} same tokens, max |score diff| {worst:.2e}, {syncs.total / len(batches):.1f} host syncs per batch"
    if not ok:
        try:
            assert_same_hypotheses(expected, actual, tolerance)
        except AssertionError as difference:
            detail += f"; first difference: {str(difference)[:400]}"
    report.check(
        "PASS" if ok else "FAIL", name, detail,
        [model_name, option_name, label, len(expected), f"{same}/{total}", f"{worst:.2e}", f"{syncs.total / len(batches):.1f}", f"{seconds:.1f}"],
    )  # fmt: skip


def check_fp16(report: Report, device: torch.device, args) -> None:
    case = FP16_CASES[device.type]
    report.table(
        "c. fast vs stock on transformer-base (random weights), fp32, fp16 and bf16 (informational)",
        f"{case.sentences} sentences, batch {case.batch_size}, "
        + " ".join(f"{k}={v}" for k, v in case.options.items())
        + "; each fast variant vs stock in the same dtype; the score difference is over hypotheses with the same tokens.",
        ["dtype", "variant", "same tokens / hypotheses", "max abs score diff", "status"],
    )
    model, task = build_model(case.model, device=device)
    batches = make_batches(task, case, device=device)
    gen_cfg = GenerationConfig(**case.options)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model.to(dtype)
        generators = {"stock": task.build_generator([model], gen_cfg)}
        for label in DTYPE_VARIANTS:
            generators[label] = accelerate(task.build_generator([model], gen_cfg), FAST_VARIANTS[label])
        with torch.no_grad():
            runs = {label: [s for b in batches for s in g.generate([model], b)] for label, g in generators.items()}
        for label in DTYPE_VARIANTS:
            same, total, worst = agreement(runs["stock"], runs[label])
            dtype_name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
            report.check(
                "INFO", f"{dtype_name} {label}", f"{same}/{total} ({same / total:.1%}) same tokens, max |score diff| {worst:.2e}",
                [dtype_name, label, f"{same}/{total} ({same / total:.1%})", f"{worst:.2e}"],
            )  # fmt: skip


PARTS = {"ngram": check_ngram, "fixtures": check_fixtures, "fp16": check_fp16}


def environment(device: torch.device) -> List[str]:
    lines = [
        "# GPU checks of fairseq_fastseq (`python -m benchmarks.gpu_check`)",
        "",
        f"python {platform.python_version()}, torch {torch.__version__}, fairseq {fairseq.__version__}, "
        f"numpy {numpy.__version__}, device {device.type}",
    ]
    if device.type == "cuda":
        lines.append(
            f"GPU {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, TF32 matmul "
            f"{torch.backends.cuda.matmul.allow_tf32}, cuDNN TF32 {torch.backends.cudnn.allow_tf32}, fp16 reduced-precision "
            f"reduction {torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction}"
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_check.md")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--fixtures", default=".gpu_fixtures", help="the tiny fixture models and data-bin")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    device = torch.device(args.device)
    for name in ("fairseq", "fairseq_fastseq"):  # no per-dataset INFO lines between the results
        logging.getLogger(name).setLevel(logging.WARNING)
    report = Report(environment(device))
    print("\n".join(report.lines[2:]), flush=True)
    for part in args.parts:
        started = time.perf_counter()
        try:
            PARTS[part](report, device, args)
        except Exception as error:  # noqa: BLE001  (one broken part must not hide the others)
            traceback.print_exc()
            report.check("FAIL", f"part {part}", f"{type(error).__name__}: {error}", [f"{type(error).__name__}: {error}"])
        report.lines += ["", f"({part}: {time.perf_counter() - started:.1f} s)"]
    verdict = f"{len(report.failed)} failed: {', '.join(report.failed)}" if report.failed else "all checks passed"
    report.lines += ["", f"**{verdict}**", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text("\n".join(report.lines))
    print(f"{verdict}; report: {out / 'gpu_check.md'}", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
