"""The encoder keys/values of an encoder-attention layer for every beam, as fairseq holds
them (the lean step's ``PER_BEAM`` cache, and the module path's ``attention.py``), with the
values of fairseq's per-beam projection but projected once per sentence where the product
is large enough."""

from typing import Callable

from torch import Tensor

# Below this many rows (source tokens x sentences) the encoder output is projected per beam,
# as fairseq does: for very small products the BLAS kernel's last bit can depend on the
# number of rows (seen on x86 CPUs under about a dozen), above this it does not.
MIN_ROWS_PROJECTED_ONCE = 64


def encoder_keys_values_per_beam(
    projection: Callable[[Tensor], Tensor], encoder_out: Tensor, beams: int, heads: int, head_dim: int
) -> Tensor:
    """``projection`` of the encoder output (src_len, sentences, dim) for every beam, as a
    contiguous (sentences * beams * heads, src_len, head_dim) cache: the values of fairseq's
    per-beam projection, projected once per sentence where the product is large enough."""
    src_len, sentences, _ = encoder_out.size()
    if src_len * sentences < MIN_ROWS_PROJECTED_ONCE:  # fairseq's way: every beam's copy
        projected, copies = projection(encoder_out.repeat_interleave(beams, dim=1)), 1
    else:
        projected, copies = projection(encoder_out.contiguous()), beams
    # (sentences, 1, heads, src_len, head_dim): the time-major projection made contiguous per
    # head (fairseq keeps a strided view, which the steps read slower), then copied per beam
    # (a copy from a contiguous source: faster than expanding the strided view).
    per_head = projected.view(src_len, -1, 1, heads, head_dim).permute(1, 2, 3, 0, 4).contiguous()
    return per_head.expand(-1, copies, -1, -1, -1).reshape(-1, src_len, head_dim)
