"""Where the time goes inside the model step, kernel by kernel: stock fairseq, the fast
generator and CTranslate2 on the same checkpoint, verses, batches and thread.

    python -m benchmarks.kernel_profile [--random-base] [--sentences 64] [--batch-size 32]
                                        [--beam 5] [--max-len-b 200] [--repeats 3]

Two views:

- ``perf`` (Linux ``perf record``, sampling every engine's process with the same clock, only
  while it decodes): the share of samples per kind of kernel (matrix products, copies,
  softmax, top-k, the Python interpreter, ...), turned into milliseconds per decoder step.
  CTranslate2 has no profiler in its wheel, so this is the view that compares all three.
  Without ``perf`` (or where the kernel forbids it) the table says so.
- ``torch.profiler`` for stock, fast and its kernel tiers: self time per operator, per
  decoder step.

Decoder steps are counted as log-softmax calls of the fairseq engine (one per step); the
columns of the other engines (the fast generator's other kernel tiers, CTranslate2) are
divided by the fast generator's count (the same or nearly the same outputs, so nearly the
same steps). Figures: ``BENCHMARKS.md`` ("Kernel-level profile").
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import bible, peers
from .search import cpu_name

ENGINES = (peers.STOCK, peers.FAST, *peers.FAST_TIERS, peers.CT2_FP32, peers.CT2_INT8)
# (category, regular expression on "dso symbol"), first match wins.
CATEGORIES: List[Tuple[str, str]] = [
    ("kernel (page faults, system calls)", r"\[kernel|\[k\]"),
    # The kernel tiers' attention in C++ (fairseq_fastseq/step/native; its softmax is ATen's).
    ("native attention (fused, int8)", r"fairseq_fastseq_attention"),
    # oneDNN's and fbgemm's kernels are generated at run time: perf sees them as JIT code
    # ("[JIT] tid ..." or "[unknown]") or, for fbgemm's packing and requantization, by name.
    # exact's linear layers and attention products in MKL's and bmm's order
    # (fairseq_fastseq_exact_gemm, fairseq_fastseq_exact_attention, and both compiled into
    # fairseq_fastseq_exact_layer, whose own code around them is a few loops), as stock's BLAS calls;
    # fused's linear layers on AMX (fairseq_fastseq_split_bf16: its rows' split into bfloat16 too).
    ("matrix products (BLAS, oneDNN, fbgemm, exact's and fused's kernels; JIT code)", r"sgemm|sgemv|gemm_|_gemm|exact_attention|exact_layer|split_bf16|dnnl|fbgemm|\[JIT\]|\[unknown\]"),
    ("copies (memmove, copy/index/gather kernels)", r"memmove|memcpy|copy_kernel|index_select|index_kernel|cpu_index|gather|transpose|[Cc]oncat|scopy"),
    # ATen's flash attention (the encoder's, in fairseq's modules): its own code is the online
    # softmax (maxima, exponentials, rescaling) around MKL's products, which perf files apart.
    ("softmax, log-softmax, exp", r"softmax|Sleef|exp[fF]?\d*|vml.*Exp|flash_attention"),
    # torch.topk's, and the beam step's candidates in one pass (beam_top_k.cpp: added_top_k)
    ("top-k", r"topk|TopK|top_k|adjust_heap|nth_element|partial_sort"),
    ("layer norm", r"layer_norm|LayerNorm|RowwiseMoments"),
    ("elementwise (add, mul, relu, fill, masks)", r"add_kernel|mul_kernel|div_|clamp|relu|vml_kernel|cpu::add|nan_to_num|masked_fill|fill_kernel|where|compare|eq_kernel|ne_kernel"),
    ("Python interpreter", r"libpython|python3"),
    ("torch dispatch, allocation, bookkeeping", r"libtorch|libc10|malloc|free|_int_|operator new|tcmalloc"),
]
OTHER = "other"
# The profiler's names of the operators that multiply matrices: fairseq's (MKL) and the kernel
# tiers' (oneDNN's prepacked linear, fbgemm's dynamic int8 linear).
MATRIX_PRODUCT_OPS = (
    "aten::addmm", "aten::mm", "aten::bmm",
    "mkldnn::_linear_pointwise", "quantized::linear_dynamic", "quantized::linear_relu_dynamic",
)  # fmt: skip


def categorize(location: str) -> str:
    """The kind of kernel a ``perf`` sample location ("dso symbol") belongs to."""
    for name, pattern in CATEGORIES:
        if re.search(pattern, location):
            return name
    return OTHER


def parse_perf_report(text: str) -> Dict[str, float]:
    """Share (0-1) of samples per category from ``perf report --stdio --sort dso,sym``."""
    shares: Dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+(\S+)\s+(.*)$", line)
        if match:
            category = categorize(f"{match.group(2)} {match.group(3)}")
            shares[category] = shares.get(category, 0.0) + float(match.group(1)) / 100
    return shares


# --- the engines ---------------------------------------------------------------------------------


def _engines(args: argparse.Namespace, workdir: Path) -> Tuple[Dict[str, peers.Engine], List]:
    path = bible.random_base_checkpoint(workdir / "base.pt") if args.random_base else bible.CHECKPOINT
    batches = peers.batched(bible.encoded_verses(args.sentences), args.batch_size)
    engines = peers.fairseq_engines(str(path), str(bible.MODEL_DIR), args.beam, batches, args.max_len_b)
    if args.ct2:
        engines += peers.ct2_engines(str(path), str(bible.MODEL_DIR), workdir, args.beam, 1, args.max_len_b)
    return {engine.name: engine for engine in engines}, batches


def _decode_all(engine: peers.Engine, batches: List, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        for batch in batches:
            engine.translate(batch)
    return time.perf_counter() - started


def child(args: argparse.Namespace) -> None:
    """One engine under ``perf``: warm up, then tell perf to sample only the timed decoding."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as workdir:
        engines, batches = _engines(args, Path(workdir))
        engine = engines[args.child]
        engine.translate(batches[0])
        with open(args.ctl, "w") as ctl, open(args.ack) as ack:
            ctl.write("enable\n")
            ctl.flush()
            ack.readline()
            seconds = _decode_all(engine, batches, args.repeats)
            ctl.write("disable\n")
            ctl.flush()
            ack.readline()
    Path(args.out).write_text(json.dumps({"seconds": seconds}))


def perf_profile(engine: str, args: argparse.Namespace, workdir: Path) -> Tuple[Optional[Dict[str, float]], str]:
    """(seconds per category, note) of ``engine`` decoding ``repeats`` times, or (None, why not)."""
    ctl, ack, data, out = (workdir / name for name in ("ctl", "ack", "perf.data", "out.json"))
    for fifo in (ctl, ack):
        if fifo.exists():
            fifo.unlink()
        os.mkfifo(fifo)
    command = [
        "perf", "record", "-e", "cpu-clock", "-F", "999", "-D", "-1", "--control", f"fifo:{ctl},{ack}",
        "-o", str(data), "--", sys.executable, "-m", "benchmarks.kernel_profile", "--child", engine,
        "--ctl", str(ctl), "--ack", str(ack), "--out", str(out), *_model_arguments(args),
    ]  # fmt: skip
    environment = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        subprocess.run(command, check=True, capture_output=True, env=environment, timeout=3600)
        report = subprocess.run(
            ["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso,sym"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        detail = getattr(error, "stderr", b"") or b""
        detail = detail.decode(errors="replace") if isinstance(detail, bytes) else detail
        return None, f"perf failed: {type(error).__name__} {detail.strip()[-200:]}"
    seconds = json.loads(out.read_text())["seconds"]
    return {category: share * seconds for category, share in parse_perf_report(report).items()}, ""


def _model_arguments(args: argparse.Namespace) -> List[str]:
    chosen = ["--sentences", str(args.sentences), "--batch-size", str(args.batch_size), "--beam", str(args.beam)]
    chosen += ["--max-len-b", str(args.max_len_b), "--repeats", str(args.repeats)]
    return chosen + (["--random-base"] if args.random_base else []) + (["--no-ct2"] if not args.ct2 else [])


def aten_profile(engine: peers.Engine, batches: List) -> Tuple[Dict[str, float], int, float]:
    """(self seconds per aten op, decoder steps, wall seconds) of one pass over the batches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        seconds = _decode_all(engine, batches, 1)
    averages = profiler.key_averages()
    steps = sum(event.count for event in averages if event.key == "aten::_log_softmax")
    return {event.key: event.self_cpu_time_total / 1e6 for event in averages}, steps, seconds


# --- tables ----------------------------------------------------------------------------------


def category_table(per_engine: Dict[str, Dict[str, float]], steps: Dict[str, int]) -> str:
    names = list(per_engine)
    order = [name for name, _ in CATEGORIES] + [OTHER]
    lines = [
        "| kind of kernel (perf samples) | " + " | ".join(f"{name} ms/step" for name in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for category in order:
        cells = [per_engine[name].get(category, 0.0) * 1000 / steps[name] for name in names]
        if any(cell >= 0.005 for cell in cells):
            lines.append(f"| {category} | " + " | ".join(f"{cell:.2f}" for cell in cells) + " |")
    totals = [sum(per_engine[name].values()) * 1000 / steps[name] for name in names]
    lines.append("| **all** | " + " | ".join(f"**{total:.2f}**" for total in totals) + " |")
    return "\n".join(lines)


def aten_table(per_engine: Dict[str, Tuple[Dict[str, float], int, float]], top: int = 16) -> str:
    names = list(per_engine)
    ranked = sorted({op for ops, _, _ in per_engine.values() for op in ops}, key=lambda op: -max(ops.get(op, 0) for ops, _, _ in per_engine.values()))
    lines = [
        "| aten op (self time) | " + " | ".join(f"{name} ms/step | {name} share" for name in names) + " |",
        "|---|" + "---|---|" * len(names),
    ]
    for op in ranked[:top]:
        cells = []
        for ops, steps, wall in per_engine.values():
            cells += [f"{ops.get(op, 0.0) * 1000 / steps:.3f}", f"{ops.get(op, 0.0) / wall:.1%}"]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    cells = []
    for ops, steps, wall in per_engine.values():
        matrix_products = sum(ops.get(op, 0.0) for op in MATRIX_PRODUCT_OPS)
        cells += [f"{matrix_products * 1000 / steps:.3f}", f"{matrix_products / wall:.1%}"]
    lines.append("| **matrix products (" + " + ".join(op.split("::")[1] for op in MATRIX_PRODUCT_OPS) + ")** | " + " | ".join(cells) + " |")
    cells = []
    for _, steps, wall in per_engine.values():
        cells += [f"{wall * 1000 / steps:.3f}", "100%"]
    lines.append("| **wall** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random-base", action="store_true", help="a random-weight transformer-base-sized model (peers.py)")
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--max-len-b", type=int, default=peers.MAX_LEN_B)
    parser.add_argument("--repeats", type=int, default=3, help="passes sampled by perf per engine")
    parser.add_argument("--no-ct2", dest="ct2", action="store_false", help="leave CTranslate2 out")
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    for hidden in ("--ctl", "--ack", "--out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as workdir:
        engines, batches = _engines(args, Path(workdir))
        for engine in engines.values():
            if engine.translate is not None:
                engine.translate(batches[0])  # warm-up
        aten = {name: aten_profile(engines[name], batches) for name in (peers.STOCK, peers.FAST, *peers.FAST_TIERS)}
        steps = {name: aten[name][1] for name in aten}
        for name in (peers.CT2_FP32, peers.CT2_INT8):
            steps[name] = steps[peers.FAST]
        sampled, notes = {}, []
        for name in ENGINES:
            if name not in engines or engines[name].translate is None:
                notes.append(f"{name}: {engines[name].note if name in engines else 'not run'}")
                continue
            seconds, note = perf_profile(name, args, Path(workdir))
            if seconds is None:
                notes.append(f"{name}: {note}")
            else:
                sampled[name] = seconds
    model = "random-weight transformer-base-sized model" if args.random_base else "Bible es-en model"
    print(
        f"{model}, first {args.sentences} test verses, batch {args.batch_size}, beam {args.beam}, max length "
        f"{args.max_len_b}; 1 thread; {cpu_name()}; torch {torch.__version__}, ctranslate2 {peers.ct2_version()}; "
        f"decoder steps: stock {steps[peers.STOCK]}, fast {steps[peers.FAST]} (per pass)\n"
    )
    if sampled:
        passes = {name: steps[name] * args.repeats for name in sampled}
        print(category_table(sampled, passes) + "\n")
    for note in notes:
        print(f"- {note}")
    print(aten_table(aten))


if __name__ == "__main__":
    main()
