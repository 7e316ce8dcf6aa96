"""Is ``torch.nn.functional.scaled_dot_product_attention`` worth using for the incremental
self-attention step? It must equal fairseq's ``bmm`` / float softmax / ``bmm`` bitwise (the
fast generator's promise) and be faster on the time-major cache's strided keys/values.

    python -m benchmarks.sdpa [--threads 1] [--repeats 20] [--device cpu]

For each shape (rows = sentences x beams, heads, cached steps, head dim) it times both on
the same query and cache views, and says whether the outputs are bitwise equal. The query
is already scaled, as fairseq scales it, so SDPA runs with ``scale=1.0``.
"""

import argparse
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from fairseq import utils

from .search import check_device, cpu_name, device_name, median_ms
from .tables import markdown_table

# (rows, heads, cached steps, head dim): transformer-base at batch 1 / 32 / 128 x beam 5,
# a long output, BART-base at batch 8 x beam 4.
SHAPES: List[Tuple[int, int, int, int]] = [(5, 8, 30, 64), (160, 8, 41, 64), (640, 8, 41, 64), (640, 8, 200, 64), (32, 12, 60, 64)]


def fairseq_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    weights = torch.bmm(q, k.transpose(1, 2))
    weights = utils.softmax(weights, dim=-1).type_as(weights)
    return torch.bmm(weights, v)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)


def compare(shape: Tuple[int, int, int, int], repeats: int, device: str = "cpu") -> Dict:
    rows, heads, steps, head_dim = shape
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    # The time-major cache (capacity, rows, heads, head_dim) and the strided views fairseq's
    # arithmetic runs on in attention.py.
    cache_k, cache_v = (torch.randn(steps + 16, rows, heads, head_dim, generator=generator).to(device) for _ in "kv")
    k = cache_k[:steps].view(steps, rows * heads, head_dim).transpose(0, 1)
    v = cache_v[:steps].view(steps, rows * heads, head_dim).transpose(0, 1)
    q = (torch.randn(rows * heads, 1, head_dim, generator=generator) * head_dim**-0.5).to(device)
    with torch.no_grad():
        bitwise = torch.equal(fairseq_attention(q, k, v), sdpa(q, k, v))
        fairseq_ms = median_ms(lambda: fairseq_attention(q, k, v), repeats, device)
        sdpa_ms = median_ms(lambda: sdpa(q, k, v), repeats, device)
    return {"shape": shape, "bitwise": bitwise, "fairseq_ms": fairseq_ms, "sdpa_ms": sdpa_ms}


def markdown(results: Sequence[Dict], threads: int, repeats: int, device: str) -> str:
    lines = [
        f"torch {torch.__version__}, device {device_name(device)}, threads {threads} (`torch.get_num_threads()`), "
        f"{cpu_name()}, median of {repeats}",
        "",
    ]
    columns = ("rows", "heads", "cached steps", "head dim", "bitwise equal", "fairseq bmm/softmax/bmm ms", "SDPA ms", "SDPA speed-up")
    rows = [
        (*r["shape"], "yes" if r["bitwise"] else "NO", f"{r['fairseq_ms']:.3f}", f"{r['sdpa_ms']:.3f}", f"{r['fairseq_ms'] / r['sdpa_ms']:.2f}x")
        for r in results
    ]
    return "\n".join(lines) + "\n" + markdown_table(columns, rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    torch.set_num_threads(args.threads)
    results = [compare(shape, args.repeats, args.device) for shape in SHAPES]
    print(markdown(results, torch.get_num_threads(), args.repeats, args.device))


if __name__ == "__main__":
    main()
