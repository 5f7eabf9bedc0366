"""Loads the compiled extension ``dinocxr_fast._C`` once and says what it was built with."""
from __future__ import annotations

import functools
from types import ModuleType


@functools.lru_cache(maxsize=None)
def load() -> ModuleType | None:
    """The extension module, or None when it was not built (pure-Python install)."""
    import torch  # noqa: F401, PLC0415 - loads libc10/libtorch, which _C links against

    try:
        from dinocxr_fast import _C  # noqa: PLC0415
    except ImportError:
        return None
    return _C


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """Why the extension could not be imported, for error messages."""
    import torch  # noqa: F401, PLC0415

    try:
        from dinocxr_fast import _C  # noqa: F401, PLC0415
    except ImportError as exc:
        return str(exc)
    return None


def has_cpp() -> bool:
    return load() is not None


def has_cuda() -> bool:
    ext = load()
    return ext is not None and bool(getattr(ext, "built_with_cuda", False))


def require() -> ModuleType:
    ext = load()
    if ext is None:
        raise RuntimeError(
            "the C++ extension dinocxr_fast._C is not built "
            f"({load_error()}); build it with `pip install -e . --no-build-isolation`"
        )
    return ext
