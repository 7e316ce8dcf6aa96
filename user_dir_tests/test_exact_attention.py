"""``exact``'s attention products through the native kernel (``step/exact_attention.py``):
``bmm``'s bits at every length and layout the decoder step gives it, the kernel only where
the check found them equal, and a whole lean step at heads of 64 (the toy models' heads
are narrower, so the suite's other tests run these products through ``bmm``)."""

from argparse import Namespace

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models.transformer import TransformerModel, base_architecture
from fairseq.models.transformer_lm import TransformerLanguageModel, base_lm_architecture
from fairseq.sequence_generator import EnsembleModel
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from fairseq_fastseq.model_steps import LeanSteps, ModuleSteps
from fairseq_fastseq.step import exact_attention, native
from fairseq_fastseq.step.exact_attention import CONTEXT, SCORES, AttentionProducts, by_matrix, each_beams_products
from fairseq_fastseq.step.exact_gemm import same_bits
from fairseq_fastseq.step.exact_layer import NativeLayers

from .test_lean_step import _drive

pytestmark = pytest.mark.skipif(native.exact_attention() is None, reason="no AVX-512 or the kernel could not be built here")

# ATen's loop (up to 6 keys at 64 wide), then MKL's groups of four columns with 0-3 left over
LENGTHS = [1, 2, 6, 7, 8, 9, 10, 11, 30, 31, 65, 130]


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    monkeypatch.setattr(exact_attention, "_SAME_BITS", {})


class CountingKernels:
    """The native kernels, counting their calls."""

    def __init__(self):
        self.calls = 0

    def scores_into(self, *args):
        self.calls += 1
        native.exact_attention().scores_into(*args)

    def context_into(self, *args):
        self.calls += 1
        native.exact_attention().context_into(*args)


def _products(kernels):
    """``AttentionProducts`` over ``kernels``, their calls counted from here on (not the
    probe for this CPU's order)."""
    products = AttentionProducts(kernels)
    kernels.calls = 0
    return products


def _signed_zeros(t, generator):
    """About one entry in ten set to +0 or -0 (masked probabilities, zero weights)."""
    zero = torch.rand(t.shape, generator=generator) < 0.1
    t[zero] = torch.where(torch.rand(t.shape, generator=generator) < 0.5, 0.0, -0.0)[zero]
    return t


def _time_major_cache(generator, length, rows, heads, capacity=140):
    """Self-attention keys as the step reads them: (rows * heads, length, 64) views of a
    (capacity, rows * heads, 64) buffer."""
    buffer = _signed_zeros(torch.randn(capacity, rows * heads, 64, generator=generator), generator)
    return buffer[:length].transpose(0, 1)


@pytest.mark.parametrize("length", LENGTHS)
def test_self_attention_products_have_bmms_bits_through_the_kernel(length):
    generator = torch.Generator().manual_seed(length)
    rows, heads = 13, 4
    kernels = CountingKernels()
    products = _products(kernels)
    keys, values = (_time_major_cache(generator, length, rows, heads) for _ in range(2))
    for draw in range(2):  # the first call is checked (bmm's result returned), the second trusted
        queries = torch.randn(1, rows * heads, 64, generator=generator).transpose(0, 1)
        scores = torch.empty(rows * heads, 1, length)
        bmm = lambda: torch.bmm(queries, keys.transpose(1, 2), out=scores)  # noqa: E731
        products.scores(queries, keys, scores, bmm if draw == 0 else lambda: pytest.fail("a checked length went to bmm"))
        assert same_bits(scores, torch.bmm(queries, keys.transpose(1, 2)))
        probs = _signed_zeros(torch.softmax(scores, dim=-1), generator)
        context = torch.empty(rows * heads, 1, 64)
        bmm = lambda: torch.bmm(probs, values, out=context)  # noqa: E731
        products.context(probs, values, context, bmm if draw == 0 else lambda: pytest.fail("a checked length went to bmm"))
        assert same_bits(context, torch.bmm(probs, values))
    assert exact_attention._SAME_BITS[(SCORES, length, torch.get_num_threads())] is True


def _attention_by_steps(queries, keys, values, mask, group):
    """fairseq's steps, one ``bmm`` per query row (as the decoder step calls it): scores, -inf
    where masked, softmax, context."""
    per_row = []
    for i in range(queries.size(1)):
        weights = torch.bmm(queries[:, i : i + 1], keys.transpose(1, 2))
        if mask is not None:
            weights.view(-1, group, *weights.shape[1:]).masked_fill_(mask[:, None, None, :], float("-inf"))
        per_row.append(torch.bmm(torch.softmax(weights, dim=-1), values))
    return torch.cat(per_row, dim=1)


def _checked(products, queries, keys, values):
    """Both products checked at the keys' length, as a first call of the step does."""
    scores = torch.empty(queries.size(0), queries.size(1), keys.size(1))
    products.scores(queries, keys, scores, lambda: torch.bmm(queries, keys.transpose(1, 2), out=scores))
    context = torch.empty(queries.size(0), queries.size(1), values.size(2))
    probs = torch.softmax(scores, dim=-1)
    products.context(probs, values, context, lambda: torch.bmm(probs, values, out=context))


@pytest.mark.parametrize("length", [3, 9, 30, 31])
def test_one_call_per_attention_has_fairseqs_bits_for_both_layouts(length):
    """``attend``: scores, mask, softmax and context in one native call, bitwise fairseq's
    steps, for the self-attention's time-major cache (a row's heads share a padding row) and
    the encoder attention's beams against their sentence's keys (a sentence's heads share one)."""
    generator = torch.Generator().manual_seed(length)
    products = AttentionProducts(native.exact_attention())
    rows, heads = 11, 4
    keys, values = (_time_major_cache(generator, length, rows, heads) for _ in range(2))
    queries = torch.randn(1, rows * heads, 64, generator=generator).transpose(0, 1)
    padding = torch.rand(length, rows, generator=generator) < 0.3
    padding[-1] = False  # each row's newest position is its own token
    beams, sentences = 5, 6
    cross_keys, cross_values = (torch.randn(sentences * heads, length, 64, generator=generator) for _ in range(2))
    by_beam = torch.randn(beams, sentences * heads, 1, 64, generator=generator)
    source_padding = torch.zeros(sentences, length, dtype=torch.bool)
    source_padding[::2, : length // 3] = True  # left padded, as fairseq's sources
    layouts = [(queries, keys, values, padding.t()), (by_matrix(by_beam), cross_keys, cross_values, source_padding)]
    assert not products.attend(queries, keys, values, padding.t(), heads, torch.empty(rows * heads, 1, 64))  # length not checked
    _checked(products, queries, keys, values)
    for q, k, v, mask in layouts:
        context = torch.empty(q.size(0), q.size(1), 64)
        assert products.attend(q, k, v, mask, heads, context)
        assert same_bits(context, _attention_by_steps(q, k, v, mask, heads))
    # the self-attention's rows read through a history table: row r's entry of slice t in cached row table[t, r]
    cached = 15
    buffer_keys, buffer_values = (_time_major_cache(generator, length, cached, heads) for _ in range(2))
    table = torch.randint(0, cached, (length, rows), generator=generator)
    in_rows = [b.transpose(0, 1).view(length, cached, heads * 64).gather(1, table.unsqueeze(2).expand(-1, -1, heads * 64)) for b in (buffer_keys, buffer_values)]
    row_keys, row_values = (t.view(length, rows * heads, 64).transpose(0, 1) for t in in_rows)
    context = torch.empty(rows * heads, 1, 64)
    assert products.attend(queries, buffer_keys, buffer_values, padding.t(), heads, context, table)
    assert same_bits(context, _attention_by_steps(queries, row_keys, row_values, padding.t(), heads))
    unaligned = torch.randn(keys.numel() + 1)[1:].view(keys.shape)
    assert not products.attend(queries, unaligned, values, padding.t(), heads, torch.empty(rows * heads, 1, 64))


def test_first_call_of_a_length_returns_bmms_result_and_checks_the_kernel():
    products, calls = _products(CountingKernels()), []
    queries, keys = torch.randn(8, 1, 64), torch.randn(8, 20, 64)
    out = torch.empty(8, 1, 20)
    products.scores(queries, keys, out, lambda: calls.append(torch.bmm(queries, keys.transpose(1, 2), out=out)))
    assert len(calls) == 1 and products.kernels.calls >= 2  # the call's operands, then random ones (160 outputs)
    assert exact_attention._SAME_BITS[(SCORES, 20, torch.get_num_threads())] is True


@pytest.mark.parametrize("length", [5, 31])
def test_each_beam_against_its_sentences_keys_has_the_per_beam_bmms_bits(length):
    """The encoder attention held once per sentence: all beams of a (sentence, head) matrix in
    one pass of the kernel, as fairseq's one ``bmm`` per beam gives them."""
    generator = torch.Generator().manual_seed(length)
    beams, matrices = 5, 24
    keys, values = (_signed_zeros(torch.randn(matrices, length, 64, generator=generator), generator) for _ in range(2))
    queries = torch.randn(beams, matrices, 1, 64, generator=generator)
    products, chunks = AttentionProducts(native.exact_attention()), [slice(0, matrices)]
    for _ in range(2):
        want = torch.empty(beams, matrices, 1, length)
        each_beams_products(queries, keys.transpose(1, 2), want, chunks)
        got = torch.empty(beams, matrices, 1, length)
        products.scores(by_matrix(queries), keys, by_matrix(got), lambda: each_beams_products(queries, keys.transpose(1, 2), got, chunks))
        assert same_bits(got, want)
    probs = torch.softmax(want, dim=-1)
    want, got = torch.empty(beams, matrices, 1, 64), torch.empty(beams, matrices, 1, 64)
    each_beams_products(probs, values, want, chunks)
    for _ in range(2):
        products.context(by_matrix(probs), values, by_matrix(got), lambda: each_beams_products(probs, values, got, chunks))
        assert same_bits(got, want)


def test_all_zero_products_sum_to_positive_zero_as_bmms():
    products = AttentionProducts(native.exact_attention())
    for length in (3, 9):
        queries, keys = torch.zeros(4, 1, 64), -torch.rand(4, length, 64)  # every product -0
        out = torch.empty(4, 1, length)
        products.scores(queries, keys, out, lambda: torch.bmm(queries, keys.transpose(1, 2), out=out))
        got = products.scores(queries, keys, torch.empty(4, 1, length), lambda: pytest.fail("a checked length went to bmm"))
        assert same_bits(got, torch.bmm(queries, keys.transpose(1, 2))) and not torch.signbit(got).any()


def test_scores_off_the_caches_alignment_go_to_bmm_unchecked():
    """MKL's order changes with the operands' alignment: a key matrix starting 4 bytes off is
    left to ``bmm``, and nothing is recorded for its length."""
    kernels, calls = CountingKernels(), []
    keys = torch.randn(8 * 12 * 64 + 1)[1:].view(8, 12, 64)
    queries, out = torch.randn(8, 1, 64), torch.empty(8, 1, 12)
    _products(kernels).scores(queries, keys, out, lambda: calls.append(1))
    assert calls == [1] and kernels.calls == 0 and not exact_attention._SAME_BITS


def test_a_length_where_the_kernel_differs_stays_on_bmm(caplog):
    class Wrong(CountingKernels):
        def context_into(self, probs, values, out, order):
            super().context_into(probs, values, out, order)
            if probs.size(2) == 9:
                out.add_(1e-3)

    kernels = Wrong()
    products = _products(kernels)
    probs, values = torch.softmax(torch.randn(6, 1, 9), dim=-1), torch.randn(6, 9, 64)
    references = []
    for _ in range(3):
        out = torch.empty(6, 1, 64)
        products.context(probs, values, out, lambda: references.append(torch.bmm(probs, values, out=out)))
        assert same_bits(out, torch.bmm(probs, values))
    assert len(references) == 3 and kernels.calls == 1
    assert exact_attention._SAME_BITS == {(CONTEXT, 9, torch.get_num_threads()): False}


@pytest.mark.parametrize("kind", [SCORES, CONTEXT])
def test_this_cpus_order_is_found_and_the_other_order_differs_from_bmm(kind):
    """The kernel holds two of MKL's orders (an AMD EPYC's, an Intel Xeon's); the one found
    for this CPU gives bmm's bits at every length past ATen's loop, the other does not."""
    kernels = native.exact_attention()
    found = exact_attention.bmm_order(kernels, kind)
    assert found in exact_attention.ORDERS
    generator = torch.Generator().manual_seed(3)
    for length in [7, 9, 16, 30, 65]:
        shapes = [(40, 1, 64), (40, length, 64)] if kind == SCORES else [(40, 1, length), (40, length, 64)]
        a, b = (torch.randn(shape, generator=generator) for shape in shapes)
        want = torch.bmm(a, b.transpose(1, 2) if kind == SCORES else b)
        for order in exact_attention.ORDERS:
            assert same_bits(exact_attention._native(kernels, kind, a, b, torch.empty_like(want), order), want) == (order == found)


def test_where_no_order_gives_bmms_bits_every_product_goes_to_bmm(caplog):
    class NoOrder(CountingKernels):
        def scores_into(self, queries, keys, out, order):
            super().scores_into(queries, keys, out, order)
            out.add_(1e-3)

    exact_attention.bmm_order.cache_clear()
    products, calls = _products(NoOrder()), []
    queries, keys = torch.randn(8, 1, 64), torch.randn(8, 20, 64)
    for _ in range(2):
        products.scores(queries, keys, torch.empty(8, 1, 20), lambda: calls.append(1))
    assert calls == [1, 1] and products.kernels.calls == 0 and not exact_attention._SAME_BITS
    assert products.orders == {SCORES: None, CONTEXT: exact_attention.bmm_order(native.exact_attention(), CONTEXT)}
    assert "no order of the kernel's gives bmm's bits for the scores" in caplog.text


def _heads_of_64(normalize_before=False):
    """A random transformer whose heads are 64 wide (two of them), as real checkpoints' are."""
    args = Namespace(
        encoder_layers=2, decoder_layers=2, encoder_embed_dim=128, decoder_embed_dim=128, encoder_ffn_embed_dim=256,
        decoder_ffn_embed_dim=256, encoder_attention_heads=2, decoder_attention_heads=2, dropout=0.0,
        decoder_normalize_before=normalize_before,
    )  # fmt: skip
    base_architecture(args)
    dictionary = Dictionary()
    for word in range(40):
        dictionary.add_symbol(f"w{word}")
    task = TranslationTask(TranslationConfig(), dictionary, dictionary)
    torch.manual_seed(0)
    return TransformerModel.build_model(args, task).eval(), dictionary


@pytest.mark.parametrize("beam, normalize_before", [(1, False), (4, False), (4, True)])
def test_lean_step_with_heads_of_64_equals_fairseqs_modules(beam, normalize_before, monkeypatch):
    """Self-attention up to 20 keys and encoder attention over sources of 3-33 tokens (left
    padded), through the kernels: fairseq's log-probabilities and attention, bitwise. In a
    second search over the same shapes every decoder step is one native call for both layers
    (``exact_layer.py``) where the encoder keys are once per sentence (beams above 1), and
    every attention one call (``attend``) where they are per beam."""
    ways = []
    attend, native_step = AttentionProducts.attend, NativeLayers.__call__
    monkeypatch.setattr(AttentionProducts, "attend", lambda *args: ways.append(("attend", attend(*args))) or ways[-1][1])
    monkeypatch.setattr(NativeLayers, "__call__", lambda *args: ways.append(("layers", native_step(*args))) or ways[-1][1])
    model, dictionary = _heads_of_64(normalize_before)
    generator = torch.Generator().manual_seed(beam)
    lengths = torch.tensor([33, 30, 29, 17, 11, 9, 8, 7, 3])
    tokens = torch.full((len(lengths), int(lengths.max())), dictionary.pad())
    for row, length in enumerate(lengths.tolist()):
        tokens[row, -length:] = torch.randint(4, len(dictionary), (length,), generator=generator)
        tokens[row, -1] = dictionary.eos()
    sample = {"net_input": {"src_tokens": tokens, "src_lengths": lengths}}
    args = (sample, beam, dictionary.eos(), dictionary.pad(), len(dictionary))
    with torch.no_grad():
        expected = _drive(ModuleSteps(EnsembleModel([model]), beam, False, True, 1.0), *args, seed=beam, num_steps=20)
        actual = _drive(LeanSteps(EnsembleModel([model]), beam, 21, True, 1.0), *args, seed=beam, num_steps=20)
        del ways[:]
        lean = LeanSteps(EnsembleModel([model]), beam, 21, False, 1.0)
        again = _drive(lean, *args, seed=beam, num_steps=20)
    assert (lean.caches[0].histories is not None) == (beam > 1)  # rows read through a table, none copied
    for step, ((want, want_attention), (got, got_attention), (got_again, _)) in enumerate(zip(expected, actual, again)):
        assert torch.equal(got, want) and torch.equal(got_attention, want_attention), f"step {step}"
        assert torch.equal(got_again, want), f"step {step}, every shape checked before"
    layer_steps = [result for way, result in ways if way == "layers"]
    if beam > 1:
        assert len(layer_steps) == 20 and all(result is not None for result in layer_steps)
    else:
        assert all(result is None for result in layer_steps) and all(result for way, result in ways if way == "attend")
    used = {key for key, same in exact_attention._SAME_BITS.items() if same}
    assert {kind for kind, _, _ in used} == {SCORES, CONTEXT} and max(length for _, length, _ in used) >= 20


def test_language_model_with_heads_of_64_steps_natively_with_fairseqs_bits(monkeypatch):
    """A ``transformer_lm`` (no encoder attention; 6 linear layers and 2 norms per layer): in a
    second search over the same shapes every decoder step is one native call for both layers
    over rows read through the history table, bitwise fairseq's modules. In the first, where
    each step's length is new, the call is refused at the first layer and runs the second
    after the first layer's Python step has checked the new length."""
    ways, firsts = [], []
    native_step = NativeLayers.__call__
    monkeypatch.setattr(NativeLayers, "__call__", lambda *args: firsts.append(args[4]) or ways.append(native_step(*args)) or ways[-1])
    args = Namespace(decoder_layers=2, decoder_embed_dim=128, decoder_ffn_embed_dim=256, decoder_attention_heads=2, dropout=0.0)
    base_lm_architecture(args)
    dictionary = Dictionary()
    for word in range(40):
        dictionary.add_symbol(f"w{word}")
    torch.manual_seed(0)
    model = TransformerLanguageModel.build_model(args, LanguageModelingTask(LanguageModelingConfig(), dictionary, dictionary)).eval()
    beam, sentences = 4, 5
    sample = {"net_input": {"src_tokens": torch.full((sentences, 1), dictionary.eos()), "src_lengths": torch.ones(sentences, dtype=torch.long)}}
    drive_args = (sample, beam, dictionary.eos(), dictionary.pad(), len(dictionary))
    with torch.no_grad():
        expected = _drive(ModuleSteps(EnsembleModel([model]), beam, False, False, 1.0), *drive_args, seed=3, num_steps=12)
        first_search = _drive(LeanSteps(EnsembleModel([model]), beam, 13, False, 1.0), *drive_args, seed=3, num_steps=12)
        assert [(first, out is None) for first, out in zip(firsts, ways)] == [(0, True), (1, False)] * 12
        del ways[:], firsts[:]
        lean = LeanSteps(EnsembleModel([model]), beam, 13, False, 1.0)
        again = _drive(lean, *drive_args, seed=3, num_steps=12)
    assert lean.caches[0].histories is not None and len(ways) == 12 and all(out is not None for out in ways)
    for step, ((want, _), (got, _), (got_first, _)) in enumerate(zip(expected, again, first_search)):
        assert torch.equal(got, want) and torch.equal(got_first, want), f"step {step}"


@pytest.mark.parametrize("wrong_matrix", [0, 150, 299])
def test_a_check_of_many_matrices_compares_a_sample_that_holds_the_edges_and_the_middle(wrong_matrix):
    class WrongAtOne(CountingKernels):
        def context_into(self, probs, values, out, order):
            super().context_into(probs, values, out, order)
            sample = exact_attention.sampled_rows(300, 64).tolist()  # first, middle and last runs, in order
            if probs.size(0) == len(sample) and wrong_matrix in sample:  # the check's call (not the order's probe)
                out[sample.index(wrong_matrix)].add_(1e-3)

    products = _products(WrongAtOne())
    probs, values = torch.softmax(torch.randn(300, 1, 9), dim=-1), torch.randn(300, 9, 64)
    out = torch.empty(300, 1, 64)
    products.context(probs, values, out, lambda: torch.bmm(probs, values, out=out))
    assert exact_attention._SAME_BITS == {(CONTEXT, 9, torch.get_num_threads()): False}
    assert products.kernels.calls == 1


def test_copy_rows_copies_each_time_slice_and_refuses_rows_out_of_range():
    buffer = torch.arange(4 * 5 * 3, dtype=torch.float32).view(4, 5, 3)
    expected = buffer.clone()
    expected[:3, [0, 4]] = expected[:3, [2, 1]]
    kernels = native.exact_attention()
    kernels.copy_rows(buffer, 3, torch.tensor([2, 1]), torch.tensor([0, 4]))
    assert torch.equal(buffer, expected)  # the fourth time slice (past the length) untouched
    with pytest.raises(RuntimeError, match="a row out of range"):
        kernels.copy_rows(buffer, 3, torch.tensor([5]), torch.tensor([0]))
