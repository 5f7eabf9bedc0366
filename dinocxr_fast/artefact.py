"""What an exported model carries beside it, in one place: the metadata (input transform, classes,
output kind, source checkpoint) that ``export`` writes and ``infer`` reads, and whether TensorRT
can run here. Both commands import this module, and neither imports the other for it."""
from __future__ import annotations

import json
from pathlib import Path


def sha256_of(path: Path) -> str:
    from dinocxr_fast.runtime.checkpoint import sha256_file  # noqa: PLC0415  (imports torch: after --help)

    return sha256_file(path)


def metadata_for(record: dict, checkpoint: Path | None = None, *, features_only: bool = False,
                 precision: str = "fp32") -> dict:
    """What a model built from a classifier record needs at inference: the input transform, the
    classes, the output kind; with ``checkpoint``, where it came from (an exported artefact)."""
    e = record["eval"]
    meta = {
        "input": {"channels": int(record["model"]["in_chans"]), "size": int(e["crop"]), "resize": int(e["resize"]),
                  "mean": float(e["mean"]), "std": float(e["std"]), "interpolation": e.get("interpolation", "bicubic")},
        "output": "features" if features_only else "logits",
        "classes": list(record["classes"]),
        "arch": record["model"]["arch"],
        "precision": precision,
    }
    if checkpoint is not None:
        meta.update(source_checkpoint=str(checkpoint), source_sha256=sha256_of(checkpoint))
    return meta


def write_metadata(artefact: Path, meta: dict) -> Path:
    path = artefact.with_suffix(artefact.suffix + ".json")
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_metadata(artefact: Path) -> dict:
    path = Path(artefact).with_suffix(Path(artefact).suffix + ".json")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: export writes it beside {artefact}")
    return json.loads(path.read_text())


def tensorrt_available() -> str | None:
    """None when TensorRT can build here, else the reason it cannot."""
    try:
        import tensorrt  # noqa: F401, PLC0415
    except ImportError:
        return "tensorrt is not installed (pip install tensorrt)"
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU"
    return None
