"""What the installed package holds: the plugin, not the tests' fixtures."""

import ast
import pkgutil

from .conftest import PLUGIN_DIR


def test_runtime_package_holds_no_test_fixtures():
    modules = {module.name for module in pkgutil.iter_modules([str(PLUGIN_DIR)])}
    assert "toy" not in modules and "demo" in modules
    for path in PLUGIN_DIR.glob("*.py"):
        imported = {
            (node.module or "").split(".")[0] if isinstance(node, ast.ImportFrom) else alias.name.split(".")[0]
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
        }
        assert not imported & {"testsupport", "user_dir_tests"}, f"{path.name} imports test support"

