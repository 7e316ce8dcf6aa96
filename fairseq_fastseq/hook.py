"""The one place where fairseq_fastseq wraps fairseq's functions, and the list of every
place where the plugin changes fairseq's behaviour.

Why a hook is needed: fairseq's generate and interactive loops hand only ``cfg.generation``
to ``task.build_generator``, no fairseq registry lets a plugin swap the generator that
stock tasks build, and flags that a plugin registry adds never reach ``cfg``. So
``install()``, run at plugin import, wraps five fairseq functions (rows 1-5). The other
rows are the changes made elsewhere, listed here so that there is one list (the README
has the same table):

| # | where | what changes | when |
|---|---|---|---|
| 1 | ``fairseq.options.parse_args_and_arch`` (``hook.py``) | ``--generator`` gets its help and every parser the ``--fast-*`` knobs (``registry.add_generator_arguments``); a knob without ``--generator fast`` is argparse's error naming it | every fairseq command line |
| 2 | ``fairseq.dataclass.utils.override_module_args`` (``hook.py``) | ``--fast-*`` values become ``fastseq.*`` overrides; a tokenizer's ``source_lang``/``target_lang=null``, which omegaconf refuses, gets the data-bin's languages (``languages.py``) | every command line turned into a config |
| 3 | ``build_generator`` of ``FairseqTask`` and ``TranslationFromPretrainedBARTTask`` (``hook.py``; the latter overrides it without ``super()``) | after the stock method built its generator: an unknown ``generator=`` is an error; ``generator=fast`` swaps in ours (``choice.accelerate``) and sets the intra-op threads (``threads.py``) | each generator built |
| 4 | ``fairseq_cli.generate.main``, also as ``__main__`` of ``python -m fairseq_cli.generate`` (``hook.py``) | ``--task translation_fast`` runs ``pipeline.main``; with ``--generator fast``, a torchrun job of a task that does not shard stops (``distributed.py``), and load errors name their cause (``errors.py``); both run under ``choice.attention_unread`` (the output prints no attention, so the search keeps none) | each fairseq-generate run |
| 5 | ``fairseq_cli.interactive.main``, also as ``__main__`` (``hook.py``) | with ``--generator fast``, runs under ``choice.attention_unread`` | each fairseq-interactive run |
| 6 | Hydra schema node ``config`` (``config.extend_hydra_schema``) | re-stored as fairseq's ``FairseqConfig`` plus ``generator`` and ``fastseq`` | at import (fields with defaults: inert) |
| 7 | torch's safe unpickler (``safe_load.py``) | allow-lists the plain-data classes of fairseq checkpoints | at import, every ``torch.load`` |
| 8 | ``batch_by_size`` of the dataset object (``tasks.py``) | set on that object for one ``get_batch_iterator`` call: the sentences fairseq's batching drops get one more batch | ``--task translation_fast`` |
| 9 | ``__class__`` of ``MultiheadAttention`` modules (``attention_plan.fast_attention``) and of a model (``models.as_fast_variant``) | the fast attention paths; for a search, restored afterwards | during a fast ``generate()``; ``as_fast_variant`` when called |
| 10 | registries | adds ``--generator {stock,fast}``, ``--task translation_fast``, ``--arch *_fast`` | choices only |

Rows 1 and 2 act on every run because they cannot know the choice earlier: row 1 adds
help text and an error for flags that would fail anyway; row 2 adds nothing without
``--fast-*`` flags and changes only overrides that would fail to compose. Rows 3 and 4
call the stock function as is unless the run selected ``fast`` or ``translation_fast``;
row 5, unless it selected ``fast``.
"""

import functools
import sys
from argparse import ArgumentParser, Namespace
from typing import Any, Callable, List, Optional, Tuple

import fairseq.dataclass.utils as fairseq_dataclass_utils
import fairseq.options
import fairseq_cli.generate
import fairseq_cli.interactive
from fairseq.tasks.fairseq_task import FairseqTask
from fairseq.tasks.translation_from_pretrained_bart import TranslationFromPretrainedBARTTask
from omegaconf import DictConfig, OmegaConf

from . import pipeline
from .config import FastGeneratorConfig
from .distributed import refuse_unsharded_run
from .errors import clear_load_errors
from .choice import accelerate, attention_unread
from .generator import FastSequenceGenerator
from .languages import with_inferred_languages
from .registry import add_generator_arguments, check_knobs_need_fast, checked_choice, knobs_from_namespace
from .tasks import PIPELINED_TASKS
from .threads import apply_threads

_ROUTED_TASKS = (FairseqTask, TranslationFromPretrainedBARTTask)
_MARK = "_fairseq_fastseq_routed"


def selection(gen_args: Any) -> Tuple[Optional[str], FastGeneratorConfig]:
    """The generator choice and knobs of the run that ``build_generator`` was called for.

    ``gen_args`` is ``cfg.generation``; as a DictConfig it still links to the whole ``cfg``
    (``_get_root``), which holds ``generator`` and ``fastseq``. fairseq's hub interface
    (``hub.translate(..., generator="fast")``) sets its keyword arguments on a copy of
    ``cfg.generation`` itself, so a ``generator`` there wins. Legacy callers pass a flat
    Namespace instead.
    """
    if isinstance(gen_args, DictConfig):
        root = gen_args._get_root()
        choice = gen_args.generator if "generator" in gen_args else OmegaConf.select(root, "generator", default=None)
        knobs = OmegaConf.select(root, "fastseq", default=None)
        knobs = OmegaConf.to_container(knobs, enum_to_str=True) if knobs is not None else {}
    else:
        choice = getattr(gen_args, "generator", None)
        knobs = knobs_from_namespace(gen_args)
    return checked_choice(choice), FastGeneratorConfig(**knobs)


def _route_build_generator(build_generator: Callable) -> Callable:
    @functools.wraps(build_generator)
    def routed(self, models, args, *more, **kwargs):
        choice, knobs = selection(args)
        try:
            generator = build_generator(self, models, args, *more, **kwargs)
        except ValueError as error:
            if choice == "fast" and "mutually exclusive" in str(error):
                raise ValueError(f"{error} {_exclusive_search_options(args)}") from error
            raise
        if choice != "fast":
            return generator
        accelerated = accelerate(generator, knobs)
        if isinstance(accelerated, FastSequenceGenerator):
            apply_threads(knobs.threads)
        return accelerated

    setattr(routed, _MARK, True)
    return routed


def _exclusive_search_options(args: Any) -> str:
    """Which of fairseq's mutually exclusive search strategies the run asked for."""
    strategies = {
        "--sampling": getattr(args, "sampling", False),
        "--diverse-beam-groups": (getattr(args, "diverse_beam_groups", -1) or -1) > 0,
        "--match-source-len": getattr(args, "match_source_len", False),
        "--diversity-rate": (getattr(args, "diversity_rate", -1) or -1) > 0,
    }
    chosen = ", ".join(flag for flag, on in strategies.items() if on)
    return f"This run sets {chosen}; keep one of them (they are different search strategies)."


def _with_knob_overrides(override_module_args: Callable) -> Callable:
    @functools.wraps(override_module_args)
    def with_knobs(args: Namespace) -> Tuple[List[str], List[str]]:
        overrides, deletes = override_module_args(args)
        if args is not None:
            overrides = with_inferred_languages(overrides, args)
            for name, value in knobs_from_namespace(args).items():
                overrides.append(f"fastseq.{name}={value}")
        return overrides, deletes

    setattr(with_knobs, _MARK, True)
    return with_knobs


def _with_generator_arguments(parse_args_and_arch: Callable) -> Callable:
    @functools.wraps(parse_args_and_arch)
    def with_arguments(
        parser: ArgumentParser, input_args: Optional[List[str]] = None, parse_known: bool = False, *more, **kwargs
    ) -> Any:
        add_generator_arguments(parser)
        parsed = parse_args_and_arch(parser, input_args, parse_known, *more, **kwargs)
        check_knobs_need_fast(parser, parsed[0] if parse_known else parsed)
        return parsed

    setattr(with_arguments, _MARK, True)
    return with_arguments


def _route_generate_main(generate_main: Callable) -> Callable:
    @functools.wraps(generate_main)
    def routed(cfg: Any) -> Any:
        task, choice, path, data = _run_settings(cfg)
        if task in PIPELINED_TASKS:
            with attention_unread():  # its output holds no attention (--print-alignment: alignments)
                return pipeline.main(cfg)
        if choice == "fast":
            refuse_unsharded_run(task, PIPELINED_TASKS)
            with clear_load_errors(path, data), attention_unread():
                return generate_main(cfg)
        return generate_main(cfg)

    setattr(routed, _MARK, True)
    return routed


def _route_interactive_main(interactive_main: Callable) -> Callable:
    @functools.wraps(interactive_main)
    def routed(cfg: Any) -> Any:
        if _run_settings(cfg)[1] == "fast":
            with attention_unread():  # its output holds no attention (--print-alignment: alignments)
                return interactive_main(cfg)
        return interactive_main(cfg)

    setattr(routed, _MARK, True)
    return routed


def _run_settings(cfg: Any) -> Tuple[Optional[str], Optional[str], Optional[str], Optional[str]]:
    """(task, generator, --path, data-bin) of a generate run, from its parsed command line
    (a flat Namespace) or its Hydra config."""
    if isinstance(cfg, Namespace):
        return tuple(getattr(cfg, name, None) for name in ("task", "generator", "path", "data"))
    keys = ("task._name", "generator", "common_eval.path", "task.data")
    return tuple(OmegaConf.select(cfg, key, default=None) for key in keys)


def _cli_modules(module: Any) -> List[Any]:
    """A fairseq CLI ``module``, and ``__main__`` when that is the same script run with ``-m``."""
    modules = [module]
    main_module = sys.modules.get("__main__")
    if getattr(getattr(main_module, "__spec__", None), "name", None) == module.__name__:
        modules.append(main_module)
    return modules


def install() -> None:
    """Install the wrappers once (the plugin may be imported more than once)."""
    if not getattr(fairseq_dataclass_utils.override_module_args, _MARK, False):
        fairseq_dataclass_utils.override_module_args = _with_knob_overrides(
            fairseq_dataclass_utils.override_module_args
        )
    if not getattr(fairseq.options.parse_args_and_arch, _MARK, False):
        fairseq.options.parse_args_and_arch = _with_generator_arguments(fairseq.options.parse_args_and_arch)
    for task_cls in _ROUTED_TASKS:
        method = task_cls.__dict__["build_generator"]
        if not getattr(method, _MARK, False):
            task_cls.build_generator = _route_build_generator(method)
    for cli, route in ((fairseq_cli.generate, _route_generate_main), (fairseq_cli.interactive, _route_interactive_main)):
        for module in _cli_modules(cli):
            if not getattr(module.main, _MARK, False):
                module.main = route(module.main)
