"""The encoder-attention choices equal to fairseq's up to rounding (not bitwise):
EL-attention (``--fast-encoder-projection el_attention``) and grouped queries
(``grouped``). Step by step, and through the generator: same tokens, scores within 1e-4."""

import copy

import pytest
import torch
from fairseq.modules.multihead_attention import MultiheadAttention

from fairseq_fastseq.attention_plan import describe
from fairseq_fastseq.config import FastGeneratorConfig
from fairseq_fastseq.el_attention import ELEncoderAttention

from .equivalence import assert_fast_matches_stock
from .naive import with_correct_ngram_blocking

ROUNDING = 1e-4  # the product's tolerance; these choices sum in another order than fairseq


@pytest.mark.parametrize("need_head_weights", [False, True])
def test_steps_match_fairseqs_per_beam_attention(need_head_weights):
    torch.manual_seed(0)
    sentences, beams, src_len, dim = 3, 4, 9, 16
    stock = MultiheadAttention(dim, 4, encoder_decoder_attention=True, kdim=dim, vdim=dim).eval()
    fast = copy.deepcopy(stock)
    fast.__class__ = ELEncoderAttention
    encoder_out = torch.randn(src_len, sentences, dim)
    padding = torch.zeros(sentences, src_len, dtype=torch.bool)
    padding[1, :4] = True
    stock_state, fast_state = {}, {}
    rows = sentences * beams
    with torch.no_grad():
        for step in range(4):
            if step == 2:  # sentence 1 finishes: beams reorder within sentences 0 and 2
                new_order = torch.tensor([3, 3, 1, 0, 8, 9, 11, 11])
                stock.reorder_incremental_state(stock_state, new_order)
                fast.reorder_incremental_state(fast_state, new_order)
                kept = torch.tensor([0, 2])
                encoder_out, padding, sentences, rows = encoder_out[:, kept], padding[kept], 2, 8
            query = torch.randn(1, rows, dim)
            expanded = encoder_out.repeat_interleave(beams, dim=1)
            want, want_weights = stock(
                query, expanded, expanded, padding.repeat_interleave(beams, 0), stock_state,
                static_kv=True, need_head_weights=need_head_weights,
            )  # fmt: skip
            got, got_weights = fast(
                query, encoder_out, encoder_out, padding, fast_state, static_kv=True, need_head_weights=need_head_weights
            )
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            torch.testing.assert_close(got_weights, want_weights, atol=1e-6, rtol=0)
    assert not any(key.endswith("prev_key") for state in fast_state.values() for key in state)  # no K/V cache


SEARCHES = [dict(beam=1), dict(beam=5, nbest=3), dict(beam=4, no_repeat_ngram_size=2, lenpen=1.5)]
# Models whose encoder attention the choices change get every search; the others (no fairseq
# encoder attention: the choice must leave them alone) one. The plain transformer is in the
# CLI test below.
CASES = [
    *[(model, search) for model in ("transformer_prenorm_2heads", "transformer_shared_8heads", "bart") for search in SEARCHES],
    ("lstm", SEARCHES[1]),
    ("transformer_lm", SEARCHES[1]),
]


@pytest.mark.parametrize("model, search", CASES)
@pytest.mark.parametrize("encoder", ["el_attention", "grouped"])
def test_generator_gives_stocks_tokens(toy_models, encoder, model, search):
    # stock's CPU n-gram blocker bans nothing: the reference is stock with a correct one
    reference = with_correct_ngram_blocking if search.get("no_repeat_ngram_size") else None
    knobs = FastGeneratorConfig(on_unsupported="error", encoder_projection=encoder)
    assert_fast_matches_stock(toy_models[model], knobs=knobs, atol=ROUNDING, reference=reference, **search)


@pytest.mark.parametrize(
    "encoder, model, expected",
    [
        ("el_attention", "transformer", "EL-attention (encoder output once per sentence, no encoder keys/values)"),
        ("el_attention", "bart", "fairseq's (or the model's own) encoder attention"),  # BART shares K/V itself
        ("el_attention", "transformer_lm", "no encoder attention (decoder-only)"),
        ("grouped", "transformer", "encoder keys/values once per sentence, attended by its beams as grouped queries"),
        ("grouped", "bart", "encoder keys/values once per sentence, attended by its beams as grouped queries"),
    ],
)
def test_log_line_names_the_encoder_attention_where_it_applies(toy_models, encoder, model, expected):
    from fairseq import checkpoint_utils

    models, _ = checkpoint_utils.load_model_ensemble([str(toy_models[model].checkpoint)])
    if model == "bart":
        models[0].set_beam_size(4)  # as fairseq's generator leaves it
    assert describe(models, encoder=encoder).endswith(expected)


def test_grouped_attends_without_per_beam_copies_and_restores_beam_sizes(toy_models):
    """Under ``grouped`` the encoder attention of a plain transformer runs fairseq's beam-aware
    path, fed one copy of the encoder output per sentence."""
    from fairseq.dataclass.configs import GenerationConfig

    from fairseq_fastseq.choice import accelerate

    from .equivalence import load

    toy = toy_models["transformer"]
    models, task, batches = load((str(toy.checkpoint),), str(toy.data_bin), 8)
    attention = models[0].decoder.layers[0].encoder_attn
    seen = []
    original = attention.forward

    def spy(query, key, *args, **kwargs):
        seen.append((query.size(1), key.size(1), attention.beam_size))
        return original(query, key, *args, **kwargs)

    attention.forward = spy
    try:
        knobs = FastGeneratorConfig(on_unsupported="error", encoder_projection="grouped")
        generator = accelerate(task.build_generator(models, GenerationConfig(beam=4)), knobs)
        task.inference_step(generator, models, batches[0])
    finally:
        del attention.forward
    rows, sentences, beam_size = seen[0]
    assert (rows, sentences, beam_size) == (4 * batches[0]["nsentences"], batches[0]["nsentences"], 4)
    assert attention.beam_size == 1 and type(attention) is MultiheadAttention  # as before the search


@pytest.mark.parametrize("encoder, config", [("el_attention", "el"), ("grouped", "grouped")])
def test_command_line_and_hydra_select_the_choice(toy_models, encoder, config):
    """``--fast-encoder-projection <choice>`` and ``attention=<config>``: stock's hypotheses."""
    from .cli import generate_results
    from .test_hydra import _model_keys, hydra_generate, results

    model = toy_models["transformer"]

    def hypotheses(lines):  # the H- lines without their scores (EL scores differ in the last bits)
        return [(line.split("\t")[0], line.split("\t")[-1]) for line in lines if line.startswith("H-")]

    stock = hypotheses(generate_results(model, "--beam", "4"))
    flags = generate_results(
        model, "--beam", "4", "--user-dir", "fairseq_fastseq", "--generator", "fast",
        "--fast-encoder-projection", encoder,
    )  # fmt: skip
    hydra = hydra_generate(*_model_keys(model), "generator=fast", f"attention={config}", "generation.beam=4")
    assert hydra.returncode == 0, hydra.stderr[-3000:]
    assert stock and hypotheses(flags) == stock == hypotheses(results(hydra.stdout))
    expected = {"el": "EL-attention", "grouped": "encoder keys/values once per sentence, attended"}[config]
    assert f"attention: time-major self-attention cache (4 modules), {expected}" in hydra.stderr
