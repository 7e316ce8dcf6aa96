"""The benchmark suite of ``../shared/docs/benchmark.md`` in one run: every case, stock
fairseq and ours side by side (and CTranslate2 where installed), one table and one chart.

    python -m benchmarks [--quick] [--threads 1] [--repeats 3] [--device {cpu,cuda}]
                         [--dtype {fp32,fp16}] [--out benchmarks/results] [--benchmarks-md BENCHMARKS.md]

Cases (models as in benchmark.md; random-weight models run to their length limit):

- ``mt-greedy``, ``mt-beam5`` on real-mt (the bundled Bible model, test verses in file order,
  fairseq-generate's length limit 200) and mt-base (``max_len_b`` 40), batch 1, 32, 128;
- ``sum-beam4-ngram3`` on sum-base, as a ``transformer`` and as a ``bart_base`` checkpoint
  (400-1000-token sources, beam 4, lenpen 2, ``min_len`` 20, ``max_len_b`` 60 instead of
  benchmark.md's 55/140, so that the suite fits in about an hour on 2 cores), batch 8 and 32;
- ``lm`` on lm-base: greedy and beam 4 at batch 1 and 32, top-p sampling at batch 32;
- ``e2e-pipeline``: whole fairseq-generate runs on real-mt (``--max-tokens 4096``,
  sentencepiece + moses + sacrebleu): stock vs ``--task translation_fast --generator fast``;
- ``peers``: real-mt, beam 5, batch 32: stock, fast, CTranslate2 fp32 and int8 (optional).

Each search case alternates stock and fast in one process (``repeats`` times, median), with a
fixed thread count. Reported per engine: sentences/s, target tokens/s (best hypotheses, EOS
included; for lm-base the prompt too), the ratio to stock, the share of hypotheses identical to
stock's, BLEU (real-mt), and the process's peak RSS while the engine ran. ``--quick`` runs a
few small cases once (a few minutes): a smoke run, not figures to quote.

Writes ``<out>/<name>.md``, ``.json`` and ``.png`` (bar chart of the ratios; needs
matplotlib), name ``cpu``/``cuda-fp16``..., with ``-quick`` for a quick run; a full run also
replaces the suite's section of ``--benchmarks-md`` (pass ``--benchmarks-md ''`` to skip).
"""

import argparse
import datetime
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fairseq_fastseq.config import FastGeneratorConfig
from fairseq_fastseq.demo import read_lines

from . import bible, peers, pipeline, search
from .memory import RssPeak
from .search import Case, cpu_name

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- benchmark suite: begin -->", "<!-- benchmark suite: end -->"
STOCK, FAST = "fairseq stock", "fairseq fast"
FAST_ONLY = {"fast": FastGeneratorConfig(on_unsupported="error")}
_PIPELINED = [*pipeline.PLUGIN, "--task", "translation_fast", "--generator", "fast"]
PIPELINE_VARIANTS = {
    "stock": [],
    "fast": _PIPELINED,
    # the kernel tiers that round differently (--fast-kernels), engines of their own
    **{name: [*_PIPELINED, "--fast-kernels", tier] for name, tier in peers.FAST_TIERS.items()},
}
NGRAM_NOT_COMPARED = "n/a: stock's blocker bans nothing here"
BASE_MAX_LEN = 40  # the random-weight base model's length limit (as the mt-base search cases)


@dataclass
class Row:
    case: str
    model: str
    batch: str
    sentences: int
    engine: str
    sent_s: Optional[float] = None
    tokens_s: Optional[float] = None
    ratio: Optional[float] = None  # engine sentences/s over stock's, same case
    identical: str = "-"  # vs stock: share of identical hypotheses, or why not compared
    bleu: Optional[float] = None
    rss: RssPeak = field(default_factory=RssPeak)  # while this engine ran
    note: str = ""


@dataclass(frozen=True)
class Job:
    """One case of the suite: a search case, the end-to-end pipeline, or the peers."""

    name: str
    kind: str  # "search", "e2e" or "peers"
    case: Optional[Case] = None  # search
    sentences: int = 0  # e2e and peers: the first N test verses (0: all of the data-bin)
    batch: int = 32  # peers
    random_base: bool = False  # peers: a random-weight transformer-base-sized checkpoint (peers.py)


MT_BASE = dict(max_len_a=0, max_len_b=40)
SUM = dict(beam=4, lenpen=2.0, min_len=20, max_len_a=0, max_len_b=60, no_repeat_ngram_size=3)
LM = dict(max_len_a=0, max_len_b=168)


def jobs(quick: bool = False) -> List[Job]:
    """The suite's cases; ``quick`` keeps a few, with fewer sentences."""
    if quick:
        return [
            Job("mt-greedy", "search", Case("real-mt", 1, 8, None, dict(beam=1))),
            Job("mt-beam5", "search", Case("real-mt", 32, 32, None, dict(beam=5))),
            Job("mt-beam5", "search", Case("mt-base", 8, 8, (10, 40), dict(beam=5, **MT_BASE))),
            Job("sum-beam4-ngram3", "search", Case("sum-base", 2, 2, (400, 1000), SUM)),
            Job("sum-beam4-ngram3", "search", Case("sum-bart", 2, 2, (400, 1000), SUM)),
            Job("lm-beam4", "search", Case("lm-base", 4, 4, (16, 128), dict(beam=4, **LM))),
            Job("e2e-pipeline", "e2e", sentences=64),
            Job("peers", "peers", sentences=32, batch=32),
        ]
    suite = []
    for beam, name in ((1, "mt-greedy"), (5, "mt-beam5")):
        for batch, sentences in ((1, 32), (32, 256), (128, 512)):
            suite.append(Job(name, "search", Case("real-mt", batch, sentences, None, dict(beam=beam))))
        for batch, sentences in ((1, 24 if beam == 1 else 16), (32, 64), (128, 128)):
            suite.append(Job(name, "search", Case("mt-base", batch, sentences, (10, 40), dict(beam=beam, **MT_BASE))))
    for model in ("sum-base", "sum-bart"):
        for batch in (8, 32):
            suite.append(Job("sum-beam4-ngram3", "search", Case(model, batch, batch, (400, 1000), SUM)))
    lm_cases = [
        ("lm-greedy", 1, 8, dict(beam=1, **LM)),
        ("lm-greedy", 32, 32, dict(beam=1, **LM)),
        ("lm-beam4", 1, 8, dict(beam=4, **LM)),
        ("lm-beam4", 32, 32, dict(beam=4, **LM)),
        ("lm-top-p", 32, 32, dict(beam=1, sampling=True, sampling_topp=0.9, **LM)),
    ]
    suite += [Job(name, "search", Case("lm-base", batch, n, (16, 128), options)) for name, batch, n, options in lm_cases]
    peer_jobs = [Job("peers", "peers", sentences=512, batch=32), Job("peers", "peers", sentences=64, batch=32, random_base=True)]
    return suite + [Job("e2e-pipeline", "e2e"), *peer_jobs]


# --- one job -> rows ----------------------------------------------------------------------------


def _identical(result: Dict) -> str:
    if result["identical"] is None:
        return NGRAM_NOT_COMPARED
    return "100%" if result["identical"] else f"{result['same_tokens']:.1%} (NOT identical)"


def search_rows(job: Job, result: Dict) -> List[Row]:
    """Rows of a ``search.bench_case`` result run with stock and ``fast``."""
    case = job.case
    rows = []
    for label, engine in (("stock", STOCK), ("fast", FAST)):
        rows.append(
            Row(
                job.name, case.model, str(case.batch_size), case.sentences, engine,
                sent_s=result["sent_s"][label], tokens_s=result["tokens_s"][label], ratio=result["ratio"][label],
                identical="reference" if label == "stock" else _identical(result),
                bleu=(result["bleu"] or {}).get(label), rss=result["rss"][label],
                note=result["options"],
            )
        )  # fmt: skip
    return rows


BLEU_IN_SCORE_LINE = re.compile(r"BLEU = ([0-9.]+)")


def e2e_rows(job: Job, result: Dict, sentences: int, batching: str) -> List[Row]:
    """Rows of a ``pipeline.bench`` result with ``PIPELINE_VARIANTS``."""
    rows = []
    for label in PIPELINE_VARIANTS:
        engine = {"stock": STOCK, "fast": FAST}.get(label, label)
        found = BLEU_IN_SCORE_LINE.search(result["score_line"][label])
        same = "reference" if label == "stock" else "100% (byte-identical file)" if result["identical"][label] else "NO"
        if label in peers.FAST_TIERS and not result["identical"][label]:
            same = "file differs (rounds differently)"
        flags = " ".join(PIPELINE_VARIANTS[label][len(pipeline.PLUGIN) :])
        loop = f"generation loop {result['loop_seconds'][label]:.1f} s, {result['loop_ratio'][label]:.2f}x stock's"
        rows.append(
            Row(
                job.name, "real-mt", batching, sentences, engine,
                sent_s=sentences / result["seconds"][label], ratio=result["ratio"][label], identical=same,
                bleu=float(found.group(1)) if found else None, rss=result["rss"][label],
                note="whole fairseq-generate run" + (f" ({flags})" if flags else "") + f"; {loop}",
            )
        )  # fmt: skip
    return rows


def peer_rows(job: Job, rows: Sequence[peers.Row]) -> List[Row]:
    engines = {peers.STOCK: STOCK, peers.FAST: FAST}
    model = "base (random weights)" if job.random_base else "real-mt"
    length = f"; at most {BASE_MAX_LEN} tokens (random weights run to the limit)" if job.random_base else ""
    out = []
    for row in rows:
        identical = "reference" if row.engine == peers.STOCK else "-" if row.differs is None else f"{1 - row.differs:.1%}"
        out.append(
            Row(
                job.name, model, str(job.batch), job.sentences, engines.get(row.engine, row.engine),
                sent_s=row.sent_s, ratio=row.ratio, identical=identical,
                bleu=None if job.random_base else row.bleu, rss=row.rss, note=row.note + length,
            )
        )  # fmt: skip
    return out


class Runner:
    """Runs jobs with shared models and settings."""

    def __init__(self, repeats: int, threads: int, device: str = "cpu", dtype: str = "fp32") -> None:
        self.repeats, self.threads, self.device, self.dtype = repeats, threads, device, dtype
        self.models: Dict = {}

    def __call__(self, job: Job) -> List[Row]:
        if job.kind == "search":
            result = search.bench_case(job.name, job.case, self.repeats, self.models, self.device, self.dtype, FAST_ONLY, count_syncs=False)
            return search_rows(job, result)
        if job.kind == "e2e":
            return self._e2e(job)
        if self.device != "cpu":
            return [Row(job.name, "real-mt", str(job.batch), job.sentences, "-", note="peers run on the CPU only")]
        compared = peers.compare(
            sentences=job.sentences, batch_size=job.batch, threads=self.threads, repeats=self.repeats,
            max_len_b=BASE_MAX_LEN if job.random_base else peers.MAX_LEN_B, random_base=job.random_base,
        )  # fmt: skip
        return peer_rows(job, compared)

    def _e2e(self, job: Job) -> List[Row]:
        with tempfile.TemporaryDirectory() as workdir:
            workdir = Path(workdir)
            data_bin = bible.first_verses_data_bin(job.sentences, workdir / "data") if job.sentences else bible.MODEL_DIR
            sentences = job.sentences or len(read_lines(bible.SOURCES, sys.maxsize))
            args = pipeline.generate_args(
                str(data_bin), str(bible.CHECKPOINT), str(bible.SPM_MODEL),
                device=self.device, fp16=self.dtype == "fp16",
            )  # fmt: skip
            result = pipeline.bench(args, self.repeats, workdir / "out", PIPELINE_VARIANTS)
        return e2e_rows(job, result, sentences, "--max-tokens 4096")


# --- reporting -----------------------------------------------------------------------------------


def _cell(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


COLUMNS = [
    ("case", lambda r: r.case),
    ("model", lambda r: r.model),
    ("batch", lambda r: r.batch),
    ("sentences", lambda r: r.sentences),
    ("engine", lambda r: r.engine),
    ("sentences/s", lambda r: _cell(r.sent_s, ".2f")),
    ("target tokens/s", lambda r: _cell(r.tokens_s, ".0f")),
    ("vs stock", lambda r: "-" if r.ratio is None else f"{r.ratio:.2f}x"),
    ("identical to stock", lambda r: r.identical),
    ("BLEU", lambda r: _cell(r.bleu, ".2f")),
    ("peak RSS MiB (rise in run)", lambda r: "-" if r.rss.mib is None else f"{r.rss.mib:.0f} (+{r.rss.growth_mib:.0f})"),
    ("note", lambda r: r.note),
]


def environment(threads: int, repeats: int, device: str, dtype: str, quick: bool) -> Dict[str, str]:
    import fairseq

    return {
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "mode": "quick" if quick else "full",
        "device": search.device_name(device),
        "dtype": dtype,
        "threads": str(threads),
        "cpu": cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fairseq": fairseq.__version__,
        "ctranslate2": peers.ct2_version(),
        "repeats": str(repeats),
    }


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True)
        return head.stdout.strip() + ("+uncommitted changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(rows: Sequence[Row], env: Dict[str, str], chart: Optional[str] = None) -> str:
    header = ", ".join(f"{key} {value}" for key, value in env.items())
    lines = [
        f"Measured with `python -m benchmarks{' --quick' if env['mode'] == 'quick' else ''}`: {header} "
        "(`torch.get_num_threads()`); stock and fast alternate within each repeat, median reported. "
        "Peak RSS is the whole process's (every model loaded so far) while the engine ran, and how "
        "far it rose above the RSS at the run's start.",
        "",
        "| " + " | ".join(title for title, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(str(cell(row)).replace("|", "/") for _, cell in COLUMNS) + " |" for row in rows]
    if chart:
        lines += ["", f"![speed vs stock]({chart})"]
    return "\n".join(lines)


def _bar_label(row: Row) -> str:
    batch = f"b{row.batch}" if row.batch.isdigit() else row.batch
    engine = "" if row.engine == FAST else f" {row.engine} ({row.identical} as stock)"
    return f"{row.case} {row.model} {batch}{engine}"


def chart(rows: Sequence[Row], path: Path, title: str) -> Optional[Path]:
    """A horizontal bar chart of every non-stock engine's ratio to stock; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed: no chart (pip install matplotlib)")
        return None
    bars = [row for row in rows if row.engine != STOCK and row.ratio is not None]
    labels = [_bar_label(row) for row in bars]
    colors = ["tab:blue" if r.engine == FAST else "tab:gray" for r in bars]
    figure, axes = plt.subplots(figsize=(9, 0.32 * len(bars) + 1.5))
    axes.barh(range(len(bars)), [r.ratio for r in bars], color=colors)
    axes.set_yticks(range(len(bars)), labels, fontsize=8)
    axes.invert_yaxis()
    axes.axvline(1.0, color="black", linewidth=1)
    axes.set_xlabel("speed vs stock fairseq (sentences/s ratio, same run)")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def replace_section(document: Path, section: str) -> None:
    """Put ``section`` between the suite's markers in ``document`` (at the top, after the
    title, the first time)."""
    block = f"{BEGIN}\n{section}\n{END}"
    text = document.read_text(encoding="utf-8") if document.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        title, _, rest = text.partition("\n")
        text = f"{title}\n\n## The whole suite: `python -m benchmarks`\n\n{block}\n{rest}"
    document.write_text(text, encoding="utf-8")


def job_label(job: Job) -> str:
    if job.case:
        return f"{job.name} {job.case.model} b{job.case.batch_size}"
    return f"{job.name} base" if job.random_base else job.name


def merged(previous: Sequence[Row], rerun: Sequence[Row]) -> List[Row]:
    """``previous`` with the rows of every rerun case replaced by the rerun's, in place."""
    key = lambda row: (row.case, row.model, row.batch)  # noqa: E731
    fresh: Dict = {}
    for row in rerun:
        fresh.setdefault(key(row), []).append(row)
    out: List[Row] = []
    for row in previous:
        if key(row) not in fresh:
            out.append(row)
        elif fresh[key(row)]:
            out += fresh.pop(key(row))
            fresh[key(row)] = []
    return out + [row for rows in fresh.values() for row in rows]


def run(selected: Sequence[Job], runner: Callable[[Job], List[Row]]) -> List[Row]:
    """Every job, with a progress bar; a job that fails becomes a row that says so."""
    from tqdm import tqdm

    rows: List[Row] = []
    progress = tqdm(selected, desc="benchmarks", unit="case", file=sys.stderr, dynamic_ncols=True)
    for job in progress:
        label = job_label(job)
        progress.set_postfix_str(label)
        try:
            job_rows = runner(job)
        except Exception as error:  # noqa: BLE001  (one broken case must not lose the others)
            logging.exception("benchmark case %s failed", label)
            job_rows = [Row(job.name, job.case.model if job.case else "real-mt", "-", 0, "-", note=peers.failure("failed", error))]
        rows += job_rows
        fast = [row for row in job_rows if row.engine == FAST and row.ratio is not None]
        if fast:
            progress.write(f"{label}: fast {fast[0].ratio:.2f}x stock, identical {fast[0].identical}", file=sys.stderr)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few small cases, once (a few minutes)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (and CTranslate2's)")
    parser.add_argument("--repeats", type=int, help="default 3, or 1 with --quick")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="fp16 needs --device cuda")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the .md, .json and .png go")
    parser.add_argument(
        "--benchmarks-md", default=str(ROOT / "BENCHMARKS.md"), help="full runs replace the suite's section here ('' to skip)"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="TEXT",
        help="rerun only the cases whose label ('mt-beam5 real-mt b32', 'e2e-pipeline', ...) contains TEXT "
        "(repeatable); their rows replace those of the previous run's <out>/<name>.json",
    )
    args = parser.parse_args(argv)
    search.check_device(parser, args.device, args.dtype)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.WARNING)  # fairseq logs its whole config per model and run
    env = environment(torch.get_num_threads(), repeats, args.device, args.dtype, args.quick)

    selected = [job for job in jobs(args.quick) if not args.only or any(text in job_label(job) for text in args.only)]
    if not selected:
        parser.error(f"--only {args.only}: no case matches; labels: {', '.join(job_label(job) for job in jobs(args.quick))}")
    rows = run(selected, Runner(repeats, torch.get_num_threads(), args.device, args.dtype))

    name = args.device + ("" if args.dtype == "fp32" else f"-{args.dtype}") + ("-quick" if args.quick else "")
    previous = args.out / f"{name}.json"
    if args.only and previous.exists():
        earlier = json.loads(previous.read_text())
        rerun_note = f"{', '.join(repr(text) for text in args.only)} at commit {env['commit']}"
        reruns = [earlier["environment"]["rerun"]] if "rerun" in earlier["environment"] else []
        env = dict(earlier["environment"], rerun="; ".join([*reruns, rerun_note]))  # every rerun, oldest first
        old_rows = [Row(**{**row, "rss": RssPeak(**row["rss"])}) for row in earlier["rows"]]
        rows = merged(old_rows, rows)
    args.out.mkdir(parents=True, exist_ok=True)
    title = f"{env['device']} {env['dtype']}, {env['threads']} thread(s), {env['cpu']}, commit {env['commit']}"
    png = chart(rows, args.out / f"{name}.png", title)
    (args.out / f"{name}.json").write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=1))
    (args.out / f"{name}.md").write_text(markdown(rows, env, png.name if png else None) + "\n", encoding="utf-8")
    if args.benchmarks_md and not args.quick:
        document = Path(args.benchmarks_md)
        link = os.path.relpath(png.resolve(), document.resolve().parent) if png else None
        replace_section(document, markdown(rows, env, link))
    print(markdown(rows, env, png.name if png else None))
    print(f"\nwritten: {args.out / name}.md, .json" + (", .png" if png else " (no chart: matplotlib missing)"))
    return 0
