"""Each kernel that ``--fast-kernels fused``/``int8`` swap in, against the exact kernel it
replaces, on one decoder step's shapes: time per call, speed-up, largest difference.

    python -m benchmarks.kernel_swaps [--model {bible,base}] [--beam 5] [--batches 1 32 128]
                                      [--source-len 40] [--budget 0.05] [--repeats 5]

The kernels are the lean step's own (``fairseq_fastseq/step/kernels.py`` and ``layer.py``),
run on the first decoder layer and the output projection of the bundled Bible checkpoint
(``bible``, its trained weights) or of a random-weight transformer-base-sized one
(``base``), at ``batch x beam`` rows. Encoder attention is one step of a layer's attention
over ``--source-len`` encoder positions: per beam (exact) or grouped per sentence (fused).
"Largest difference" is the largest absolute difference of the outputs from the exact
kernel's on the same random input. Figures: ``BENCHMARKS.md`` ("Kernel tiers").
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fairseq_fastseq.step.encoder_caches import GROUPED, PER_BEAM
from fairseq_fastseq.step.kernels import TIERS
from fairseq_fastseq.step.layer import CrossAttentionStep

from . import bible
from .search import cpu_name

SWAPPING_TIERS = ("fused", "int8")


def seconds_per_call(run: Callable[[], Tensor], budget: float, repeats: int) -> float:
    """Median over ``repeats`` timings of the mean time per call, each timing as many calls
    as fit in about ``budget`` seconds (counted from one warm-up call)."""
    return alternating_seconds({"run": run}, budget, repeats)["run"]


def alternating_seconds(runs: Dict[str, Callable[[], object]], budget: float, repeats: int) -> Dict[str, float]:
    """``seconds_per_call`` of each run, timed in ``repeats`` rounds that take each run in
    turn, so that a busy machine slows them alike."""
    calls = {}
    for name, run in runs.items():
        started = time.perf_counter()
        run()
        calls[name] = max(1, int(budget / max(time.perf_counter() - started, 1e-6)))
    timings: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            for _ in range(calls[name]):
                run()
            timings[name].append((time.perf_counter() - started) / calls[name])
    return {name: statistics.median(values) for name, values in timings.items()}


def add_timing_arguments(parser: argparse.ArgumentParser, budget: float, repeats: int) -> None:
    """The options of the kernel timings (``seconds_per_call``): --budget, --repeats, --threads."""
    parser.add_argument("--budget", type=float, default=budget, help="seconds per timing (as many calls as fit)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timings per kernel (median)")
    parser.add_argument("--threads", type=int, default=1)


def check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace, names: str, counts: List[int]) -> None:
    """A usage error unless ``counts`` (the options ``names``, then --repeats and --threads) are
    at least 1 and --budget above 0."""
    if min(counts + [args.repeats, args.threads]) < 1 or args.budget <= 0:
        parser.error(f"{names}, --repeats and --threads must be at least 1, --budget above 0")


def kernel_calls(model: torch.nn.Module, tier: str, batch: int, beam: int, source_len: int) -> Dict[str, Callable[[], Tensor]]:
    """Each swapped kernel of ``tier`` as a call on fixed random inputs (seed 0 for every tier)."""
    kernels = TIERS[tier]()
    decoder = model.decoder
    layer = decoder.layers[0]
    rows, dim = batch * beam, layer.embed_dim
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=generator)
    hidden = torch.relu(torch.randn(rows, layer.fc1.out_features, generator=generator))
    encoder_out = torch.randn(source_len, batch, dim, generator=generator)
    projections = kernels.self_projections(layer.self_attn)
    fc1 = kernels.feed_forward_in(layer.fc1, F.relu)
    fc2, attention_out = kernels.linear(layer.fc2), kernels.linear(layer.self_attn.out_proj)
    weight = decoder.output_projection.weight
    output = kernels.output_projection(weight) or (lambda y: F.linear(y, weight))
    cross = CrossAttentionStep(layer.encoder_attn, kernels)
    cache = cross.start(encoder_out, None, beam, GROUPED if kernels.grouped_encoder_attention else PER_BEAM)
    return {
        "self-attention q/k/v projections": lambda: torch.cat([t.reshape(rows, -1) for t in projections(x)], dim=1),
        "feed-forward in (fc1 + ReLU)": lambda: fc1(x),
        "feed-forward out (fc2)": lambda: fc2(hidden),
        "attention output projection": lambda: attention_out(x),
        f"encoder attention, one step ({source_len} source tokens)": lambda: cross(x, cache, False)[0],
        "output projection (vocabulary)": lambda: output(x),
    }


def measure(model: torch.nn.Module, batches: List[int], beam: int, source_len: int, budget: float, repeats: int) -> List[Dict]:
    rows = []
    with torch.no_grad():  # the prepared-weight cache reads version counters (not kept in inference mode)
        for batch in batches:
            tiers = {tier: kernel_calls(model, tier, batch, beam, source_len) for tier in ("exact", *SWAPPING_TIERS)}
            for kernel, exact in tiers["exact"].items():
                reference, exact_seconds = exact(), seconds_per_call(exact, budget, repeats)
                row = {"kernel": kernel, "rows": batch * beam, "exact_ms": exact_seconds * 1e3}
                for tier in SWAPPING_TIERS:
                    swapped = tiers[tier][kernel]
                    row[f"{tier}_ms"] = seconds_per_call(swapped, budget, repeats) * 1e3
                    row[f"{tier}_diff"] = (swapped() - reference).abs().max().item()
                rows.append(row)
    return rows


def markdown(rows: List[Dict], title: str) -> str:
    header = "| kernel | rows | exact ms | " + " | ".join(f"{t} ms | {t} speed-up | {t} largest diff" for t in SWAPPING_TIERS) + " |"
    lines = [title, "", header, "|---|---|---|" + "---|---|---|" * len(SWAPPING_TIERS)]
    for row in rows:
        cells = [row["kernel"], str(row["rows"]), f"{row['exact_ms']:.3f}"]
        for tier in SWAPPING_TIERS:
            cells += [f"{row[f'{tier}_ms']:.3f}", f"{row['exact_ms'] / row[f'{tier}_ms']:.2f}x", f"{row[f'{tier}_diff']:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_model(name: str, workdir: Path) -> Tuple[torch.nn.Module, str]:
    if name == "bible":
        return bible.load()[0], "the bundled Bible checkpoint"
    return bible.load(bible.random_base_checkpoint(workdir / "base.pt"))[0], "a random-weight transformer-base-sized checkpoint"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["bible", "base"], default="bible")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128], help="sentences per batch")
    parser.add_argument("--source-len", type=int, default=40, help="encoder positions for the encoder attention")
    add_timing_arguments(parser, budget=0.05, repeats=5)
    args = parser.parse_args(argv)
    check_counts(parser, args, "--batches, --beam, --source-len", args.batches + [args.beam, args.source_len])
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        model, described = load_model(args.model, Path(workdir))
        rows = measure(model, args.batches, args.beam, args.source_len, args.budget, args.repeats)
    title = f"{described}, beam {args.beam}, threads {torch.get_num_threads()}, {cpu_name()}, torch {torch.__version__}"
    print(markdown(rows, title))


if __name__ == "__main__":
    main()
