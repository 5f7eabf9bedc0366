"""Checkpoints: written atomically, loaded without unpickling arbitrary objects.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed
over its final name, so a crash, a full disk or a kill mid-write leaves the previous checkpoint
intact. Loading uses ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts
only. RNG states are stored as tensors and plain numbers for that reason.
"""
from __future__ import annotations

import errno
import os
import random
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

STEP_PATTERN = re.compile(r"^checkpoint-(\d{8})\.pt$")
FINAL_NAME = "checkpoint-final.pt"


class CheckpointError(RuntimeError):
    pass


def step_name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        hint = " (disk full)" if exc.errno == errno.ENOSPC else ""
        raise CheckpointError(f"cannot write checkpoint {path}{hint}: {exc.strerror or exc}; "
                              "the previous checkpoint is intact") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def latest(folder: Path) -> Path | None:
    """The checkpoint to resume from: the newest step checkpoint, else the final one."""
    folder = Path(folder)
    candidates = list_step_checkpoints(folder)
    final = folder / FINAL_NAME
    if final.is_file():
        candidates.append(final)
    if not candidates:
        return None
    return max(candidates, key=lambda p: (load_step(p), p.name == FINAL_NAME))


def load_step(path: Path) -> int:
    m = STEP_PATTERN.match(Path(path).name)
    if m:
        return int(m.group(1))
    return int(load(path).get("step", -1))


def load(path: Path | str, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
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
