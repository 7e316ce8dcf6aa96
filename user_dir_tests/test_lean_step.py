"""The lean decoder step (``fairseq_fastseq/step/``) against fairseq's own modules, step by step:
the same log-probabilities and attention, bitwise, through beam reorders, sentences leaving
the batch and padding entering it; and the reasons it gives where it does not apply."""

import copy
import logging
from argparse import Namespace

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.dataclass.configs import GenerationConfig
from fairseq.models.transformer import TransformerModel, base_architecture
from fairseq.modules.layer_drop import LayerDropModuleList
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase
from fairseq.sequence_generator import EnsembleModel
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from fairseq_fastseq.config import FastGeneratorConfig
from fairseq_fastseq.choice import accelerate
from fairseq_fastseq.model_steps import LeanSteps, ModuleSteps
from fairseq_fastseq.step import caches, encoder_caches, exact_attention, kernels, layer
from fairseq_fastseq.step.coverage import why_not_lean
from fairseq_fastseq.step.encoder_projection import MIN_ROWS_PROJECTED_ONCE

from .equivalence import load, random_beam_order

FAMILIES = ["transformer", "transformer_prenorm_2heads", "transformer_shared_8heads", "bart", "transformer_lm"]


def _fresh_model(toy, batch_size=6):
    models, task, batches = load((str(toy.checkpoint),), str(toy.data_bin), batch_size)
    return copy.deepcopy(models[0]), task, batches  # a test of its own: BART's beam size, caches


def _drive(steps, sample, beam, eos, pad, vocab, seed, num_steps=14, sentences_leave=True):
    """Decode ``num_steps`` steps with random next tokens (padding among them), random parent
    beams and (if ``sentences_leave``) sentences leaving at random; return every step's outputs."""
    rng = torch.Generator().manual_seed(seed)
    sentences = sample["net_input"]["src_tokens"].size(0)
    steps.start(sample["net_input"], sentences)
    tokens = torch.full((sentences * beam, 1), eos)
    outputs = []
    for step in range(num_steps):
        lprobs, attention = steps.decode(tokens, step)
        outputs.append((lprobs.clone(), None if attention is None else attention.clone()))
        some_finish = sentences_leave and sentences > 1 and torch.rand(1, generator=rng) < 0.4
        order, kept = random_beam_order(rng, sentences, beam, some_finish)  # rows before the drop
        tokens = tokens[order]
        new = torch.randint(4, vocab, (order.numel(), 1), generator=rng)
        new[torch.rand(order.numel(), generator=rng) < 0.1] = pad  # a padded prefix, say
        tokens = torch.cat([tokens, new], dim=1)
        steps.reorder(order, kept)
        sentences = order.numel() // beam
    return outputs


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("need_attention", [True, False])
def test_lean_steps_equal_fairseqs_modules(toy_models, name, beam, need_attention):
    model, task, batches = _fresh_model(toy_models[name])
    dictionary = task.target_dictionary
    if hasattr(model, "set_beam_size") and beam > 1:
        model.set_beam_size(beam)  # what fairseq's generator does for BART
    sample = batches[0]
    args = (sample, beam, dictionary.eos(), dictionary.pad(), len(dictionary))
    with torch.no_grad():
        expected = _drive(ModuleSteps(EnsembleModel([model]), beam, False, True, 1.0), *args, seed=beam)
        actual = _drive(LeanSteps(EnsembleModel([model]), beam, 15, need_attention, 1.0), *args, seed=beam)
    for step, ((want, want_attention), (got, got_attention)) in enumerate(zip(expected, actual)):
        assert torch.equal(got, want), f"step {step}"
        if need_attention:
            assert (got_attention is None) == (want_attention is None)
            assert got_attention is None or torch.equal(got_attention, want_attention), f"step {step}"
        else:
            assert got_attention is None


@pytest.mark.parametrize("name", ["transformer", "transformer_prenorm_2heads"])
def test_exact_keys_and_values_are_written_into_the_cache_by_their_products(toy_models, monkeypatch, name):
    """``exact`` projects each step's keys and values straight into the cache's time slice
    (``addmm``'s ``out=``), never through ``append``'s copy; bitwise fairseq's."""

    def no_copy(*args, **kwargs):
        raise AssertionError("the exact step copied its keys and values into the cache")

    model, task, batches = _fresh_model(toy_models[name])
    dictionary, beam = task.target_dictionary, 3
    args = (batches[0], beam, dictionary.eos(), dictionary.pad(), len(dictionary))
    with torch.no_grad():
        expected = _drive(ModuleSteps(EnsembleModel([model]), beam, False, True, 1.0), *args, seed=5)
        monkeypatch.setattr(caches.SelfAttentionCache, "append", no_copy)
        actual = _drive(LeanSteps(EnsembleModel([model]), beam, 15, False, 1.0), *args, seed=5)
    for step, ((want, _), (got, _)) in enumerate(zip(expected, actual)):
        assert torch.equal(got, want), f"step {step}"


@pytest.mark.parametrize(
    "name, need_attention, chunk_bytes, native_products",
    [
        ("transformer", True, exact_attention.CACHE_RESIDENT_BYTES, True),
        ("transformer", True, exact_attention.CACHE_RESIDENT_BYTES, False),
        ("transformer_prenorm_2heads", False, 3000, False),  # 3000 bytes: a few matrices a chunk
    ],
)
def test_encoder_keys_once_per_sentence_give_fairseqs_per_beam_products(toy_models, monkeypatch, name, need_attention, chunk_bytes, native_products):
    """A batch large enough to project the encoder output once per sentence: each beam's
    queries attend in turn to one copy of the keys/values per sentence (``PER_SENTENCE``),
    all matrices at once or a few at a time (``bmm``), or all beams of a matrix at once (the
    native products, where built), with finished sentences kept in the cache, then compacted;
    bitwise fairseq's."""
    monkeypatch.setattr(exact_attention, "CACHE_RESIDENT_BYTES", chunk_bytes)
    if not native_products:
        monkeypatch.setattr(kernels, "attention_products", lambda weight: exact_attention.AttentionProducts(None))
    model, task, batches = _fresh_model(toy_models[name], batch_size=40)
    sample, beam, dictionary = batches[0], 3, task.target_dictionary
    sentences, src_len = sample["net_input"]["src_tokens"].shape
    assert sentences * src_len >= MIN_ROWS_PROJECTED_ONCE and sentences >= 12, (sentences, src_len)
    args = (sample, beam, dictionary.eos(), dictionary.pad(), len(dictionary))
    lean = LeanSteps(EnsembleModel([model]), beam, 15, need_attention, 1.0)
    with torch.no_grad():
        expected = _drive(ModuleSteps(EnsembleModel([model]), beam, False, True, 1.0), *args, seed=7)
        actual = _drive(lean, *args, seed=7)
    assert {cache.layout for cache in lean.caches[0].cross_attention} == {encoder_caches.PER_SENTENCE}
    for step, ((want, want_attention), (got, got_attention)) in enumerate(zip(expected, actual)):
        assert torch.equal(got, want), f"step {step}"
        assert got_attention is None if not need_attention else torch.equal(got_attention, want_attention), f"step {step}"


def test_cache_resident_chunks_cover_every_matrix_once(monkeypatch):
    monkeypatch.setattr(exact_attention, "CACHE_RESIDENT_BYTES", 1000)
    chunks = exact_attention.cache_resident_chunks(10, 300)  # 3 matrices a chunk
    assert [(c.start, c.stop) for c in chunks] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [(c.start, c.stop) for c in exact_attention.cache_resident_chunks(4, 5000)] == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_an_ensemble_and_a_temperature_combine_as_fairseqs(toy_models):
    first, task, batches = _fresh_model(toy_models["transformer"])
    second = copy.deepcopy(first)
    with torch.no_grad():
        for parameter in second.parameters():
            parameter.mul_(0.9)
    dictionary = task.target_dictionary
    args = (batches[0], 2, dictionary.eos(), dictionary.pad(), len(dictionary))
    with torch.no_grad():
        expected = _drive(ModuleSteps(EnsembleModel([first, second]), 2, False, True, 0.7), *args, seed=5)
        actual = _drive(LeanSteps(EnsembleModel([first, second]), 2, 15, True, 0.7), *args, seed=5)
    for (want, want_attention), (got, got_attention) in zip(expected, actual):
        assert torch.equal(got, want) and torch.equal(got_attention, want_attention)


def test_finished_sentences_stay_in_the_encoder_cache_until_a_quarter_is_finished():
    keys = torch.arange(8 * 2 * 3 * 5 * 4, dtype=torch.float).view(8 * 2 * 3, 5, 4)  # 8 sentences, beam 2, 3 heads
    cache = encoder_caches.CrossAttentionCache(keys, keys.clone(), None, beams=2, heads=3, layout=encoder_caches.PER_BEAM)
    cache.keep_sentences(torch.tensor([0, 1, 2, 4, 5, 6, 7]))  # 7 of 8 live: no copy
    assert cache.cached_sentences == 8 and cache.keys is keys
    queries = torch.randn(7 * 2 * 3, 1, 4)
    assert torch.equal(cache.live_part(cache.all_queries(queries)), queries)
    cache.keep_sentences(torch.tensor([0, 2, 3, 4, 5]))  # 5 of 8 live (sentences 0, 2, 4, 5, 6): compacted
    assert cache.cached_sentences == 5 and cache.live is None
    assert torch.equal(cache.keys, keys.view(8, -1, 5, 4)[[0, 2, 4, 5, 6]].view(-1, 5, 4))


@pytest.mark.parametrize("reads_live", [True, False])
def test_grouped_encoder_caches_stay_until_a_quarter_is_finished_where_their_reader_takes_the_live_ones(reads_live):
    """The tiers' C++ kernel reads the live sentences among the cached ones (``GROUPED``, as
    ``PER_SENTENCE``); the bmm fallback reads a compact cache."""
    keys = torch.arange(8 * 3 * 5 * 4, dtype=torch.float).view(8 * 3, 5, 4)  # 8 sentences, 3 heads
    cache = encoder_caches.CrossAttentionCache(keys, keys.clone(), None, beams=2, heads=3, layout=encoder_caches.GROUPED, reads_live=reads_live)
    cache.keep_sentences(torch.tensor([0, 1, 2, 4, 5, 6, 7]))
    assert (cache.keys is keys) == reads_live and cache.cached_sentences == (8 if reads_live else 7)
    assert (cache.live.tolist() if reads_live else cache.live) == ([0, 1, 2, 4, 5, 6, 7] if reads_live else None)


@pytest.mark.parametrize("name", ["transformer", "bart", "transformer_lm"])
def test_the_search_runs_no_fairseq_decoder_layer(toy_models, monkeypatch, name):
    model, task, batches = _fresh_model(toy_models[name])
    calls = []
    original = TransformerDecoderLayerBase.forward
    monkeypatch.setattr(TransformerDecoderLayerBase, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    for knobs, layer_calls in ((FastGeneratorConfig(), False), (FastGeneratorConfig(decoder_step="fairseq"), True)):
        calls.clear()
        generator = accelerate(task.build_generator([model], GenerationConfig(beam=2)), knobs)
        task.inference_step(generator, [model], batches[0])
        assert bool(calls) == layer_calls


def _transformer(**options):
    args = Namespace(
        encoder_layers=1, decoder_layers=1, encoder_embed_dim=8, decoder_embed_dim=8,
        encoder_ffn_embed_dim=16, decoder_ffn_embed_dim=16, encoder_attention_heads=2,
        decoder_attention_heads=2, **options,
    )  # fmt: skip
    base_architecture(args)
    from fairseq.data import Dictionary

    dictionary = Dictionary()
    task = TranslationTask(TranslationConfig(), dictionary, dictionary)
    return TransformerModel.build_model(args, task).eval()


def _with_hook(model):
    model.decoder.layers[0].fc1.register_forward_hook(lambda *args: None)
    return model


def _retaining_dropout(model):
    model.make_generation_fast_(retain_dropout=True)
    return model


def _replaced_forward(model):
    layer = model.decoder.layers[0]
    layer.forward = layer.forward
    return model


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: _transformer(), None),
        (lambda: _transformer(scale_attn=True), "TransformerModel: decoder layer 0 uses --scale-attn"),
        (lambda: _transformer(cross_self_attention=True), "TransformerModel: cross-self-attention (--cross-self-attention)"),
        (lambda: _transformer().train(), "TransformerModel is in training mode"),
        (lambda: _with_hook(_transformer()), "TransformerModel: a forward hook is registered on layers.0.fc1"),
        (lambda: _replaced_forward(_transformer()), "TransformerModel: the forward of layers.0 is replaced on the object"),
        (
            lambda: _retaining_dropout(_transformer()),
            "TransformerModel: dropout stays on in inference at dropout_module (--retain-dropout)",
        ),
    ],
)
def test_coverage_gives_the_reason(make, reason):
    assert why_not_lean(make()) == reason


def test_lstm_falls_back_to_fairseqs_modules_with_the_reason(toy_models, caplog):
    models, task, _ = load((str(toy_models["lstm"].checkpoint),), str(toy_models["lstm"].data_bin), 6)
    with caplog.at_level(logging.INFO, logger="fairseq_fastseq.generator"):
        accelerate(task.build_generator(models, GenerationConfig(beam=2)), FastGeneratorConfig())
    assert (
        "decoder step: fairseq's modules (outside the lean step: LSTMModel's decoder is LSTMDecoder, "
        "not fairseq's transformer decoder)" in caplog.text
    )


def test_the_log_says_the_lean_step_runs(toy_models, caplog):
    models, task, _ = load((str(toy_models["transformer"].checkpoint),), str(toy_models["transformer"].data_bin), 6)
    with caplog.at_level(logging.INFO, logger="fairseq_fastseq.generator"):
        accelerate(task.build_generator(models, GenerationConfig(beam=2)), FastGeneratorConfig())
    assert "decoder step: lean" in caplog.text


def test_a_fast_variant_checkpoint_is_covered(toy_models):
    from fairseq_fastseq.models import as_fast_variant

    model, _, _ = _fresh_model(toy_models["transformer"])
    assert why_not_lean(as_fast_variant(model)) is None


def test_a_checkpoint_loaded_twice_is_covered_each_time(toy_models):
    """Coverage reads the model, not a cache keyed on it."""
    toy = toy_models["transformer_lm"]
    for _ in range(2):
        models, _ = checkpoint_utils.load_model_ensemble([str(toy.checkpoint)])
        assert why_not_lean(models[0].eval()) is None


def test_decoder_layerdrop_draws_as_fairseqs_decoder(toy_models):
    """fairseq's LayerDropModuleList draws a random number per layer at every decoder step in
    inference too: what runs after the step (sampling) sees the same generator state."""
    model, _, batches = _fresh_model(toy_models["transformer"])
    model.decoder.layers = LayerDropModuleList(0.1, list(model.decoder.layers))
    net_input = batches[0]["net_input"]
    sentences = net_input["src_tokens"].size(0)
    tokens = torch.full((sentences, 1), model.decoder.dictionary.eos())
    ensemble = EnsembleModel([model])
    steps = LeanSteps(ensemble, 1, 5, False, 1.0)
    states = []
    with torch.no_grad():
        encoder_outs = ensemble.forward_encoder(net_input)
        steps.start(net_input, sentences)
        torch.manual_seed(5)
        ensemble.forward_decoder(tokens, encoder_outs, [{}], 1.0)
        states.append(torch.get_rng_state())
        torch.manual_seed(5)
        steps.decode(tokens, 0)
        states.append(torch.get_rng_state())
    assert torch.equal(*states)
