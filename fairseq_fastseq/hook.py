"""The one place where fairseq_fastseq routes fairseq to its own generator.

Why a hook is needed: fairseq's generate and interactive loops hand only ``cfg.generation``
to ``task.build_generator``, and no fairseq registry lets a plugin swap the generator that
stock tasks build; flags that a plugin registry adds never reach ``cfg`` either. So, at
plugin import, we

1. wrap ``fairseq.dataclass.utils.override_module_args`` so that ``--fast-*`` flags become
   ``fastseq.*`` overrides of the Hydra config (``config.py`` adds those fields);
2. wrap ``build_generator`` of ``FairseqTask`` (inherited by translation, denoising,
   language_modeling, ...) and of ``TranslationFromPretrainedBARTTask`` (which overrides it
   without calling ``super()``): once the stock method has built its generator, if the run's
   config selects ``generator=fast``, ``generator.accelerate`` swaps in ours.

Both wrappers call the stock function first and change nothing unless the run selected
``fast``: with ``--generator stock``, or a config without the field, they are inert.
"""

import dataclasses
import functools
from argparse import Namespace
from typing import Any, Callable, Dict, List, Optional, Tuple

import fairseq.dataclass.utils as fairseq_dataclass_utils
from fairseq.tasks.fairseq_task import FairseqTask
from fairseq.tasks.translation_from_pretrained_bart import TranslationFromPretrainedBARTTask
from omegaconf import DictConfig, OmegaConf

from .config import FLAG_PREFIX, FastGeneratorConfig
from .generator import accelerate

_ROUTED_TASKS = (FairseqTask, TranslationFromPretrainedBARTTask)
_MARK = "_fairseq_fastseq_routed"


def knobs_from_namespace(args: Namespace) -> Dict[str, Any]:
    """The ``--fast-*`` values present on a parsed command line, keyed by knob name."""
    found = {}
    for knob in dataclasses.fields(FastGeneratorConfig):
        flag_dest = f"{FLAG_PREFIX}_{knob.name}"
        if hasattr(args, flag_dest):
            found[knob.name] = getattr(args, flag_dest)
    return found


def selection(gen_args: Any) -> Tuple[Optional[str], FastGeneratorConfig]:
    """The generator choice and knobs of the run that ``build_generator`` was called for.

    ``gen_args`` is ``cfg.generation``; as a DictConfig it still links to the whole ``cfg``
    (``_get_root``), which holds ``generator`` and ``fastseq``. Legacy callers pass a flat
    Namespace instead.
    """
    if isinstance(gen_args, DictConfig):
        root = gen_args._get_root()
        choice = OmegaConf.select(root, "generator", default=None)
        knobs = OmegaConf.select(root, "fastseq", default=None)
        knobs = OmegaConf.to_container(knobs, enum_to_str=True) if knobs is not None else {}
    else:
        choice = getattr(gen_args, "generator", None)
        knobs = knobs_from_namespace(gen_args)
    return choice, FastGeneratorConfig(**knobs)


def _route_build_generator(build_generator: Callable) -> Callable:
    @functools.wraps(build_generator)
    def routed(self, models, args, *more, **kwargs):
        generator = build_generator(self, models, args, *more, **kwargs)
        choice, knobs = selection(args)
        if choice != "fast":
            return generator
        return accelerate(generator, knobs)

    setattr(routed, _MARK, True)
    return routed


def _with_knob_overrides(override_module_args: Callable) -> Callable:
    @functools.wraps(override_module_args)
    def with_knobs(args: Namespace) -> Tuple[List[str], List[str]]:
        overrides, deletes = override_module_args(args)
        if args is not None:
            for name, value in knobs_from_namespace(args).items():
                overrides.append(f"fastseq.{name}={value}")
        return overrides, deletes

    setattr(with_knobs, _MARK, True)
    return with_knobs


def install() -> None:
    """Install the wrappers once (the plugin may be imported more than once)."""
    if not getattr(fairseq_dataclass_utils.override_module_args, _MARK, False):
        fairseq_dataclass_utils.override_module_args = _with_knob_overrides(
            fairseq_dataclass_utils.override_module_args
        )
    for task_cls in _ROUTED_TASKS:
        method = task_cls.__dict__["build_generator"]
        if not getattr(method, _MARK, False):
            task_cls.build_generator = _route_build_generator(method)
