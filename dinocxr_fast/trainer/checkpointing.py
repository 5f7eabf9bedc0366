"""A run's folder and the checkpoints in it: the loop's checkpointing component.

It owns where and how a job's state is written (atomically, with a SHA-256 beside it, the oldest
pruned), what a resume may load (a checkpoint of this job's format whose model and data sections
match the run's), and the debugging dump of a non-finite step. What goes into the state is the
job's (``TrainingJob.state_dict``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from dinocxr_fast.runtime import checkpoint as ckpt


class RunCheckpoints:
    def __init__(self, run_dir: Path, *, job_format: str, keep_last: int, must_match: tuple[str, ...]) -> None:
        self.run_dir = Path(run_dir)
        self.job_format = job_format
        self.keep_last = int(keep_last)
        self.must_match = must_match  # config sections a resume must share with the checkpoint

    def prepare_folder(self) -> None:
        """Create the run folder, prove it writable, and remove what a killed run left half-made."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
            ckpt.clean_partial(self.run_dir)
        except OSError as exc:
            raise ckpt.CheckpointError(f"run folder {self.run_dir} is not writable: {exc.strerror or exc}") from exc

    def save(self, state: dict, step: int, *, final: bool = False) -> Path:
        path = self.run_dir / (ckpt.FINAL_NAME if final else ckpt.step_name(step))
        ckpt.atomic_torch_save(state, path)
        if not final:
            ckpt.prune(self.run_dir, self.keep_last)
        return path

    def load_for_resume(self, path: Path, cfg: dict, device: torch.device) -> dict:
        """The state at ``path``, refused (CheckpointError) unless it is this job's and the same run."""
        state = ckpt.load(path, map_location=device)
        if state.get("format") != self.job_format:
            raise ckpt.CheckpointError(f"{path} is a {state.get('format')!r} checkpoint, this job needs "
                                       f"{self.job_format!r}")
        for section in self.must_match:
            theirs, ours = state["config"].get(section) or {}, cfg.get(section) or {}
            differ = [f"{section}.{k}: {theirs.get(k)!r} vs {ours.get(k)!r}"
                      for k in sorted(set(theirs) | set(ours), key=str) if theirs.get(k) != ours.get(k)]
            if differ:
                raise ckpt.CheckpointError(f"cannot resume from {path}: the checkpoint's config differs from this "
                                           f"run's ({'; '.join(differ)})")
        return state

    def last_good_state(self) -> str:
        """Which checkpoint holds the last good state, for a message about a failed step."""
        earlier = ckpt.list_step_checkpoints(self.run_dir)
        return (f"{earlier[-1]} is the last good state" if earlier else
                "no earlier checkpoint exists, so none holds a good state")

    def save_non_finite_dump(self, step: int, dump: dict) -> Path:
        path = self.run_dir / f"nonfinite-step{step:08d}.pt"
        ckpt.atomic_torch_save({"step": step, **dump}, path)
        return path
