"""Fast == stock on every fixture model: same hypotheses, same order, bitwise-equal scores."""

import pytest

from testsupport import toy

from .equivalence import assert_fast_matches_stock, lengths

MODELS = [*toy.TRANSLATION_MODELS, *toy.LANGUAGE_MODELS]
SEARCHES = {
    "beam1": dict(beam=1),
    "beam5": dict(beam=5),
    "beam5_nbest3": dict(beam=5, nbest=3),
}


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("model", MODELS)
def test_fast_matches_stock(toy_models, model, search):
    assert_fast_matches_stock(toy_models[model], **SEARCHES[search])


# The tiny BART (BERT-style init) learns only the target's unigram distribution within the
# fixture's training budget: it always emits one word and EOS. It still covers BART's own
# code paths (beam-shared encoder attention, layernorm_embedding, learned positions).
VARIED_EOS_MODELS = [name for name in toy.TRANSLATION_MODELS if name != "bart"]


@pytest.mark.parametrize("model", VARIED_EOS_MODELS)
def test_fixture_models_finish_hypotheses_at_varied_steps(toy_models, model):
    """A model that never emits EOS would hide most of the search logic from these tests."""
    hypotheses = assert_fast_matches_stock(toy_models[model], beam=5)
    max_len_with_eos = 201  # fairseq's default --max-len-b 200, plus EOS
    finished_early = [n for n in lengths(hypotheses) if n < max_len_with_eos]
    assert len(set(finished_early)) >= 4
    assert len(finished_early) >= 0.8 * len(hypotheses)
