"""The package is the same in a checkout, an editable install and a wheel: what a checkout imports
is what setup.py packages, and the extension's sources find their headers through the build's
include folders. (Building and installing the wheel itself is too slow for a test.)"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from setuptools import find_packages

REPO = Path(__file__).resolve().parents[1]


def test_every_python_folder_of_the_package_is_packaged():
    # setup.py packages find_packages(include=["dinocxr_fast", "dinocxr_fast.*"]) and maps no folder:
    # a folder of modules without __init__.py would import from a checkout and be missing from a wheel.
    packaged = set(find_packages(str(REPO), include=["dinocxr_fast", "dinocxr_fast.*"]))
    folders = {p.parent for p in (REPO / "dinocxr_fast").rglob("*.py") if "__pycache__" not in p.parts}
    names = {".".join(f.relative_to(REPO).parts) for f in folders}
    assert names <= packaged, sorted(names - packaged)
    assert "dinocxr_fast.ops.triton" in packaged


def test_no_package_outside_dinocxr_fast():
    # kernels/ is device code compiled into _C, not an importable dinocxr_fast.kernels.
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert importlib.util.find_spec("dinocxr_fast.kernels") is None


def test_extension_sources_include_headers_by_name():
    # csrc/ and kernels/cuda/ are include folders of the build (setup.py, CMakeLists.txt,
    # scripts/cuda_compile_check.sh); a relative path up the tree would tie a file to where it sits.
    sources = [p for p in (REPO / "csrc").rglob("*") if p.suffix in {".cpp", ".h"}]
    assert sources
    up = [f"{p.relative_to(REPO)}: {line}" for p in sources for line in p.read_text().splitlines()
          if re.match(r'\s*#\s*include\s*"\.\./', line)]
    assert not up, up
