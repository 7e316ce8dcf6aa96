"""``fused``'s linear layers on Intel AMX: each float32 product as three bfloat16 products
(``native/split_bf16.cpp``: operands split into high and low bfloat16 parts, the low x low
product dropped), ~1e-5 relative error on a layer's output where float32 has ~1e-6, at 1.2-3.7x
MKL's speed on the decoder's shapes. Measured speed and agreement with stock:
``BENCHMARKS.md`` ("The fused tier's linear layers on AMX")."""

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from . import native

Projection = Callable[[Tensor], Tensor]
Prepare = Callable[[Tuple, Tuple[Tensor, ...], Callable[[], object]], object]


def split_bf16_linear(weight: Tensor, bias: Optional[Tensor], relu: bool, prepared: Prepare, float32: Projection) -> Optional[Projection]:
    """``relu?(x @ weight.T + bias)`` through the AMX kernel, its weight packed once
    (``prepared``); ``float32`` (the same in float32) for rows holding an infinity or NaN (a
    split value's parts would turn them into NaN where float32 gives inf). None where the
    kernel is unavailable (no AMX, not permitted, not built), the weight is not a float32 CPU
    tensor, or not finite."""
    kernels = native.split_bf16() if weight.device.type == "cpu" and weight.dtype == torch.float32 else None
    if kernels is None or not bool(torch.isfinite(weight).all()):
        return None
    packed = prepared(("split_bf16",), (weight,), lambda: kernels.pack(weight.detach()))
    outputs, bias = weight.size(0), None if bias is None else bias.detach()

    def project(x: Tensor) -> Tensor:
        out = kernels.linear(x, packed, outputs, bias, relu)
        return float32(x) if out is None else out

    return project
