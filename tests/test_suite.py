"""Rules every test file keeps."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).parent


def test_no_test_depends_on_the_clock():
    # a loaded machine is slow: tests measure memory, counts and bytes, never seconds
    clocks = ("perf_counter", r"time\.time", "monotonic")  # an assert on a line that reads one of these
    pattern = re.compile("assert" + r"[^\n]*(" + "|".join(clocks) + r")\(\)")
    offenders = [p.name for p in TESTS.glob("test_*.py") if pattern.search(p.read_text())]
    assert not offenders


def test_no_test_imports_a_private_name_of_wasi():
    # tests exercise the package through the names it publishes
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("wasi"):
                module_private = any(part.startswith("_") for part in node.module.split("."))
                names = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
                if module_private or names:
                    offenders.append(f"{path.name}:{node.lineno} from {node.module} import {names}")
    assert not offenders, offenders


# test files that are not one module's: whole commands (test_e2e_*), the scripts in benchmarks/, these
# rules, the layer checker in tools/, and topics that span several modules of the library
NOT_A_MODULE = {"suite", "benchmarks", "data_corpora", "descent", "fidelity", "recompute", "layers", "autocast"}


def test_test_files_name_a_module_of_the_package_or_an_end_to_end_run():
    # tests/test_<module path joined by underscores>.py mirrors src/wasi one file to one module
    package = TESTS.parent / "src" / "wasi"
    modules = set()
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if parts and parts != ("__main__",):
            modules.add("_".join(parts))
    strays = [p.name for p in TESTS.glob("test_*.py")
              if p.stem.removeprefix("test_") not in modules | NOT_A_MODULE and not p.stem.startswith("test_e2e_")]
    assert not strays, strays
