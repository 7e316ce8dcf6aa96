"""The equivalence harness: run fairseq's stock generator and ours on the same model, batches
and options, and require the same hypotheses (tokens, order, scores, alignments).

Scores must be bitwise equal on CPU fp32: every fast path computes what fairseq computes, in
the same order (see ``attention.py`` for the one place where that needs care). The
product's promise is looser (scores within floating-point tolerance); the tests hold the
code to the stricter one, so that a change that reorders arithmetic shows up here.
"""

import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from fairseq import checkpoint_utils
from fairseq.dataclass.configs import GenerationConfig
from fairseq.sequence_generator import SequenceGenerator

from fairseq_fastseq.config import FastGeneratorConfig
from fairseq_fastseq.choice import accelerate
from fairseq_fastseq.generator import FastSequenceGenerator

SCORE_TOLERANCE = 0.0  # exact
Hypotheses = List[List[Dict[str, Any]]]


@functools.lru_cache(maxsize=None)
def load(checkpoints: Tuple[str, ...], data_bin: str, batch_size: int) -> Tuple[list, Any, list]:
    """Models (an ensemble if several), task and the test split's batches, as
    fairseq-generate would build them."""
    models, saved_cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        list(checkpoints), arg_overrides={"data": data_bin}
    )
    for model in models:
        model.eval()
    task.load_dataset("test", task_cfg=saved_cfg.task)
    batches = list(
        task.get_batch_iterator(
            dataset=task.dataset("test"), max_sentences=batch_size, seed=1
        ).next_epoch_itr(shuffle=False)
    )
    return models, task, batches


@functools.lru_cache(maxsize=None)
def load_language_model(checkpoint: str, data_bin: str) -> Any:
    """The LM of shallow fusion, as fairseq-generate loads ``--lm-path`` (no task given)."""
    lms, _ = checkpoint_utils.load_model_ensemble([checkpoint], arg_overrides={"data": data_bin}, task=None)
    return lms[0].eval()


def generate_all(
    generator, task, models, batches, prefix_size: int, seed: Optional[int], constraints: Optional[Callable]
) -> Hypotheses:
    """Hypotheses of every sentence; a batch that raises contributes one ``(error, message)``
    entry, so that fast must fail exactly where stock fails."""
    hypotheses: Hypotheses = []
    for sample in batches:
        prefix = sample["target"][:, :prefix_size] if prefix_size > 0 else None
        if seed is not None:
            torch.manual_seed(seed)
        try:
            hypotheses.extend(
                task.inference_step(
                    generator, models, sample, prefix_tokens=prefix,
                    constraints=constraints(sample) if constraints is not None else None,
                )  # fmt: skip
            )
        except Exception as error:  # noqa: BLE001  (compared, not swallowed)
            hypotheses.append((type(error).__name__, str(error)))
    return hypotheses


def assert_same_hypotheses(expected: Hypotheses, actual: Hypotheses, atol: float = SCORE_TOLERANCE) -> None:
    assert len(actual) == len(expected), f"{len(actual)} sentences, expected {len(expected)}"
    for i, (want_list, got_list) in enumerate(zip(expected, actual)):
        if isinstance(want_list, tuple) or isinstance(got_list, tuple):
            assert got_list == want_list, f"batch with sentence {i}: {got_list} != stock {want_list}"
            continue
        assert len(got_list) == len(want_list), f"sentence {i}: {len(got_list)} hypotheses, expected {len(want_list)}"
        for j, (want, got) in enumerate(zip(want_list, got_list)):
            where = f"sentence {i} hypothesis {j}"
            assert got["tokens"].tolist() == want["tokens"].tolist(), (
                f"{where}: tokens {got['tokens'].tolist()} != stock {want['tokens'].tolist()}"
            )
            got_score, want_score = float(got["score"]), float(want["score"])
            assert got_score == want_score or abs(got_score - want_score) <= atol, (
                f"{where}: score {float(got['score'])} != stock {float(want['score'])}"
            )
            torch.testing.assert_close(
                got["positional_scores"], want["positional_scores"], atol=atol, rtol=0, msg=where
            )
            for key in ("attention", "alignment"):
                if isinstance(want[key], torch.Tensor) and want[key].numel() > 0:
                    torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0, msg=f"{where}: {key}")
                elif not isinstance(want[key], torch.Tensor):  # soft alignments: lists of strings
                    assert got[key] == want[key], f"{where}: {key} {got[key]} != stock {want[key]}"


def assert_fast_matches_stock(
    toy_model,
    batch_size: int = 16,
    prefix_size: int = 0,
    seed: Optional[int] = None,
    reference: Optional[Callable] = None,
    ensemble_with: Sequence = (),
    constraints_fn: Optional[Callable] = None,
    knobs: Optional[FastGeneratorConfig] = None,
    atol: float = SCORE_TOLERANCE,
    lm=None,
    **options,
) -> Hypotheses:
    """Generate the toy model's test split with stock and fast generators; assert equality.

    ``options`` are fairseq GenerationConfig fields (beam, lenpen, sampling, ...).
    ``reference`` optionally replaces the stock generator (a callable taking the stock
    generator and returning the reference one): for stock bugs we fix.
    ``ensemble_with`` adds more toy models (same dictionary) to an ensemble;
    ``constraints_fn`` maps a batch to its packed target-side constraints;
    ``knobs`` are the fast generator's (default: all optimizations, errors instead of
    fallbacks); ``atol`` loosens the score comparison for a knob that is not bitwise;
    ``lm`` is a toy language model on the same target dictionary for shallow fusion
    (``--lm-path``; its weight is the ``lm_weight`` option), loaded as fairseq-generate does.
    """
    checkpoints = tuple(str(m.checkpoint) for m in (toy_model, *ensemble_with))
    models, task, batches = load(checkpoints, str(toy_model.data_bin), batch_size)
    for model in models:  # as freshly loaded: stock never sets BART's beam size back to 1
        if hasattr(model, "set_beam_size"):
            model.set_beam_size(1)
    gen_cfg = GenerationConfig(**options)
    fusion = None
    if lm is not None:
        fusion = {"lm_model": load_language_model(str(lm.checkpoint), str(lm.data_bin)), "lm_weight": gen_cfg.lm_weight}
    stock = task.build_generator(models, gen_cfg, extra_gen_cls_kwargs=fusion)
    assert isinstance(stock, SequenceGenerator)
    fast = task.build_generator(models, gen_cfg, extra_gen_cls_kwargs=fusion)
    fast = accelerate(fast, knobs or FastGeneratorConfig(on_unsupported="error"))
    assert isinstance(fast, FastSequenceGenerator)
    if reference is not None:
        stock = reference(stock)
    expected = generate_all(stock, task, models, batches, prefix_size, seed, constraints_fn)
    actual = generate_all(fast, task, models, batches, prefix_size, seed, constraints_fn)
    assert any(not isinstance(h, tuple) for h in expected), f"stock failed on every batch: {expected[0]}"
    assert_same_hypotheses(expected, actual, atol)
    return expected


def lengths(hypotheses: Hypotheses) -> Sequence[int]:
    return [len(h[0]["tokens"]) for h in hypotheses]


def random_beam_order(rng: torch.Generator, sentences: int, beams: int, drop: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A beam search's reorder drawn at random: each kept sentence's rows continue random beams
    of that sentence; with ``drop`` (and more than one sentence) one or two sentences leave.
    Returns the new rows' old rows and the kept sentences (None if none left)."""
    kept = None
    if drop and sentences > 1:
        keep = max(1, sentences - int(torch.randint(1, 3, (1,), generator=rng)))
        kept = torch.randperm(sentences, generator=rng)[:keep].sort().values
    live = kept if kept is not None else torch.arange(sentences)
    parent_beams = torch.randint(0, beams, (live.numel(), beams), generator=rng)
    return (live.unsqueeze(1) * beams + parent_beams).view(-1), kept
