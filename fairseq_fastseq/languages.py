"""``-s``/``-t`` for the configs that need them, read from the data-bin as the task reads them.

fairseq's translation task leaves ``--source-lang``/``--target-lang`` unset when the data-bin's
file names give them (``test.es-en.es.idx``): it infers them in ``setup_task``. But a
tokenizer whose config has the same fields (``--tokenizer moses``: ``source_lang: str``)
receives the unset value first, as the Hydra override ``tokenizer.source_lang=null``, which
omegaconf 2.3 refuses for a ``str`` field (``ConfigCompositionException: Error merging
override tokenizer.source_lang=null``), stock and fast alike. So before fairseq composes the
config, such an override gets the languages the task would infer, which is what ``-s SRC -t
TGT`` would have given.
"""

import typing
from argparse import Namespace
from typing import List, Optional, Tuple

from fairseq import utils
from fairseq.data import data_utils
from fairseq.registry import REGISTRIES

LANGUAGE_FIELDS = ("source_lang", "target_lang")


class LanguagesNotFoundError(ValueError):
    """A config needs the languages and neither the command line nor the data-bin gives them."""


def with_inferred_languages(overrides: List[str], args: Namespace) -> List[str]:
    """``overrides`` with each ``<registry>.source_lang=null``/``target_lang=null`` that its
    config cannot take replaced by the data-bin's language."""
    refused = [index for index, override in enumerate(overrides) if _refuses_null(override, args)]
    if not refused:
        return overrides
    languages = dict(zip(LANGUAGE_FIELDS, _data_bin_languages(args, overrides[refused[0]])))
    inferred = list(overrides)
    for index in refused:
        node_and_field = overrides[index].removesuffix("=null")
        inferred[index] = f"{node_and_field}='{languages[node_and_field.split('.')[1]]}'"
    return inferred


def _refuses_null(override: str, args: Namespace) -> bool:
    """Whether ``override`` sets a language field of a chosen registry config (not the
    task's, whose fields are optional) to null, and the field's type does not allow it."""
    node_and_field, _, value = override.partition("=")
    node, _, field = node_and_field.partition(".")
    if value != "null" or field not in LANGUAGE_FIELDS or node == "task" or node not in REGISTRIES:
        return False
    config = REGISTRIES[node]["dataclass_registry"].get(getattr(args, node, None))
    declared = getattr(config, "__dataclass_fields__", {}).get(field)
    return declared is not None and type(None) not in typing.get_args(declared.type)


def _data_bin_languages(args: Namespace, override: str) -> Tuple[str, str]:
    data: Optional[str] = getattr(args, "data", None)
    pair = data_utils.infer_language_pair(utils.split_paths(data)[0]) if data else (None, None)
    if None in pair:
        raise LanguagesNotFoundError(
            f"{override.split('=')[0]} needs a language, and data-bin {data} has none in its file "
            "names (<split>.<src>-<tgt>.<lang>.idx): pass --source-lang SRC --target-lang TGT (-s, -t)"
        )
    return pair[0], pair[1]
