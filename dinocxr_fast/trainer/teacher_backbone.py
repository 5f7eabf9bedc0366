"""The teacher backbone of a pretraining run as a safetensors file: the weights downstream jobs
(linear, finetune, evaluate) start from, written at the end of a run (``--save-backbone``) or from
any of its checkpoints without building the model (``train export-backbone``)."""
from __future__ import annotations

from pathlib import Path

from dinocxr_fast.runtime import checkpoint as ckpt

BACKBONE_NAME = "teacher_backbone.safetensors"
PRETRAIN_FORMAT = "dinocxr_fast.pretrain/1"  # the "format" of a pretraining checkpoint


def write_teacher_backbone(state_dict: dict, model_cfg: dict, step: int, path: Path) -> Path:
    ckpt.export_safetensors(state_dict, path, metadata={
        "arch": model_cfg["arch"], "in_chans": str(model_cfg["in_chans"]), "step": str(step),
        "source": "dinocxr_fast pretrain teacher"})
    return path


def export_backbone_from_run(run: Path, out: Path | None = None) -> tuple[Path, int]:
    """The teacher backbone of a pretraining run's latest checkpoint as safetensors, without
    building the model or training: (the file written, the checkpoint's step)."""
    run = Path(run)
    path = run if run.is_file() else ckpt.latest(run)
    if path is None:
        raise ckpt.CheckpointError(f"no checkpoint in {run} (a pretraining run folder holds checkpoint-*.pt)")
    state = ckpt.load(path)
    if state.get("format") != PRETRAIN_FORMAT:
        raise ckpt.CheckpointError(f"{path} is a {state.get('format')!r} checkpoint, not a pretraining one")
    prefix = "backbone."
    backbone = {k[len(prefix):]: v for k, v in state["teacher"].items() if k.startswith(prefix)}
    target = Path(out) if out else path.parent / BACKBONE_NAME
    return write_teacher_backbone(backbone, state["config"]["model"], int(state["step"]), target), int(state["step"])
