"""The docs say what the code does: the README's table of the places where the plugin
changes fairseq is hook.py's own, its wrapped functions are the ones install() wraps, and
docstrings name functions that exist."""

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import fairseq.dataclass.utils
import fairseq.options
import fairseq_cli.generate
import fairseq_cli.interactive
from fairseq.tasks.fairseq_task import FairseqTask
from fairseq.tasks.translation_from_pretrained_bart import TranslationFromPretrainedBARTTask

import fairseq_fastseq
from fairseq_fastseq import hook

from .conftest import REPO


def _table(text: str):
    return [line.replace("``", "`") for line in text.splitlines() if line.startswith("| ")]


def test_readme_has_hooks_table_of_hook_py():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Where the plugin changes fairseq") :]
    section = section[: section.index("\n## ")]
    assert _table(section) and _table(section) == _table(hook.__doc__)


def test_the_wrapped_functions_are_those_of_the_table():
    wrapped = [
        fairseq.options.parse_args_and_arch,
        fairseq.dataclass.utils.override_module_args,
        FairseqTask.build_generator,
        TranslationFromPretrainedBARTTask.build_generator,
        fairseq_cli.generate.main,
        fairseq_cli.interactive.main,
    ]
    assert all(getattr(function, hook._MARK, False) for function in wrapped)
    rows = _table(hook.__doc__)[1:6]
    names = [
        "parse_args_and_arch", "override_module_args", "build_generator",
        "fairseq_cli.generate.main", "fairseq_cli.interactive.main",
    ]  # fmt: skip
    assert all(f"`{name}" in row or name in row for name, row in zip(names, rows))


def _docstrings(module):
    tree = ast.parse(Path(module.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
            yield ast.get_docstring(node)


def test_docstrings_name_functions_that_exist():
    """A ``module.name`` of this package in a docstring names something that module has."""
    package = Path(fairseq_fastseq.__file__).parent
    modules = {info.name: importlib.import_module(f"fairseq_fastseq.{info.name}") for info in pkgutil.iter_modules([str(package)])}
    stale = [
        f"{name}: ``{found[1]}.{found[2]}``"
        for name, module in modules.items()
        for docstring in _docstrings(module)
        for found in re.finditer(r"``(\w+)\.(\w+)", docstring)
        if found[1] in modules and found[2] != "py" and not hasattr(modules[found[1]], found[2])
    ]
    assert not stale
