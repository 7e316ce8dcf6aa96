"""The time-major self-attention cache == fairseq's cache, step by step, with reorders."""

import copy

import pytest
import torch
from fairseq.modules.multihead_attention import MultiheadAttention

from fairseq_fastseq.attention import SentenceProjectedEncoderAttention, TimeMajorCachedSelfAttention
from fairseq_fastseq.attention_plan import describe, fast_attention


def _pair(embed_dim=16, heads=4):
    torch.manual_seed(0)
    stock = MultiheadAttention(embed_dim, heads, self_attention=True).eval()
    fast = copy.deepcopy(stock)
    fast.__class__ = TimeMajorCachedSelfAttention
    return stock, fast


def _step(module, x, state, **kwargs):
    out, _ = module(query=x, key=x, value=x, incremental_state=state, need_weights=False, **kwargs)
    return out


@pytest.mark.parametrize("steps", [5, 40])  # 40 outgrows the initial capacity twice
def test_steps_and_reorders_match_fairseq(steps):
    stock, fast = _pair()
    rng = torch.Generator().manual_seed(1)
    bsz, stock_state, fast_state = 6, {}, {}
    with torch.no_grad():
        for step in range(steps):
            x = torch.randn(1, bsz, 16, generator=rng)
            assert torch.equal(_step(fast, x, fast_state), _step(stock, x, stock_state)), f"step {step}"
            if step % 3 == 2 and bsz > 2:  # a sentence leaves the batch
                bsz -= 1
                order = torch.randperm(bsz + 1, generator=rng)[:bsz]
            else:
                order = torch.randint(0, bsz, (bsz,), generator=rng)  # beams change parents
            stock.reorder_incremental_state(stock_state, order)
            fast.reorder_incremental_state(fast_state, order)


def test_a_step_it_does_not_handle_continues_on_fairseqs_path():
    stock, fast = _pair()
    stock_state, fast_state = {}, {}
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(1, 3, 16)
            assert torch.equal(_step(fast, x, fast_state), _step(stock, x, stock_state))
        x = torch.randn(1, 3, 16)
        mask = torch.zeros(3, 4, dtype=torch.bool)
        assert torch.equal(
            _step(fast, x, fast_state, key_padding_mask=mask), _step(stock, x, stock_state, key_padding_mask=mask)
        )


def test_switch_is_scoped_to_the_block(toy_models):
    from fairseq import checkpoint_utils

    models, _ = checkpoint_utils.load_model_ensemble([str(toy_models["transformer"].checkpoint)])
    with fast_attention(models, time_major_self_attn=True) as per_sentence:
        assert per_sentence
        # encoder and decoder self-attention, 2 layers each; 2 encoder-decoder attentions
        assert sum(isinstance(m, TimeMajorCachedSelfAttention) for m in models[0].modules()) == 4
        assert sum(isinstance(m, SentenceProjectedEncoderAttention) for m in models[0].modules()) == 2
    assert all(type(m) is MultiheadAttention for m in models[0].modules() if isinstance(m, MultiheadAttention))


def test_bart_keeps_its_own_beam_shared_attention(toy_models):
    """BART's decoder already takes the encoder output once per sentence (set_beam_size)."""
    from fairseq import checkpoint_utils

    models, _ = checkpoint_utils.load_model_ensemble([str(toy_models["bart"].checkpoint)])
    models[0].set_beam_size(4)
    with fast_attention(models, time_major_self_attn=True) as per_sentence:
        assert not per_sentence
        assert not any(isinstance(m, SentenceProjectedEncoderAttention) for m in models[0].modules())


@pytest.mark.parametrize(
    "model, expected",
    [
        ("transformer", "time-major self-attention cache (4 modules), encoder keys/values once per sentence"),
        ("bart", "time-major self-attention cache (4 modules), fairseq's (or the model's own) encoder attention"),
        ("lstm", "fairseq's (LSTMModel has no fairseq MultiheadAttention; the fast search still applies)"),
    ],
)
def test_log_line_says_what_attention_is_accelerated(toy_models, model, expected):
    from fairseq import checkpoint_utils

    models, _ = checkpoint_utils.load_model_ensemble([str(toy_models[model].checkpoint)])
    if model == "bart":
        models[0].set_beam_size(4)  # as fairseq's generator does: BART shares encoder K/V itself
    assert describe(models) == expected


@pytest.mark.parametrize(
    "src_len, sentences, beams",
    [(7, 3, 4), (1, 1, 5), (3, 1, 4), (7, 1, 5), (11, 1, 2), (64, 1, 5), (200, 2, 4)],
)  # small products round differently in BLAS (projected per beam); large ones are projected once
def test_encoder_projection_once_per_sentence_matches_per_beam(src_len, sentences, beams):
    torch.manual_seed(0)
    stock = MultiheadAttention(16, 4, encoder_decoder_attention=True, kdim=16, vdim=16).eval()
    fast = copy.deepcopy(stock)
    fast.__class__ = SentenceProjectedEncoderAttention
    encoder_out = torch.randn(src_len, sentences, 16)
    padding = torch.zeros(sentences, src_len, dtype=torch.bool)
    padding[0, : src_len // 3] = True
    expanded = encoder_out.repeat_interleave(beams, dim=1)
    stock_state, fast_state = {}, {}
    with torch.no_grad():
        for _ in range(3):
            query = torch.randn(1, sentences * beams, 16)
            want, _ = stock(query, expanded, expanded, padding.repeat_interleave(beams, 0), stock_state, static_kv=True)
            got, _ = fast(query, encoder_out, encoder_out, padding, fast_state, static_kv=True)
            assert torch.equal(got, want)
    cache = fast._get_input_buffer(fast_state)
    assert cache["prev_key"].is_contiguous() and cache["prev_value"].is_contiguous()  # read faster than fairseq's view


@pytest.mark.parametrize(
    "knob, method",
    [
        ("self_attn_cache", TimeMajorCachedSelfAttention._incremental_self_attention),
        ("encoder_projection", SentenceProjectedEncoderAttention._project_once_per_sentence),
    ],
)
@pytest.mark.parametrize("enabled", [True, False])
def test_fast_generator_uses_each_optimization_per_knob(toy_models, monkeypatch, knob, method, enabled):
    from fairseq.dataclass.configs import GenerationConfig

    from fairseq_fastseq.config import FastGeneratorConfig
    from fairseq_fastseq.choice import accelerate

    from .equivalence import load

    model = toy_models["transformer"]
    models, task, batches = load((str(model.checkpoint),), str(model.data_bin), 16)
    calls = []
    owner = TimeMajorCachedSelfAttention if knob == "self_attn_cache" else SentenceProjectedEncoderAttention
    monkeypatch.setattr(owner, method.__name__, lambda self, *args: calls.append(1) or method(self, *args))
    off = {"self_attn_cache": "stock", "encoder_projection": "per_beam"}[knob]
    modules = dict(decoder_step="fairseq")  # the lean step has caches of its own
    knobs = FastGeneratorConfig(**modules) if enabled else FastGeneratorConfig(**modules, **{knob: off})
    generator = accelerate(task.build_generator(models, GenerationConfig(beam=3)), knobs)
    task.inference_step(generator, models, batches[0])
    assert bool(calls) == enabled


def test_cache_is_never_allocated_beyond_the_searchs_steps():
    from fairseq_fastseq.attention_plan import cache_steps

    stock, fast = _pair()
    stock_state, fast_state = {}, {}
    with torch.no_grad(), cache_steps([fast], 20):
        for step in range(22):  # two steps past the limit: the cache still grows, one at a time
            x = torch.randn(1, 3, 16)
            assert torch.equal(_step(fast, x, fast_state), _step(stock, x, stock_state)), f"step {step}"
            keys = fast._get_input_buffer(fast_state)["time_major_key"]
            assert keys.size(0) == (16 if step < 16 else 20 if step < 20 else step + 1)
    assert fast.max_steps is None  # the limit ends with the block


def test_attention_call_binds_arguments_as_fairseqs_forward():
    """The module path's attention classes read their arguments through ``AttentionCall``:
    its fields must be fairseq's forward parameters, in order, with fairseq's defaults (a
    fairseq that renamed or reordered one would otherwise be read wrongly)."""
    import inspect

    from fairseq_fastseq.attention import AttentionCall

    parameters = list(inspect.signature(MultiheadAttention.forward).parameters.values())[1:]  # after self
    assert list(AttentionCall._fields) == [p.name for p in parameters]
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    assert AttentionCall._field_defaults == defaults
    x = torch.zeros(1)
    call = AttentionCall(x, x, x, None, {}, False, attn_mask=x)
    assert call.incremental_state == {} and call.need_weights is False and call.attn_mask is x and call.static_kv is False
