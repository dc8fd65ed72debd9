"""One namespace: every user folder is installed under `graphir.`, and nothing imports the old
top-level names (they would work from a checkout and break in an installed wheel)."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
FOLDERS = PYPROJECT["tool"]["setuptools"]["package-dir"]


def test_every_package_folder_is_in_the_wheel():
    # The mapped folders are disjoint (ops/ is not inside graphir/), so each __init__.py names
    # exactly one package.
    found = {".".join([pkg, *init.parent.relative_to(ROOT / folder).parts])
             for pkg, folder in FOLDERS.items() for init in (ROOT / folder).rglob("__init__.py")}
    assert found == set(PYPROJECT["tool"]["setuptools"]["packages"])


def test_no_top_level_imports_of_the_user_folders():
    bad = re.compile(r"^\s*(>>> )?(from|import) (ops|nn|lowering|runtime|tools|examples)\b",
                     re.M)
    offenders = []
    for folder in list(FOLDERS.values()) + ["tests"]:
        for f in (ROOT / folder).rglob("*.py"):
            for m in bad.finditer(f.read_text()):
                offenders.append(f"{f.relative_to(ROOT)}: {m.group(0).strip()}")
    assert offenders == []


def test_parser_finds_ops_without_importing_the_op_library():
    # The core loads op libraries through the "graphir.op_libraries" entry points.
    code = ("import sys, graphir\n"
            "assert 'graphir.ops' not in sys.modules\n"
            "g = graphir.parse('graph @g(%a: tensor<[4], f32, cpu:0>) {\\n"
            "  %0 = gir.exp(%a) : tensor<[4], f32, cpu:0>\\n  gir.output %0\\n}\\n')\n"
            "print(g.nodes[-1].op)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "exp"
