"""Peak resident memory of each generator, every run in a fresh process.

    python -m benchmarks.peak_rss [--cases mt-beam5-b16 real-mt-beam5-b32 ...] [--repeats 2] [--threads 1]

In one process, whatever ran before (and what the allocator kept of it) shapes the next
run's peak; so here each (case, generator) runs alone in a child process: it builds the
model and batches, generates the first batch once (warm-up), then generates every batch
with the process's RSS high-water mark reset (``memory.peak_rss``). Reported: the median
over ``--repeats`` children of that peak, and of its rise above the RSS at the start.
Generators: stock and the ablation of ``benchmarks.search`` (``FAST_VARIANTS``).
"""

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import asdict
from typing import Dict, List

import torch

from .search import CASES, FAST_VARIANTS, Case, cpu_name, default_variants

GENERATORS = ["stock", *default_variants("cpu")]


def child(case_json: str, label: str) -> Dict:
    """One measurement, in this process, of the case given as JSON."""
    from fairseq.dataclass.configs import GenerationConfig

    from fairseq_fastseq.choice import accelerate

    from .memory import peak_rss
    from .search import build_model, make_batches

    fields = json.loads(case_json)
    case = Case(**{**fields, "source_tokens": tuple(fields["source_tokens"]) if fields["source_tokens"] else None})
    model, task = build_model(case.model)
    batches = make_batches(task, case)
    generator = task.build_generator([model], GenerationConfig(**case.options))
    if label != "stock":
        generator = accelerate(generator, FAST_VARIANTS[label])
    with torch.no_grad():
        task.inference_step(generator, [model], batches[0])
        with peak_rss() as peak:
            for batch in batches:
                task.inference_step(generator, [model], batch)
    return {"peak_mib": peak.mib, "growth_mib": peak.growth_mib}


def measure(case_name: str, label: str, threads: int) -> Dict:
    case_json = json.dumps(asdict(CASES[case_name]))
    command = [sys.executable, "-m", "benchmarks.peak_rss", "--child", case_json, label, "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{case_name} {label} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(results: Dict[str, Dict[str, List[Dict]]], threads: int, repeats: int) -> str:
    lines = [
        f"torch {torch.__version__}, threads {threads}, {cpu_name()}, median of {repeats} fresh processes per cell; "
        "peak RSS MiB during generation (rise above the RSS at its start)",
        "",
        "| case | " + " | ".join(GENERATORS) + " |",
        "|---|" + "---|" * len(GENERATORS),
    ]
    for case_name, by_label in results.items():
        cells = []
        for label in GENERATORS:
            runs = by_label[label]
            if any(run["peak_mib"] is None for run in runs):
                cells.append("n/a")
                continue
            peak = statistics.median(run["peak_mib"] for run in runs)
            growth = statistics.median(run["growth_mib"] for run in runs)
            cells.append(f"{peak:.0f} (+{growth:.0f})")
        lines.append(f"| {case_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["mt-beam5-b16", "real-mt-beam5-b32"], choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=2, metavar=("CASE_JSON", "GENERATOR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    results: Dict[str, Dict[str, List[Dict]]] = {}
    for case_name in args.cases:
        results[case_name] = {label: [] for label in GENERATORS}
        for _ in range(args.repeats):
            for label in GENERATORS:  # alternating, as the timing benchmarks do
                results[case_name][label].append(measure(case_name, label, args.threads))
                print(f"{case_name} {label}: {results[case_name][label][-1]}", file=sys.stderr, flush=True)
    print(markdown(results, torch.get_num_threads(), args.repeats))


if __name__ == "__main__":
    main()
