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
from dinocxr_fast.data.imageio import policy_from_config


def pretrain_source(data_cfg: dict, seed: int) -> Source:
    """Unlabelled images: the user's folder or CSV list, or the embedded synthetic phantoms."""
    policy_from_config(data_cfg)
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
    common = {"channels": channels, "dtype": dtype, "augment": data_cfg.get("augment")}
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


def supervised_sources(data_cfg: dict) -> tuple[Source, Source, Source, str]:
    """(train, validation, test, test split name) of a labelled ImageFolder root.

    The label fraction is a stratified, seeded, patient-grouped subset of train. Model selection
    must not see the test images: when the root has no test split, the val split becomes the
    test set and 20 % of the training patients (stratified) are held out for selection.
    """
    from dinocxr_fast.data import split_by_patient  # noqa: PLC0415

    policy_from_config(data_cfg)
    if not data_cfg.get("path"):
        raise DatasetError("data.path is required: an ImageFolder root with train/ and val/ sub-folders (--data PATH)")
    root = Path(data_cfg["path"]).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data.path {root} does not exist")
    train = labelled_split(root, data_cfg["train_split"])
    fraction = float(data_cfg["label_fraction"])
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data.label_fraction must be in (0, 1], got {fraction}")
    classes = list(train.classes)
    val_dir, test_dir = root / data_cfg["val_split"], root / data_cfg["test_split"]
    if not val_dir.is_dir():
        raise DatasetError(f"{val_dir} does not exist (a validation split is needed)")
    if test_dir.is_dir():
        val, test, test_split = ImageFolderSource(val_dir, classes=classes), ImageFolderSource(test_dir, classes=classes), \
            data_cfg["test_split"]
    else:
        held_out, rest = split_by_patient(train.samples, 0.2, int(data_cfg["label_seed"]))
        train, val = train.with_samples(rest), train.with_samples(held_out)
        test, test_split = ImageFolderSource(val_dir, classes=classes), data_cfg["val_split"]
    if fraction < 1.0:
        train = train.label_fraction(fraction, int(data_cfg["label_seed"]))
    for name, source in (("training", train), ("validation", val), ("test", test)):
        empty = [c for c, n in source.class_counts().items() if n == 0]
        if empty:  # AUC, balanced accuracy and class weights need every class
            raise DatasetError(f"the {name} split ({source.root}) has no image of class {', '.join(empty)}: "
                               "every split needs images of every class")
    return train, val, test, test_split


def supervised_train_loader(source: Source, data_cfg: dict, batch_size: int, *, channels: int, device, shard_id: int,
                            num_shards: int, seed: int):
    """Augmented crops with labels for fine-tuning: random-resized crop + flip, (images, labels)."""
    from dinocxr_fast.data import ViewSpec, build_train_loader  # noqa: PLC0415

    crop = ViewSpec(size=int(data_cfg["image_size"]), scale=tuple(data_cfg["train_scale"]), flip_p=0.5, jitter_p=0.0,
                    blur_p=0.0, solarize_p=0.0)
    return build_train_loader(source, ViewsConfig(views=(crop,), channels=channels), batch_size, device=device,
                              shard_id=shard_id, num_shards=num_shards, seed=seed, backend=loader_backend(data_cfg),
                              num_threads=int(data_cfg["num_workers"]))
