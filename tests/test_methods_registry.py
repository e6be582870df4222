"""The method registry: names are unique, and the engine reaches methods only through it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from llava.drop.methods import METHODS, DropMethod, register
from llava.drop.methods.registry import discover_methods

DROP_DIR = Path(__file__).resolve().parent.parent / "llava" / "drop"
ENGINE_MODULES = sorted(path.name for path in DROP_DIR.glob("*.py"))  # everything in llava/drop but the methods package


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return names | {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}


def test_register_refuses_a_taken_name():
    discover_methods()
    taken = METHODS["fastv"]

    class Impostor(DropMethod):
        name = "fastv"

    with pytest.raises(ValueError, match="'fastv' is already registered by llava.drop.methods.fastv.FastV"):
        register(Impostor)
    assert METHODS["fastv"] is taken


def test_register_refuses_an_unknown_family():
    class Stranger(DropMethod):
        name = "stranger"
        family = "decoder"

    with pytest.raises(ValueError, match="'stranger' has family 'decoder'; choose one of encoder, prefill, "
                                         "multi-stage, baseline"):
        register(Stranger)
    assert "stranger" not in METHODS


def test_engine_imports_no_concrete_method():
    """The engine sees only the interface (llava/drop/method.py), never the methods package."""
    assert {"generate.py", "prefill.py", "decode.py", "method.py"} <= set(ENGINE_MODULES)
    for module in ENGINE_MODULES:
        methods = {name for name in imported_modules(DROP_DIR / module) if name.startswith("llava.drop.methods")}
        assert not methods, (module, methods)


def test_drop_never_imports_eval():
    for path in DROP_DIR.rglob("*.py"):
        assert not any(name.startswith("llava.eval") for name in imported_modules(path)), path
