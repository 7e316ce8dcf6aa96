"""The option matrix: fast == stock for every search option fairseq-generate accepts."""

import math
import random

import pytest
from fairseq.token_generation_constraints import pack_constraints

from .conftest import FUSION_LM
from .equivalence import assert_fast_matches_stock, load_language_model
from .naive import WithoutSampleIds, with_correct_ngram_blocking

TRANSLATION = ["transformer", "transformer_prenorm_2heads", "transformer_shared_8heads", "bart"]

OPTIONS = {
    "beam2": dict(beam=2),
    "beam8": dict(beam=8),
    "max_len": dict(beam=4, max_len_a=0.5, max_len_b=2),
    "min_len": dict(beam=4, min_len=6),
    "lenpen_short": dict(beam=4, lenpen=0.3),
    "lenpen_long": dict(beam=4, lenpen=2.0),
    "lenpen_negative": dict(beam=4, lenpen=-0.5),  # odd but valid: fairseq divides by length**lenpen
    "unnormalized": dict(beam=4, unnormalized=True),
    "unkpen": dict(beam=4, unkpen=-5.0),
    "temperature": dict(beam=4, temperature=0.6),
    "match_source_len": dict(beam=3, match_source_len=True),
    "diversity_rate": dict(beam=4, diversity_rate=0.5),
    "print_alignment_hard": dict(beam=3, print_alignment="hard"),
    "print_alignment_soft": dict(beam=3, print_alignment="soft"),
}


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("model", TRANSLATION)
def test_search_option(toy_models, model, option):
    assert_fast_matches_stock(toy_models[model], **OPTIONS[option])


@pytest.mark.parametrize("model", TRANSLATION)
def test_sampling_with_seed(toy_models, model):
    for options in (dict(sampling_topk=5), dict(sampling_topp=0.8), dict(temperature=1.5)):
        assert_fast_matches_stock(toy_models[model], beam=3, nbest=3, sampling=True, seed=7, **options)


@pytest.mark.parametrize("model", TRANSLATION + ["transformer_lm"])
def test_prefix_tokens(toy_models, model):
    assert_fast_matches_stock(toy_models[model], beam=4, prefix_size=2)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("model", ["transformer", "bart", "transformer_lm"])
def test_no_repeat_ngram_against_correct_blocker(toy_models, model, n):
    """Stock 0.12 on CPU bans nothing; the reference is stock with a correct blocker."""
    assert_fast_matches_stock(
        toy_models[model], beam=4, no_repeat_ngram_size=n, reference=with_correct_ngram_blocking
    )


def test_no_repeat_ngram_longer_than_the_output_bans_nothing(toy_models):
    assert_fast_matches_stock(
        toy_models["transformer"], beam=4, max_len_a=0, max_len_b=5, no_repeat_ngram_size=50,
        reference=with_correct_ngram_blocking,
    )  # fmt: skip


@pytest.mark.parametrize("model", ["transformer", "transformer_prenorm_2heads"])
def test_diverse_beam_groups_against_fixed_stock(toy_models, model):
    """Stock 0.12 indexes its overlap buffer by dataset id (IndexError once an id >= batch
    size); the reference is stock indexing by batch row."""
    assert_fast_matches_stock(
        toy_models[model], beam=4, diverse_beam_groups=2, diverse_beam_strength=0.5,
        reference=WithoutSampleIds, batch_size=8,
    )  # fmt: skip


def test_ensemble_of_two_checkpoints(toy_models):
    assert_fast_matches_stock(toy_models["transformer"], beam=4, ensemble_with=[toy_models["transformer_prenorm_2heads"]])


@pytest.mark.parametrize("mode", ["ordered", "unordered"])
def test_lexical_constraints(toy_models, mode):
    def two_target_words(sample):
        rng = random.Random(int(sample["id"][0]))
        per_sentence = []
        for target in sample["target"]:
            words = [t for t in target.tolist() if t > 3]
            per_sentence.append([target.new_tensor([w]) for w in rng.sample(words, min(2, len(words)))])
        return pack_constraints(per_sentence)

    assert_fast_matches_stock(toy_models["transformer"], beam=4, constraints=mode, constraints_fn=two_target_words)


COMBINABLE = {
    "beam": [1, 2, 5],
    "lenpen": [0.5, 1.0, 1.5],
    "min_len": [1, 3],
    "max_len_b": [5, 30, 200],
    "unkpen": [0.0, 2.0],
    "temperature": [1.0, 0.8],
    "unnormalized": [False, True],
}


@pytest.mark.parametrize("seed", range(12))
def test_random_option_combinations(toy_models, seed):
    rng = random.Random(seed)
    options = {name: rng.choice(values) for name, values in COMBINABLE.items()}
    model = rng.choice(TRANSLATION)
    assert_fast_matches_stock(toy_models[model], **options)


@pytest.mark.parametrize("lm_weight", [0.5, -0.3])
@pytest.mark.parametrize("model", ["transformer", "bart"])
def test_shallow_fusion_with_a_language_model(toy_models, model, lm_weight):
    """--lm-path/--lm-weight: the LM's log-probabilities join every step's scores."""
    fused = assert_fast_matches_stock(toy_models[model], lm=toy_models[FUSION_LM], beam=4, lm_weight=lm_weight)
    plain = assert_fast_matches_stock(toy_models[model], beam=4)
    assert [h[0]["score"] for h in fused] != [h[0]["score"] for h in plain]  # the LM takes part


def test_nan_log_probabilities_count_as_minus_infinity(toy_models):
    """Rows of NaN log-probabilities at some steps (from the fusion LM here): fairseq makes
    them -inf before the search's step; fast leaves that to plain beam search's step
    (``logit_edits.py``), which must give the same candidates."""
    lm_model = toy_models[FUSION_LM]
    lm = load_language_model(str(lm_model.checkpoint), str(lm_model.data_bin))

    def nan_rows(module, inputs, output):
        logits = output[0]
        if logits.size(1) in (3, 5):  # steps 2 and 4
            logits[1::3, -1, :] = math.nan
        return output

    handle = lm.register_forward_hook(nan_rows)
    try:
        hypotheses = assert_fast_matches_stock(toy_models["transformer"], lm=lm_model, beam=4, lm_weight=0.5)
    finally:
        handle.remove()
    assert all(math.isfinite(h[0]["score"]) for h in hypotheses)
