"""--tokenizer moses without -s/-t: the languages come from the data-bin, as the task infers
them (fairseq 0.12 under omegaconf 2.3 fails to compose its config otherwise)."""

import pytest
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq_cli import generate

from fairseq_fastseq.languages import LanguagesNotFoundError

from .cli import results, with_plugin


def _parse(*argv):
    return options.parse_args_and_arch(options.get_generation_parser(), [*map(str, argv)])


@pytest.mark.parametrize("generator", ["stock", "fast"])
def test_moses_without_languages_generates_what_it_does_with_them(toy_models, tmp_path, generator):
    model = toy_models["transformer_subword_nmt"]
    common = [model.data_bin, "--path", model.checkpoint, "--cpu", "--beam", "3", "--batch-size", "16", "--num-workers", "0"]
    common += ["--bpe", "subword_nmt", "--bpe-codes", model.bpe_model, "--tokenizer", "moses"]
    common += with_plugin("--generator", generator)
    outputs = {}
    for name, languages in (("inferred", []), ("given", ["-s", "src", "-t", "tgt"])):
        args = _parse(*common, *languages, "--results-path", tmp_path / name)
        assert convert_namespace_to_omegaconf(args).tokenizer.source_lang == "src"
        generate.main(args)
        outputs[name] = results((tmp_path / name / "generate-test.txt").read_text())
    assert any(line.startswith("D-") for line in outputs["given"])
    assert outputs["inferred"] == outputs["given"]


def test_moses_without_languages_on_a_data_bin_without_them_names_the_flags(toy_models):
    lm_data = toy_models["transformer_lm"].data_bin  # a language-model data-bin: test.bin, no pair
    args = _parse(lm_data, "--task", "translation", "--tokenizer", "moses", *with_plugin())
    with pytest.raises(LanguagesNotFoundError, match="tokenizer.source_lang needs a language, .* pass --source-lang SRC --target-lang TGT"):
        convert_namespace_to_omegaconf(args)
