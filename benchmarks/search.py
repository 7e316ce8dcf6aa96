"""Stock vs fast generation, side by side in one process: same model, batches and threads.

    python -m benchmarks.search [--cases mt-greedy mt-beam5 ...] [--threads 1] [--repeats 3]
                                [--device {cpu,cuda}] [--dtype {fp32,fp16,bf16}]
                                [--variants fast graphs ...]

Models have transformer-base / BART-base dimensions and random weights: realistic per-token
cost, but they rarely emit EOS, so outputs run to the length limit (each case states it).
Reported: sentences/s of each generator (median of the repeats, stock and fast timed
alternately), the ratio fast/stock, whether every hypothesis is identical, and a profile:
the share of wall time inside the model (encoder, decoder, cache and encoder-output
reorders) versus everything else (search, bookkeeping, n-gram blocking).

On CUDA (``--device cuda``, optionally ``--dtype fp16`` or ``bf16``) each generator first runs the first
batch once, untimed (warm-up); wall times are taken between ``torch.cuda.synchronize()``
calls; time inside the model comes from CUDA events around each model call, so measuring it
adds no host sync; and the peak GPU memory of each generator's runs is reported. In fp16 (bf16) a
hypothesis may legitimately differ (rounding breaks near-ties another way), so "identical"
is the share of hypotheses with the same tokens. The cases named ``-s<N>`` are sized for a GPU;
the default ``--cases`` are the CPU cases.
"""

import argparse
import platform
import statistics
import time
from argparse import Namespace
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from fairseq.data import Dictionary
from fairseq.dataclass.configs import GenerationConfig
from fairseq.models.bart import BARTModel, bart_base_architecture
from fairseq.models.transformer import TransformerModel, base_architecture, transformer_wmt_en_de
from fairseq.models.transformer_lm import TransformerLanguageModel, base_lm_architecture
from fairseq.tasks import FairseqTask
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from fairseq_fastseq import graphs, logit_edits, model_steps
from fairseq_fastseq.config import FastGeneratorConfig
from fairseq_fastseq.demo import read_lines
from fairseq_fastseq.choice import accelerate
from fairseq_fastseq.generator import FastSequenceGenerator

from . import bible
from .host_syncs import counting_host_syncs
from .memory import RssPeak, highest, peak_rss

# Ablation: the fast search loop alone (fairseq's modules and attention), + encoder
# keys/values projected once per sentence, + the time-major self-attention cache (fairseq's
# modules with both cache paths), and the lean decoder step (everything: `fast`).
_MODULES = dict(on_unsupported="error", decoder_step="fairseq")
FAST_VARIANTS = {
    "search": FastGeneratorConfig(**_MODULES, self_attn_cache="stock", encoder_projection="per_beam"),
    "+enc-kv": FastGeneratorConfig(**_MODULES, self_attn_cache="stock", encoder_projection="per_sentence"),
    "+cache": FastGeneratorConfig(**_MODULES),
    "fast": FastGeneratorConfig(on_unsupported="error"),
    # The kernel tiers that round differently (--fast-kernels): scores within rounding for
    # fused; int8 changes some outputs (its agreement is in the table).
    "fused": FastGeneratorConfig(on_unsupported="error", kernels="fused"),
    "int8": FastGeneratorConfig(on_unsupported="error", kernels="int8"),
    # Choices equal to fairseq's up to rounding only (not the default): grouped queries over
    # encoder keys/values once per sentence, and EL-attention (no encoder keys/values).
    "grouped": FastGeneratorConfig(on_unsupported="error", encoder_projection="grouped"),
    "el": FastGeneratorConfig(on_unsupported="error", encoder_projection="el_attention"),
    # The static-shape loop (--fast-cuda-graphs on): its decoder step captured in CUDA graphs on
    # a GPU; on CPU uncaptured, which shows what keeping finished sentences in the batch costs.
    "graphs": FastGeneratorConfig(on_unsupported="error", cuda_graphs="on"),
}
# Variants run by default on a GPU only (``--variants`` names them on CPU).
GPU_VARIANTS = ("graphs",)
# Their scores are compared within this.
ROUNDING_TOLERANCE = {"grouped": 1e-4, "el": 1e-4, "fused": 1e-4, "graphs": 1e-4}
# Variants whose agreement with stock is reported, not required ("identical" leaves them out).
APPROXIMATE = ("int8",)
# What counts as time in the model: fairseq's ensemble calls (stock), the fast loop's model steps.
MODEL_METHODS = ("forward_encoder", "forward_decoder", "reorder_incremental_state", "reorder_encoder_out")
STEP_METHODS = ("start", "decode", "reorder")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Scores must match bitwise on CPU (as in the tests); cuBLAS may pick other kernels per shape.
SCORE_TOLERANCE = {"cpu": 0.0, "cuda": 1e-4}
NGRAM_NOT_COMPARED = {
    "cpu": "n/a (stock CPU n-gram blocker is a no-op)",
    "cuda": "n/a (stock n-gram blocker is a no-op without fairseq's CUDA extension)",
}


@dataclass(frozen=True)
class Case:
    model: str  # "mt-base", "sum-base", "sum-bart", "lm-base" or "real-mt"
    batch_size: int
    sentences: int
    # Random source tokens per sentence; for lm-base prompt tokens (one length per batch);
    # None for real-mt, whose sources are the Bible test verses in file order.
    source_tokens: Optional[Tuple[int, int]]
    options: Dict


MT = dict(max_len_a=0, max_len_b=40)
SUM = dict(beam=4, lenpen=2.0, min_len=20, max_len_a=0, max_len_b=60, no_repeat_ngram_size=3)
CASES: Dict[str, Case] = {
    "mt-greedy-b1": Case("mt-base", 1, 24, (10, 40), dict(beam=1, **MT)),
    "mt-greedy-b32": Case("mt-base", 32, 64, (10, 40), dict(beam=1, **MT)),
    "mt-beam5-b1": Case("mt-base", 1, 16, (10, 40), dict(beam=5, **MT)),
    "mt-beam5-b32": Case("mt-base", 32, 64, (10, 40), dict(beam=5, **MT)),
    "mt-beam5-b128": Case("mt-base", 128, 128, (10, 40), dict(beam=5, **MT)),
    "mt-beam4-ngram3-b32": Case("mt-base", 32, 64, (10, 40), dict(beam=4, **MT, no_repeat_ngram_size=3)),
    "sum-beam4-ngram3-b8": Case("sum-base", 8, 16, (400, 1000), SUM),
}
# GPT-2-style continuation of 16-128-token prompts; max_len_b counts the prompt too.
LM = dict(max_len_a=0, max_len_b=168)
CASES.update(
    {
        "lm-greedy-b1": Case("lm-base", 1, 8, (16, 128), dict(beam=1, **LM)),
        "lm-greedy-b32": Case("lm-base", 32, 32, (16, 128), dict(beam=1, **LM)),
        "lm-beam4-b1": Case("lm-base", 1, 8, (16, 128), dict(beam=4, **LM)),
        "lm-beam4-b32": Case("lm-base", 32, 32, (16, 128), dict(beam=4, **LM)),
        "lm-top-p-b32": Case("lm-base", 32, 32, (16, 128), dict(beam=1, sampling=True, sampling_topp=0.9, **LM)),
    }
)
DEFAULT_CASES = list(CASES)  # the CPU cases; the GPU-sized and memory ones below run when named
CASES.update(
    {
        "mt-beam5-b128-s256": Case("mt-base", 128, 256, (10, 40), dict(beam=5, **MT)),
        "mt-beam4-ngram3-b128-s256": Case("mt-base", 128, 256, (10, 40), dict(beam=4, **MT, no_repeat_ngram_size=3)),
        "mt-greedy-b1-s4": Case("mt-base", 1, 4, (10, 40), dict(beam=1, **MT)),
        "mt-beam5-b1-s4": Case("mt-base", 1, 4, (10, 40), dict(beam=5, **MT)),
        "sum-beam4-ngram3-b32-s64": Case("sum-base", 32, 64, (400, 1000), SUM),
        "mt-beam5-b16": Case("mt-base", 16, 16, (10, 40), dict(beam=5, **MT)),
        "real-mt-beam5-b32": Case("real-mt", 32, 64, None, dict(beam=5)),
        "sum-beam4-ngram3-b8-s8": Case("sum-base", 8, 8, (400, 1000), SUM),
    }
)


def build_model(
    name: str, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Tuple[torch.nn.Module, FairseqTask]:
    """A random-weight fairseq model of the named size, with its task and dictionary; for
    ``real-mt`` the bundled Bible checkpoint."""
    if name == "real-mt":
        return bible.load(device=device, dtype=dtype)
    torch.manual_seed(seed)
    dictionary = Dictionary()
    vocab = 50000 if name.startswith("sum-") else 32000
    for i in range(vocab - len(dictionary)):
        dictionary.add_symbol(f"tok{i}")
    if name == "lm-base":  # transformer_lm, 6 layers x 512 (GPT-2-style, tied embeddings)
        task = LanguageModelingTask(LanguageModelingConfig(), dictionary)
        args = Namespace(decoder_layers=6, decoder_embed_dim=512, decoder_ffn_embed_dim=2048, decoder_attention_heads=8)
        args.share_decoder_input_output_embed, args.tokens_per_sample = True, 1024
        base_lm_architecture(args)
        model = TransformerLanguageModel.build_model(args, task)
        return model.to(device=device, dtype=dtype).eval(), task
    task = TranslationTask(TranslationConfig(), dictionary, dictionary)
    args = Namespace(share_all_embeddings=True, max_source_positions=1024, max_target_positions=1024)
    if name == "sum-bart":  # a bart_base checkpoint: stock fairseq already shares encoder K/V by beam
        bart_base_architecture(args)
        return BARTModel.build_model(args, task).to(device=device, dtype=dtype).eval(), task
    if name == "mt-base":
        transformer_wmt_en_de(args)
    else:  # BART-base dimensions, as a plain `transformer` (stock keeps encoder K/V per beam)
        args.encoder_embed_dim = args.decoder_embed_dim = 768
        args.encoder_ffn_embed_dim = args.decoder_ffn_embed_dim = 3072
        args.encoder_attention_heads = args.decoder_attention_heads = 12
        base_architecture(args)
    model = TransformerModel.build_model(args, task)
    return model.to(device=device, dtype=dtype).eval(), task


def make_batches(task: FairseqTask, case: Case, seed: int = 1, device: str = "cpu") -> List[Dict]:
    """Random sources (left-padded, EOS last, as fairseq collates translation data), or for a
    language model random prompts after the EOS that fairseq uses as BOS, one length per batch;
    for real-mt the first test verses, in file order."""
    if case.model == "real-mt":
        verses = bible.encoded_verses(case.sentences)
        batches = []
        for start in range(0, len(verses), case.batch_size):
            batch = bible.collate(task, verses[start : start + case.batch_size], str(device))
            batch["id"] = batch["id"] + start  # the verse's line in the test set (collate counts from 0)
            batches.append(batch)
        return batches
    generator = torch.Generator().manual_seed(seed)
    dictionary = task.source_dictionary
    low, high = case.source_tokens
    batches = []
    for start in range(0, case.sentences, case.batch_size):
        size = min(case.batch_size, case.sentences - start)
        if case.model == "lm-base":
            lengths = torch.full((size,), int(torch.randint(low, high + 1, (1,), generator=generator)))
        else:
            lengths = torch.randint(low, high + 1, (size,), generator=generator)
        src = torch.full((size, int(lengths.max()) + 1), dictionary.pad())
        for row, length in enumerate(lengths.tolist()):
            words = torch.randint(dictionary.nspecial, len(dictionary), (length,), generator=generator)
            if case.model == "lm-base":
                src[row, 0], src[row, 1:] = dictionary.eos(), words
            else:
                src[row, -length - 1 : -1], src[row, -1] = words, dictionary.eos()
        batches.append(
            {
                "id": torch.arange(start, start + size, device=device),
                "net_input": {"src_tokens": src.to(device), "src_lengths": (lengths + 1).to(device)},
            }
        )
    return batches


class _Spans:
    """Seconds spent inside wrapped calls: the host clock on CPU; on CUDA, events recorded
    around each call and read after the run, so that measuring adds no host sync."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._spans: list = []
        self._depth = 0  # a wrapped call within a wrapped call (an override calling its base) counts once

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def wrap(self, function):
        def wrapper(*args, **kwargs):
            if self._depth:
                return function(*args, **kwargs)
            self._depth += 1
            start = self._mark()
            try:
                return function(*args, **kwargs)
            finally:
                self._spans.append((start, self._mark()))
                self._depth -= 1

        return wrapper

    def seconds(self) -> float:
        """The total; on CUDA, call it after the device is synchronized."""
        if self.cuda:
            return sum(start.elapsed_time(end) for start, end in self._spans) / 1000
        return sum(end - start for start, end in self._spans)


@contextmanager
def _wrapped(owner, names: Sequence[str], spent: _Spans) -> Iterator[None]:
    """``owner``'s methods ``names`` timed into ``spent`` within the block."""
    originals = {name: owner.__dict__.get(name) for name in names}
    for name in names:
        setattr(owner, name, spent.wrap(getattr(owner, name)))
    try:
        yield
    finally:
        for name, original in originals.items():
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


@contextmanager
def model_time(generator, device: torch.device) -> Iterator[_Spans]:
    """Accumulate the seconds spent inside the model: the fast loop's model steps (encoder,
    decoder steps, cache reorders), or stock's calls of its model ensemble."""
    spent = _Spans(device)
    if isinstance(generator, FastSequenceGenerator):
        with ExitStack() as wrapped:
            for steps_class in (model_steps.LeanSteps, model_steps.ModuleSteps, graphs.StaticSteps):
                wrapped.enter_context(_wrapped(steps_class, STEP_METHODS, spent))
            yield spent
    else:
        with _wrapped(generator.model, MODEL_METHODS, spent):
            yield spent


@contextmanager
def ngram_blocking_time(device: torch.device) -> Iterator[_Spans]:
    """Accumulate the seconds the fast generator spends blocking repeated n-grams."""
    spent = _Spans(device)
    with _wrapped(logit_edits, ["block_repeated_ngrams"], spent):
        yield spent


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(step: Callable[[], object], repeats: int, device: torch.device = torch.device("cpu")) -> float:
    """The median wall time of ``repeats`` calls of ``step``, in milliseconds (each between
    device synchronizations on a GPU)."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


@dataclass
class Run:
    wall: float  # seconds
    in_model: float  # seconds inside the model ensemble
    blocking: float  # seconds blocking repeated n-grams (fast generators)
    peak_gpu_bytes: int  # allocated above what was allocated before the run; 0 on CPU
    rss: RssPeak  # the process's resident memory during the run
    hypotheses: list  # per batch, per sentence, fairseq's hypothesis dicts


def run_once(generator, model, task, batches, device: torch.device) -> Run:
    """One timed pass over the batches, through the task's ``inference_step`` as in
    fairseq-generate: a language model takes its prompt as prefix tokens there. Seeded, so
    that sampling draws the same for every generator."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with model_time(generator, device) as in_model, ngram_blocking_time(device) as blocking, torch.no_grad():
        with peak_rss() as rss:
            torch.manual_seed(0)
            synchronize(device)
            started = time.perf_counter()
            hypotheses = [task.inference_step(generator, [model], batch) for batch in batches]
            synchronize(device)
            wall = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) - before if cuda else 0
    return Run(wall, in_model.seconds(), blocking.seconds(), peak, rss, hypotheses)


def syncs_of_one_batch(generator, model, task, batch: Dict) -> int:
    """The host syncs of generating ``batch`` once more, untimed (``benchmarks.host_syncs``)."""
    with counting_host_syncs() as syncs, torch.no_grad():
        torch.manual_seed(0)
        task.inference_step(generator, [model], batch)
    return syncs.total


def agreement(stock: Sequence, fast: Sequence) -> Tuple[int, int, float]:
    """(hypotheses with the same tokens, hypotheses, the largest |score difference| among
    those, final or per token) of two runs given sentence by sentence. A sentence whose
    batch raised is an ``(error, message)`` tuple; it agrees if both raised the same."""
    same, total, worst = 0, abs(len(stock) - len(fast)), 0.0
    for want, got in zip(stock, fast):
        if isinstance(want, tuple) or isinstance(got, tuple):
            same, total = same + (want == got), total + 1
            continue
        total += max(len(want), len(got))
        for s, f in zip(want, got):
            if s["tokens"].tolist() == f["tokens"].tolist():
                same += 1
                per_token = (s["positional_scores"].float() - f["positional_scores"].float()).abs().max()
                worst = max(worst, abs(float(s["score"]) - float(f["score"])), float(per_token))
    return same, total, worst


def detokenized_bleu(task, batches: Sequence[Dict], hypotheses: Sequence) -> float:
    """BLEU of the best hypotheses of real-mt (sentencepiece removed) against the reference
    verses of the same ids."""
    best = {}
    for batch, sentences in zip(batches, hypotheses):
        for sample_id, sentence in zip(batch["id"].tolist(), sentences):
            best[sample_id] = task.target_dictionary.string(sentence[0]["tokens"].cpu(), bpe_symbol="sentencepiece")
    references = read_lines(bible.REFERENCES, len(best))
    return bible.bleu([best[i] for i in range(len(best))], references)


def default_variants(device: str) -> Dict[str, FastGeneratorConfig]:
    """Every variant on a GPU; on CPU all but ``GPU_VARIANTS``."""
    return {label: knobs for label, knobs in FAST_VARIANTS.items() if device == "cuda" or label not in GPU_VARIANTS}


def bench_case(
    name: str,
    case: Case,
    repeats: int,
    models: Dict,
    device: str = "cpu",
    dtype: str = "fp32",
    variants: Optional[Dict[str, FastGeneratorConfig]] = None,
    count_syncs: bool = True,
) -> Dict:
    """Stock and each fast variant (default: ``default_variants``) on the case, alternating
    within each repeat; medians, ratios, agreement with stock, shares, peaks, and (unless
    ``count_syncs`` is off: one more run of the first batch each) host syncs."""
    variants = default_variants(device) if variants is None else variants
    device = torch.device(device)
    if case.model not in models:
        models[case.model] = build_model(case.model, device=device, dtype=DTYPES[dtype])
    model, task = models[case.model]
    batches = make_batches(task, case, device=device)
    gen_cfg = GenerationConfig(**case.options)
    generators = {"stock": task.build_generator([model], gen_cfg)}
    for label, knobs in variants.items():
        generators[label] = accelerate(task.build_generator([model], gen_cfg), knobs)
        assert isinstance(generators[label], FastSequenceGenerator)
    if device.type == "cuda":  # warm-up: kernels, cuBLAS handles, the caching allocator
        for generator in generators.values():
            run_once(generator, model, task, batches[:1], device)
    runs: Dict[str, List[Run]] = {label: [] for label in generators}
    for _ in range(repeats):
        for label, generator in generators.items():
            runs[label].append(run_once(generator, model, task, batches, device))
    host_syncs = {label: syncs_of_one_batch(generator, model, task, batches[0]) for label, generator in generators.items()} if count_syncs else None
    median = {label: statistics.median(run.wall for run in label_runs) for label, label_runs in runs.items()}
    # Stock's n-gram blocker bans nothing unless fairseq's CUDA extension is built and usable.
    blocks = "no_repeat_ngram_size" in case.options and not generators["stock"].repeat_ngram_blocker.use_extension
    outputs = {label: label_runs[-1].hypotheses for label, label_runs in runs.items()}
    sentences = {label: [sent for batch in output for sent in batch] for label, output in outputs.items()}
    agreements = {label: agreement(sentences["stock"], sentences[label]) for label in variants}
    tolerance = {label: max(SCORE_TOLERANCE[device.type], ROUNDING_TOLERANCE.get(label, 0.0)) for label in variants}
    agrees = {
        label: same == total and diff <= tolerance[label]
        for label, (same, total, diff) in agreements.items()
        if label not in APPROXIMATE
    }
    # Target tokens of the best hypotheses, EOS included (for lm-base, the prompt too).
    tokens = {label: sum(len(sent[0]["tokens"]) for sent in sents) for label, sents in sentences.items()}
    return {
        "case": name,
        "model": case.model,
        "batch": case.batch_size,
        "sentences": case.sentences,
        "options": " ".join(f"{k}={v}" for k, v in case.options.items()),
        "sent_s": {label: case.sentences / seconds for label, seconds in median.items()},
        "tokens_s": {label: tokens[label] / seconds for label, seconds in median.items()},
        "ratio": {label: median["stock"] / seconds for label, seconds in median.items()},
        "identical": None if blocks else all(agrees.values()),
        "same_tokens": None if blocks else min([1.0] + [agreements[label][0] / agreements[label][1] for label in agrees]),
        "max_score_diff": None if blocks else max([0.0] + [agreements[label][2] for label in agrees]),
        "differing": {} if blocks else {label: agreements[label] for label, ok in agrees.items() if not ok},
        "approximate": {} if blocks else {label: agreements[label] for label in variants if label in APPROXIMATE},
        "model_share": {label: statistics.median(r.in_model / r.wall for r in label_runs) for label, label_runs in runs.items()},
        "blocking_share": statistics.median(r.blocking / r.wall for r in runs["fast"]) if blocks and "fast" in runs else None,
        "host_syncs": host_syncs,
        "peak_mib": {label: max(run.peak_gpu_bytes for run in label_runs) / 2**20 for label, label_runs in runs.items()},
        "rss": {label: highest([run.rss for run in label_runs]) for label, label_runs in runs.items()},
        "bleu": {label: detokenized_bleu(task, batches, output) for label, output in outputs.items()}
        if case.model == "real-mt"
        else None,
        # Where stock bans nothing, the rounding variants are compared with the bitwise ``fast``.
        "same_as_fast": {
            label: agreement(sentences["fast"], sentences[label])
            for label in variants
            if blocks and (label in ROUNDING_TOLERANCE or label in APPROXIMATE) and "fast" in variants
        },
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        return f"{names[0]} ({len(names)} cores)"
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    return f"cuda ({torch.cuda.get_device_name()})" if device == "cuda" else device


def _identical_cell(row: Dict, device: str, dtype: str) -> str:
    if row["identical"] is None:
        versus_fast = "".join(
            f"; {label}: {same}/{total} same tokens as fast (max score diff {diff:.1e})"
            for label, (same, total, diff) in row["same_as_fast"].items()
        )
        return NGRAM_NOT_COMPARED[device] + versus_fast
    approximate = "".join(f"; {label}: {same}/{total} same tokens" for label, (same, total, _) in row.get("approximate", {}).items())
    return _verdict(row, dtype) + approximate


def _verdict(row: Dict, dtype: str) -> str:
    """fp32: whether every variant gave stock's output (else which did not); fp16: the share."""
    if dtype != "fp32":
        return f"{row['same_tokens']:.1%} (max score diff {row['max_score_diff']:.1e})"
    if row["identical"]:
        return "yes"
    which = ", ".join(f"{label} {same}/{total} same tokens" for label, (same, total, _) in row["differing"].items())
    return f"NO: {which}; max score diff {row['max_score_diff']:.1e}"


def markdown(rows: List[Dict], threads: int, repeats: int, device: str = "cpu", dtype: str = "fp32") -> str:
    labels = list(rows[0]["sent_s"])  # stock and the variants run
    variants = labels[1:]
    columns = [
        ("case", lambda r: r["case"]),
        ("batch", lambda r: r["batch"]),
        ("sentences", lambda r: r["sentences"]),
        ("options", lambda r: r["options"]),
        *[(f"{label} sent/s", lambda r, label=label: f"{r['sent_s'][label]:.2f}") for label in labels],
        *[(f"{label}/stock", lambda r, label=label: f"{r['ratio'][label]:.2f}x") for label in variants],
        ("identical", lambda r: _identical_cell(r, device, dtype)),
        *[(f"model share {label}", lambda r, label=label: f"{r['model_share'][label]:.0%}") for label in labels],
        ("n-gram blocking share (fast)", lambda r: "-" if r["blocking_share"] is None else f"{r['blocking_share']:.1%}"),
        *[(f"host syncs {label}", lambda r, label=label: r["host_syncs"][label]) for label in labels],
    ]
    columns += [
        (f"peak RSS MiB {label}", lambda r, label=label: "-" if r["rss"][label].mib is None else f"{r['rss'][label].mib:.0f}")
        for label in labels
    ]
    note = ", peak RSS = the process's while a generator ran, host syncs = those of one more run of the first batch"
    if device == "cuda":
        columns += [(f"peak MiB {label}", lambda r, label=label: f"{r['peak_mib'][label]:.0f}") for label in labels]
        note += (
            ", warm-up run of the first batch per generator, peak MiB = torch.cuda.max_memory_allocated "
            "during a run above what was allocated before it (model, inputs)"
        )
    lines = [
        f"torch {torch.__version__}, device {device_name(device)}, dtype {dtype}, threads {threads} "
        f"(`torch.get_num_threads()`), {cpu_name()}, median of {repeats}, all generators alternating "
        f"in one process{note}",
        "",
        "| " + " | ".join(title for title, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(str(cell(r)) for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines)


def check_device(parser: argparse.ArgumentParser, device: str, dtype: str = "fp32") -> None:
    """Stop with a usage error for a device this machine lacks, or fp16 off the GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: CUDA is not available here (torch {torch.__version__}, torch.cuda.is_available() is False)")
    if dtype != "fp32" and device != "cuda":
        parser.error(f"--dtype {dtype} needs --device cuda")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=list(CASES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="fp16 and bf16 need --device cuda")
    parser.add_argument(
        "--variants", nargs="+", choices=list(FAST_VARIANTS), help=f"the fast variants (default: all; on CPU all but {', '.join(GPU_VARIANTS)})"
    )
    args = parser.parse_args(argv)
    check_device(parser, args.device, args.dtype)
    torch.set_num_threads(args.threads)
    variants = {label: FAST_VARIANTS[label] for label in args.variants} if args.variants else default_variants(args.device)
    models: Dict = {}
    rows = []
    table = dict(threads=torch.get_num_threads(), repeats=args.repeats, device=args.device, dtype=args.dtype)
    for name in args.cases:
        rows.append(bench_case(name, CASES[name], args.repeats, models, args.device, args.dtype, variants))
        print(markdown(rows[-1:], **table).splitlines()[-1], flush=True)
    print()
    print(markdown(rows, **table))


if __name__ == "__main__":
    main()
