"""The import layering of the package (tools/check_layers.py) and what ``import wasi`` loads."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "check_layers.py"
LIBRARY_TOP = 6  # layers 0-6: the library that `import wasi` exposes


def _checker():
    spec = importlib.util.spec_from_file_location("check_layers", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, check=False)


def test_the_library_layers_import_only_downwards_without_cycles():
    result = _run("--max-layer", str(LIBRARY_TOP), str(ROOT / "src"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 problem(s) in layers 0-6" in result.stdout


def test_every_module_of_the_package_is_in_the_layer_map():
    checker = _checker()
    unmapped = [name for name in checker.find_modules(ROOT / "src") if checker.layer_of(name) is None]
    assert unmapped == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_checker_reports_upward_imports_anywhere_and_cycles(tmp_path):
    _write(tmp_path, {
        "wasi/__init__.py": '_EXPORTS = {"thing": "wasi.cli"}\n',
        "wasi/config.py": "def f():\n    from wasi.convert import convert\n",  # 0 -> 5, in a function
        "wasi/functional.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import wasi.modules\n",
        "wasi/modules.py": "from wasi import functional\n",  # downwards: fine
        "wasi/convert.py": "from wasi.checkpoint import save\n",
        "wasi/checkpoint.py": "from . import convert\n",  # same layer, but a cycle with convert
        "wasi/cli.py": "",
    })
    result = _run(str(tmp_path))
    assert result.returncode == 1
    out = result.stdout
    assert "wasi.config (layer 0) imports wasi.convert (layer 5) in f" in out
    assert "wasi.functional (layer 1) imports wasi.modules (layer 3) module level" in out
    assert "wasi (layer 6) imports wasi.cli (layer 10)" in out  # through the lazy table
    assert "import cycle: wasi.checkpoint <-> wasi.convert" in out
    assert "import cycle: wasi.functional <-> wasi.modules" in out
    assert "wasi.modules (layer 3) imports" not in out
    # only layers 0-3 checked: the upward imports from above stay out of the report
    limited = _run("--max-layer", "3", str(tmp_path)).stdout
    assert "wasi.config (layer 0)" in limited and "wasi (layer 6)" not in limited
    assert "import cycle: wasi.functional <-> wasi.modules" in limited  # it has a layer 1 module
    assert "wasi.checkpoint <-> wasi.convert" not in limited  # layer 5 only


def test_the_checker_names_modules_missing_from_the_map(tmp_path):
    _write(tmp_path, {"wasi/__init__.py": "", "wasi/stray.py": "import wasi.config\n", "wasi/config.py": ""})
    result = _run(str(tmp_path))
    assert result.returncode == 1
    assert "module wasi.stray is not in the layer map" in result.stdout
    assert _run("--max-layer", "6", str(tmp_path)).returncode == 0


UPPER = ("wasi.data", "wasi.models", "wasi.training", "wasi.bench", "wasi.cli", "wasi.export.predict")


def _loaded_after(code: str) -> list[str]:
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith('wasi'))))\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_import_wasi_and_its_public_names_load_the_library_only():
    loaded = _loaded_after("import wasi\nfor name in wasi.__all__:\n    getattr(wasi, name)")
    assert "wasi.convert" in loaded and "wasi.calibrate.plan" in loaded  # the names were really loaded
    assert [m for m in loaded if m.startswith(UPPER)] == []


@pytest.mark.parametrize("module", ["wasi.convert", "wasi.checkpoint", "wasi.memory"])
def test_the_conversion_layer_does_not_load_the_planner(module):
    loaded = _loaded_after(f"import {module}")
    assert module in loaded
    above = [m for m in loaded if m.startswith("wasi.calibrate.") and m not in
             ("wasi.calibrate.fit", "wasi.calibrate.knapsack")]
    assert above == []
