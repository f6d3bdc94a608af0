"""dvc.yaml cannot drift from the code: every module a stage's command runs is one of that stage's `deps`.

A stage's modules are the import closure of its stage module (stages/<command>.py), read from the source with
`ast` (imports inside functions included, since they run too), within this repository's `pipeline` and `stages`
packages. A dep covers a module when it is that file or a folder above it. Without this, a code change that changes
a result would not rerun the stage that produced it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPOSITORY

PACKAGES = ("pipeline", "stages")


def module_file(name: str) -> Path | None:
    """The source file of a dotted module name of this repository, or None (a name inside a module, or third-party)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPOSITORY.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, and the parent packages that importing it runs."""
    names: set[str] = set()
    package = ".".join(path.relative_to(REPOSITORY).with_suffix("").parts)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: -node.level] if path.name != "__init__.py" else package.split(".")
                base = ".".join([*anchor, *filter(None, [base])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    with_parents = set()
    for name in names:
        parts = name.split(".")
        with_parents.update(".".join(parts[:end]) for end in range(1, len(parts) + 1))
    return with_parents


def closure(start: Path) -> set[Path]:
    """`start`, the packages above it, and every repository module it imports, transitively."""
    seen, pending = set(), [start, *(parent / "__init__.py" for parent in start.parents if REPOSITORY in parent.parents)]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        pending.extend(found for found in map(module_file, imported_modules(path)) if found is not None)
    return seen


def stage_commands() -> dict[str, tuple[str, list[str]]]:
    """dvc.yaml stage name → (the primaps-pipeline command it runs, its deps)."""
    stages = yaml.safe_load((REPOSITORY / "dvc.yaml").read_text())["stages"]
    commands = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        words = " ".join(body["cmd"].split()).split()
        commands[name] = (words[words.index("primaps-pipeline") + 1], body.get("deps", []))
    return commands


def covered(module: Path, deps: list[str]) -> bool:
    relative = module.relative_to(REPOSITORY)
    return any(relative == Path(dep) or Path(dep) in relative.parents for dep in deps)


@pytest.mark.parametrize("stage", sorted(stage_commands()))
def test_every_module_a_stage_runs_is_one_of_its_deps(stage):
    command, deps = stage_commands()[stage]
    modules = closure(REPOSITORY / "stages" / f"{command}.py")
    missing = sorted(str(module.relative_to(REPOSITORY)) for module in modules if not covered(module, deps))
    assert not missing, f"dvc.yaml stage {stage} ({command}) runs modules missing from its deps: {missing}"


def test_the_closure_follows_imports_inside_functions_and_through_packages():
    modules = {str(path.relative_to(REPOSITORY)) for path in closure(REPOSITORY / "stages" / "fit.py")}
    assert {"stages/fit.py", "pipeline/em/model.py", "pipeline/em/vote.py", "pipeline/store/features.py",
            "pipeline/__init__.py"} <= modules
    assert "stages/extract.py" not in modules and "pipeline/cli.py" not in modules
    # A stage that lost a dep is caught: fit without its EM package.
    assert not covered(REPOSITORY / "pipeline" / "em" / "vote.py", ["stages/fit.py", "pipeline/store"])
