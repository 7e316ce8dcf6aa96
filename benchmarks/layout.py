"""Encoder keys/values in fairseq's cache layout vs contiguous per beam and head: one decoder
step of encoder-decoder attention (``bmm``, softmax, ``bmm``), timed both ways.

fairseq keeps the cached keys/values as a strided view of the time-major projection
(src_len, rows, heads x head_dim): each (row, head) matrix has its rows ``rows x heads x
head_dim`` floats apart. ``attention.SentenceProjectedEncoderAttention`` stores them
contiguous; this shows what that buys and checks that the values are the same bits.

    python -m benchmarks.layout [--threads 1]
"""

import argparse
from typing import Sequence

import torch

from .search import median_ms

# (sentences, beams, heads, source tokens): long sources at BART-base size, and MT at
# transformer-base size (batch 32 and 128).
SHAPES = [(8, 4, 12, 913), (32, 5, 8, 30), (128, 5, 8, 30)]


def compare(sentences: int, beams: int, heads: int, src_len: int, head_dim: int = 64, repeats: int = 11) -> dict:
    rows = sentences * beams
    torch.manual_seed(0)
    strided = [
        torch.randn(src_len, rows, heads * head_dim).view(src_len, rows * heads, head_dim).transpose(0, 1)
        for _ in range(2)
    ]
    contiguous = [t.contiguous() for t in strided]
    query = torch.randn(rows * heads, 1, head_dim)

    def attend(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return torch.bmm(torch.softmax(torch.bmm(query, key.transpose(1, 2)), dim=-1), value)

    same = torch.equal(attend(*strided), attend(*contiguous))
    fairseq_ms = median_ms(lambda: attend(*strided), repeats)
    ours_ms = median_ms(lambda: attend(*contiguous), repeats)
    return dict(shape=(sentences, beams, heads, src_len), fairseq_ms=fairseq_ms, contiguous_ms=ours_ms, same=same)


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; one attention step, median of 11")
    print("| sentences x beams x heads, source tokens | fairseq's layout ms | contiguous ms | speed-up | same bits |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        r = compare(*shape)
        s, b, h, n = r["shape"]
        print(f"| {s} x {b} x {h}, {n} | {r['fairseq_ms']:.2f} | {r['contiguous_ms']:.2f} | "
              f"{r['fairseq_ms'] / r['contiguous_ms']:.2f}x | {'yes' if r['same'] else 'no'} |")


if __name__ == "__main__":
    main()
