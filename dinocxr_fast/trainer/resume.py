"""Where a command's run continues from (``--resume``) and with which config.

A resumed run continues with its own ``config.yaml``; the command line may change only the keys in
``SAFE_AT_RESUME``, and each change is printed and logged in the run folder.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from dinocxr_fast.config import ConfigError, load_config
from dinocxr_fast.runtime import checkpoint as ckpt

# Keys a resume may change: they do not alter what the run computes, only how long it runs, how it
# is logged, checkpointed and monitored, and which hardware / backend runs it. Anything else (model,
# data, optimiser, DINO recipe, seed, precision) would make the continued run a different run.
SAFE_AT_RESUME = {
    "train": {"epochs", "max_steps", "max_minutes", "fit_schedules", "device", "compile", "log_every", "ckpt_every",
              "keep_last", "loss_check_every", "knn_data", "knn_every", "knn_k", "knn_temperature", "knn_size"},
    "data": {"loader", "num_workers"},
    "dino": {"backend"},
}
# They budget one command, not the run: a resume runs to the run's end unless they are given again
# (the printed "continue this run" command must continue it).
PER_COMMAND_BUDGETS = ("max_steps", "max_minutes")


def merge_overrides(first: dict, second: dict) -> dict:
    out = {k: dict(v) for k, v in first.items()}
    for section, values in second.items():
        out.setdefault(section, {}).update(values)
    return out


def _flat(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_config(run_dir: Path, overrides: dict, sets: list[str], *, base: str = "base") -> dict | None:
    """The run's own ``config.yaml`` with the changes asked at resume applied where they are safe
    (anything else is a one-line error). None when the run has no config.yaml."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        return None
    budgets = {"train": dict.fromkeys(PER_COMMAND_BUDGETS)}
    cfg = load_config(str(saved), budgets, base=base)
    wanted = load_config(str(saved), merge_overrides(budgets, overrides), sets, base=base)
    before, after = _flat(cfg), _flat(wanted)
    changes = [(k, before.get(k), v) for k, v in after.items() if before.get(k) != v]
    unsafe = [k for k, _, _ in changes if k.split(".", 1)[1] not in SAFE_AT_RESUME.get(k.split(".", 1)[0], ())]
    if unsafe:
        detail = ", ".join(f"{k}: {before.get(k)!r} -> {after[k]!r}" for k in unsafe)
        raise ConfigError(f"--resume continues {run_dir} with its own config.yaml; these changes would make it a "
                          f"different run: {detail}. Start a new run (another --out) for them.")
    if changes:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        lines = [f"{stamp} resume: {k} {old!r} -> {new!r}" for k, old, new in changes]
        print("\n".join(lines), file=sys.stderr)
        with open(Path(run_dir) / "resume-changes.log", "a") as f:
            f.write("\n".join(lines) + "\n")
    return wanted


def preset_label(preset: str) -> str:
    return Path(preset).stem


def resolve_resume(resume: str | None, out: Path | None, preset: str) -> Path | None:
    """The checkpoint ``--resume`` names: 'auto' is the latest in ``out`` (None there: a fresh run),
    or without ``out`` the newest of the preset's runs under runs/; a folder is its latest."""
    if resume is None:
        return None
    if resume == "auto":
        if out is not None:
            return ckpt.latest(out)
        runs = sorted(Path("runs").glob(f"{preset_label(preset)}-*"), key=lambda p: p.stat().st_mtime)
        for run in reversed(runs):
            found = ckpt.latest(run)
            if found is not None:
                return found
        return None
    path = Path(resume)
    if path.is_dir():
        found = ckpt.latest(path)
        if found is None:
            raise ckpt.CheckpointError(f"no checkpoint in {path}")
        return found
    if not path.is_file():
        raise ckpt.CheckpointError(f"--resume {resume}: no such checkpoint file or run folder")
    return path


def adopt_pretrained_arch(cfg: dict) -> None:
    """A pretraining checkpoint knows its architecture: use it, so --pretrained alone is enough."""
    source = cfg["model"]["pretrained"]
    if not source or str(source).lower() in ("none", "random"):
        return
    path = Path(source).expanduser()
    if path.is_dir():
        path = ckpt.latest(path) or path
    if path.suffix != ".pt" or not path.is_file():
        return
    state = ckpt.load(path)
    model = state.get("config", {}).get("model")
    if model:
        cfg["model"]["arch"] = model["arch"]
        cfg["model"]["in_chans"] = model["in_chans"]
