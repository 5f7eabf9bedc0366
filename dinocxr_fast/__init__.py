"""dinocxr_fast: DINO-CXR self-supervised pretraining of ViTAEv2 on chest X-rays, made fast."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _expose_source_kernels() -> None:
    """Make the top-level ``kernels/`` importable as ``dinocxr_fast.kernels``.

    An installed wheel (or an editable install) maps ``kernels/`` to ``dinocxr_fast.kernels``.
    When the package is imported straight from a source checkout, nothing does, so register the
    same name here. Device code stays outside the Python package, as DESIGN.md fixes.
    """
    name = f"{__name__}.kernels"
    if name in sys.modules:
        return
    try:
        if importlib.util.find_spec(name) is not None:
            return
    except (ImportError, ValueError):
        pass
    root = Path(__file__).resolve().parent.parent / "kernels"
    init = root / "__init__.py"
    if not init.is_file():
        return
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_expose_source_kernels()
