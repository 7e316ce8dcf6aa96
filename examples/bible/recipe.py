"""Train a small Spanish→English transformer on the public-domain Bible corpus, end to end.

    python examples/bible/recipe.py                      # every step, CPU (about 1h10 on 2 cores)
    python examples/bible/recipe.py --steps evaluate     # BLEU of the shipped model, stock vs fast
    python examples/bible/recipe.py --device cuda        # the same recipe on a GPU, with --fp16

Steps (``--steps``, comma-separated, run in this order):

- ``spm``: a joint sentencepiece model on train es+en; encode train/valid/test;
- ``binarize``: ``fairseq-preprocess --joined-dictionary`` into the data-bin
  (which also gets the sentencepiece model, so a data-bin is all a training run needs);
- ``train``: ``fairseq-train``, a 3+3-layer transformer with shared embeddings;
- ``export``: the final checkpoint (or the mean of the last epochs), without optimizer
  state, weights stored in fp16 (they load into the fp32 model unchanged): ``--model-dir``/model.pt;
- ``assets``: copy the dictionaries, sentencepiece model and binarized test set from the
  data-bin into ``--model-dir``, which then is a data-bin of its own for fairseq-generate;
- ``evaluate``: ``fairseq-generate`` on the 1,004-verse test set, stock and
  ``--generator fast``, sacrebleu on detokenized output against the raw references.

Every fairseq tool runs from ``fairseq_cli.<tool>`` in a ``python -c`` subprocess, so the recipe
also runs where fairseq is importable but its console scripts are not installed.
"""

import argparse
import contextlib
import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CORPUS = HERE / "data"
PLUGIN_DIR = REPO / "fairseq_fastseq"
DEFAULT_WORKDIR = REPO / "examples" / "work" / "bible"
DEFAULT_MODEL_DIR = HERE / "model"
STEPS = ("spm", "binarize", "train", "export", "assets", "evaluate")

SRC, TGT = "es", "en"
SPLITS = ("train", "valid", "test")
SPM_MODEL = "spm.model"
EXPORTED = "model.pt"
# 8k joint pieces: ~1.35 pieces per word on 29k verses, and a small shared embedding table.
VOCAB_SIZE = 8000

# About 7.7M parameters (2M of them the shared embedding table): 15 MB as fp16. Pre-norm
# layers take a higher learning rate, which matters in a budget of 1,100 updates.
MODEL_ARGS = [
    "--arch", "transformer", "--share-all-embeddings",
    "--encoder-layers", "3", "--decoder-layers", "3",
    "--encoder-embed-dim", "256", "--decoder-embed-dim", "256",
    "--encoder-ffn-embed-dim", "1024", "--decoder-ffn-embed-dim", "1024",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
    "--encoder-normalize-before", "--decoder-normalize-before", "--dropout", "0.1",
]  # fmt: skip
# One epoch is 275 updates of ~3,600 target tokens. On 2 idle CPU cores (~950-1,100 target
# tokens/s) 4 epochs take about 60-70 minutes; the model is still far from converged, so the
# default is the final checkpoint rather than an average of epochs (see README.md).
MAX_EPOCH = 4
AVERAGE_LAST = 1
TRAIN_ARGS = [
    "--task", "translation", "--source-lang", SRC, "--target-lang", TGT,
    "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
    "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0",
    "--lr", "0.002", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "400",
    "--warmup-init-lr", "1e-07", "--max-tokens", "4096", "--seed", "1",
    "--keep-last-epochs", "3", "--log-format", "simple", "--log-interval", "25",
    "--num-workers", "1",
]  # fmt: skip

VALID_LINE = re.compile(r"valid on 'valid' subset \| (.*)$", re.M)
BLEU_LINE = re.compile(r"Generate test with .*: (BLEU = .*)$", re.M)


def run_fairseq(
    tool: str, args: Sequence[object], log: Path, env: Optional[Dict[str, str]] = None, echo: bool = False
) -> str:
    """Run ``fairseq_cli.<tool>`` in a subprocess, logging to ``log``; return the log text.

    ``os._exit`` skips interpreter teardown, where fairseq's leftover worker threads
    sometimes abort the process after the work is safely written.
    """
    program = (
        f"import os, sys; sys.argv[0] = 'fairseq-{tool}'; from fairseq_cli.{tool} import cli_main; "
        "cli_main(); sys.stdout.flush(); sys.stderr.flush(); os._exit(0)"
    )
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", program, *map(str, args)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with open(log, "w") as out, subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        for line in proc.stdout:
            out.write(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
    if proc.returncode != 0:
        raise RuntimeError(f"fairseq-{tool} failed (exit {proc.returncode}), log {log}:\n{log.read_text()[-3000:]}")
    return log.read_text()


def _thread_env(threads: int) -> Dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


# fairseq 0.12 calls torch.load with torch's default, which is weights_only=True on torch >= 2.6
# and refuses fairseq checkpoints. Runs without the plugin (which allow-lists fairseq's classes)
# get this instead: training (resume), the export check and the stock evaluation, all on our own files.
TRUSTED_LOAD_ENV = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}


@contextlib.contextmanager
def _trusted_torch_load() -> Iterator[None]:
    old = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    os.environ.update(TRUSTED_LOAD_ENV)
    try:
        yield
    finally:
        if old is None:
            del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = old


def train_sentencepiece(workdir: Path, threads: int = 2) -> Path:
    """Unzip the corpus, train a joint unigram model on train es+en, encode every split.

    Returns the folder of encoded ``{split}.{es,en}`` files; the model is ``workdir/spm.model``.
    """
    import sentencepiece as spm

    raw, encoded = workdir / "raw", workdir / "spm"
    raw.mkdir(parents=True, exist_ok=True)
    encoded.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        for lang in (SRC, TGT):
            with gzip.open(CORPUS / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
                (raw / f"{split}.{lang}").write_text(f.read(), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=[str(raw / f"train.{SRC}"), str(raw / f"train.{TGT}")],
        model_prefix=str(workdir / "spm"), vocab_size=VOCAB_SIZE, model_type="unigram",
        character_coverage=1.0, num_threads=threads, minloglevel=2,
        # fairseq's dictionary adds its own <s>, <pad>, </s>, <unk>.
        bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1,
    )  # fmt: skip
    processor = spm.SentencePieceProcessor(model_file=str(workdir / SPM_MODEL))
    for split in SPLITS:
        for lang in (SRC, TGT):
            lines = (raw / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()
            pieces = processor.encode(lines, out_type=str)
            (encoded / f"{split}.{lang}").write_text("".join(" ".join(p) + "\n" for p in pieces), encoding="utf-8")
    return encoded


def binarize(encoded: Path, spm_model: Path, data_bin: Path, threads: int = 2) -> Path:
    """``fairseq-preprocess`` with one dictionary for both languages (for --share-all-embeddings)."""
    data_bin.mkdir(parents=True, exist_ok=True)
    run_fairseq(
        "preprocess",
        [
            "--source-lang", SRC, "--target-lang", TGT, "--joined-dictionary",
            "--trainpref", encoded / "train", "--validpref", encoded / "valid", "--testpref", encoded / "test",
            "--destdir", data_bin, "--workers", threads,
        ],  # fmt: skip
        data_bin / "preprocess.log",
        env=_thread_env(threads),
    )
    shutil.copy(spm_model, data_bin / SPM_MODEL)
    return data_bin


def train(
    data_bin: Path,
    save_dir: Path,
    device: str = "cpu",
    threads: int = 2,
    max_epoch: int = MAX_EPOCH,
    max_update: int = 0,
    minutes: float = 0,
) -> Path:
    """``fairseq-train`` with the recipe's hyperparameters; ``cuda`` only adds ``--fp16``.

    Resumes from ``save_dir/checkpoint_last.pt`` if present. ``minutes`` caps the training
    time (fairseq's ``--stop-time-hours``, checked after each update). Returns the train log.
    """
    device_args = ["--fp16"] if device == "cuda" else ["--cpu"]
    limits = ["--max-epoch", max_epoch, "--max-update", max_update]
    if minutes > 0:
        limits += ["--stop-time-hours", minutes / 60]
    log = save_dir / "train.log"
    text = run_fairseq(
        "train",
        [data_bin, "--save-dir", save_dir, *TRAIN_ARGS, *MODEL_ARGS, *limits, *device_args],
        log,
        env={**_thread_env(threads), **TRUSTED_LOAD_ENV},
        echo=True,
    )
    valid = VALID_LINE.findall(text)
    print(f"last validation: {valid[-1] if valid else 'none'}")
    return log


def _last_checkpoints(save_dir: Path, count: int) -> List[Path]:
    """``checkpoint_last.pt`` for one (it is newer than the last epoch when a cap stopped training
    mid-epoch), else the newest ``count`` epoch checkpoints."""
    epochs = sorted(save_dir.glob("checkpoint[0-9]*.pt"), key=lambda p: int(re.sub(r"\D", "", p.stem)))
    return epochs[-count:] if count > 1 and epochs else [save_dir / "checkpoint_last.pt"]


def export(save_dir: Path, out: Path, average_last: int = AVERAGE_LAST, data_bin: Optional[Path] = None) -> Path:
    """Write a small inference checkpoint: the final one (or the mean of the last epochs), fp16 weights.

    It stays a normal fairseq checkpoint dict (``cfg``, ``model``, last ``optimizer_history``
    entry, minimal ``extra_state``), without the optimizer state. Equal tensors (the tied
    embeddings: fairseq saves a GPU run's copies separately) are stored once. fairseq's
    ``load_state_dict`` copies the fp16 values into the fp32 model. With ``data_bin``, the
    file is loaded back through fairseq to check exactly that.
    """
    import torch

    paths = _last_checkpoints(save_dir, average_last)
    total: Dict[str, torch.Tensor] = {}
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=False)  # our own training output
        for key, tensor in state["model"].items():
            if tensor.is_floating_point():
                total[key] = total[key] + tensor.float() if key in total else tensor.float().clone()
    weights = {}
    for key, tensor in state["model"].items():  # the last checkpoint fixes layout and non-float values
        weights[key] = (total[key] / len(paths)).half() if tensor.is_floating_point() else tensor
    weights = share_equal_tensors(weights)
    extra = state["extra_state"]
    exported = {
        "cfg": state["cfg"],
        "args": state.get("args"),
        "model": weights,
        "optimizer_history": state["optimizer_history"][-1:],
        "extra_state": {"epoch": extra.get("epoch"), "train_iterator": extra.get("train_iterator")},
        "exported_from": [p.name for p in paths],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(exported, out)
    print(f"exported {out} ({out.stat().st_size / 2**20:.1f} MiB) from {', '.join(p.name for p in paths)}")
    if data_bin is not None:
        _check_loads_as_fp32(out, data_bin)
    return out


def share_equal_tensors(weights: Dict[str, "torch.Tensor"]) -> Dict[str, "torch.Tensor"]:
    """``weights`` with every tensor equal to an earlier one replaced by that one, so that
    ``torch.save`` stores it once."""
    import torch

    kept: List[torch.Tensor] = []
    shared = {}
    for key, tensor in weights.items():
        same = next((k for k in kept if k.shape == tensor.shape and k.dtype == tensor.dtype and torch.equal(k, tensor)), None)
        if same is None:
            kept.append(tensor)
        shared[key] = tensor if same is None else same
    return shared


def _check_loads_as_fp32(checkpoint: Path, data_bin: Path) -> None:
    """Load through fairseq as fairseq-generate does; every parameter must be fp32 and equal to the file."""
    import torch
    from fairseq import checkpoint_utils

    with _trusted_torch_load():
        overrides = {"data": str(data_bin)}
        (model,), _, _ = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)], arg_overrides=overrides)
        stored = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    for name, param in model.state_dict().items():
        if param.is_floating_point() and name in stored:
            assert param.dtype == torch.float32, (name, param.dtype)
            assert torch.equal(param, stored[name].float()), name
    print(f"checked: {checkpoint.name} loads into the fp32 model with the stored values")


def install_assets(data_bin: Path, model_dir: Path) -> None:
    """Copy what inference needs next to model.pt: dictionaries, sentencepiece model, binarized test set.

    ``model_dir`` is then itself a data-bin for ``fairseq-generate``.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    names = [f"dict.{SRC}.txt", f"dict.{TGT}.txt", SPM_MODEL]
    names += [f"test.{SRC}-{TGT}.{lang}.{ext}" for lang in (SRC, TGT) for ext in ("bin", "idx")]
    for name in names:
        shutil.copy(data_bin / name, model_dir / name)


def _generate(
    model_dir: Path, results: Path, generator: str, device: str, beam: int, threads: int, extra: Sequence[str]
) -> Dict[str, object]:
    """One fairseq-generate run on the test set: detokenized hypotheses by id, fairseq's BLEU line, seconds."""
    args: List[object] = [
        model_dir, "--path", model_dir / EXPORTED, "--source-lang", SRC, "--target-lang", TGT,
        "--gen-subset", "test", "--beam", beam, "--batch-size", 64,
        # fairseq 0.12 (ve-fairseq build) batch_by_size drops the last len % multiple sentences: 4 of 1,004 at 8
        "--required-batch-size-multiple", 1,
        "--bpe", "sentencepiece", "--sentencepiece-model", model_dir / SPM_MODEL,
        "--scoring", "sacrebleu", "--results-path", results, *extra,
    ]  # fmt: skip
    args += ["--fp16"] if device == "cuda" else ["--cpu"]
    if generator == "fast":  # the plugin allow-lists fairseq's checkpoint classes for torch.load
        env = _thread_env(threads)
        args += ["--user-dir", PLUGIN_DIR, "--generator", "fast"]
    else:
        env = {**_thread_env(threads), **TRUSTED_LOAD_ENV}
    started = time.perf_counter()
    run_fairseq("generate", args, results / "run.log", env=env)
    seconds = time.perf_counter() - started
    text = (results / "generate-test.txt").read_text(encoding="utf-8")
    hypotheses = {}
    for line in text.splitlines():
        if line.startswith("D-"):
            ident, _score, hypothesis = (line.split("\t") + [""])[:3]
            hypotheses[int(ident[2:])] = hypothesis
    bleu = BLEU_LINE.search(text)
    return {"hypotheses": hypotheses, "fairseq_bleu": bleu.group(1) if bleu else None, "seconds": seconds}


def evaluate(
    model_dir: Path, workdir: Path, device: str = "cpu", beam: int = 5, threads: int = 2, extra: Sequence[str] = ()
) -> Dict[str, object]:
    """BLEU of stock and fast fairseq-generate on the test set, and how many outputs agree.

    The sacrebleu score compares the detokenized hypotheses (``D-`` lines) with the raw
    reference verses, so it does not depend on the sentencepiece round trip. ``extra`` goes to
    fairseq-generate as it is (e.g. ``--max-len-b 20`` for a quick check of a barely trained model).
    """
    import sacrebleu

    with gzip.open(CORPUS / f"test.{TGT}.gz", "rt", encoding="utf-8") as f:
        references = f.read().splitlines()
    report: Dict[str, object] = {"beam": beam}
    outputs = {}
    for generator in ("stock", "fast"):
        run = _generate(model_dir, workdir / "eval" / generator, generator, device, beam, threads, extra)
        if sorted(run["hypotheses"]) != list(range(len(references))):
            raise RuntimeError(f"fairseq-generate translated {len(run['hypotheses'])} of {len(references)} verses")
        hypotheses = [run["hypotheses"][i] for i in range(len(references))]
        outputs[generator] = hypotheses
        metric = sacrebleu.BLEU()
        bleu = metric.corpus_score(hypotheses, [references])
        report[generator] = {"sacrebleu": round(bleu.score, 2), "signature": str(metric.get_signature()),
                             "fairseq_bleu": run["fairseq_bleu"], "seconds": round(run["seconds"], 1)}  # fmt: skip
        print(f"--generator {generator}: BLEU {bleu.score:.2f} in {run['seconds']:.0f}s; {run['fairseq_bleu']}")
    same = sum(a == b for a, b in zip(outputs["stock"], outputs["fast"]))
    report["identical"] = f"{same}/{len(outputs['stock'])}"
    print(f"identical detokenized outputs, stock vs fast: {report['identical']}")
    (workdir / "eval" / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="scratch: text, checkpoints, eval")
    parser.add_argument("--data-bin", type=Path, help="binarized data (default: WORKDIR/data-bin)")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="exported model folder")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda adds --fp16, nothing else")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (OMP_NUM_THREADS) and workers")
    parser.add_argument("--max-epoch", type=int, default=MAX_EPOCH)
    parser.add_argument("--max-update", type=int, default=0, help="stop earlier, for a quick check (0: no cap)")
    parser.add_argument("--minutes", type=float, default=0, help="training time budget (0: none)")
    parser.add_argument("--average-last", type=int, default=AVERAGE_LAST, help="epoch checkpoints to average")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--generate-args", default="", help="more fairseq-generate options, e.g. '--max-len-b 20'")
    args = parser.parse_args(argv)
    steps = args.steps.split(",")
    unknown = set(steps) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; choose from {','.join(STEPS)}")
    workdir = args.workdir.resolve()
    data_bin = (args.data_bin or workdir / "data-bin").resolve()
    model_dir = args.model_dir.resolve()
    save_dir = workdir / "checkpoints"

    if "spm" in steps:
        encoded = train_sentencepiece(workdir, args.threads)
        print(f"sentencepiece: {workdir / SPM_MODEL}, encoded text in {encoded}")
    if "binarize" in steps:
        binarize(workdir / "spm", workdir / SPM_MODEL, data_bin, args.threads)
        print(f"data-bin: {data_bin}")
    if "train" in steps:
        train(data_bin, save_dir, args.device, args.threads, args.max_epoch, args.max_update, args.minutes)
    if "export" in steps:
        export(save_dir, model_dir / EXPORTED, args.average_last, data_bin)
    if "assets" in steps:
        install_assets(data_bin, model_dir)
        print(f"assets: {model_dir}")
    if "evaluate" in steps:
        evaluate(model_dir, workdir, args.device, args.beam, args.threads, shlex.split(args.generate_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
