"""The lean step's CPU buffers (``step/pool.py``, ``step/caches.py``): kept from one search to
the next, the self-attention cache sized for the whole search on CPU, and sentences leaving
the batch served from the spare buffer's front - fewer pages mapped afresh, the same values."""

import torch
from fairseq.dataclass.configs import GenerationConfig

from fairseq_fastseq.choice import accelerate
from fairseq_fastseq.config import FastGeneratorConfig
from fairseq_fastseq.step.caches import GROWTH, SelfAttentionCache
from fairseq_fastseq.step.pool import BufferPool

from .equivalence import generate_all, load

LIKE = torch.empty(0)


def test_a_new_search_takes_the_same_buffers_again_smallest_fit_first():
    pool = BufferPool()
    pool.new_search()
    big, small = pool.take((10, 10), LIKE), pool.take((4, 5), LIKE)
    pool.new_search()
    assert pool.take((3, 5), LIKE).data_ptr() == small.data_ptr()  # the smallest that holds it
    assert pool.take((2, 50), LIKE).data_ptr() == big.data_ptr()
    fresh = pool.take((2, 2), LIKE)  # none free: a new buffer, kept for the next search
    assert fresh.data_ptr() not in (big.data_ptr(), small.data_ptr())
    pool.new_search()
    assert {pool.take((2, 2), LIKE).data_ptr() for _ in range(3)} == {small.data_ptr(), fresh.data_ptr(), big.data_ptr()}


def test_a_buffer_too_small_for_a_search_is_replaced():
    pool = BufferPool()
    pool.new_search()
    small = pool.take((4,), LIKE)
    pool.new_search()
    larger = pool.take((8,), LIKE)
    assert larger.shape == (8,) and larger.data_ptr() != small.data_ptr()
    assert len(pool._kept) == 1  # the small one was let go


def test_off_the_cpu_the_pool_keeps_nothing():
    pool = BufferPool()
    taken = pool.take((3, 4), torch.empty(0, device="meta"))
    assert taken.device.type == "meta" and taken.shape == (3, 4) and pool._kept == []


def _filled_cache(like: torch.Tensor, rows: int, steps: int, max_steps: int, pool: BufferPool) -> SelfAttentionCache:
    cache = SelfAttentionCache(heads=2, head_dim=3, max_steps=max_steps, pool=pool)
    for _ in range(steps):
        cache.append(torch.rand(rows, 6).to(like.device), torch.rand(rows, 6).to(like.device), None)
    return cache


def test_the_cpu_cache_holds_every_step_and_a_device_cache_grows():
    assert _filled_cache(LIKE, 4, 1, 50, BufferPool()).keys.size(0) == 50  # never grows, never copies
    on_device = _filled_cache(torch.empty(0, device="meta"), 4, 1, 50, BufferPool())
    assert on_device.keys.size(0) == GROWTH


def test_sentences_leaving_reuse_the_spare_buffer_with_the_same_values():
    pool = BufferPool()
    pool.new_search()
    cache = _filled_cache(LIKE, 6, 3, 10, pool)
    spare = cache.reorder(torch.tensor([1, 0, 2, 3, 5, 4]), None)  # the first reorder takes a spare
    taken = len(pool._kept)
    expected_keys = cache.keys[:3, [4, 5, 0]].clone()
    expected_values = cache.values[:3, [4, 5, 0]].clone()
    storages = {cache.keys.data_ptr(), cache.values.data_ptr(), spare.data_ptr()}
    spare = cache.reorder(torch.tensor([4, 5, 0]), spare)  # three rows left
    assert len(pool._kept) == taken  # nothing new
    assert {cache.keys.data_ptr(), cache.values.data_ptr(), spare.data_ptr()} == storages
    assert cache.keys.shape == (10, 3, 2, 3)
    assert torch.equal(cache.keys[:3], expected_keys) and torch.equal(cache.values[:3], expected_values)


def test_a_generator_searches_again_in_the_buffers_of_its_last_search(toy_models):
    toy = toy_models["transformer"]
    models, task, batches = load((str(toy.checkpoint),), str(toy.data_bin), 16)
    generator = accelerate(task.build_generator(models, GenerationConfig(beam=4)), FastGeneratorConfig())
    first = generate_all(generator, task, models, batches[:1], 0, None, None)
    kept = [buffer.data_ptr() for buffer in generator.buffers._kept]
    assert kept  # the caches and the output buffer came from the generator's pool
    second = generate_all(generator, task, models, batches[:1], 0, None, None)
    assert [buffer.data_ptr() for buffer in generator.buffers._kept] == kept
    assert len(first) == len(second)
    for ours, again in zip(first, second):
        for hypothesis, repeated in zip(ours, again):
            assert torch.equal(hypothesis["tokens"], repeated["tokens"])
            assert torch.equal(hypothesis["positional_scores"], repeated["positional_scores"])
