"""The C++ attention of the kernel tiers (``step/native``) against fairseq's bmm / softmax /
bmm up to rounding, on the cache layouts the step hands it; its fallback when it cannot be
built; and the int8 output projection in row chunks."""

import logging

import pytest
import torch

from fairseq_fastseq.step import kernels, native
from fairseq_fastseq.step.output import ROWS_PER_CALL, RowChunkedOutput
from fairseq_fastseq.step.split_linear import split_bf16_linear

pytestmark = pytest.mark.skipif(native.compiled() is None, reason="the native kernels could not be built here")


def _masked_softmax(scores: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1)


# head_dim 32, 64 and 128 take the register kernels (pieces and beams in passes of 4 or 2, a
# shorter last pass), others the loop over head_dim.
@pytest.mark.parametrize("heads, head_dim, length", [(1, 8, 1), (4, 64, 17), (3, 16, 40), (3, 64, 9), (2, 32, 7), (1, 128, 5), (3, 128, 12)])
@pytest.mark.parametrize("padded", [False, True])
def test_self_attention_is_bmm_softmax_bmm_over_the_time_major_cache(heads, head_dim, length, padded):
    """A cache buffer with more rows than the step uses (slots after sentences left), strided
    queries (the fused projection's), and padding masking some rows' positions."""
    torch.manual_seed(0)
    rows, buffer_rows, capacity = 6, 9, 50
    keys_buffer, values_buffer = (torch.randn(capacity, buffer_rows * heads, head_dim) for _ in range(2))
    keys, values = keys_buffer[:length, : rows * heads], values_buffer[:length, : rows * heads]
    queries = torch.randn(rows, heads, 3, head_dim)[:, :, 0].reshape(rows * heads, head_dim)
    padding = torch.rand(length, rows) < 0.3 if padded else None
    if padding is not None:
        padding[0] = False  # every row attends to something
    got = native.compiled().self_attention(queries, keys, values, padding, heads)
    scores = torch.bmm(queries.unsqueeze(1), keys.transpose(0, 1).transpose(1, 2))  # (rows * heads, 1, length)
    masked = torch.zeros_like(scores, dtype=torch.bool) if padding is None else padding.t().repeat_interleave(heads, 0).unsqueeze(1)
    want = torch.bmm(_masked_softmax(scores, masked), values.transpose(0, 1)).squeeze(1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads, head_dim, length", [(1, 8, 1), (4, 64, 17), (3, 16, 40), (2, 32, 7), (3, 128, 12)])
@pytest.mark.parametrize("padded", [False, True])
def test_self_attention_through_a_history_reads_each_rows_entries_where_they_are(heads, head_dim, length, padded):
    """With a history (``histories.py``), row ``r``'s entry of slice ``t`` is cache row
    ``history[t, r]``: the same bits as the kernel over a cache with those entries gathered
    into row order, for every head-size path."""
    torch.manual_seed(2)
    rows, cached = 6, 11
    keys, values = (torch.randn(length, cached * heads, head_dim) for _ in range(2))
    table = torch.empty(length + 3, rows + 2, dtype=torch.long).random_(0, cached)
    history = table[:length, :rows]  # a view of a larger table, as ``Histories.table`` gives
    queries = torch.randn(rows * heads, head_dim)
    padding = torch.rand(length, rows) < 0.3 if padded else None
    if padding is not None:
        padding[0] = False
    got = native.compiled().self_attention(queries, keys, values, padding, heads, history)
    slices = torch.arange(length).unsqueeze(1)
    gathered = [c.view(length, cached, heads, head_dim)[slices, history].reshape(length, rows * heads, head_dim) for c in (keys, values)]
    assert torch.equal(got, native.compiled().self_attention(queries, *gathered, padding, heads))
    assert not torch.equal(got, native.compiled().self_attention(queries, keys[:, : rows * heads], values[:, : rows * heads], padding, heads))


@pytest.mark.parametrize(
    "sentences, beams, heads, head_dim, src_len",
    [(1, 1, 1, 8, 3), (3, 5, 4, 64, 23), (2, 4, 2, 16, 9), (1, 6, 3, 32, 5), (2, 3, 2, 128, 7), (2, 1, 2, 64, 4)],
)
@pytest.mark.parametrize("padded", [False, True])
def test_grouped_attention_is_each_beams_attention_over_its_sentence(sentences, beams, heads, head_dim, src_len, padded):
    torch.manual_seed(1)
    queries = torch.randn(sentences * beams, heads * head_dim)
    keys, values = (torch.randn(sentences * heads, src_len, head_dim) for _ in range(2))
    padding = torch.rand(sentences, src_len) < 0.3 if padded else None
    if padding is not None:
        padding[:, -1] = False
    averaged = torch.full((sentences * beams, src_len), float("nan"))  # with the weights asked for
    got = native.compiled().grouped_attention(queries, keys, values, padding, heads, averaged)
    per_head = queries.view(sentences, beams, heads, head_dim).transpose(1, 2).reshape(sentences * heads, beams, head_dim)
    scores = torch.bmm(per_head, keys.transpose(1, 2))
    masked = torch.zeros_like(scores, dtype=torch.bool) if padding is None else padding.repeat_interleave(heads, 0).unsqueeze(1).expand_as(scores)
    probs = _masked_softmax(scores, masked)
    context = torch.bmm(probs, values).view(sentences, heads, beams, head_dim)
    want = context.transpose(1, 2).reshape(sentences * beams, heads * head_dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # fairseq's decoder attention: the weights averaged over heads, (rows, src_len)
    torch.testing.assert_close(averaged, probs.view(sentences, heads, beams, src_len).mean(dim=1).view(-1, src_len), atol=1e-6, rtol=1e-5)
    assert torch.equal(native.compiled().grouped_attention(queries, keys, values, padding, heads), got)


@pytest.mark.parametrize("head_dim", [64, 24])
def test_grouped_attention_reads_the_live_sentences_among_the_cached_ones(head_dim):
    """Finished sentences stay in the encoder cache (``encoder_caches.py``): with ``live``, the
    same bits as over a cache holding only the live sentences."""
    torch.manual_seed(4)
    cached, beams, heads, src_len, live = 5, 3, 2, 7, torch.tensor([4, 0, 2])
    keys, values = (torch.randn(cached * heads, src_len, head_dim) for _ in range(2))
    padding = torch.rand(cached, src_len) < 0.3
    padding[:, 0] = False
    queries = torch.randn(live.numel() * beams, heads * head_dim)
    averaged, compact_averaged = (torch.empty(live.numel() * beams, src_len) for _ in range(2))
    got = native.compiled().grouped_attention(queries, keys, values, padding, heads, averaged, live)
    compact = [c.view(cached, heads, src_len, head_dim)[live].reshape(-1, src_len, head_dim) for c in (keys, values)]
    assert torch.equal(got, native.compiled().grouped_attention(queries, *compact, padding[live], heads, compact_averaged))
    assert torch.equal(averaged, compact_averaged)
    with pytest.raises(RuntimeError, match="live names cached sentence 5 of 5"):
        native.compiled().grouped_attention(queries, keys, values, padding, heads, None, torch.tensor([4, 0, 5]))


@pytest.mark.parametrize("scale", [2.0**-8, 4.0])
def test_the_kernels_softmax_holds_for_flat_and_for_sharp_scores(scale):
    """Scores from nearly equal to hundreds apart, exact in float32 (small integers times a
    power of two) so that only the softmax can differ: the kernels' own exp
    (``exp_of_nonpositive``, 0 below about -87) against PyTorch's."""
    torch.manual_seed(3)
    sentences, beams, heads, head_dim, src_len = 2, 5, 4, 64, 19
    queries = torch.randint(-3, 4, (sentences * beams, heads * head_dim)).float() * scale
    keys = torch.randint(-3, 4, (sentences * heads, src_len, head_dim)).float()
    values = torch.randn(sentences * heads, src_len, head_dim)
    got = native.compiled().grouped_attention(queries, keys, values, None, heads)
    per_head = queries.view(sentences, beams, heads, head_dim).transpose(1, 2).reshape(sentences * heads, beams, head_dim)
    probs = torch.softmax(torch.bmm(per_head, keys.transpose(1, 2)), dim=-1)
    want = torch.bmm(probs, values).view(sentences, heads, beams, head_dim).transpose(1, 2).reshape(sentences * beams, -1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_wrong_inputs_get_an_error_not_a_wrong_result():
    kernels_module = native.compiled()
    with pytest.raises(RuntimeError, match="float32"):
        kernels_module.self_attention(torch.zeros(4, 8, dtype=torch.float64), torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), None, 2)
    with pytest.raises(RuntimeError, match="history names cache row 2 of 2"):
        kernels_module.self_attention(torch.zeros(4, 8), torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), None, 2, torch.full((2, 2), 2))
    with pytest.raises(RuntimeError, match="without a history"):
        kernels_module.self_attention(torch.zeros(2, 8), torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), None, 2)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels_module.grouped_attention(torch.zeros(4, 8), torch.zeros(2, 8, 3).transpose(1, 2), torch.zeros(2, 3, 8), None, 2)


def test_only_the_tiers_that_round_differently_use_it_and_only_on_cpu_float32():
    weight = torch.zeros(4, 4)
    assert kernels.ExactKernels().native_attention(weight) is None
    assert kernels.FusedKernels().native_attention(weight) is native.compiled()
    assert kernels.Int8Kernels().native_attention(weight.double()) is None


def test_without_a_build_the_tiers_fall_back_to_bmm_and_say_why(failing_build, caplog):
    with caplog.at_level(logging.WARNING, logger="fairseq_fastseq.step.native"):
        assert kernels.FusedKernels().native_attention(torch.zeros(4, 4)) is None
    assert "native self-attention kernel is unavailable (RuntimeError: Error building extension: g++: command not found)" in caplog.text
    assert "through bmm instead" in caplog.text


@pytest.mark.parametrize("rows", [3, 2 * ROWS_PER_CALL, 2 * ROWS_PER_CALL + 1, 5 * ROWS_PER_CALL + 7])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_row_chunked_output_is_the_log_softmax_of_one_projection(rows, temperature):
    """Integer-valued weights and features: every logit is exact whatever the summation order,
    so the chunked log-probabilities must equal one call's bit for bit."""
    torch.manual_seed(2)
    weight = torch.randint(-3, 4, (50, 8)).float()
    features = torch.randint(-3, 4, (rows, 8)).float()
    calls = []

    def project(x):
        calls.append(x.size(0))
        return x @ weight.t()

    got = RowChunkedOutput(project, weight)(features, temperature)
    want = torch.log_softmax((features @ weight.t()) / temperature, dim=-1)
    assert torch.equal(got, want)
    assert max(calls) <= (rows if rows <= 2 * ROWS_PER_CALL else ROWS_PER_CALL)


def test_a_build_says_so_before_it_starts(monkeypatch, caplog, tmp_path):
    """Compiling takes about a minute: the log says so before, not after a silent wait."""
    import torch.utils.cpp_extension

    monkeypatch.setattr(torch.utils.cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda *args, **kwargs: "built")
    native.compiled.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="fairseq_fastseq.step.native"):
            assert native.compiled() == "built"
        assert "compiling the native kernels for this machine" in caplog.text
    finally:
        native.compiled.cache_clear()


def test_a_rebuild_of_sources_newer_than_the_library_says_so_too(monkeypatch, caplog, tmp_path):
    """A reinstalled package's sources are newer than the library built before: ninja
    compiles again (about a minute), and the log says so rather than a silent wait."""
    import os

    import torch.utils.cpp_extension

    source, library_age = native.SOURCE.resolve(), []

    def build_directory(name, verbose):  # holds a library of the given age against the source
        library = tmp_path / f"{name}.so"
        library.touch()
        built = source.stat().st_mtime + library_age[-1]
        os.utime(library, (built, built))
        return str(tmp_path)

    monkeypatch.setattr(torch.utils.cpp_extension, "_get_build_directory", build_directory)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda *args, **kwargs: "loaded")
    for age, compiles in ((-3600, True), (3600, False)):  # library older / newer than the source
        library_age.append(age)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fairseq_fastseq.step.native"):
            assert native._load(native.EXTENSION, source, native.FLAGS, "self-attention kernel", "bmm") == "loaded"
        assert ("compiling the native kernels" in caplog.text) == compiles, age


def test_sources_reached_through_a_symlink_build_as_the_real_ones(monkeypatch, tmp_path):
    """PyTorch's build file names the sources' path and rebuilds when it changes: a copy
    reached through a link (the README test's linked checkout) must pass the real path, or
    each load from the other path rebuilds every kernel (about a minute each)."""
    import torch.utils.cpp_extension

    linked = tmp_path / "native"
    linked.symlink_to(native.SOURCE.resolve().parent)
    built = []
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda name, sources, **kwargs: built.append((name, sources)))
    for source in (native.SOURCE, linked / native.SOURCE.name):
        native._load(native.EXTENSION, source, native.FLAGS, "self-attention kernel", "bmm")
    assert built[0] == built[1] and built[0][1] == [str(native.SOURCE.resolve())]


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path, caplog):
    """PyTorch's build lock is a bare file that a killed build leaves behind; every later
    load would wait on it forever."""
    import os
    import time

    from fairseq_fastseq.step import native

    stale, fresh = tmp_path / "stale" / "lock", tmp_path / "fresh" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    old = time.time() - native.STALE_LOCK_SECONDS - 60
    os.utime(stale, (old, old))
    with caplog.at_level(logging.WARNING, logger="fairseq_fastseq.step.native"):
        native._remove_stale_lock(stale)
        native._remove_stale_lock(fresh)
        native._remove_stale_lock(tmp_path / "none" / "lock")
    assert not stale.exists() and fresh.exists()
    assert "a build lock left 11 minutes ago by a build that did not finish" in caplog.text


@pytest.mark.parametrize("cpu_has_amx", [True, False], ids=["refused_by_linux", "no_amx"])
def test_without_amx_fused_keeps_float32_linear_layers(monkeypatch, caplog, cpu_has_amx):
    """A CPU without AMX builds nothing; where Linux refuses the process AMX's tile state
    (arch_prctl) the built kernel is not used, and the log says so."""

    class Refused:  # a built kernel in a process Linux refused AMX
        @staticmethod
        def available():
            return False

    monkeypatch.setattr(native, "HAS_AMX_BF16", cpu_has_amx)
    monkeypatch.setattr(native, "_load", lambda *args, **kwargs: Refused if cpu_has_amx else pytest.fail("built without AMX"))
    native.split_bf16.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="fairseq_fastseq.step.native"):
            assert native.split_bf16() is None
            linear = torch.nn.Linear(8, 4)
            assert split_bf16_linear(linear.weight, linear.bias, False, kernels.FusedKernels().prepared, linear) is None
        assert ("Linux refused this process AMX's tile state" in caplog.text) == cpu_has_amx
    finally:
        native.split_bf16.cache_clear()
