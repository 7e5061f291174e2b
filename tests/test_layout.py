"""The house rules that no ready-made checker covers.

ruff's PLC2701 flags a private name imported from another top-level package, but not
one imported between modules of the same package; import-linter checks arrows, not
names. This walks every module of ours and fails on ``from x import _name`` where x
is another module (a package's own ``__init__`` re-exporting is not a case we have).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("meshserve", "meshserve_bench", "gateway", "router", "model_workers", "tests")


def private_imports(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line name from module`` for each private name ``path`` imports from elsewhere."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith("protos"):
            found += [
                f"{path.relative_to(root)}:{node.lineno} {alias.name} from {node.module}"
                for alias in node.names
                if alias.name.startswith("_") and not alias.name.startswith("__")
            ]
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_imports_another_modules_private_names(package: str) -> None:
    found = [hit for path in sorted((ROOT / package).rglob("*.py")) for hit in private_imports(path)]
    assert found == []


def test_the_check_sees_a_private_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from meshserve.queue.protocol import _secret\nfrom os import path\nfrom x import __version__\n")
    assert private_imports(module, tmp_path) == ["m.py:1 _secret from meshserve.queue.protocol"]


def servers_without_the_suite_binary(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line`` of each ``RedisServer(...)`` call in ``path`` that names no binary:
    such a server is the bundled one even in CI's pass against stock Redis."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "RedisServer"):
            continue
        if not node.args and not any(keyword.arg == "binary" for keyword in node.keywords):
            found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_every_redis_a_test_starts_honours_the_suite_binary() -> None:
    found = [hit for path in sorted((ROOT / "tests").rglob("*.py")) for hit in servers_without_the_suite_binary(path)]
    assert found == []


def test_the_check_sees_a_server_without_a_binary(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "RedisServer()\nRedisServer(port=1)\nRedisServer(suite_binary_from_env())\nRedisServer(binary=b)\n"
    )
    assert servers_without_the_suite_binary(module, tmp_path) == ["m.py:1", "m.py:2"]
