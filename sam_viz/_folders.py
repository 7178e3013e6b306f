"""`sam_viz.models` and `sam_viz.sparse_ops` in a clone. The wheel installs the folders models/ and
sparse_ops/ inside the package (pyproject.toml's package-dir), so that they cannot collide with a
user's own `models`; a clone keeps them beside sam_viz/, and this finder gives them the same names
there. Each file is loaded under that one name: models/__init__.py and sparse_ops/__init__.py refuse
to be imported as the top-level `models` or `sparse_ops`, which would be a second copy of each
module (other classes for isinstance, other caches)."""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BESIDE = {f"sam_viz.{name}": HERE.parent / name for name in ("models", "sparse_ops")}


class BesideFinder(importlib.abc.MetaPathFinder):
    """Finds exactly the names in BESIDE, in the folders beside sam_viz/; their submodules are then
    found the usual way, in the package's __path__."""

    def find_spec(self, fullname, path=None, target=None):
        folder = BESIDE.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def install() -> None:
    """In a clone (no models/ inside sam_viz/, a models/ package beside it), put the finder first on
    sys.meta_path, once. Installed from the wheel it does nothing."""
    if (HERE / "models").is_dir() or not all((f / "__init__.py").is_file() for f in BESIDE.values()):
        return
    if not any(isinstance(f, BesideFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, BesideFinder())
