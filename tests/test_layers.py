"""The layers point one way: kernels/ <- engine/ <- the application (src/flashzo, its serve/, sglang_plugin/).

kernels/ imports nothing of flashzo's but kernels/; engine/ only kernels/ and engine/. Checked twice:
by reading every module's imports (ast), and by importing flashzo.kernels and flashzo.engine in a
fresh interpreter and listing the flashzo modules that loaded (the top-level package loads its
names lazily, so importing a subpackage does not drag the application in).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the folders pyproject.toml installs as flashzo's packages, bottom layer first
LAYERS = {"flashzo.kernels": "kernels", "flashzo.engine": "engine"}
APPLICATION = {"flashzo": "src/flashzo", "flashzo.sglang": "sglang_plugin"}
ALLOWED = {"flashzo.kernels": ("flashzo.kernels",), "flashzo.engine": ("flashzo.kernels", "flashzo.engine")}


def module_name(path: Path) -> str:
    """The installed name of a source file (kernels/rows.py -> flashzo.kernels.rows)."""
    for package, folder in {**LAYERS, **APPLICATION}.items():
        base = ROOT / folder
        if base in path.parents or path.parent == base:
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            return ".".join([package, *parts])
    raise ValueError(path)


def flashzo_imports(source: str, name: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) of every flashzo module the source of module `name` imports, relative imports
    resolved (`from pkg import name` counts as importing pkg)."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, module))
    return [(line, m) for line, m in found if m == "flashzo" or m.startswith("flashzo.")]


def layer_of(module: str) -> str:
    """The layer a flashzo module belongs to: flashzo.kernels, flashzo.engine or the application."""
    for package in LAYERS:
        if module == package or module.startswith(package + "."):
            return package
    return "application"


def wrong_way(path: Path, source: str | None = None) -> list[str]:
    """The imports of `path` (or of `source` read as that module) that point up the layers."""
    name = module_name(path)
    here = layer_of(name)
    source = path.read_text() if source is None else source
    return [f"{path.relative_to(ROOT)}:{line}: {here} imports {imported}"
            for line, imported in flashzo_imports(source, name, path.name == "__init__.py")
            if layer_of(imported) not in ALLOWED.get(here, (layer_of(imported),))]


def layer_files() -> list[Path]:
    return sorted(p for folder in LAYERS.values() for p in (ROOT / folder).rglob("*.py"))


def test_imports_point_down():
    files = layer_files()
    assert {module_name(p) for p in files} >= {"flashzo.kernels.rows", "flashzo.engine.model"}
    problems = [problem for path in files for problem in wrong_way(path)]
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


@pytest.mark.parametrize("where,line", [
    ("kernels/randn.py", "from flashzo.engine.batch import Copy"),
    ("kernels/segments.py", "from flashzo.errors import InputError"),
    ("kernels/rows.py", "import flashzo.engine.model"),
    ("kernels/checks.py", "from .. import engine"),
    ("engine/lora.py", "from flashzo import tasks"),
    ("engine/batch.py", "from flashzo.data import load_jsonl"),
    ("engine/model.py", "from flashzo.sglang.routing import zo_linear"),
    ("engine/loss.py", "from flashzo.errors import InputError"),
])
def test_the_import_check_sees_a_wrong_way_import(where, line):
    """Each of these lines, added to a module, is reported; the module's own imports are not."""
    path = ROOT / where
    assert wrong_way(path) == []
    problems = wrong_way(path, path.read_text() + f"\n{line}\n")
    assert len(problems) == 1, problems


def loaded_by(statement: str) -> list[str]:
    """The flashzo modules a fresh interpreter has loaded after `statement`."""
    code = f"import sys\n{statement}\nimport json\nprint(json.dumps(sorted(m for m in sys.modules if "\
           "m == 'flashzo' or m.startswith('flashzo.'))))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT.parent)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_importing_the_kernels_loads_kernels_only():
    loaded = loaded_by("import flashzo.kernels")
    outside = [m for m in loaded if m != "flashzo" and layer_of(m) != "flashzo.kernels"]
    assert not outside, f"import flashzo.kernels loads {outside}"
    kernel_files = {module_name(p) for p in (ROOT / "kernels").glob("*.py")}
    assert set(loaded) - {"flashzo"} <= kernel_files and len(loaded) <= len(kernel_files) + 1, loaded


def test_importing_the_engine_loads_kernels_and_engine_only():
    loaded = loaded_by("import flashzo.engine")
    outside = [m for m in loaded if m != "flashzo" and layer_of(m) == "application"]
    assert not outside, f"import flashzo.engine loads {outside}"
    assert "flashzo.engine.model" in loaded and "flashzo.kernels.perturbed_lora" in loaded


def test_the_package_still_offers_every_name():
    """`import flashzo` loads nothing more, and its names and subpackages load on use."""
    assert loaded_by("import flashzo") == ["flashzo"]
    code = ("import flashzo\nfrom flashzo import MeZOTrainer, load_jsonl\nimport flashzo.errors as e\n"
            "assert flashzo.InputError is e.InputError and issubclass(e.InputError, ValueError)\n"
            "assert set(flashzo.__all__) <= set(dir(flashzo)) and flashzo.engine.CausalLM is flashzo.CausalLM\n"
            "assert all(getattr(flashzo, n) is not None for n in flashzo.__all__)\n"
            "try:\n    flashzo.no_such_name\nexcept AttributeError as err:\n    assert 'no_such_name' in str(err)\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT.parent)
    assert run.returncode == 0, run.stderr
