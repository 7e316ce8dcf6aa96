"""The ``--generator {stock,fast}`` choice, as a fairseq registry.

``setup_registry`` makes fairseq add ``--generator`` to every fairseq CLI and turn the
choice into the Hydra override ``generator=<name>``. The classes carry no dataclass on
purpose: a registry dataclass would make Hydra treat ``generator`` as a config group that
fairseq's defaults list lacks ("Could not override 'generator'"). Their knobs live in
``config.FastGeneratorConfig`` instead.
"""

from argparse import ArgumentParser
from typing import Optional

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.registry import setup_registry

from .config import FLAG_PREFIX, FastGeneratorConfig

_, register_generator, GENERATOR_REGISTRY, _ = setup_registry("--generator", default="stock")


@register_generator("stock")
class StockGeneratorChoice:
    """fairseq's own SequenceGenerator; the plugin changes nothing."""

    @staticmethod
    def add_args(parser: ArgumentParser) -> None:
        pass


@register_generator("fast")
class FastGeneratorChoice:
    """fairseq_fastseq's generator: the stock generator's output, faster."""

    @staticmethod
    def add_args(parser: ArgumentParser) -> None:
        group = parser.add_argument_group("fast generator (--generator fast)")
        gen_parser_from_dataclass(group, FastGeneratorConfig(), with_prefix="--" + FLAG_PREFIX)


def checked_choice(choice: Optional[str]) -> Optional[str]:
    """``choice`` if it names a generator (or is None: no choice made).

    argparse and Hydra check ``--generator``/``generator=`` themselves; the hub interface
    (``hub.translate(..., generator="fastt")``) passes any keyword through, and a misspelt
    value would otherwise run the stock generator without a word.
    """
    if choice is not None and choice not in GENERATOR_REGISTRY:
        choices = ", ".join(repr(name) for name in GENERATOR_REGISTRY)
        raise ValueError(f"unknown generator {choice!r}: the choices are {choices}")
    return choice
