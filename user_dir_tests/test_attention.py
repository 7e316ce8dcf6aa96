"""The time-major self-attention cache == fairseq's cache, step by step, with reorders."""

import copy

import pytest
import torch
from fairseq.modules.multihead_attention import MultiheadAttention

from fairseq_fastseq.attention import TimeMajorCachedSelfAttention, time_major_self_attention


def _pair(embed_dim=16, heads=4):
    torch.manual_seed(0)
    stock = MultiheadAttention(embed_dim, heads, self_attention=True).eval()
    fast = copy.deepcopy(stock)
    fast.__class__ = TimeMajorCachedSelfAttention
    return stock, fast


def _step(module, x, state, **kwargs):
    out, _ = module(query=x, key=x, value=x, incremental_state=state, need_weights=False, **kwargs)
    return out


@pytest.mark.parametrize("steps", [5, 70])  # 70 outgrows the initial capacity twice
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
    with time_major_self_attention(models) as switched:
        assert switched == 2 + 2  # encoder and decoder self-attention, 2 layers each
        assert sum(isinstance(m, TimeMajorCachedSelfAttention) for m in models[0].modules()) == 4
    assert not any(isinstance(m, TimeMajorCachedSelfAttention) for m in models[0].modules())


@pytest.mark.parametrize("knob, expect_used", [("time_major", True), ("stock", False)])
def test_fast_generator_uses_the_cache_per_knob(toy_models, monkeypatch, knob, expect_used):
    from fairseq.dataclass.configs import GenerationConfig

    from fairseq_fastseq.config import FastGeneratorConfig
    from fairseq_fastseq.generator import accelerate

    from .equivalence import load

    model = toy_models["transformer"]
    models, task, batches = load((str(model.checkpoint),), str(model.data_bin), 16)
    calls = []
    original = TimeMajorCachedSelfAttention._incremental_self_attention
    monkeypatch.setattr(
        TimeMajorCachedSelfAttention,
        "_incremental_self_attention",
        lambda self, *args: calls.append(1) or original(self, *args),
    )
    generator = accelerate(task.build_generator(models, GenerationConfig(beam=3)), FastGeneratorConfig(self_attn_cache=knob))
    task.inference_step(generator, models, batches[0])
    assert bool(calls) == expect_used
