"""Typed knobs of the fast generator and their home in fairseq's Hydra schema.

fairseq's ``FairseqConfig`` has no field for a plugin registry, so ``--generator fast``
(which fairseq turns into the Hydra override ``generator=fast``) would fail to compose.
We re-store the schema node ``config`` with two extra fields: ``generator`` (the choice)
and ``fastseq`` (the fast generator's knobs, reachable as ``fastseq.<knob>=...`` in Hydra
and as ``--fast-<knob>`` on the command line).
"""

from dataclasses import dataclass, field, fields
from typing import List, Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.configs import FairseqConfig
from hydra.core.config_store import ConfigStore

ON_UNSUPPORTED_CHOICES = ChoiceEnum(["fallback", "error"])
DECODER_STEP_CHOICES = ChoiceEnum(["lean", "fairseq"])
KERNELS_CHOICES = ChoiceEnum(["exact", "fused", "int8"])
SELF_ATTN_CACHE_CHOICES = ChoiceEnum(["time_major", "stock"])
ENCODER_PROJECTION_CHOICES = ChoiceEnum(["per_sentence", "per_beam", "grouped", "el_attention"])
CUDA_GRAPHS_CHOICES = ChoiceEnum(["auto", "on", "off"])

# Prefix of the knobs' command-line flags: --fast-on-unsupported etc.
FLAG_PREFIX = "fast"


@dataclass
class FastGeneratorConfig(FairseqDataclass):
    on_unsupported: ON_UNSUPPORTED_CHOICES = field(
        default="fallback",
        metadata={
            "help": "what --generator fast does with an option or model it cannot "
            "accelerate: 'fallback' runs fairseq's stock generator for it (and logs "
            "which option caused that), 'error' stops with an error naming it"
        },
    )
    decoder_step: DECODER_STEP_CHOICES = field(
        default="lean",
        metadata={
            "help": "the decoder's incremental step: 'lean' is ours (typed caches, no per-call "
            "module bookkeeping; the same kernels, so the same bits) for fairseq's transformer "
            "decoders, with a logged fallback to fairseq's modules for anything it does not "
            "cover; 'fairseq' runs fairseq's modules with the cache paths below (for comparison)"
        },
    )
    kernels: KERNELS_CHOICES = field(
        default="exact",
        metadata={
            "help": "the lean step's arithmetic: 'exact' is fairseq's (the same output, bitwise on "
            "CPU float32); 'fused' rounds differently for speed (one query/key/value projection, "
            "encoder keys/values once per sentence attended as grouped queries; on CPUs with AMX, "
            "linear layers as three bfloat16 products per float32 product); 'int8' is 'fused' "
            "with dynamic int8 linear layers (CPU). 'fused' and 'int8' can change outputs: see "
            "BENCHMARKS.md for how much"
        },
    )
    self_attn_cache: SELF_ATTN_CACHE_CHOICES = field(
        default="time_major",
        metadata={
            "help": "decoder self-attention cache: 'time_major' is preallocated, written in "
            "place and reordered with one copy; 'stock' keeps fairseq's (for comparison)"
        },
    )
    encoder_projection: ENCODER_PROJECTION_CHOICES = field(
        default="per_sentence",
        metadata={
            "help": "encoder-decoder attention: 'per_sentence' projects the encoder output to "
            "keys/values once per sentence and copies them for its beams; 'per_beam' is "
            "fairseq's way, once per beam (for comparison); 'grouped' projects once per sentence "
            "and has its beams attend as grouped queries, without per-beam copies (fairseq's BART "
            "path, for any model); 'el_attention' keeps no keys/values "
            "and attends to the encoder output with projected queries (EL-attention: less "
            "memory, more compute). 'grouped' and 'el_attention' equal fairseq's up to rounding: "
            "scores differ in the last bits and a near-tie may pick another token"
        },
    )
    cuda_graphs: CUDA_GRAPHS_CHOICES = field(
        default="off",
        metadata={
            "help": "the static-shape search loop (finished sentences kept in the batch, not dropped; "
            "a host sync every few steps, not every step) with its decoder step captured in CUDA "
            "graphs and replayed: 'auto' runs it on a GPU for the searches it covers (beam search "
            "and greedy on the lean step), 'on' also on CPU, uncaptured (to check it), 'off' (the "
            "default until it is measured on a GPU) never. Tokens equal stock's; scores equal up to "
            "rounding (the self-attention spans a bucket of 16 positions, the rest masked)"
        },
    )
    threads: str = field(
        default="auto",
        metadata={
            "help": "intra-op threads: 'auto' runs with as many as there are free cores when the "
            "generator is built (at most torch's default; a busy core would stall every parallel "
            "region), unless OMP_NUM_THREADS/MKL_NUM_THREADS or torch.set_num_threads chose; N runs "
            "with N. Scores are bitwise stock's for the same thread count"
        },
    )


def knob_names() -> List[str]:
    """The knobs, in declaration order (``FairseqDataclass``'s private ``_name`` is none)."""
    return [knob.name for knob in fields(FastGeneratorConfig) if not knob.name.startswith("_")]


@dataclass
class FastseqConfig(FairseqConfig):
    generator: Optional[str] = field(
        default=None,
        metadata={"help": "sequence generator: 'stock' (fairseq's) or 'fast'"},
    )
    fastseq: FastGeneratorConfig = field(default_factory=FastGeneratorConfig)


def extend_hydra_schema() -> None:
    """Make ``generator`` and ``fastseq`` valid keys of fairseq's top-level config."""
    ConfigStore.instance().store(name="config", node=FastseqConfig)
