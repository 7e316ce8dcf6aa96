"""The fast generator's default thread count on a busy machine: auto vs fixed counts.

    python -m benchmarks.busy_machine [--verses 100] [--beam 5] [--batch-size 32]
                                      [--neighbour-threads 2] [--threads 1 2]
                                      [--data-bin DIR --path CKPT]

Starts a neighbour, a process that runs matrix products on ``--neighbour-threads`` OpenMP
threads without pause (another user's inference job, say), and while it runs, times whole
``fairseq-generate --generator fast`` runs (separate processes, as a user starts them, with
no ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` in their environment): once with the default
(``--fast-threads auto``) and once per ``--threads`` count. The defaults use the first
``--verses`` test verses of the bundled Bible model. Reported: the threads each run used
(from its log), fairseq's generation time and the wall time of the process, and each
generation time over the best one. ``--neighbour-threads 0`` measures an idle machine.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

import fairseq_fastseq

from .bible import CHECKPOINT, first_verses_data_bin
from .search import cpu_name

PLUGIN_DIR = Path(fairseq_fastseq.__file__).parent
# A neighbour: one matrix product after another, each a parallel region over its threads.
NEIGHBOUR = (
    "import torch\n"
    "a = torch.randn(384, 384)\n"
    "print('ready', flush=True)\n"
    "while True:\n"
    "    a = torch.tanh(a @ a)\n"
)
GENERATION_TIME = re.compile(r"Translated [\d,]+ sentences \([\d,]+ tokens\) in ([\d.]+)s")
THREADS_LINE = re.compile(r"threads: (\d+) intra-op threads")
DEFAULT = "default (auto)"


def without_thread_variables(**more: str) -> Dict[str, str]:
    """This environment without the variables that fix a thread count, plus ``more``."""
    env = {name: value for name, value in os.environ.items() if name not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**env, **more}


def start_neighbour(threads: int) -> Optional[subprocess.Popen]:
    """The competing job, running once this returns (None for ``threads`` 0)."""
    if threads == 0:
        return None
    env = without_thread_variables(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], stdout=subprocess.PIPE, text=True, env=env)
    assert neighbour.stdout.readline().strip() == "ready"
    time.sleep(0.5)  # its threads are spinning
    return neighbour


def run_generate(common: Sequence[str], extra: Sequence[str]) -> Dict:
    """One fairseq-generate process: threads used, generation and wall seconds."""
    command = [str(Path(sys.executable).parent / "fairseq-generate"), *common, *extra]
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env=without_thread_variables())
    wall = time.perf_counter() - started
    output = run.stdout + run.stderr
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return {
        "threads": int(THREADS_LINE.search(output)[1]),
        "generation": float(GENERATION_TIME.search(output)[1]),
        "wall": wall,
    }


def markdown(results: Dict[str, Dict], description: str) -> str:
    best = min(result["generation"] for result in results.values())
    lines = [
        description,
        "",
        "| fast generator | threads used | generation s | process wall s | generation vs best |",
        "|---|---|---|---|---|",
    ]
    for label, result in results.items():
        lines.append(
            f"| {label} | {result['threads']} | {result['generation']:.1f} | {result['wall']:.1f} "
            f"| {result['generation'] / best:.2f}x |"
        )
    return "\n".join(lines)


def commit() -> str:
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=PLUGIN_DIR)
    return found.stdout.strip() or "unknown"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verses", type=int, default=100, help="first test verses of the Bible model")
    parser.add_argument("--data-bin", help="another data-bin (instead of the Bible verses)")
    parser.add_argument("--path", default=str(CHECKPOINT))
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--neighbour-threads", type=int, default=2, help="0: no neighbour")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="fixed counts to compare with")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        data_bin = args.data_bin or str(first_verses_data_bin(args.verses, Path(workdir)))
        common = [
            data_bin, "--path", args.path, "--beam", str(args.beam), "--batch-size", str(args.batch_size),
            "--cpu", "--no-progress-bar", "--user-dir", str(PLUGIN_DIR), "--generator", "fast",
        ]  # fmt: skip
        settings = {DEFAULT: [], **{f"--fast-threads {n}": ["--fast-threads", str(n)] for n in args.threads}}
        neighbour = start_neighbour(args.neighbour_threads)
        try:
            results = {label: run_generate(common, extra) for label, extra in settings.items()}
        finally:
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()
    print(markdown(results, describe(args, sys.argv[1:] if argv is None else argv)))


def describe(args: argparse.Namespace, argv: Sequence[str]) -> str:
    """What ran, where, and the command that reproduces it."""
    data = args.data_bin or f"the first {args.verses} Bible test verses"
    if args.neighbour_threads:
        neighbour = f"while a neighbour runs matrix products on {args.neighbour_threads} OpenMP threads"
    else:
        neighbour = "on an otherwise idle machine"
    return (
        f"`fairseq-generate --generator fast` on {data}, beam {args.beam}, batch {args.batch_size}, {neighbour}. "
        f"CPU: {cpu_name()}; torch {torch.__version__}; commit {commit()}; "
        f"command: `python -m benchmarks.busy_machine {' '.join(argv)}`"
    )


if __name__ == "__main__":
    main()
