"""Minor page faults and kernel time of stock and fast generation, side by side in one
process; with ``--keep-freed-memory``, the same after telling glibc's malloc to keep freed
memory for reuse, which shows how much of the difference is the allocator.

    python -m benchmarks.page_faults [--cases mt-beam5-b128 ...] [--repeats 2] [--keep-freed-memory]

glibc serves allocations above its mmap threshold (at most 32 MB by default) with a fresh
``mmap``, and returns the heap's free top above the trim threshold to the kernel: every
large tensor allocated per decoder step is then paid for again in page faults. The fast
generator writes its largest per-step tensors into buffers made once per batch
(``fairseq_fastseq/ensemble.py``, ``beam_step.py``). ``--keep-freed-memory`` calls
``mallopt`` (M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB) before anything runs; both
generators profit from it, which gives the like-for-like comparison under that setting.
(glibc 2.36's ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` environment variables
with the same values did not do the same here: an 82 MB tensor still took ~9,000 page
faults on average, against ~20,000 by default and none after ``mallopt``.)
"""

import argparse
import ctypes
import resource
import statistics
import time
from typing import Dict, List, Sequence

import torch
from fairseq.dataclass.configs import GenerationConfig

from fairseq_fastseq.config import FastGeneratorConfig
from fairseq_fastseq.choice import accelerate

from .search import CASES, build_model, cpu_name, make_batches

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory() -> None:
    libc = ctypes.CDLL("libc.so.6")
    if not (libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 31)):
        raise RuntimeError("glibc's mallopt refused the thresholds")


def measure(case_name: str, repeats: int) -> Dict[str, Dict[str, float]]:
    """Per generator: median wall seconds, minor page faults and system seconds of one pass."""
    case = CASES[case_name]
    model, task = build_model(case.model)
    batches = make_batches(task, case)
    gen_cfg = GenerationConfig(**case.options)
    generators = {
        "stock": task.build_generator([model], gen_cfg),
        "fast": accelerate(task.build_generator([model], gen_cfg), FastGeneratorConfig(on_unsupported="error")),
    }
    passes: Dict[str, List[Dict[str, float]]] = {label: [] for label in generators}
    for _ in range(repeats):
        for label, generator in generators.items():
            before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            with torch.no_grad():
                for batch in batches:
                    task.inference_step(generator, [model], batch)
            wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
            passes[label].append(
                dict(wall=wall, faults=after.ru_minflt - before.ru_minflt, system=after.ru_stime - before.ru_stime)
            )
    return {label: {key: statistics.median(p[key] for p in runs) for key in runs[0]} for label, runs in passes.items()}


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["mt-beam5-b128"], choices=sorted(CASES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--keep-freed-memory", action="store_true", help="mallopt before anything runs (see above)")
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    allocator = "glibc keeping freed memory (mallopt)" if args.keep_freed_memory else "glibc defaults"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {cpu_name()}, {allocator}, median of {args.repeats}")
    print("| case | generator | wall s | minor page faults | system s | fast/stock |")
    print("|---|---|---|---|---|---|")
    for name in args.cases:
        result = measure(name, args.repeats)
        for label, r in result.items():
            ratio = result["stock"]["wall"] / r["wall"]
            print(f"| {name} | {label} | {r['wall']:.2f} | {r['faults']:.0f} | {r['system']:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
