"""The real-mt model of benchmark.md: the bundled Spanish-English Bible checkpoint, its
test verses encoded as the model saw them, and BLEU against the reference verses."""

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from fairseq.tasks import FairseqTask

import fairseq_fastseq  # noqa: F401  (allow-lists fairseq's checkpoint globals for torch.load)
from fairseq_fastseq.demo import BIBLE, read_lines

MODEL_DIR = BIBLE / "model"  # data-bin of its own: dictionaries, binarized test set, spm.model
DATA_DIR = BIBLE / "data"
CHECKPOINT = MODEL_DIR / "model.pt"
SPM_MODEL = MODEL_DIR / "spm.model"
SOURCES = DATA_DIR / "test.es.gz"
REFERENCES = DATA_DIR / "test.en.gz"


def load(
    path: Path = CHECKPOINT, data_bin: Path = MODEL_DIR, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Tuple[torch.nn.Module, FairseqTask]:
    """The checkpoint through fairseq's own loader (fp16 weights on disk load as ``dtype``)."""
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(path)], arg_overrides={"data": str(data_bin), "source_lang": "es", "target_lang": "en"}
    )
    return models[0].to(device=device, dtype=dtype).eval(), task


def random_base_checkpoint(destination: Path, seed: int = 0) -> Path:
    """A transformer-base-sized checkpoint (``transformer_wmt_en_de``: 6+6 layers, 512 dims, 8
    heads, 2,048 FFN dims, post-norm) with random weights and the Bible model's dictionaries
    and configuration otherwise, written as a fairseq checkpoint (for peers that convert a file).
    Random weights rarely emit EOS: outputs run to the length limit."""
    import copy

    from fairseq import tasks
    from fairseq.models.transformer import transformer_wmt_en_de

    state = torch.load(str(CHECKPOINT), weights_only=True)
    args = copy.deepcopy(state["cfg"]["model"])
    sized = ("layers", "embed_dim", "ffn_embed_dim", "attention_heads", "normalize_before")
    for name in [f"{side}_{field}" for side in ("encoder", "decoder") for field in sized] + ["decoder_output_dim", "decoder_input_dim"]:
        delattr(args, name)
    args.arch, args.data = "transformer_wmt_en_de", str(MODEL_DIR)
    transformer_wmt_en_de(args)
    torch.manual_seed(seed)
    model = tasks.setup_task(args).build_model(args)
    state["cfg"]["model"], state["model"] = args, model.state_dict()
    torch.save(state, str(destination))
    return destination


def encoded_verses(count: int, spm_model: Path = SPM_MODEL, source: Path = SOURCES) -> List[List[str]]:
    """The first ``count`` source verses as sentencepiece pieces (the binarized test set's tokens)."""
    import sentencepiece

    spm = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    return [spm.encode(line, out_type=str) for line in read_lines(source, count)]


def collate(task: FairseqTask, batch: Sequence[Sequence[str]], device: str = "cpu") -> Dict:
    """A batch with the ids, order and left-padded layout of fairseq-generate's batches."""
    src_dict = task.source_dictionary
    tokens = [src_dict.encode_line(" ".join(pieces), add_if_not_exist=False).long() for pieces in batch]
    dataset = task.build_dataset_for_inference(tokens, [len(t) for t in tokens])
    sample = dataset.collater([dataset[i] for i in range(len(tokens))])
    return sample if device == "cpu" else _to(sample, device)


def _to(value, device: str):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    return value


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU of detokenized text, sacrebleu's defaults (13a)."""
    import sacrebleu

    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score


def first_verses_data_bin(count: int, workdir: Path) -> Path:
    """A data-bin of the first ``count`` test verses, binarized by ``fairseq-preprocess`` with
    the model's dictionaries (for short end-to-end runs)."""
    from testsupport.toy import run_fairseq

    import sentencepiece

    spm = sentencepiece.SentencePieceProcessor(model_file=str(SPM_MODEL))
    workdir.mkdir(parents=True, exist_ok=True)
    for language, path in (("es", SOURCES), ("en", REFERENCES)):
        pieces = [" ".join(spm.encode(line, out_type=str)) for line in read_lines(path, count)]
        (workdir / f"test.{language}").write_text("\n".join(pieces) + "\n", encoding="utf-8")
    destdir = workdir / "bin"
    run_fairseq(
        "preprocess",
        [
            "--source-lang", "es", "--target-lang", "en", "--testpref", str(workdir / "test"),
            "--srcdict", str(MODEL_DIR / "dict.es.txt"), "--tgtdict", str(MODEL_DIR / "dict.en.txt"),
            "--destdir", str(destdir), "--workers", "1",
        ],  # fmt: skip
        workdir / "preprocess.log",
    )
    return destdir
