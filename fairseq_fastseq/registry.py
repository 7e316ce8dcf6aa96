"""The ``--generator {stock,fast}`` choice, as a fairseq registry, and its command-line flags.

``setup_registry`` makes fairseq add ``--generator`` to every fairseq CLI and turn the
choice into the Hydra override ``generator=<name>``. The classes carry no dataclass on
purpose: a registry dataclass would make Hydra treat ``generator`` as a config group that
fairseq's defaults list lacks ("Could not override 'generator'"). Their knobs live in
``config.FastGeneratorConfig`` instead.

fairseq prints ``--help`` before it adds the arguments of a registry choice, and adds them
only for the choice made, so ``hook.py`` calls ``add_generator_arguments`` on every parser
before fairseq parses it: ``--help`` lists each ``--fast-*`` knob, and a knob given without
``--generator fast`` gets an error that says so (``check_knobs_need_fast``) rather than
argparse's "unrecognized arguments".
"""

from argparse import ArgumentParser, Namespace
from typing import Any, Dict, Optional

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.registry import setup_registry

from .config import FLAG_PREFIX, FastGeneratorConfig, knob_names

_, register_generator, GENERATOR_REGISTRY, _ = setup_registry("--generator", default="stock")

GENERATOR_HELP = (
    "sequence generator: 'stock' is fairseq's SequenceGenerator, unchanged; 'fast' is "
    "fairseq_fastseq's, with the same output, faster (its knobs are the --fast-* flags)"
)


def knob_flag(name: str) -> str:
    """The command-line flag of a ``FastGeneratorConfig`` field: ``--fast-on-unsupported``."""
    return f"--{FLAG_PREFIX}-{name.replace('_', '-')}"


def add_generator_arguments(parser: ArgumentParser) -> None:
    """Describe ``--generator`` and add every knob of ``FastGeneratorConfig`` as a flag, once.

    The flags default to None, meaning "not given" (the knob's own default applies; the
    help says which), so that a knob given without ``--generator fast`` can be told apart.
    """
    flags = parser._option_string_actions  # argparse's own index of the flags it knows
    if "--generator" in flags:
        flags["--generator"].help = GENERATOR_HELP
    if knob_flag(knob_names()[0]) in flags:
        return
    group = parser.add_argument_group("fast generator (these flags need --generator fast)")
    gen_parser_from_dataclass(group, FastGeneratorConfig(), with_prefix="--" + FLAG_PREFIX)
    for action in group._group_actions:
        action.help = f"{action.help.removeprefix(FLAG_PREFIX + ': ')} (default: {action.default})"
        action.default = None


def knobs_from_namespace(args: Namespace) -> Dict[str, Any]:
    """The ``--fast-*`` values given on a parsed command line, keyed by knob name."""
    given = {name: getattr(args, f"{FLAG_PREFIX}_{name}", None) for name in knob_names()}
    return {name: value for name, value in given.items() if value is not None}


def check_knobs_need_fast(parser: ArgumentParser, args: Namespace) -> None:
    """Stop (argparse's exit 2) when a knob is given but the generator is not ``fast``."""
    knobs = [knob_flag(name) for name in knobs_from_namespace(args)]
    if knobs and getattr(args, "generator", None) != "fast":
        parser.error(
            f"{', '.join(knobs)}: the fast generator's knobs need --generator fast "
            f"(this run has --generator {getattr(args, 'generator', None)})"
        )


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
        add_generator_arguments(parser)  # already there when hook.py saw the parser first
