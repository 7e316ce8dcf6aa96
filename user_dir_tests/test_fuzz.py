"""Property-based equivalence: random tiny models, inputs and options; fast == stock.

Profiles: 200 seeded examples in CI; ``pytest --slow`` runs 2,000 (see conftest.py).
"""

from argparse import Namespace

import torch
from fairseq.data import Dictionary
from fairseq.dataclass.configs import GenerationConfig
from fairseq.models.transformer import TransformerModel, base_architecture
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from hypothesis import given
from hypothesis import strategies as st

from fairseq_fastseq.config import FastGeneratorConfig
from fairseq_fastseq.choice import accelerate
from fairseq_fastseq.generator import FastSequenceGenerator

from .equivalence import assert_same_hypotheses
from .naive import with_correct_ngram_blocking

MAX_POSITIONS = 32


def _dictionary(size: int) -> Dictionary:
    dictionary = Dictionary()
    for i in range(size):
        dictionary.add_symbol(f"w{i}")
    return dictionary


@st.composite
def tiny_models(draw):
    """A random-weight fairseq transformer: dimensions, norms, embeddings and positions vary."""
    heads = draw(st.sampled_from([1, 2, 4]))
    dim = heads * draw(st.sampled_from([4, 8]))  # sinusoidal positions need dim >= 4
    args = Namespace(
        encoder_layers=draw(st.integers(1, 2)),
        decoder_layers=draw(st.integers(1, 2)),
        encoder_embed_dim=dim,
        decoder_embed_dim=dim,
        encoder_ffn_embed_dim=2 * dim,
        decoder_ffn_embed_dim=2 * dim,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_normalize_before=draw(st.booleans()),
        decoder_normalize_before=draw(st.booleans()),
        share_all_embeddings=draw(st.booleans()),
        encoder_learned_pos=draw(st.booleans()),
        decoder_learned_pos=draw(st.booleans()),
        layernorm_embedding=draw(st.booleans()),
        no_scale_embedding=draw(st.booleans()),
        max_source_positions=MAX_POSITIONS,
        max_target_positions=MAX_POSITIONS,
    )
    base_architecture(args)
    dictionary = _dictionary(draw(st.integers(4, 24)))
    task = TranslationTask(TranslationConfig(), dictionary, dictionary)
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    model = TransformerModel.build_model(args, task).eval()
    # Sharper output distributions, so that EOS wins at varied steps.
    with torch.no_grad():
        model.decoder.output_projection.weight.mul_(draw(st.sampled_from([1.0, 4.0, 16.0])))
    return model, task


@st.composite
def batches(draw, dictionary: Dictionary):
    """Left-padded sources as fairseq collates them: empty ones, repeats and unknowns too."""
    size = draw(st.integers(1, 5))
    symbols = st.sampled_from([dictionary.unk(), *range(dictionary.nspecial, len(dictionary))])
    sources = [draw(st.lists(symbols, min_size=0, max_size=MAX_POSITIONS - 2)) for _ in range(size)]
    width = max(len(s) for s in sources) + 1
    src_tokens = torch.full((size, width), dictionary.pad())
    for row, source in enumerate(sources):
        src_tokens[row, width - len(source) - 1 :] = torch.tensor(source + [dictionary.eos()])
    lengths = torch.tensor([len(s) + 1 for s in sources])
    ids = torch.tensor(draw(st.permutations(range(size, 2 * size))))  # ids >= batch size
    return {"id": ids, "net_input": {"src_tokens": src_tokens, "src_lengths": lengths}}


@st.composite
def options(draw):
    chosen = dict(
        beam=draw(st.integers(1, 4)),
        max_len_a=draw(st.sampled_from([0.0, 0.5, 1.2])),
        max_len_b=draw(st.integers(2, 12)),
        lenpen=draw(st.sampled_from([0.5, 1.0, 2.0])),
        unkpen=draw(st.sampled_from([0.0, 1.5, -1.5])),
        temperature=draw(st.sampled_from([1.0, 0.7, 1.3])),
        unnormalized=draw(st.booleans()),
        no_repeat_ngram_size=draw(st.integers(0, 3)),
    )
    chosen["min_len"] = draw(st.integers(1, chosen["max_len_b"]))
    search = draw(st.sampled_from(["beam", "sampling", "diversity_rate", "match_source_len"]))
    if search == "sampling":
        chosen.update(sampling=True, sampling_topk=draw(st.sampled_from([-1, 3])))
    elif search == "diversity_rate":
        chosen.update(diversity_rate=0.5)
    elif search == "match_source_len":
        chosen.update(match_source_len=True, min_len=1)
    return chosen


def _generate(generator, model, sample):
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            return generator.generate([model], sample)
    except Exception as error:  # noqa: BLE001  (fast must fail where and how stock fails)
        return [(type(error).__name__, str(error))]


@given(data=st.data())
def test_fast_equals_stock_on_random_models_inputs_and_options(data):
    model, task = data.draw(tiny_models())
    sample = data.draw(batches(task.source_dictionary))
    gen_cfg = GenerationConfig(**data.draw(options()))
    stock = task.build_generator([model], gen_cfg)
    if stock.repeat_ngram_blocker is not None:  # stock's CPU blocker bans nothing
        stock = with_correct_ngram_blocking(stock)
    fast = accelerate(task.build_generator([model], gen_cfg), FastGeneratorConfig(on_unsupported="error"))
    assert isinstance(fast, FastSequenceGenerator)
    assert_same_hypotheses(_generate(stock, model, sample), _generate(fast, model, sample))
