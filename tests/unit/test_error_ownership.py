"""Each package raises its own errors; only a command's ``run()`` turns them into a CommandError
(an exit status and one line), and nothing reaches CommandError through the dispatcher."""

from __future__ import annotations

import ast

from support.cli import REPO

PACKAGES = ("flowcloud", "edge", "services", "training", "bench")


def _modules() -> dict[str, ast.Module]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name] = ast.parse(path.read_text(), str(path))
    return found


def _command_modules() -> set[str]:
    from flowcloud.cli.main import COMMANDS

    return {module for module, _ in COMMANDS.values()}


def test_nothing_imports_command_error_through_the_dispatcher() -> None:
    offenders = [
        name
        for name, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and node.module == "flowcloud.cli.main"
        and any(alias.name == "CommandError" for alias in node.names)
    ]
    assert offenders == []


def test_only_command_modules_know_command_error() -> None:
    commands = _command_modules()
    offenders = [
        name
        for name, tree in _modules().items()
        if name not in commands and not name.startswith("flowcloud.cli.")
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and node.id == "CommandError"
    ]
    assert offenders == []


def test_training_raises_command_error_only_in_run() -> None:
    """Training's modules are libraries too (tests and notebooks call train(), write_dataset(), ...)."""
    offenders = []
    for name, tree in _modules().items():
        if not name.startswith("training."):
            continue
        for function in tree.body:
            if not isinstance(function, ast.FunctionDef) or function.name == "run":
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Raise) and "CommandError" in ast.unparse(node):
                    offenders.append(f"{name}.{function.name}")
    assert offenders == []
