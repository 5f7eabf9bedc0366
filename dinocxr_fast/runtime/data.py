"""The trainer's data wiring: a config section -> a Source and its views."""
from __future__ import annotations

from pathlib import Path

import torch

from dinocxr_fast.data import (
    CsvSource,
    DatasetError,
    EvalConfig,
    ImageFolderSource,
    Source,
    SyntheticSource,
    ViewsConfig,
    dali_available,
)


def pretrain_source(data_cfg: dict, seed: int) -> Source:
    """Unlabelled images: the user's folder or CSV list, or the embedded synthetic phantoms."""
    path = data_cfg.get("path")
    if path is None:
        return SyntheticSource(int(data_cfg["synthetic_count"]), int(data_cfg["synthetic_size"]), seed=seed).unlabelled()
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetError(f"data.path {root} does not exist")
    if data_cfg.get("split"):
        root = root / data_cfg["split"]
        if not root.is_dir():
            raise DatasetError(f"data.split folder {root} does not exist")
    if data_cfg.get("csv"):
        return CsvSource(data_cfg["csv"], str(root)).unlabelled()
    return ImageFolderSource(root, labelled=False)


def views_config(data_cfg: dict, channels: int, dtype: str = "float32") -> ViewsConfig:
    kind = data_cfg["views"]
    common = {"channels": channels, "dtype": dtype}
    if kind == "dino_cxr":
        return ViewsConfig.dino_cxr(size=int(data_cfg["view_size"]), n_views=int(data_cfg["n_views"]),
                                    scale=tuple(data_cfg["global_scale"]), **common)
    if kind == "dino_multicrop":
        return ViewsConfig.dino_multicrop(global_size=int(data_cfg["view_size"]), local_size=int(data_cfg["local_size"]),
                                          n_local=int(data_cfg["n_local"]), global_scale=tuple(data_cfg["global_scale"]),
                                          local_scale=tuple(data_cfg["local_scale"]), **common)
    raise ValueError(f"unknown data.views={kind!r} (dino_cxr, dino_multicrop)")


def loader_backend(data_cfg: dict) -> str:
    choice = data_cfg["loader"]
    if choice == "auto":
        return "dali" if dali_available() else "torch"
    if choice not in ("dali", "torch"):
        raise ValueError(f"unknown data.loader={choice!r} (dali, torch, auto)")
    if choice == "dali" and not dali_available():
        raise RuntimeError("data.loader=dali but nvidia-dali is not installed (pip install nvidia-dali-cuda130)")
    return choice


def labelled_split(root: str | Path, split: str) -> Source:
    folder = Path(root).expanduser() / split
    if not folder.is_dir():
        raise DatasetError(f"{folder} does not exist (the kNN monitor needs {Path(root)}/train and /val)")
    return ImageFolderSource(folder)


def eval_config(size: int, channels: int) -> EvalConfig:
    return EvalConfig.for_size(int(size), channels=channels)


def device_from(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA GPU is available")
    return device
