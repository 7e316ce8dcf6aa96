"""Stock vs fast generation, side by side in one process: same model, batches and threads.

    python -m benchmarks.search [--cases mt-greedy mt-beam5 ...] [--threads 1] [--repeats 3]

Models have transformer-base / BART-base dimensions and random weights: realistic per-token
cost, but they rarely emit EOS, so outputs run to the length limit (each case states it).
Reported: sentences/s of each generator (median of the repeats, stock and fast timed
alternately), the ratio fast/stock, whether every hypothesis is identical, and a profile:
the share of wall time inside the model (encoder, decoder, cache and encoder-output
reorders) versus everything else (search, bookkeeping, n-gram blocking).
"""

import argparse
import platform
import statistics
import time
from argparse import Namespace
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

import torch
from fairseq.data import Dictionary
from fairseq.dataclass.configs import GenerationConfig
from fairseq.models.transformer import TransformerModel, base_architecture, transformer_wmt_en_de
from fairseq.tasks.translation import TranslationConfig, TranslationTask

import fairseq_fastseq.generator as fast_generator_module
from fairseq_fastseq.config import FastGeneratorConfig
from fairseq_fastseq.generator import FastSequenceGenerator, accelerate

# Ablation: the fast search loop alone (fairseq's attention), + encoder keys/values
# projected once per sentence, + the time-major self-attention cache (everything: `fast`).
FAST_VARIANTS = {
    "search": FastGeneratorConfig(on_unsupported="error", self_attn_cache="stock", encoder_projection="per_beam"),
    "+enc-kv": FastGeneratorConfig(on_unsupported="error", self_attn_cache="stock", encoder_projection="per_sentence"),
    "fast": FastGeneratorConfig(on_unsupported="error"),
}
MODEL_METHODS = ("forward_encoder", "forward_decoder", "reorder_incremental_state", "reorder_encoder_out")


@dataclass(frozen=True)
class Case:
    model: str  # "mt-base" or "sum-base"
    batch_size: int
    sentences: int
    source_tokens: Tuple[int, int]
    options: Dict


CASES: Dict[str, Case] = {
    "mt-greedy-b1": Case("mt-base", 1, 24, (10, 40), dict(beam=1, max_len_a=0, max_len_b=40)),
    "mt-greedy-b32": Case("mt-base", 32, 64, (10, 40), dict(beam=1, max_len_a=0, max_len_b=40)),
    "mt-beam5-b1": Case("mt-base", 1, 16, (10, 40), dict(beam=5, max_len_a=0, max_len_b=40)),
    "mt-beam5-b32": Case("mt-base", 32, 64, (10, 40), dict(beam=5, max_len_a=0, max_len_b=40)),
    "mt-beam5-b128": Case("mt-base", 128, 128, (10, 40), dict(beam=5, max_len_a=0, max_len_b=40)),
    "mt-beam4-ngram3-b32": Case("mt-base", 32, 64, (10, 40), dict(beam=4, max_len_a=0, max_len_b=40, no_repeat_ngram_size=3)),
    "sum-beam4-ngram3-b8": Case(
        "sum-base", 8, 16, (400, 1000),
        dict(beam=4, lenpen=2.0, min_len=20, max_len_a=0, max_len_b=60, no_repeat_ngram_size=3),
    ),  # fmt: skip
}


def build_model(name: str, seed: int = 0) -> Tuple[TransformerModel, TranslationTask]:
    """A random-weight fairseq transformer of the named size, with a joined dictionary."""
    torch.manual_seed(seed)
    dictionary = Dictionary()
    vocab = 32000 if name == "mt-base" else 50000
    for i in range(vocab - len(dictionary)):
        dictionary.add_symbol(f"tok{i}")
    task = TranslationTask(TranslationConfig(), dictionary, dictionary)
    args = Namespace(share_all_embeddings=True, max_source_positions=1024, max_target_positions=1024)
    if name == "mt-base":
        transformer_wmt_en_de(args)
    else:  # BART-base dimensions, as a plain `transformer` (stock keeps encoder K/V per beam)
        args.encoder_embed_dim = args.decoder_embed_dim = 768
        args.encoder_ffn_embed_dim = args.decoder_ffn_embed_dim = 3072
        args.encoder_attention_heads = args.decoder_attention_heads = 12
        base_architecture(args)
    model = TransformerModel.build_model(args, task)
    return model.eval(), task


def make_batches(task: TranslationTask, case: Case, seed: int = 1) -> List[Dict]:
    generator = torch.Generator().manual_seed(seed)
    dictionary = task.source_dictionary
    low, high = case.source_tokens
    batches = []
    for start in range(0, case.sentences, case.batch_size):
        size = min(case.batch_size, case.sentences - start)
        lengths = torch.randint(low, high + 1, (size,), generator=generator)
        src = torch.full((size, int(lengths.max()) + 1), dictionary.pad())
        for row, length in enumerate(lengths.tolist()):  # left-padded, EOS last, as fairseq collates
            src[row, -length - 1 : -1] = torch.randint(dictionary.nspecial, len(dictionary), (length,), generator=generator)
            src[row, -1] = dictionary.eos()
        batches.append(
            {"id": torch.arange(start, start + size), "net_input": {"src_tokens": src, "src_lengths": lengths + 1}}
        )
    return batches


def _timed(function, spent: List[float]):
    """``function``, adding its run time to ``spent[0]``."""

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    return wrapper


@contextmanager
def model_time(generator) -> Iterator[List[float]]:
    """Accumulate the seconds spent inside the generator's model ensemble."""
    spent = [0.0]
    ensemble = generator.model
    for name in MODEL_METHODS:
        setattr(ensemble, name, _timed(getattr(ensemble, name), spent))
    try:
        yield spent
    finally:
        for name in MODEL_METHODS:
            delattr(ensemble, name)


@contextmanager
def ngram_blocking_time() -> Iterator[List[float]]:
    """Accumulate the seconds the fast generator spends blocking repeated n-grams."""
    spent = [0.0]
    original = fast_generator_module.block_repeated_ngrams
    fast_generator_module.block_repeated_ngrams = _timed(original, spent)
    try:
        yield spent
    finally:
        fast_generator_module.block_repeated_ngrams = original


def run_once(generator, model, batches) -> Tuple[float, float, float, list]:
    """(wall seconds, seconds inside the model, seconds blocking n-grams, hypotheses)."""
    with model_time(generator) as in_model, ngram_blocking_time() as blocking, torch.no_grad():
        started = time.perf_counter()
        hypotheses = [generator.generate([model], batch) for batch in batches]
        wall = time.perf_counter() - started
    return wall, in_model[0], blocking[0], hypotheses


def identical(stock: list, fast: list) -> bool:
    pairs = [(s, f) for batch_s, batch_f in zip(stock, fast) for sent_s, sent_f in zip(batch_s, batch_f) for s, f in zip(sent_s, sent_f)]
    return all(
        s["tokens"].tolist() == f["tokens"].tolist() and abs(float(s["score"]) - float(f["score"])) <= 1e-4
        for s, f in pairs
    )


def bench_case(name: str, case: Case, repeats: int, models: Dict) -> Dict:
    if case.model not in models:
        models[case.model] = build_model(case.model)
    model, task = models[case.model]
    batches = make_batches(task, case)
    gen_cfg = GenerationConfig(**case.options)
    generators = {"stock": task.build_generator([model], gen_cfg)}
    for label, knobs in FAST_VARIANTS.items():
        generators[label] = accelerate(task.build_generator([model], gen_cfg), knobs)
        assert isinstance(generators[label], FastSequenceGenerator)
    times: Dict[str, List[float]] = {label: [] for label in generators}
    model_share: Dict[str, List[float]] = {label: [] for label in generators}
    blocking_share: List[float] = []
    outputs = {}
    for _ in range(repeats):
        for label, generator in generators.items():
            wall, in_model, blocking, outputs[label] = run_once(generator, model, batches)
            times[label].append(wall)
            model_share[label].append(in_model / wall)
            if label == "fast":
                blocking_share.append(blocking / wall)
    median = {label: statistics.median(t) for label, t in times.items()}
    blocks = "no_repeat_ngram_size" in case.options  # stock's CPU blocker bans nothing
    return {
        "case": name,
        "batch": case.batch_size,
        "sentences": case.sentences,
        "options": " ".join(f"{k}={v}" for k, v in case.options.items()),
        "sent_s": {label: case.sentences / seconds for label, seconds in median.items()},
        "ratio": {label: median["stock"] / seconds for label, seconds in median.items()},
        "identical": None if blocks else all(identical(outputs["stock"], outputs[label]) for label in FAST_VARIANTS),
        "model_share": {label: statistics.median(shares) for label, shares in model_share.items()},
        "blocking_share": statistics.median(blocking_share) if blocks else None,
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        return f"{names[0]} ({len(names)} cores)"
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


def markdown(rows: List[Dict], threads: int, repeats: int) -> str:
    labels = ["stock", *FAST_VARIANTS]
    lines = [
        f"torch {torch.__version__}, threads {threads} (`torch.get_num_threads()`), "
        f"{cpu_name()}, median of {repeats}, all generators alternating in one process",
        "",
        "| case | batch | sentences | options | "
        + " | ".join(f"{label} sent/s" for label in labels)
        + " | "
        + " | ".join(f"{label}/stock" for label in FAST_VARIANTS)
        + " | identical | "
        + " | ".join(f"model share {label}" for label in labels)
        + " | n-gram blocking share (fast) |",
        "|" + "---|" * (6 + 2 * len(labels) + len(FAST_VARIANTS)),
    ]
    for r in rows:
        same = {True: "yes", False: "NO", None: "n/a (stock CPU n-gram blocker is a no-op)"}[r["identical"]]
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['sentences']} | {r['options']} | "
            + " | ".join(f"{r['sent_s'][label]:.2f}" for label in labels)
            + " | "
            + " | ".join(f"{r['ratio'][label]:.2f}x" for label in FAST_VARIANTS)
            + f" | {same} | "
            + " | ".join(f"{r['model_share'][label]:.0%}" for label in labels)
            + (f" | {r['blocking_share']:.1%} |" if r["blocking_share"] is not None else " | - |")
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models: Dict = {}
    rows = []
    for name in args.cases:
        rows.append(bench_case(name, CASES[name], args.repeats, models))
        print(markdown(rows[-1:], torch.get_num_threads(), args.repeats).splitlines()[-1], flush=True)
    print()
    print(markdown(rows, torch.get_num_threads(), args.repeats))


if __name__ == "__main__":
    main()
