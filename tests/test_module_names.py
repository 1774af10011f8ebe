"""No script or test module may shadow an installed package or the standard library.

bench/ scripts run with bench/ first on sys.path, and pytest puts tests/ there too: a file named
like a top-level import name of any installed distribution (bench/kernels.py once hid the
`kernels` package that transformers 5.25 imports) or of the standard library replaces it for
everything imported after it. This test fails as soon as such a name appears, whatever a newer
dependency starts to import.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT_DIRS = ("bench", "tests")


def _module_names(folder: Path) -> dict[str, Path]:
    """Importable names a folder puts on sys.path: its .py files and its package folders."""
    names = {p.stem: p for p in folder.glob("*.py")}
    names.update({p.name: p for p in folder.iterdir() if (p / "__init__.py").is_file()})
    return names


def _installed_top_level_names() -> set[str]:
    names = set(importlib.metadata.packages_distributions())
    return names | set(sys.stdlib_module_names)


def test_the_installed_names_are_read() -> None:
    taken = _installed_top_level_names()
    # The lookup itself must see what this environment has, or the test below proves nothing.
    assert {"torch", "transformers", "pytest", "os", "json"} <= taken


def test_no_script_or_test_module_shadows_an_installed_name() -> None:
    taken = _installed_top_level_names()
    clashes = [
        f"{path.relative_to(ROOT)} (shadows `{name}`)"
        for folder in SCRIPT_DIRS
        for name, path in _module_names(ROOT / folder).items()
        if name in taken
    ]
    assert not clashes, "rename: " + ", ".join(sorted(clashes))
