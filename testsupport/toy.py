"""Tiny real fairseq models, trained in seconds on CPU, for the tests and benchmarks.

The task is learnable but not trivial: the target is the source reversed with every word
relabelled. After a few hundred updates a model emits EOS at varied steps (some
hypotheses finish early, some run long), which is what exercises a beam search; a
random-weight model that never emits EOS would hide most of the search logic.

Everything goes through fairseq's own command-line tools (``fairseq-preprocess``,
``fairseq-train``), run as subprocesses, so the checkpoints and data-bins are exactly what
users have.
"""

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

SOURCE_LANG, TARGET_LANG = "src", "tgt"
SPLIT_SIZES = {"train": 3000, "valid": 100, "test": 48}
VOCAB_SIZE = 24
MAX_WORDS = 14
# The test split also gets an empty source line and one far longer than any training line.
EDGE_CASE_LENGTHS = (0, 40)

_TINY_TRANSFORMER = [
    "--encoder-layers", "2", "--decoder-layers", "2",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
]  # fmt: skip

# name -> fairseq-train arguments; every translation model reads the same data-bin.
TRANSLATION_MODELS: Dict[str, List[str]] = {
    "transformer": ["--arch", "transformer", *_TINY_TRANSFORMER],
    "transformer_prenorm_2heads": [
        "--arch", "transformer", *_TINY_TRANSFORMER,
        "--encoder-normalize-before", "--decoder-normalize-before",
        "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    ],
    "transformer_shared_8heads": [
        "--arch", "transformer", *_TINY_TRANSFORMER, "--share-all-embeddings",
        "--encoder-attention-heads", "8", "--decoder-attention-heads", "8",
    ],
    "bart": [
        "--arch", "bart_base", *_TINY_TRANSFORMER,
        "--max-source-positions", "64", "--max-target-positions", "64",
    ],
    # No fairseq MultiheadAttention: the fast search applies, the attention variants do not.
    "lstm": [
        "--arch", "lstm", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
        "--encoder-hidden-size", "32", "--decoder-hidden-size", "32", "--decoder-out-embed-dim", "32",
    ],
}  # fmt: skip
LANGUAGE_MODELS: Dict[str, List[str]] = {
    "transformer_lm": [
        "--arch", "transformer_lm", "--decoder-layers", "2", "--decoder-embed-dim", "32",
        "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "4",
        "--share-decoder-input-output-embed", "--tokens-per-sample", "64",
        "--sample-break-mode", "eos",
    ],
}  # fmt: skip


def write_corpus(directory: Path, seed: int = 0) -> None:
    """Write ``{train,valid,test}.{src,tgt}``: random word strings and their reversed relabelling.

    An existing corpus is kept as it is (it may be in use by another test process)."""
    if (directory / f"test.{TARGET_LANG}").exists():
        return
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, size in SPLIT_SIZES.items():
        sources, targets = [], []
        lengths = [rng.randint(1, MAX_WORDS) for _ in range(size)]
        if split == "test":
            lengths[: len(EDGE_CASE_LENGTHS)] = EDGE_CASE_LENGTHS
        for length in lengths:
            words = [rng.randrange(VOCAB_SIZE) for _ in range(length)]
            sources.append(" ".join(f"w{w}" for w in words))
            targets.append(" ".join(f"W{(w * 7) % VOCAB_SIZE}" for w in reversed(words)))
        (directory / f"{split}.{SOURCE_LANG}").write_text("\n".join(sources) + "\n")
        (directory / f"{split}.{TARGET_LANG}").write_text("\n".join(targets) + "\n")


# Target words that the BPE variants of the corpus write as punctuation, so that a moses
# detokenizer has something to do ("W5 ," -> "W5,").
PUNCTUATION = {"W0": ",", "W1": "."}
BPE_KINDS = ("subword_nmt", "sentencepiece")


def write_bpe_corpus(corpus: Path, directory: Path, kind: str) -> Path:
    """A BPE-encoded copy of ``corpus`` (with some target words as punctuation); returns the
    BPE model file (subword-nmt codes or a sentencepiece model) that decodes it. An existing
    one is kept as it is (it may be in use by another test process)."""
    if kind not in BPE_KINDS:
        raise ValueError(f"unknown BPE kind {kind!r}; one of {BPE_KINDS}")
    model = directory / ("codes" if kind == "subword_nmt" else "spm.model")
    if model.exists() and (directory / f"test.{TARGET_LANG}").exists():
        return model
    directory.mkdir(parents=True, exist_ok=True)
    texts = {}
    for split in SPLIT_SIZES:
        for lang in (SOURCE_LANG, TARGET_LANG):
            lines = (corpus / f"{split}.{lang}").read_text().splitlines()
            if lang == TARGET_LANG:
                lines = [" ".join(PUNCTUATION.get(word, word) for word in line.split()) for line in lines]
            texts[split, lang] = lines
    training_text = directory / "bpe-train.txt"
    training_text.write_text("\n".join(texts["train", SOURCE_LANG] + texts["train", TARGET_LANG]) + "\n")
    if kind == "subword_nmt":
        from subword_nmt.apply_bpe import BPE
        from subword_nmt.learn_bpe import learn_bpe

        with open(training_text) as infile, open(model, "w") as outfile:
            learn_bpe(infile, outfile, num_symbols=12)  # few merges: most words stay split
        with open(model) as codes:
            encode = BPE(codes).process_line
    else:
        import sentencepiece

        sentencepiece.SentencePieceTrainer.train(
            input=str(training_text), model_prefix=str(directory / "spm"), vocab_size=32,
            model_type="bpe", minloglevel=2,
        )  # fmt: skip
        processor = sentencepiece.SentencePieceProcessor(model_file=str(model))
        encode = lambda line: " ".join(processor.encode(line, out_type=str))  # noqa: E731
    for (split, lang), lines in texts.items():
        (directory / f"{split}.{lang}").write_text("".join(encode(line) + "\n" for line in lines))
    return model


def run_fairseq(tool: str, args: Sequence[str], log: Path) -> None:
    """Run a fairseq CLI in a subprocess; on failure raise with the tail of its log."""
    # os._exit skips interpreter teardown, where fairseq-train's leftover worker threads
    # sometimes abort the process ("terminate called without an active exception")
    # after the checkpoint is safely written.
    program = (
        f"import os, sys; from fairseq_cli.{tool} import cli_main; cli_main(); "
        "sys.stdout.flush(); sys.stderr.flush(); os._exit(0)"
    )
    command = [sys.executable, "-c", program]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(log, "w") as out:
        result = subprocess.run([*command, *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"fairseq-{tool} failed (exit {result.returncode}), log {log}:\n{tail}")


def preprocess(corpus: Path, destdir: Path) -> Path:
    """Binarize the corpus with one joined dictionary (so --share-all-embeddings works)."""
    if (destdir / "test.src-tgt.src.bin").exists():
        return destdir
    run_fairseq(
        "preprocess",
        [
            "--source-lang", SOURCE_LANG, "--target-lang", TARGET_LANG,
            "--trainpref", str(corpus / "train"), "--validpref", str(corpus / "valid"),
            "--testpref", str(corpus / "test"), "--destdir", str(destdir),
            "--joined-dictionary", "--workers", "1",
        ],  # fmt: skip
        destdir.parent / f"{destdir.name}.preprocess.log",
    )
    return destdir


def preprocess_bpe(corpus: Path, root: Path, kind: str) -> Tuple[Path, Path]:
    """The corpus BPE-encoded with ``kind`` and binarized: (data-bin, BPE model file)."""
    bpe_model = write_bpe_corpus(corpus, root / f"corpus_{kind}", kind)
    return preprocess(root / f"corpus_{kind}", root / f"bin_{kind}"), bpe_model


def preprocess_language_model(corpus: Path, destdir: Path, dictionary: Optional[Path] = None) -> Path:
    """Binarize the target side alone for a ``language_modeling`` task, with a dictionary of
    its own or with ``dictionary`` (a translation data-bin's ``dict.tgt.txt``: an LM for
    shallow fusion, ``--lm-path``, must index the translation model's target words)."""
    if (destdir / "test.bin").exists():
        return destdir
    run_fairseq(
        "preprocess",
        [
            "--only-source", "--trainpref", str(corpus / f"train.{TARGET_LANG}"),
            "--validpref", str(corpus / f"valid.{TARGET_LANG}"),
            "--testpref", str(corpus / f"test.{TARGET_LANG}"), "--destdir", str(destdir),
            "--workers", "1", *(["--srcdict", str(dictionary)] if dictionary is not None else []),
        ],  # fmt: skip
        destdir.parent / f"{destdir.name}.preprocess.log",
    )
    return destdir


def train(data_bin: Path, save_dir: Path, model_args: Sequence[str], task: str, updates: int = 200) -> Path:
    """Train with fairseq-train for ``updates`` steps; return the checkpoint path.

    An existing checkpoint in ``save_dir`` is reused as it is.
    """
    checkpoint = save_dir / "checkpoint_last.pt"
    if checkpoint.exists():
        return checkpoint
    run_fairseq(
        "train",
        [
            str(data_bin), "--task", task,
            "--optimizer", "adam", "--lr", "0.005", "--lr-scheduler", "inverse_sqrt",
            "--warmup-updates", "50", "--max-tokens", "2000", "--max-update", str(updates),
            "--dropout", "0", "--criterion", "cross_entropy", "--save-dir", str(save_dir),
            "--no-epoch-checkpoints", "--disable-validation", "--cpu", "--seed", "1",
            "--no-progress-bar", "--num-workers", "0",
            *model_args,  # last, so that a model's own settings win
        ],  # fmt: skip
        save_dir.parent / f"{save_dir.name}.train.log",
    )
    return checkpoint
