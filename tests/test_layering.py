"""The layering the design asks for, checked on the source: kernels/ imports nothing from modgen
(they take plain tensors), and the core (modgen/) names no built-in plugin module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def imported_modules(path: Path) -> set[str]:
    """Absolute modules a source file imports (relative imports are left out)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def test_kernels_import_nothing_from_modgen():
    files = sorted((ROOT / "kernels").glob("*.py"))
    assert files
    for path in files:
        bad = {m for m in imported_modules(path) if m == "modgen" or m.startswith("modgen.")}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_the_core_names_no_plugin_module_and_no_kernel():
    """The core reaches plugins and kernels only through registries (a kernel through the
    plugin that offers it: the C++ ops through ``modgen.blocks.ops.register_ops``)."""
    for path in sorted((ROOT / "modgen").rglob("*.py")):
        bad = {
            m for m in imported_modules(path) if m.startswith(("modgen.plugins.", "modgen.kernels"))
        }
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_checkouts_kernels_folder_does_not_shadow_pypis_kernels():
    """Run from the checkout's root (``python -m pytest``, ``python -m modgen``), the bare name
    ``kernels`` found this repo's kernels/ (installed as ``modgen.kernels``), and transformers,
    which imports PyPI's ``kernels`` package since 5.2x, failed on its first config. The bare name
    now gives PyPI's package where it is installed (this folder where it is not, as before: an
    older transformers imports the name to see whether it exists), and the root stays on the
    path."""
    code = (
        "import importlib.util, sys, kernels, transformers.activations\n"
        "print(kernels.__file__); print('' in sys.path)\n"
        "sys.path[:] = [p for p in sys.path if p not in ('', '.')]; del sys.modules['kernels']\n"
        "print(importlib.util.find_spec('kernels') is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    where, root_kept, installed = out.stdout.split()
    ours = Path(where).resolve().parent == (ROOT / "kernels").resolve()
    assert ours == (installed == "False") and root_kept == "True"
