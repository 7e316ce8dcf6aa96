"""The fast model variants (``models.py``): registered with fairseq, load stock checkpoints
unchanged, and generate exactly what the stock model generates."""

import copy

import pytest
import torch
from fairseq.dataclass.configs import GenerationConfig
from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY
from fairseq.modules.multihead_attention import MultiheadAttention

from fairseq_fastseq.attention import SentenceProjectedEncoderAttention, TimeMajorCachedSelfAttention
from fairseq_fastseq.config import FastGeneratorConfig
from fairseq_fastseq.choice import accelerate
from fairseq_fastseq.models import (
    FastBARTModel,
    FastTransformerLanguageModel,
    FastTransformerModel,
    as_fast_variant,
)

from .equivalence import assert_same_hypotheses, generate_all, load

FAMILIES = {
    "transformer": FastTransformerModel,
    "transformer_prenorm_2heads": FastTransformerModel,
    "transformer_shared_8heads": FastTransformerModel,
    "bart": FastBARTModel,
    "transformer_lm": FastTransformerLanguageModel,
}


def test_variants_are_in_fairseqs_registries():
    assert MODEL_REGISTRY["transformer_fast"] is FastTransformerModel
    assert MODEL_REGISTRY["bart_fast"] is FastBARTModel
    assert MODEL_REGISTRY["transformer_lm_fast"] is FastTransformerLanguageModel
    for arch in ("transformer_fast", "bart_fast", "bart_base_fast", "mbart_large_fast", "transformer_lm_fast"):
        assert arch in ARCH_MODEL_REGISTRY


def _stock_and_fast(toy_models, name, batch_size=16):
    toy = toy_models[name]
    models, task, batches = load((str(toy.checkpoint),), str(toy.data_bin), batch_size)
    fast_model = as_fast_variant(copy.deepcopy(models[0]))
    return models[0], fast_model, task, batches


@pytest.mark.parametrize("name", list(FAMILIES))
def test_stock_checkpoint_loads_unchanged_into_the_fast_variant(toy_models, name):
    stock, fast, _, _ = _stock_and_fast(toy_models, name)
    assert type(fast) is FAMILIES[name]
    assert sum(type(m) is TimeMajorCachedSelfAttention for m in fast.modules()) > 0
    cross = sum(type(m) is SentenceProjectedEncoderAttention for m in fast.modules())
    # BART already shares encoder keys/values by beam; a decoder-only LM has no encoder.
    assert cross == (0 if name in ("bart", "transformer_lm") else 2)
    want, got = stock.state_dict(), fast.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("generator", ["stock", "fast"])
def test_fast_variant_generates_what_the_stock_model_generates(toy_models, name, generator):
    stock_model, fast_model, task, batches = _stock_and_fast(toy_models, name, batch_size=8)
    gen_cfg = GenerationConfig(beam=4, nbest=2, max_len_b=20)
    expected = generate_all(task.build_generator([stock_model], gen_cfg), task, [stock_model], batches, 0, None, None)
    variant_generator = task.build_generator([fast_model], gen_cfg)
    if generator == "fast":
        variant_generator = accelerate(variant_generator, FastGeneratorConfig(on_unsupported="error"))
    actual = generate_all(variant_generator, task, [fast_model], batches, 0, None, None)
    assert_same_hypotheses(expected, actual)
    assert type(fast_model) is FAMILIES[name]  # a search leaves the variant as it was


def test_the_generators_knobs_override_the_variants_modules_for_one_search(toy_models):
    _, fast_model, task, batches = _stock_and_fast(toy_models, "transformer", batch_size=8)
    seen = []
    decoder_layer = fast_model.decoder.layers[0]
    original = decoder_layer.forward

    def spy(*args, **kwargs):
        seen.append((type(decoder_layer.self_attn), type(decoder_layer.encoder_attn)))
        return original(*args, **kwargs)

    decoder_layer.forward = spy
    knobs = FastGeneratorConfig(on_unsupported="error", self_attn_cache="stock", encoder_projection="per_beam")
    fast = accelerate(task.build_generator([fast_model], GenerationConfig(beam=2)), knobs)
    generate_all(fast, task, [fast_model], batches[:1], 0, None, None)
    assert seen and set(seen) == {(MultiheadAttention, MultiheadAttention)}
    assert type(decoder_layer.self_attn) is TimeMajorCachedSelfAttention  # restored afterwards
    assert type(decoder_layer.encoder_attn) is SentenceProjectedEncoderAttention


@pytest.mark.parametrize("name, arch", [("transformer", "transformer_fast"), ("transformer_lm", "transformer_lm_fast")])
def test_fairseq_builds_the_variant_from_its_arch_name(toy_models, name, arch):
    """What ``--arch transformer_fast`` gives fairseq-train; a stock checkpoint's weights load strictly."""
    from contextlib import nullcontext

    from fairseq import checkpoint_utils
    from omegaconf import OmegaConf, open_dict

    stock, _, task, _ = _stock_and_fast(toy_models, name)
    cfg = checkpoint_utils.load_checkpoint_to_cpu(str(toy_models[name].checkpoint))["cfg"].model
    with open_dict(cfg) if OmegaConf.is_config(cfg) else nullcontext():  # legacy models keep a Namespace
        cfg._name = arch
        if "arch" in cfg:
            cfg.arch = arch
    model = task.build_model(cfg)
    assert type(model) is type(as_fast_variant(copy.deepcopy(stock)))
    model.load_state_dict(stock.state_dict(), strict=True)


def test_a_model_without_a_variant_is_refused_with_the_way_out(toy_models):
    models, _, _ = load((str(toy_models["lstm"].checkpoint),), str(toy_models["lstm"].data_bin), 16)
    with pytest.raises(ValueError, match="LSTMModel has no fast variant .* use --generator fast"):
        as_fast_variant(copy.deepcopy(models[0]))


def test_bart_serves_greedy_search_after_a_beam_search(toy_models):
    """Stock fairseq fails here: its generator sets BART's beam size for beams above 1 only,
    and never back. The fast generator sets it per search and restores it afterwards."""
    toy = toy_models["bart"]
    models, task, batches = load((str(toy.checkpoint),), str(toy.data_bin), 8)
    model = copy.deepcopy(models[0])
    model.set_beam_size(1)
    fresh = generate_all(task.build_generator([model], GenerationConfig(beam=1)), task, [model], batches, 0, None, None)
    task.build_generator([model], GenerationConfig(beam=5))  # sets the beam size to 5
    stock_after = generate_all(task.build_generator([model], GenerationConfig(beam=1)), task, [model], batches, 0, None, None)
    assert all(isinstance(h, tuple) and h[0] == "RuntimeError" for h in stock_after)  # the stock bug
    fast = accelerate(task.build_generator([model], GenerationConfig(beam=1)), FastGeneratorConfig(on_unsupported="error"))
    assert_same_hypotheses(fresh, generate_all(fast, task, [model], batches, 0, None, None))
    assert {m.beam_size for m in model.decoder.modules() if isinstance(m, MultiheadAttention) and m.encoder_decoder_attention} == {5}


def test_fairseq_train_with_the_fast_arch(toy_models, tmp_path):
    """``fairseq-train --user-dir fairseq_fastseq --arch transformer_fast``: a checkpoint whose
    model is the variant, with a stock ``transformer``'s state dict."""
    from pathlib import Path

    from fairseq import checkpoint_utils

    import fairseq_fastseq
    from testsupport import toy

    plugin = str(Path(fairseq_fastseq.__file__).parent)
    stock_args = toy.TRANSLATION_MODELS["transformer"]
    assert stock_args[:2] == ["--arch", "transformer"]
    model_args = ["--user-dir", plugin, "--arch", "transformer_fast", *stock_args[2:]]
    checkpoint = toy.train(toy_models["transformer"].data_bin, tmp_path / "fast", model_args, "translation", updates=5)
    models, _ = checkpoint_utils.load_model_ensemble([str(checkpoint)])
    stock_models, _ = checkpoint_utils.load_model_ensemble([str(toy_models["transformer"].checkpoint)])
    assert type(models[0]) is FastTransformerModel
    assert {k: v.shape for k, v in models[0].state_dict().items()} == {k: v.shape for k, v in stock_models[0].state_dict().items()}
