"""The house rules of the package layout (docs/ARCHITECTURE.md), checked on the source.

- imports go one way, data -> models -> dissection -> interventions -> viz -> reports: no room
  imports a later one; models/ imports no stage; reports/ imports only the table schemas, the errors, the file
  helper and its own modules; config.py imports neither torch nor a stage;
- no dissection module passes 400 lines;
- CLI registration (`def register`) lives in commands.py modules only;
- `import cnnvis_pipeline.config` (what `snakemake -n` loads) does not load torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cnnvis_pipeline"
MODULES = sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)
STAGES = ["data", "models", "dissection", "interventions", "viz", "reports"]
SHARED = {"errors", "fileio", "tables", "config", "progress", "__init__"}  # top-level modules


def room(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_rooms(path: Path) -> set[str]:
    """Rooms (first dotted part under cnnvis_pipeline) of every import, at any depth."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "cnnvis_pipeline":  # `__version__` and the like: the package itself
                out.add(parts[1] if len(parts) > 1 and not parts[1].startswith("__")
                        else "__init__")
    return out


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_go_one_way(path):
    here = room(path)
    rooms = imported_rooms(path) - {here}
    if here in STAGES:
        later = set(STAGES[STAGES.index(here) + 1 :]) | {"bench", "cli"}
        assert not rooms & later, f"{here} imports a later room: {sorted(rooms & later)}"
    if here == "models":
        assert rooms <= {"errors", "__init__"}, sorted(rooms)
    if here == "reports":
        assert rooms <= {"errors", "tables", "fileio", "settings", "__init__"}, sorted(rooms)
    if here == "config":
        assert rooms <= {"errors", "models"}, sorted(rooms)
    if here in SHARED - {"config"}:
        assert not rooms & (set(STAGES) | {"bench", "cli", "config"}), sorted(rooms)


def test_config_imports_only_models_constants():
    tree = ast.parse((PKG / "config.py").read_text())
    models = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
              and (n.module or "").startswith("cnnvis_pipeline.models")]
    assert [n.module for n in models] == ["cnnvis_pipeline.models"]  # the package: constants only


def test_dissection_modules_stay_under_400_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PKG / "dissection").glob("*.py")}
    assert sizes and max(sizes.values()) <= 400, sizes


def test_cli_registration_only_in_commands_modules():
    registering = sorted(str(p.relative_to(PKG)) for p in MODULES
                         if any(isinstance(n, ast.FunctionDef) and n.name == "register"
                                for n in ast.parse(p.read_text()).body))
    assert registering and all(p.endswith("commands.py") for p in registering), registering
    from cnnvis_pipeline import cli

    listed = sorted(m.replace(".", "/").removeprefix("cnnvis_pipeline/") + ".py"
                    for m in cli.COMMAND_MODULES)
    assert listed == registering


def test_config_does_not_load_torch():
    code = ("import sys, cnnvis_pipeline.config as c, cnnvis_pipeline.settings as s; "
            "s.Job.from_spec({'name': 'm', 'layers': ['a']}); "
            "print(sorted({'torch', 'torchvision'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
