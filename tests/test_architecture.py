"""The package's parts stand in layers: each imports only itself and the parts below it."""

import ast
import shutil
from pathlib import Path

from helpers import PROJECT

PACKAGE = PROJECT / "src" / "brainmri"
# From the bottom up; the command line stands on everything.
LAYERS = ("core", "data", "model", "explain", "serve", "cli")


def part_of(module: str) -> str | None:
    """'brainmri.model.training' -> 'model'; 'brainmri.cli' -> 'cli'; the package itself -> None."""
    names = module.split(".")
    return names[1] if len(names) > 1 and names[0] == "brainmri" else None


def imported_modules(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            found.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.ImportFrom) and node.module == "brainmri":
            found += [f"brainmri.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return [name for name in found if name.startswith((".", "brainmri"))]


def layering_faults(package: Path) -> list[str]:
    """Every import of a part above the importing module's own part, every relative import and every
    module outside the parts, as 'file: reason'."""
    faults = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        if relative.as_posix() == "__init__.py":
            continue
        own = relative.parts[0].removesuffix(".py")
        if own not in LAYERS:
            faults.append(f"{relative}: not in any part {LAYERS}")
            continue
        for module in imported_modules(ast.parse(path.read_text())):
            target = part_of(module)
            if module.startswith("."):
                faults.append(f"{relative}: relative import {module}")
            elif target is not None and target in LAYERS and LAYERS.index(target) > LAYERS.index(own):
                faults.append(f"{relative}: {own} imports {module}, a part above it")
    return faults


def test_each_part_imports_only_itself_and_the_parts_below_it():
    assert layering_faults(PACKAGE) == []


def test_a_planted_upward_import_is_caught(tmp_path):
    copy = tmp_path / "brainmri"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    planted = copy / "core" / "paths.py"
    planted.write_text(planted.read_text() + "\n\ndef page():\n    from brainmri.serve import webapp\n")
    (copy / "loose.py").write_text("")

    assert layering_faults(copy) == [
        "core/paths.py: core imports brainmri.serve, a part above it",
        f"loose.py: not in any part {LAYERS}",
    ]
