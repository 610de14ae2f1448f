"""The package layers: the core imports nothing above it, samplers and rewards import only the core, and no
module below the trainers imports a trainer. Every import statement counts, including ones inside functions
and ``TYPE_CHECKING`` blocks (a cycle in type hints is still a cycle a reader has to untangle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = ("gen_rl.trainer", "gen_rl.vlm.trainer", "gen_rl.train")
# entry points and tools above the trainers: they may call them
ABOVE_TRAINERS = ("gen_rl.cli", "gen_rl.reference", "gen_rl.league")


def imported_modules(path: Path) -> set[str]:
    """Every module named by an import statement in ``path`` (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def files_under(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def ours(name: str) -> bool:
    return name.split(".")[0] in ("gen_rl", "pipelines", "rewards")


def allowed_for_core_users(name: str) -> bool:
    return name == "gen_rl" or name.startswith("gen_rl.core")


@pytest.mark.parametrize("path", files_under("gen_rl/core"), ids=lambda p: p.name)
def test_the_core_imports_only_itself(path):
    bad = sorted(n for n in imported_modules(path) if ours(n) and not allowed_for_core_users(n))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; the core must not import a layer above it"


@pytest.mark.parametrize(
    "path", files_under("pipelines") + files_under("rewards"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_samplers_and_rewards_import_only_the_core(path):
    bad = sorted(
        n for n in imported_modules(path) if n.startswith("gen_rl") and not allowed_for_core_users(n)
    )
    assert not bad, (
        f"{path.relative_to(ROOT)} imports {bad}; pipelines/ and rewards/ may use gen_rl.core only"
    )


@pytest.mark.parametrize("path", files_under("gen_rl"), ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_below_the_trainers_imports_a_trainer(path):
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if module in TRAINERS or module in ABOVE_TRAINERS:
        return
    bad = sorted(n for n in imported_modules(path) if n in TRAINERS)
    assert not bad, f"{module} imports the trainer module(s) {bad}; pass what it needs instead"


def test_the_scan_sees_imports_inside_functions_and_type_checking(tmp_path):
    """The checker itself: a nested and a TYPE_CHECKING import are both found."""
    probe = ROOT / "gen_rl" / "core" / "_layer_probe_tmp.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gen_rl.trainer import X\n"
        "def f():\n    from rewards import build_reward\n"
    )
    try:
        assert {"gen_rl.trainer", "rewards"} <= imported_modules(probe)
    finally:
        probe.unlink()
