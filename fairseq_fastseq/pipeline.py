"""fairseq-generate for the pipelined tasks: decoding overlapped with post-processing.

In stock ``fairseq-generate`` the main process decodes a batch, then turns it into text
(dictionary lookup, BPE removal, detokenization), prints it and scores it, then decodes the
next one. Here the main process only loads batches (fairseq's background data workers),
decodes them, and hands each finished batch, moved to the CPU, to ``OrderedWorkers``; the
``BatchFormatter`` runs there while the next batches decode, and the main process writes
and scores the results in generation order. The output is fairseq-generate's, line for
line (``S-``/``T-``/``H-``/``D-``/``P-``/``A-`` lines, the log lines, the final
``Generate ... BLEU`` line).

With ``--results-path`` the output is written to ``generate-<subset>.txt.incomplete`` and
renamed to ``generate-<subset>.txt`` only when the whole subset has been written: a run
stopped by Ctrl-C, a failing worker or an error leaves no file that looks complete.
"""

import ast
import logging
import os
import sys
from argparse import Namespace
from typing import Any, List, Optional, TextIO

import numpy as np
import torch
from fairseq import checkpoint_utils, scoring, tasks, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.logging import progress_bar
from fairseq.logging.meters import StopwatchMeter, TimeMeter
from omegaconf import DictConfig

from .formatting import BatchFormatter, GeneratedBatch, map_arrays
from .distributed import Ranks
from .errors import clear_load_errors, explain_out_of_memory
from .ordered_output import OrderedWriter, Shard
from .worker_count import parse_workers, postprocess_workers
from .workers import OrderedWorkers

# fairseq-generate's logger name, so that its log lines read the same.
logger = logging.getLogger("fairseq_cli.generate")

INCOMPLETE_SUFFIX = ".incomplete"


def main(cfg: Any) -> Any:
    """Generate ``cfg.dataset.gen_subset`` as fairseq-generate would; return the scorer (on
    rank 0 of a torchrun job; the other ranks return None)."""
    if isinstance(cfg, Namespace):
        cfg = convert_namespace_to_omegaconf(cfg)
    _check_options(cfg)
    ranks = Ranks.from_environment(cfg.task.distributed_timeout_seconds)
    try:
        if not ranks.writes_output:
            return _generate(cfg, None, ranks)
        if cfg.common_eval.results_path is None:
            return _generate(cfg, sys.stdout, ranks)
        return _generate_to_results_file(cfg, ranks)
    finally:
        ranks.close()


def _generate_to_results_file(cfg: DictConfig, ranks: Ranks) -> Any:
    os.makedirs(cfg.common_eval.results_path, exist_ok=True)
    final = os.path.join(cfg.common_eval.results_path, f"generate-{cfg.dataset.gen_subset}.txt")
    partial = final + INCOMPLETE_SUFFIX
    if os.path.exists(final):
        os.remove(final)  # an older run's results must not pass for this run's
    try:
        with open(partial, "w", buffering=1, encoding="utf-8") as output:
            scorer = _generate(cfg, output, ranks)
    except BaseException:
        logger.error("generation stopped before the end; what was written is in %s", partial)
        raise
    os.replace(partial, final)
    return scorer


def _check_options(cfg: DictConfig) -> None:
    if cfg.common_eval.path is None:
        raise ValueError("--path is required: the checkpoint(s) to generate with")
    if cfg.generation.sampling and cfg.generation.nbest != cfg.generation.beam:
        raise ValueError("--sampling requires --nbest equal to --beam")
    if cfg.generation.replace_unk is not None and cfg.dataset.dataset_impl != "raw":
        raise ValueError("--replace-unk needs the raw source text: add --dataset-impl raw")
    parse_workers(cfg.task.postprocess_workers)  # a bad value fails before the model loads


def _generate(cfg: DictConfig, output: Optional[TextIO], ranks: Ranks) -> Any:
    # fairseq-generate sends its log lines where its results go (stdout or the results file);
    # ranks other than 0 write no results and log only warnings, on stderr.
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        level=os.environ.get("LOGLEVEL", "INFO").upper() if ranks.writes_output else "WARNING",
        stream=output or sys.stderr,
    )
    utils.import_user_module(cfg.common)
    if cfg.dataset.max_tokens is None and cfg.dataset.batch_size is None:
        cfg.dataset.max_tokens = 12000
    logger.info(cfg)
    if cfg.common.seed is not None and not cfg.generation.no_seed_provided:
        np.random.seed(cfg.common.seed)
        utils.set_torch_seed(cfg.common.seed)
    use_cuda = torch.cuda.is_available() and not cfg.common.cpu

    task = tasks.setup_task(cfg.task)
    models, lms = _load_models(cfg, task, use_cuda)
    subset = task.dataset(cfg.dataset.gen_subset)
    batches = task.get_batch_iterator(
        dataset=subset,
        max_tokens=cfg.dataset.max_tokens,
        max_sentences=cfg.dataset.batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), *[m.max_positions() for m in models]),
        ignore_invalid_inputs=cfg.dataset.skip_invalid_size_inputs_valid_test,
        required_batch_size_multiple=cfg.dataset.required_batch_size_multiple,
        seed=cfg.common.seed,
        num_shards=ranks.world if ranks.world > 1 else cfg.distributed_training.distributed_world_size,
        shard_id=ranks.rank if ranks.world > 1 else cfg.distributed_training.distributed_rank,
        num_workers=cfg.dataset.num_workers,
        data_buffer_size=cfg.dataset.data_buffer_size,
    ).next_epoch_itr(shuffle=False)
    progress = progress_bar.progress_bar(
        batches,
        log_format=cfg.common.log_format,
        log_interval=cfg.common.log_interval,
        default_log_format="tqdm" if not cfg.common.no_progress_bar else "simple",
    )
    generator = task.build_generator(
        models, cfg.generation, extra_gen_cls_kwargs={"lm_model": lms[0], "lm_weight": cfg.generation.lm_weight}
    )
    scorer = scoring.build_scorer(cfg.scoring, task.target_dictionary)
    formatter = _formatter(cfg, task, generator, subset, scorer)
    writer = OrderedWriter(output, scorer, task.target_dictionary)

    gen_timer, wps_meter = StopwatchMeter(), TimeMeter()
    sentences, has_target = 0, True
    workers_count, why = postprocess_workers(cfg.task.postprocess_workers, use_cuda)
    backend = cfg.task.postprocess_backend
    logger.info(
        f"pipeline: post-processing in {workers_count} {backend} worker(s), overlapped with decoding ({why})"
        if workers_count
        else f"pipeline: post-processing on the main process, between batches ({why})"
    )
    if ranks.world > 1:
        logger.info(f"pipeline: rank {ranks.rank} of {ranks.world} generates batches {ranks.rank}, {ranks.rank} + {ranks.world}, ...")
    shard = Shard(ranks, writer)
    with OrderedWorkers(formatter, workers_count, backend) as workers:
        for position, sample in enumerate(progress):
            sample = utils.move_to_cuda(sample) if use_cuda else sample
            if "net_input" not in sample:
                continue
            prefix_tokens = sample["target"][:, : cfg.generation.prefix_size] if cfg.generation.prefix_size > 0 else None
            gen_timer.start()
            with explain_out_of_memory(sample, cfg.generation.beam):
                hypotheses = task.inference_step(
                    generator, models, sample, prefix_tokens=prefix_tokens, constraints=sample.get("constraints")
                )
            generated_tokens = sum(len(nbest[0]["tokens"]) for nbest in hypotheses)
            gen_timer.stop(generated_tokens)
            has_target = sample["target"] is not None
            shard.submitted(position)
            shard.add(workers.submit(_to_cpu(sample, hypotheses, cfg.generation.nbest)))
            wps_meter.update(generated_tokens)
            progress.log({"wps": round(wps_meter.avg)})
            sentences += sample["nsentences"] if "nsentences" in sample else sample["id"].numel()
        shard.add(workers.drain())
    totals = shard.finish(sentences, gen_timer.n, gen_timer.sum, has_target)
    if totals is None:  # a rank other than 0: rank 0 writes everything
        return None
    sentences, tokens, seconds, has_target = totals

    logger.info("NOTE: hypothesis and token scores are output in base 2")
    logger.info(
        f"Translated {sentences:,} sentences ({tokens:,} tokens) in {seconds:.1f}s "
        f"({sentences / seconds:.2f} sentences/s, {tokens / seconds:.2f} tokens/s)"
    )
    if has_target:
        _warn_about_bpe_bleu(cfg)
        print(f"Generate {cfg.dataset.gen_subset} with beam={cfg.generation.beam}: {scorer.result_string()}", file=output)
    return scorer


def _load_models(cfg: DictConfig, task: Any, use_cuda: bool):
    """The ensemble and the optional shallow-fusion LM, ready for inference; loads the subset."""
    overrides = ast.literal_eval(cfg.common_eval.model_overrides)
    logger.info(f"loading model(s) from {cfg.common_eval.path}")
    with clear_load_errors(cfg.common_eval.path, cfg.task.data):
        models, saved_cfg = checkpoint_utils.load_model_ensemble(
            utils.split_paths(cfg.common_eval.path),
            arg_overrides=overrides,
            task=task,
            suffix=cfg.checkpoint.checkpoint_suffix,
            strict=cfg.checkpoint.checkpoint_shard_count == 1,
            num_shards=cfg.checkpoint.checkpoint_shard_count,
        )
    # After the checkpoint, so that the dataset sees the saved task config, as in fairseq.
    task.load_dataset(cfg.dataset.gen_subset, task_cfg=saved_cfg.task)
    lms: List[Any] = [None]
    if cfg.generation.lm_path is not None:
        overrides["data"] = cfg.task.data
        with clear_load_errors(cfg.generation.lm_path, cfg.task.data):
            lms, _ = checkpoint_utils.load_model_ensemble([cfg.generation.lm_path], arg_overrides=overrides, task=None)
    for model in [*models, *lms]:
        if model is None:
            continue
        if cfg.common.fp16:
            model.half()
        if use_cuda and not cfg.distributed_training.pipeline_model_parallel:
            model.cuda()
        model.prepare_for_inference_(cfg)
    return models, lms


def _formatter(cfg: DictConfig, task: Any, generator: Any, subset: Any, scorer: Any) -> BatchFormatter:
    try:
        src_dict = getattr(task, "source_dictionary", None)
    except NotImplementedError:
        src_dict = None
    return BatchFormatter(
        src_dict=src_dict,
        tgt_dict=task.target_dictionary,
        post_process=cfg.common_eval.post_process,
        tokenizer=task.build_tokenizer(cfg.tokenizer),
        bpe=task.build_bpe(cfg.bpe),
        align_dict=utils.load_align_dict(cfg.generation.replace_unk),
        original_text=subset,
        symbols_to_strip=sorted(getattr(generator, "symbols_to_strip_from_output", {generator.eos})),
        quiet=cfg.common_eval.quiet,
        print_alignment=cfg.generation.print_alignment,
        print_step=cfg.generation.print_step,
        retain_iter_history=cfg.generation.retain_iter_history,
        scorer_takes_strings=hasattr(scorer, "add_string"),
    )


def _to_cpu(sample: dict, hypotheses: list, nbest: int) -> GeneratedBatch:
    """What the formatter needs of a batch, on the CPU (attention matrices left behind)."""
    kept = [[{k: v for k, v in hypothesis.items() if k != "attention"} for hypothesis in h[:nbest]] for h in hypotheses]
    return GeneratedBatch(
        ids=sample["id"].tolist(),
        src_tokens=map_arrays(sample["net_input"].get("src_tokens"), torch.Tensor.cpu),
        target=map_arrays(sample["target"], torch.Tensor.cpu),
        hypotheses=map_arrays(kept, torch.Tensor.cpu),
    )


def _warn_about_bpe_bleu(cfg: DictConfig) -> None:
    if cfg.bpe and not cfg.generation.sacrebleu:
        if cfg.common_eval.post_process:
            logger.warning(
                "BLEU score is being computed by splitting detokenized string on spaces, this is probably "
                "not what you want. Use --sacrebleu for standard 13a BLEU tokenization"
            )
        else:
            logger.warning(
                "If you are using BPE on the target side, the BLEU score is computed on BPE tokens, not on "
                "proper words.  Use --sacrebleu for standard 13a BLEU tokenization"
            )
