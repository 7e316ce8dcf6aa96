"""CTranslate2 as a peer: stock fairseq, the fast generator and CTranslate2 (fp32, int8) on
the bundled Bible model, same sentences, batches, beam and threads, in one process.

    python -m benchmarks.peers [--threads 1] [--repeats 3] [--sentences 256] [--beam 5]
                               [--batch-size 32]

CTranslate2 is optional (``pip install .[peers]``). Its fairseq converter turns the same
checkpoint (``examples/bible/model/model.pt``) into a CTranslate2 model in a temporary
folder, once without quantization (fp32) and once with ``quantization="int8"``. Without
CTranslate2, or when its converter fails, the table says so in the CTranslate2 rows.

Every engine gets the first ``--sentences`` test verses (``examples/bible/data/test.es.gz``),
sentencepiece-encoded with the model's ``spm.model`` (the same tokens as the binarized test
set in ``examples/bible/model``), in the same batches of
``--batch-size`` verses, in file order. Timed is decoding only, from subword tokens to
subword tokens: fairseq through ``task.inference_step`` on pre-collated batches (as
fairseq-generate does; the fast generators are built as fairseq-generate builds them, under
``choice.attention_unread``: its output prints no attention over the source, and neither
does CTranslate2's by default, so they keep none), CTranslate2 through ``Translator.translate_batch`` with one call per
batch. Search settings follow fairseq-generate's defaults: beam ``--beam``, ``lenpen`` 1,
``max_len_a`` 0, ``max_len_b`` 200, ``min_len`` 1; for CTranslate2 ``length_penalty=1``,
``max_decoding_length=200`` (at most 200 tokens before EOS, as fairseq), ``min_decoding_length=1``,
``max_input_length=0`` (no truncation), ``patience=1`` (stop a sentence at ``beam``
finished hypotheses). Engines alternate within each repeat; the median is reported. Outputs
are sentencepiece-decoded and compared with stock fairseq's; BLEU is sacrebleu (13a) against
the reference verses (``test.en.gz``).
"""

import argparse
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fairseq_fastseq.demo import read_lines

from . import bible
from .memory import RssPeak, highest, peak_rss
from .search import cpu_name

STOCK, FAST, CT2_FP32, CT2_INT8 = "fairseq stock", "fairseq fast generator", "CTranslate2 fp32", "CTranslate2 int8"
# The fast generator's kernel tiers that round differently (--fast-kernels fused / int8).
FAST_TIERS = {"fairseq fast fused": "fused", "fairseq fast int8": "int8"}
ENGINES = (STOCK, FAST, *FAST_TIERS, CT2_FP32, CT2_INT8)
CT2_COMPUTE = {CT2_FP32: ("float32", None), CT2_INT8: ("int8", "int8")}  # compute_type, quantization
NOT_INSTALLED = "ctranslate2 is not installed: pip install .[peers]"
MAX_LEN_B = 200  # fairseq-generate's default --max-len-b (with --max-len-a 0)


@dataclass
class Row:
    engine: str
    sent_s: Optional[float] = None
    ratio: Optional[float] = None
    differs: Optional[float] = None  # share of sentences whose decoded output differs from stock's
    bleu: Optional[float] = None
    note: str = ""
    rss: RssPeak = field(default_factory=RssPeak)  # the process's resident memory while it ran


@dataclass
class Engine:
    name: str
    translate: Optional[Callable[[List[List[str]]], List[List[str]]]]  # a batch of pieces -> pieces
    note: str = ""  # why it cannot run (then translate is None)
    times: List[float] = field(default_factory=list)
    outputs: List[List[str]] = field(default_factory=list)
    peaks: List[RssPeak] = field(default_factory=list)


def failure(what: str, error: BaseException) -> str:
    """A one-line table note for an error."""
    text = f"{what}: {type(error).__name__}: {error}".replace("|", "/").replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def batched(items: Sequence, size: int) -> List[List]:
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def differ_share(reference: Sequence[str], outputs: Sequence[str]) -> float:
    """Share of sentences whose output differs from the reference output (missing ones differ)."""
    if not reference:
        return 0.0
    differ = sum(want != got for want, got in zip(reference, outputs)) + abs(len(reference) - len(outputs))
    return differ / max(len(reference), len(outputs))


def summarize(
    times: Dict[str, List[float]],
    outputs: Dict[str, List[str]],
    sentences: int,
    bleu: Dict[str, float],
    notes: Dict,
    peaks: Optional[Dict[str, RssPeak]] = None,
) -> List[Row]:
    """Rows in ``ENGINES`` order: sentences/s from the median time, ratio vs stock's sentences/s,
    the share of outputs that differ from stock's; an engine that did not run keeps its note."""
    rows = []
    stock_rate = sentences / statistics.median(times[STOCK]) if times.get(STOCK) else None
    for engine in ENGINES:
        if not times.get(engine):
            rows.append(Row(engine, note=notes.get(engine, "not run")))
            continue
        rate = sentences / statistics.median(times[engine])
        rows.append(
            Row(
                engine,
                sent_s=rate,
                ratio=rate / stock_rate if stock_rate else None,
                differs=differ_share(outputs[STOCK], outputs[engine]) if STOCK in outputs else None,
                bleu=bleu.get(engine),
                note=notes.get(engine, ""),
                rss=(peaks or {}).get(engine, RssPeak()),
            )
        )
    return rows


def _cell(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(rows: Sequence[Row], header: str) -> str:
    lines = [
        header,
        "",
        "| engine | sentences/s | vs stock | outputs differing from stock | BLEU | note |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
        lines.append(
            f"| {row.engine} | {_cell(row.sent_s, '.2f')} | {ratio} | {_cell(row.differs, '.1%')} "
            f"| {_cell(row.bleu, '.2f')} | {row.note} |"
        )
    return "\n".join(lines)


# --- fairseq ----------------------------------------------------------------------------------


def fairseq_engines(
    model_path: str, data_dir: str, beam: int, batches: List[List[List[str]]], max_len_b: int = MAX_LEN_B
) -> List[Engine]:
    from fairseq.dataclass.configs import GenerationConfig

    from fairseq_fastseq.config import FastGeneratorConfig
    from fairseq_fastseq.choice import accelerate, attention_unread
    from fairseq_fastseq.generator import FastSequenceGenerator

    model, task = bible.load(Path(model_path), Path(data_dir))
    # fairseq-generate's defaults: max_len_a 0, min_len 1, lenpen 1 (max_len_b 200).
    gen_cfg = GenerationConfig(beam=beam, max_len_b=max_len_b)
    assert (gen_cfg.max_len_a, gen_cfg.min_len, gen_cfg.lenpen) == (0, 1, 1)
    stock = task.build_generator([model], gen_cfg)
    with attention_unread():  # as fairseq-generate builds them (``hook.py``)
        fast = {
            name: accelerate(task.build_generator([model], gen_cfg), FastGeneratorConfig(on_unsupported="error", kernels=tier))
            for name, tier in {FAST: "exact", **FAST_TIERS}.items()
        }
    assert all(isinstance(generator, FastSequenceGenerator) for generator in fast.values())
    tgt_dict = task.target_dictionary
    collated = {id(batch): bible.collate(task, batch) for batch in batches}  # before any timing

    def translator(generator) -> Callable:
        def translate(batch: List[List[str]]) -> List[List[str]]:
            sample = collated.get(id(batch)) or bible.collate(task, batch)
            with torch.no_grad():
                hypos = task.inference_step(generator, [model], sample)
            out: List[List[str]] = [[] for _ in batch]
            for sample_id, sentence in zip(sample["id"].tolist(), hypos):
                ids = sentence[0]["tokens"].tolist()
                out[sample_id] = [tgt_dict[i] for i in ids if i != tgt_dict.eos()]
            return out

        return translate

    return [Engine(STOCK, translator(stock))] + [Engine(name, translator(generator)) for name, generator in fast.items()]


# --- CTranslate2 --------------------------------------------------------------------------------


def ct2_engines(
    model_path: str, data_dir: str, workdir: Path, beam: int, threads: int, max_len_b: int = MAX_LEN_B
) -> List[Engine]:
    """The CTranslate2 engines, or rows saying why they cannot run (never raises)."""
    try:
        import ctranslate2
        from ctranslate2.converters import FairseqConverter
    except ImportError:
        print(NOT_INSTALLED, file=sys.stderr)
        return [Engine(name, None, NOT_INSTALLED) for name in CT2_COMPUTE]
    engines = []
    for name, (compute_type, quantization) in CT2_COMPUTE.items():
        output_dir = workdir / name.split()[-1]
        try:
            converter = FairseqConverter(model_path, data_dir, source_lang="es", target_lang="en")
            converter.convert(str(output_dir), quantization=quantization, force=True)
        except Exception as error:  # noqa: BLE001  (any converter failure goes into the table)
            note = failure("conversion failed", error)
            print(f"{name}: {note}", file=sys.stderr)
            engines.append(Engine(name, None, note))
            continue
        try:
            translator = ctranslate2.Translator(
                str(output_dir), device="cpu", compute_type=compute_type, intra_threads=threads, inter_threads=1
            )
        except Exception as error:  # noqa: BLE001
            engines.append(Engine(name, None, failure("loading failed", error)))
            continue

        def translate(batch: List[List[str]], translator=translator) -> List[List[str]]:
            results = translator.translate_batch(
                batch,
                beam_size=beam,
                patience=1,
                length_penalty=1,
                max_input_length=0,
                max_decoding_length=max_len_b,
                min_decoding_length=1,
            )
            return [result.hypotheses[0] for result in results]

        how = f"converted with quantization={quantization}, " if quantization else ""
        engines.append(Engine(name, translate, f"{how}compute_type={compute_type}"))
    return engines


def ct2_version() -> str:
    try:
        import ctranslate2

        return ctranslate2.__version__
    except ImportError:
        return "not installed"


# --- the run ------------------------------------------------------------------------------------


def run(engines: Sequence[Engine], batches: List[List[List[str]]], repeats: int) -> None:
    """Times each runnable engine over all batches, engines alternating within each repeat,
    after one untimed warm-up batch per engine."""
    for engine in engines:
        if engine.translate is not None and batches:
            try:
                engine.translate(batches[0])
            except Exception as error:  # noqa: BLE001
                engine.translate, engine.note = None, failure("failed", error)
    for _ in range(repeats):
        for engine in engines:
            if engine.translate is None:
                continue
            try:
                with peak_rss() as peak:
                    started = time.perf_counter()
                    outputs = [pieces for batch in batches for pieces in engine.translate(batch)]
                    seconds = time.perf_counter() - started
            except Exception as error:  # noqa: BLE001  (a peer failing mid-run goes into the table)
                engine.translate, engine.note = None, failure("failed", error)
                engine.times.clear()
                continue
            engine.times.append(seconds)
            engine.peaks.append(peak)
            engine.outputs = outputs
            print(f"{engine.name}: {engine.times[-1]:.2f} s", file=sys.stderr, flush=True)


def compare(
    path: Path = bible.CHECKPOINT,
    data_bin: Path = bible.MODEL_DIR,
    spm_model: Path = bible.SPM_MODEL,
    source: Path = bible.SOURCES,
    reference: Path = bible.REFERENCES,
    sentences: int = 256,
    batch_size: int = 32,
    beam: int = 5,
    threads: int = 1,
    repeats: int = 3,
    max_len_b: int = MAX_LEN_B,
    random_base: bool = False,
) -> List[Row]:
    """Every engine on the first ``sentences`` verses, in ``ENGINES`` order; ``random_base``:
    a random-weight transformer-base-sized model instead of ``path`` (``bible.random_base_checkpoint``)."""
    import sentencepiece

    spm = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    references = read_lines(reference, sentences)
    batches = batched(bible.encoded_verses(sentences, spm_model, source), batch_size)
    with tempfile.TemporaryDirectory() as workdir:
        if random_base:
            path = bible.random_base_checkpoint(Path(workdir) / "base.pt")
        engines = fairseq_engines(str(path), str(data_bin), beam, batches, max_len_b)
        engines += ct2_engines(str(path), str(data_bin), Path(workdir), beam, threads, max_len_b)
        run(engines, batches, repeats)

    decoded = {e.name: [spm.decode(pieces) for pieces in e.outputs] for e in engines if e.times}
    by_name = {e.name: e for e in engines}
    if by_name[STOCK].times and by_name[FAST].times:  # ours must match stock to the subword token
        same = sum(a == b for a, b in zip(by_name[STOCK].outputs, by_name[FAST].outputs))
        by_name[FAST].note = f"same subword tokens as stock: {same}/{len(references)}"
    return summarize(
        {e.name: e.times for e in engines},
        decoded,
        len(references),
        {name: bible.bleu(text, references) for name, text in decoded.items()},
        {e.name: e.note for e in engines},
        {e.name: highest(e.peaks) for e in engines},
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sentences", type=int, default=256, help="the first N test verses")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per batch, for every engine")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--max-len-b", type=int, default=MAX_LEN_B, help="at most this many tokens before EOS")
    parser.add_argument("--path", type=Path, default=bible.CHECKPOINT)
    parser.add_argument(
        "--random-base",
        action="store_true",
        help="instead of --path: a transformer-base-sized model (6+6 layers, 512 dims) with random "
        "weights and the Bible dictionaries; its outputs run to the length limit",
    )
    parser.add_argument("--data-bin", type=Path, default=bible.MODEL_DIR, help="holds dict.es.txt and dict.en.txt")
    parser.add_argument("--spm-model", type=Path, default=bible.SPM_MODEL)
    parser.add_argument("--source", type=Path, default=bible.SOURCES)
    parser.add_argument("--reference", type=Path, default=bible.REFERENCES)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.WARNING)  # fairseq and the converter log their configs
    rows = compare(
        args.path, args.data_bin, args.spm_model, args.source, args.reference,
        args.sentences, args.batch_size, args.beam, args.threads, args.repeats, args.max_len_b, args.random_base,
    )  # fmt: skip
    import fairseq

    sentences = len(read_lines(args.reference, args.sentences))
    model = "random-weight transformer-base-sized model" if args.random_base else f"Bible es-en model (`{args.path.name}`)"
    header = (
        f"{model}, first {sentences} test verses, batch {args.batch_size}, "
        f"beam {args.beam}, max length {args.max_len_b} tokens, lenpen 1; torch {torch.__version__}, fairseq "
        f"{fairseq.__version__}, ctranslate2 {ct2_version()}, threads {args.threads} (torch and CTranslate2 "
        f"intra_threads, inter_threads 1), {cpu_name()}, median of {args.repeats}, engines alternating in one process"
    )
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
