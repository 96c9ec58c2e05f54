"""The package layout: imports flow one way between concerns, every program is a `moco-mm`
command, `tools/*.py` are thin wrappers of those commands."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from moco_mm.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "moco_mm"

BASE = {"config", "distributed", "metrics", "__init__"}
# What each concern may import (besides the standard library and third parties).
ALLOWED = {
    "base": {"base"},
    "model": {"base", "model"},
    "data": {"base", "data"},
    "train": {"base", "model", "data", "train"},
    "plan": {"base", "model", "plan"},
    "search": {"base", "model", "data", "train", "search"},
    "bench": {"base", "model", "data", "train", "plan", "bench"},
    "cli": {"base", "model", "data", "train", "plan", "search", "bench", "cli"},
    "embed": {"search"},  # entry shims, see SHIMS
    "serve": {"search"},
}
# Top-level entry shims, `python -m moco_mm.NAME` (what torchrun starts): a few lines that
# hand over to the program's main in its concern, like cli.py; nothing imports them.
SHIMS = {"embed": "search", "serve": "search"}


def concern(module: str) -> str:
    """'moco_mm.model.towers' -> 'model'; base modules -> 'base'."""
    parts = module.split(".")
    assert parts[0] == "moco_mm", module
    if len(parts) == 1:
        return "base"
    head = parts[1]
    return "base" if head in BASE else head


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts)


def imported_modules(path: Path) -> set[str]:
    """Every moco_mm module `path` imports, at any depth of the file (function bodies too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "moco_mm"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "moco_mm":
            if node.module == "moco_mm":  # `from moco_mm import distributed as D`: submodules
                out |= {f"moco_mm.{a.name}" for a in node.names}
            else:
                out.add(node.module)
    return out


SOURCES = sorted(PKG.rglob("*.py"))


def test_every_module_belongs_to_a_known_concern():
    for path in SOURCES:
        assert concern(module_name(path)) in ALLOWED, f"{path}: not in a concern of the layout"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path):
    me = concern(module_name(path))
    bad = sorted(m for m in imported_modules(path) if concern(m) not in ALLOWED[me])
    assert not bad, f"{path.relative_to(ROOT)} ({me}) imports {bad}; {me} may import only {sorted(ALLOWED[me])}"


def test_nothing_imports_the_cli():
    for path in SOURCES:
        if path.name != "cli.py" or path.parent != PKG:
            assert "moco_mm.cli" not in imported_modules(path), path


def test_entry_shims_are_thin_and_unimported():
    for name, owner in SHIMS.items():
        path = PKG / f"{name}.py"
        body = [n for n in ast.parse(path.read_text()).body
                if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]  # docstring
        assert len(body) <= 3, f"{path.name} is not a thin entry shim (import sys, import main, call it)"
        assert {concern(m) for m in imported_modules(path)} == {owner}, path
        for other in SOURCES:
            assert f"moco_mm.{name}" not in imported_modules(other), f"{other} imports the shim moco_mm.{name}"


def test_the_layout_check_would_catch_a_backward_import(tmp_path):
    """The checker itself: an import from a later concern into an earlier one is seen."""
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from moco_mm.train.checkpoint import MARKER_FILE\n")
    assert "moco_mm.train.checkpoint" in imported_modules(fake)
    assert concern("moco_mm.train.checkpoint") not in ALLOWED["base"]


def test_every_command_resolves_to_a_main():
    import importlib

    for name, (target, _) in COMMANDS.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


def test_console_script_lists_commands_and_names_the_closest():
    """The installed `moco-mm` (pip's console script)."""
    exe = Path(sys.executable).parent / "moco-mm"
    assert exe.exists(), "moco-mm is not installed: pip install -e ."
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and all(name in out.stdout for name in COMMANDS)
    bad = subprocess.run([str(exe), "trian"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "did you mean train" in bad.stderr


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help(name, capsys):
    from moco_mm.cli import main

    with pytest.raises(SystemExit) as stop:
        main([name, "--help"])
    assert stop.value.code == 0
    assert f"usage: moco-mm {name}" in capsys.readouterr().out


def test_tools_are_thin_wrappers_of_commands():
    for path in sorted((ROOT / "tools").glob("*.py")):
        text = path.read_text()
        code = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("#", '"""'))]
        assert len(code) <= 5 and "from moco_mm.cli import main" in text, f"{path.name} is not a thin wrapper"
        name = text.split('main(["', 1)[1].split('"', 1)[0]
        assert name in COMMANDS, path.name
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "plan_memory.py"), "--help"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0 and "usage: moco-mm plan-memory" in res.stdout
