"""fairseq-interactive and the Python hub interface: fast == stock, one line to opt in."""

import logging

import pytest
import torch
from fairseq.models.transformer import TransformerModel
from fairseq.models.transformer_lm import TransformerLanguageModel

from testsupport import toy

from .cli import fairseq, with_plugin

FAST_LOG_LINE = "generator: fast (FastSequenceGenerator)"


def interactive(toy_model, lines, *args):
    """fairseq-interactive on ``lines`` (stdin); returns (result lines without timings, stderr)."""
    args = [toy_model.data_bin, "--path", toy_model.checkpoint, "--task", toy_model.task, "--cpu", *args]
    run = fairseq("interactive", args, input="".join(line + "\n" for line in lines))
    assert run.returncode == 0, run.stderr[-3000:]
    results = [line for line in run.stdout.splitlines() if line[:2] in ("S-", "H-", "D-", "P-", "A-")]
    return results, run.stderr


def _sources(toy_model, count=10):
    side = toy.TARGET_LANG if toy_model.task == "language_modeling" else toy.SOURCE_LANG
    lines = (toy_model.data_bin.parent / "corpus" / f"test.{side}").read_text().splitlines()[:count]
    if toy_model.task == "language_modeling":  # prompts of different lengths, none empty
        lines = [" ".join(line.split()[: 1 + i % 4]) for i, line in enumerate(lines) if line]
    return lines


INTERACTIVE_CASES = {
    "transformer-beam5-nbest2": ("transformer", ["--beam", "5", "--nbest", "2"]),
    "bart-beam4": ("bart", ["--beam", "4"]),
    "lm-beam4": ("transformer_lm", ["--beam", "4", "--max-len-b", "20"]),
    "lm-top-p-sampling": ("transformer_lm", ["--beam", "2", "--nbest", "2", "--sampling", "--sampling-topp", "0.9", "--seed", "7", "--max-len-b", "20"]),
}


@pytest.mark.parametrize("case", list(INTERACTIVE_CASES))
def test_interactive_fast_matches_stock(toy_models, case):
    name, args = INTERACTIVE_CASES[case]
    model = toy_models[name]
    batching = ["--buffer-size", "4", "--batch-size", "4"]  # several batches of mixed lengths
    stock, _ = interactive(model, _sources(model), *args, *batching)
    fast, log = interactive(model, _sources(model), *args, *batching, *with_plugin("--generator", "fast"))
    assert FAST_LOG_LINE in log
    assert fast == stock
    assert len([line for line in stock if line.startswith("H-")]) >= len(_sources(model))


@pytest.fixture(scope="module")
def hubs(toy_models):
    translation = toy_models["transformer"]
    lm = toy_models["transformer_lm"]
    return {
        "translation": TransformerModel.from_pretrained(
            str(translation.checkpoint.parent), checkpoint_file=translation.checkpoint.name,
            data_name_or_path=str(translation.data_bin),
        ),
        "lm": TransformerLanguageModel.from_pretrained(
            str(lm.checkpoint.parent), checkpoint_file=lm.checkpoint.name, data_name_or_path=str(lm.data_bin),
        ),
    }  # fmt: skip


def _sample(hub, sentences, caplog, **options):
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="fairseq_fastseq"):
        caplog.clear()
        output = hub.sample(sentences, **options)
    used_fast = any(FAST_LOG_LINE in record.getMessage() for record in caplog.records)
    return output, used_fast


HUB_CASES = {
    "translate-beam5": ("translation", dict(beam=5)),
    "translate-greedy-lenpen": ("translation", dict(beam=1, lenpen=0.5)),
    "lm-beam4": ("lm", dict(beam=4, max_len_b=20)),
    "lm-top-k-sampling": ("lm", dict(beam=1, sampling=True, sampling_topk=5, seed=11, max_len_b=20)),
}


@pytest.mark.parametrize("case", list(HUB_CASES))
def test_hub_generator_keyword_is_fast_and_identical(toy_models, hubs, caplog, case):
    kind, options = HUB_CASES[case]
    model = toy_models["transformer" if kind == "translation" else "transformer_lm"]
    sentences = _sources(model)
    stock, stock_used_fast = _sample(hubs[kind], sentences, caplog, **options)
    fast, used_fast = _sample(hubs[kind], sentences, caplog, generator="fast", **options)
    assert (stock_used_fast, used_fast) == (False, True)
    assert fast == stock


@pytest.mark.parametrize("misspelt", ["fastt", "Fast"])
def test_hub_generator_keyword_with_an_unknown_value_names_the_choices(hubs, misspelt):
    with pytest.raises(ValueError, match=f"unknown generator '{misspelt}': the choices are 'stock', 'fast'"):
        hubs["translation"].translate(["w1 w2"], beam=2, generator=misspelt)
