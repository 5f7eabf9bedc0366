"""The on-disk record of which custom backends were proven correct and faster on this device.

One JSON file per device under the user's cache folder (``DINOCXR_CACHE_DIR`` overrides;
default ``$XDG_CACHE_HOME/dinocxr_fast`` or ``~/.cache/dinocxr_fast``)::

    {"format": 1, "environment": {device, driver, cuda, torch, triton, package, extension},
     "verdicts": {"<op>|<backend>|<dtype>|<shape bucket>": {ok, reason, max_err, tol, ms, vendor_ms, ...}}}

A file that does not parse, or was written under another environment (a new driver, torch,
triton, package or extension build), is ignored and rewritten from scratch: a verdict is only
trusted for the binaries that earned it. Writes go to a temporary file renamed over the old one,
so a crash mid-write never leaves half a file.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import re
import tempfile
from pathlib import Path

import torch

FORMAT = 1
log = logging.getLogger("dinocxr_fast.ops")


def cache_dir() -> Path:
    explicit = os.environ.get("DINOCXR_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dinocxr_fast"


@functools.lru_cache(maxsize=None)
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({os.cpu_count()} cpus)"


def _extension_fingerprint() -> str:
    """Size and mtime of the compiled extension: a rebuild invalidates its verdicts."""
    from dinocxr_fast import _ext  # noqa: PLC0415

    ext = _ext.load()
    path = getattr(ext, "__file__", None)
    if not path:
        return "none"
    st = os.stat(path)
    return f"{st.st_size}-{int(st.st_mtime)}"


def _triton_version() -> str:
    try:
        import triton  # noqa: PLC0415

        return str(triton.__version__)
    except Exception:  # noqa: BLE001 - an absent or broken triton is simply "none"
        return "none"


def environment(device: torch.device) -> dict:
    """Everything a verdict depends on besides the op, the dtype and the shape."""
    import dinocxr_fast  # noqa: PLC0415

    driver = "none"
    if device.type == "cuda":
        get = getattr(torch._C, "_cuda_getDriverVersion", None)
        driver = str(get()) if get is not None else "unknown"
    return {
        "device": device_name(device),
        "driver": driver,
        "cuda": str(torch.version.cuda),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "package": dinocxr_fast.__version__,
        "extension": _extension_fingerprint(),
    }


def cache_path(device: torch.device) -> Path:
    """One file per device and environment: two checkouts or virtual environments on one machine
    (another torch, another build of the extension) keep their own verdicts instead of
    overwriting each other's at every start."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()[:80] or "device"
    env = hashlib.sha1(json.dumps(environment(device), sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir() / f"backends-{device.type}-{slug}-{env}.json"


def load(device: torch.device) -> dict[str, dict]:
    """The verdicts cached for this device and environment; {} when there are none worth trusting."""
    path = cache_path(device)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("verdicts"), dict):
            raise ValueError("not a backend-verdict file of this format")
    except (OSError, ValueError) as exc:
        log.warning("backend cache %s is unreadable (%s): ignored, it will be rebuilt", path, exc)
        return {}
    if data.get("environment") != environment(device):
        log.info("backend cache %s was written under another environment: ignored, it will be rebuilt", path)
        return {}
    return {k: v for k, v in data["verdicts"].items() if isinstance(v, dict)}


def save(device: torch.device, verdicts: dict[str, dict]) -> Path | None:
    """Write all of ``verdicts`` atomically; a read-only cache folder only costs a warning."""
    path = cache_path(device)
    payload = {"format": FORMAT, "environment": environment(device), "verdicts": verdicts}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write the backend cache %s (%s); verdicts hold for this process only", path, exc)
        return None
    return path
