"""The --generator choice and its knobs reach fairseq's config, and route build_generator."""

import pytest
from fairseq import checkpoint_utils, options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.sequence_generator import SequenceGenerator
from hydra import compose, initialize_config_module

from fairseq_fastseq.generator import FastSequenceGenerator
from fairseq_fastseq.hook import selection

from .conftest import PLUGIN_DIR


def parse_generate_args(*argv):
    parser = options.get_generation_parser()
    args = options.parse_args_and_arch(parser, input_args=[*map(str, argv), "--user-dir", str(PLUGIN_DIR)])
    return convert_namespace_to_omegaconf(args)


def test_cli_choice_and_knobs_land_in_cfg(toy_models):
    cfg = parse_generate_args(toy_models["transformer"].data_bin, "--generator", "fast", "--fast-on-unsupported", "error")
    assert cfg.generator == "fast"
    assert cfg.fastseq.on_unsupported == "error"
    assert selection(cfg.generation) == ("fast", cfg.fastseq)


def test_attention_knobs_land_in_cfg(toy_models):
    cfg = parse_generate_args(
        toy_models["transformer"].data_bin, "--generator", "fast",
        "--fast-self-attn-cache", "stock", "--fast-encoder-projection", "per_beam",
    )  # fmt: skip
    _, knobs = selection(cfg.generation)
    assert (knobs.self_attn_cache, knobs.encoder_projection) == ("stock", "per_beam")


def test_default_choice_is_stock(toy_models):
    cfg = parse_generate_args(toy_models["transformer"].data_bin)
    assert cfg.generator == "stock"
    assert cfg.fastseq.on_unsupported == "fallback"
    assert cfg.fastseq.self_attn_cache == "time_major"
    assert cfg.fastseq.encoder_projection == "per_sentence"


def test_hydra_overrides_compose():
    """Composed the way fairseq composes (Hydra 1.1 semantics: schema node ``config``)."""
    with initialize_config_module(config_module="fairseq.config", version_base="1.1"):
        cfg = compose("config", overrides=["generator=fast", "fastseq.on_unsupported=error"])
    assert cfg.generator == "fast"
    assert cfg.fastseq.on_unsupported == "error"


def _build(toy_model, *argv):
    cfg = parse_generate_args(toy_model.data_bin, "--path", toy_model.checkpoint, *argv)
    task = tasks.setup_task(cfg.task)
    models, _ = checkpoint_utils.load_model_ensemble([str(toy_model.checkpoint)], task=task)
    return task, task.build_generator(models, cfg.generation)


def test_build_generator_routes_on_choice(toy_models):
    _, fast = _build(toy_models["transformer"], "--generator", "fast")
    _, stock = _build(toy_models["transformer"], "--generator", "stock")
    assert isinstance(fast, FastSequenceGenerator)
    assert type(stock) is SequenceGenerator


def test_translation_from_pretrained_bart_routes_and_keeps_its_eos(toy_models):
    """That task overrides build_generator without super(); it must still route."""
    bart = toy_models["bart"]
    cfg = parse_generate_args(
        bart.data_bin, "--task", "translation_from_pretrained_bart", "--langs", "src,tgt",
        "--source-lang", "src", "--target-lang", "tgt", "--generator", "fast", "--beam", "3",
    )  # fmt: skip
    task = tasks.setup_task(cfg.task)
    # Stock 0.12's build_generator of this task reads self.args, which nothing sets any
    # more (an AttributeError with or without the plugin); set it as fairseq 0.10 did.
    task.args = cfg.task
    models, _ = checkpoint_utils.load_model_ensemble([str(bart.checkpoint)])
    generator = task.build_generator(models, cfg.generation)
    assert isinstance(generator, FastSequenceGenerator)
    assert generator.eos == task.target_dictionary.index("[tgt]")
    assert generator.beam_size == 3


def test_beam_zero_gets_a_clear_error(toy_models):
    with pytest.raises(ValueError, match="--beam must be at least 1 \\(got 0\\)"):
        _build(toy_models["transformer"], "--generator", "fast", "--beam", "0")
