"""Weights the kernel tiers prepare once per generator and weight version (``kernels.py``),
never written to disk: the scaled query projection, one interleaved projection for the
queries, keys and values, and the packed int8 weights."""

import warnings
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from fairseq.modules.multihead_attention import MultiheadAttention
from torch import Tensor, nn

from .cpu import HAS_AMX_INT8

# Whose int8 kernels run the ``int8`` tier: oneDNN's on CPUs with AMX (its tile products: 1.2-3x
# fbgemm's on the decoder's shapes, the same quantization, outputs within float32 rounding of
# fbgemm's: BENCHMARKS.md, "The fused tier's linear layers on AMX"), else PyTorch's default
# engine (fbgemm's kernels).
INT8_ENGINE = "onednn" if HAS_AMX_INT8 and "onednn" in torch.backends.quantized.supported_engines else None


def scaled_linear(module: nn.Linear, scaling: float) -> nn.Linear:
    """A copy of ``module`` whose output is ``scaling`` times its output."""
    scaled = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    with torch.no_grad():
        scaled.weight.copy_(module.weight * scaling)
        if module.bias is not None:
            scaled.bias.copy_(module.bias * scaling)
    return scaled.to(module.weight.device, module.weight.dtype).requires_grad_(False)


def interleaved_qkv(attention: MultiheadAttention) -> nn.Linear:
    """One linear layer for the scaled queries, keys and values, output rows ordered by head
    then q/k/v, so that each is a (rows, heads, head_dim) view of its output."""
    heads, head_dim, scaling = attention.num_heads, attention.head_dim, attention.scaling
    modules = (attention.q_proj, attention.k_proj, attention.v_proj)
    in_features = attention.q_proj.in_features
    with torch.no_grad():
        weights = [m.weight.view(heads, head_dim, in_features) for m in modules]
        weights[0] = weights[0] * scaling
        weight = torch.stack(weights, dim=1).reshape(3 * heads * head_dim, in_features)
        fused = nn.Linear(in_features, weight.size(0), bias=attention.q_proj.bias is not None)
        fused.weight.copy_(weight)
        if fused.bias is not None:
            biases = [(m.bias if m.bias is not None else torch.zeros_like(attention.q_proj.bias)).view(heads, head_dim) for m in modules]
            biases[0] = biases[0] * scaling
            fused.bias.copy_(torch.stack(biases, dim=1).reshape(-1))
    return fused.to(attention.q_proj.weight.device, attention.q_proj.weight.dtype).requires_grad_(False)


def int8_packed(weight: Tensor, bias: Optional[Tensor], engine: Optional[str] = INT8_ENGINE) -> object:
    """The weight packed for ``engine``'s dynamic int8 linear kernels (None: the current
    engine): symmetric int8 per output channel, float32 bias. A packed weight runs its
    engine's kernels whatever engine is selected later, so the global choice is restored."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1).clamp_min(1e-8) / 127
    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors; packing takes one
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch.quantize_per_channel(weight, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
    with _quantized_engine(engine):
        return torch.ops.quantized.linear_prepack(quantized, None if bias is None else bias.detach().float())


@contextmanager
def _quantized_engine(engine: Optional[str]) -> Iterator[None]:
    previous = torch.backends.quantized.engine
    if engine is not None:
        torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous
