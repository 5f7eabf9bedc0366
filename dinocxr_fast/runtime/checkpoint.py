"""Checkpoints: written atomically, checksummed, loaded without unpickling arbitrary objects.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed
over its final name, so a crash, a full disk or a kill mid-write leaves the previous checkpoint
intact; SIGINT/SIGTERM arriving during the write are held back until it is done. Its SHA-256 is
recorded beside it (``<name>.sha256``, the ``sha256sum`` format) and verified on load, so a
damaged file is named instead of resuming with wrong weights; ``latest`` then falls back to the
newest intact checkpoint. Loading uses ``torch.load(weights_only=True)``: tensors, numbers,
strings, lists and dicts only. RNG states are stored as tensors and plain numbers for that reason.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import random
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

STEP_PATTERN = re.compile(r"^checkpoint-(\d{8})\.pt$")
FINAL_NAME = "checkpoint-final.pt"
TMP_PATTERN = re.compile(r"^\..+\.tmp-(\d+)$")
log = logging.getLogger("dinocxr_fast.train")


class CheckpointError(RuntimeError):
    pass


def step_name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


def checksum_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".sha256")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT/SIGTERM back while the block runs, then deliver them to the usual handlers:
    a second Ctrl-C or ``docker stop`` cannot cut a checkpoint write short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _f: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` atomically, then its SHA-256 to ``<path>.sha256``."""
    path = Path(path)
    try:
        with signals_deferred():
            _write_atomic(path, lambda f: torch.save(obj, f))
            line = f"{sha256_file(path)}  {path.name}\n".encode()
            _write_atomic(checksum_path(path), lambda f: f.write(line))
    except OSError as exc:
        hint = " (disk full)" if exc.errno == errno.ENOSPC else ""
        raise CheckpointError(f"cannot write checkpoint {path}{hint}: {exc.strerror or exc}; "
                              "the previous checkpoint is intact") from exc


def verify(path: Path) -> None:
    """Raise CheckpointError if ``path`` does not match its recorded SHA-256. A checkpoint without
    a record (an older version wrote it) is loaded with a warning."""
    path = Path(path)
    record = checksum_path(path)
    if not record.is_file():
        log.warning("checkpoint %s has no recorded checksum (%s); loading it unverified", path, record.name)
        return
    expected = (record.read_text().split() or [""])[0]
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 {actual[:12]}... does not match "
                              f"the recorded {expected[:12] or '(empty)'}...")


def clean_partial(folder: Path) -> list[Path]:
    """Remove what a killed writer left in ``folder``: temporary files of processes that are gone,
    and checksum records whose checkpoint no longer exists."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = TMP_PATTERN.match(p.name)
        stale = m is not None and not _alive(int(m.group(1)))
        orphan = p.name.endswith(".pt.sha256") and not p.with_name(p.name.removesuffix(".sha256")).exists()
        if stale or orphan:
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.info("removed %d partial file(s) an interrupted run left in %s: %s", len(removed), folder,
                 ", ".join(p.name for p in removed))
    return removed


@contextlib.contextmanager
def discard_if_failed(folder: Path):
    """A command that fails leaves no junk run folder: the folder is removed if this command
    created it and it holds no checkpoint (nor a non-finite-loss dump): progress is never removed."""
    folder = Path(folder)
    existed = folder.exists()
    try:
        yield
    except BaseException:
        if not existed and folder.is_dir() and not any(folder.glob("*.pt")):
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers are from a process with the same pid that is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_step_checkpoints(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(folder: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` step checkpoints (the final one is never pruned)."""
    steps = list_step_checkpoints(folder)
    for path in steps[: max(len(steps) - max(keep_last, 1), 0)]:
        path.unlink(missing_ok=True)
        checksum_path(path).unlink(missing_ok=True)


def latest(folder: Path) -> Path | None:
    """The checkpoint to resume from: the newest intact step checkpoint or the final one, whichever
    is further. A damaged one is named and passed over; None if there is none at all, and a
    CheckpointError if every one is damaged."""
    folder = Path(folder)
    candidates = list_step_checkpoints(folder)
    final = folder / FINAL_NAME
    if final.is_file():
        candidates.append(final)
    good, bad = [], []
    for path in candidates:
        try:
            verify(path)
            good.append(path)
        except CheckpointError as exc:
            bad.append(path)
            log.warning("%s; passing over it", exc)
    if not good:
        if bad:
            raise CheckpointError(f"no intact checkpoint in {folder}: {', '.join(p.name for p in bad)} "
                                  "failed their checksum")
        return None
    best = max(good, key=lambda p: (load_step(p, verified=True), p.name == FINAL_NAME))
    if bad:
        log.warning("resuming from %s, the newest intact checkpoint", best)
    return best


def load_step(path: Path, verified: bool = False) -> int:
    m = STEP_PATTERN.match(Path(path).name)
    if m:
        return int(m.group(1))
    return int(load(path, verify_checksum=not verified).get("step", -1))


def load(path: Path | str, map_location: str | torch.device = "cpu", verify_checksum: bool = True) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if verify_checksum:
        verify(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - name the file whatever went wrong
        raise CheckpointError(f"cannot load checkpoint {path}: {exc}") from exc


# ---- RNG state as plain data ---------------------------------------------------------------------
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(_python_state_from_plain(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def _python_state_from_plain(plain: list) -> tuple:
    version, internal, gauss = plain
    return (version, tuple(int(x) for x in internal.tolist()), gauss)


def export_safetensors(state_dict: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """Weights only, for downstream use (fine-tuning, export)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from exc
