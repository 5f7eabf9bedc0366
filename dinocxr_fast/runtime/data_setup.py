"""The trainer's data wiring: a config section -> a Source and its views."""
from __future__ import annotations

import functools
import os
from pathlib import Path

from dinocxr_fast.config import ConfigError
from dinocxr_fast.data import (
    DatasetError,
    EvalConfig,
    ImageFolderSource,
    Source,
    ViewsConfig,
    dali_available,
    label_fraction,
    source_from_config,
)
from dinocxr_fast.data.imageio import policy_from_config
from dinocxr_fast.data.prepared import (
    INDEX,
    PreparedDataset,
    PreparedSource,
    is_prepared,
)


def _prepared(root: Path) -> PreparedDataset | None:
    """The prepared dataset at ``root`` (``python -m dinocxr_fast.prepare``), if it is one; opened
    once per version of its index (the splits of a run and every kNN evaluation share it)."""
    if not is_prepared(root):
        return None
    return _open_prepared(str(root.resolve()), (root / INDEX).stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open_prepared(root: str, index_mtime_ns: int) -> PreparedDataset:
    return PreparedDataset(root)


def pretrain_source(data_cfg: dict, seed: int) -> Source:
    """Unlabelled images, always through ``data.sources.source_from_config`` (the one way a config
    becomes a source): ``data.source`` (any kind, e.g. ``{kind: dicom, root: ...}`` or
    ``{kind: covidx, csv_path: ..., image_root: ...}``), or the shorthand ``data.path`` / ``csv`` /
    ``split``, or the embedded synthetic phantoms."""
    policy_from_config(data_cfg)
    spec, path = data_cfg.get("source"), data_cfg.get("path")
    if spec is not None:
        if path is not None or data_cfg.get("csv"):
            raise ConfigError("data.source and data.path / data.csv both given: set one of them")
        if not isinstance(spec, dict) or "kind" not in spec:
            raise ConfigError(f"data.source must be a mapping with a kind (imagefolder, dicom, csv, covidx, "
                              f"synthetic), got {spec!r}")
        if spec["kind"] in ("imagefolder", "dicom"):  # pretraining reads flat folders too (no class sub-folders)
            spec = {"labelled": False, **spec}
        try:
            return source_from_config({**spec, "unlabelled": True})
        except DatasetError:
            raise
        except KeyError as exc:
            raise ConfigError(f"data.source of kind {spec['kind']!r} needs the key {exc}") from None
        except (TypeError, ValueError) as exc:  # an unknown kind or argument: a config problem
            raise ConfigError(f"data.source: {exc}") from None
    if path is None:
        return source_from_config({"kind": "synthetic", "n": int(data_cfg["synthetic_count"]),
                                   "size": int(data_cfg["synthetic_size"]), "seed": seed, "unlabelled": True})
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetError(f"data.path {root} does not exist")
    split = data_cfg.get("split")
    prepared = _prepared(root)
    if prepared is not None:
        if split is None and "train" in prepared.splits:
            split = "train"  # as for a labelled folder root: never pretrain on the scored splits
        return prepared.source(split or None, labelled=False)
    if split is None and not data_cfg.get("csv") and (root / "train").is_dir():
        # a labelled root (train/ val/ test/): pretraining must not see the images it is scored on
        split = "train"
    if split:
        root = root / split
        if not root.is_dir():
            raise DatasetError(f"data.split folder {root} does not exist")
    if data_cfg.get("csv"):
        return source_from_config({"kind": "csv", "csv_path": data_cfg["csv"], "image_root": str(root),
                                   "unlabelled": True})
    return source_from_config({"kind": "imagefolder", "root": root, "labelled": False})


def views_config(data_cfg: dict, channels: int, dtype: str = "float32") -> ViewsConfig:
    """The config's view keys as a ``ViewsConfig.from_dict`` mapping (the one way views are built)."""
    kind = data_cfg["views"]
    common = {"channels": channels, "dtype": dtype, "augment": data_cfg.get("augment")}
    if kind == "dino_cxr":
        return ViewsConfig.from_dict({"preset": kind, "size": int(data_cfg["view_size"]),
                                      "n_views": int(data_cfg["n_views"]), "scale": data_cfg["global_scale"], **common})
    if kind == "dino_multicrop":
        return ViewsConfig.from_dict({"preset": kind, "global_size": int(data_cfg["view_size"]),
                                      "local_size": int(data_cfg["local_size"]), "n_local": int(data_cfg["n_local"]),
                                      "global_scale": data_cfg["global_scale"], "local_scale": data_cfg["local_scale"],
                                      **common})
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


def shard_for_rank(source: Source, data_cfg: dict, rank: int, world_size: int) -> tuple[Source, int, int]:
    """(source, shard id, number of shards) of this rank. ``data.shard_by: rank`` (default): every
    rank draws from the whole dataset. ``node`` (prepared datasets, multi-node torchrun): node k
    reads only the pixel files k, k + N, ... (a node-local copy of its part is enough) and its ranks
    shard that part; every node keeps as many images as the smallest, so all ranks run the same steps."""
    mode = data_cfg.get("shard_by", "rank")
    if mode not in ("rank", "node"):
        raise ValueError(f"unknown data.shard_by={mode!r} (rank, node)")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if mode == "rank" or world_size <= local:
        return source, rank, world_size
    if not isinstance(source, PreparedSource):
        raise ValueError("data.shard_by=node needs a prepared dataset (python -m dinocxr_fast.prepare)")
    if world_size % local:
        raise ValueError(f"data.shard_by=node: world size {world_size} is not a multiple of LOCAL_WORLD_SIZE {local}")
    nodes = world_size // local
    parts = [source.for_node(n, nodes) for n in range(nodes)]
    keep = min(len(p) for p in parts)
    mine = parts[rank // local]
    return mine.with_samples(mine.samples[:keep]), rank % local, local


def labelled_split(root: str | Path, split: str) -> Source:
    prepared = _prepared(Path(root).expanduser())
    if prepared is not None:
        return prepared.source(split, labelled=True)
    folder = Path(root).expanduser() / split
    if not folder.is_dir():
        raise DatasetError(f"{folder} does not exist (the kNN monitor needs {Path(root)}/train and /val)")
    return ImageFolderSource(folder)


def has_split(root: str | Path, split: str) -> bool:
    prepared = _prepared(Path(root).expanduser())
    if prepared is not None:
        return split in prepared.splits
    return (Path(root).expanduser() / split).is_dir()


def available_splits(root: str | Path) -> list[str]:
    """The splits a labelled root holds: a prepared dataset's, or a folder's sub-folders."""
    root = Path(root).expanduser()
    prepared = _prepared(root)
    if prepared is not None:
        return sorted(s for s in prepared.splits if s)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_source(root: str | Path, split: str | None, classes) -> Source:
    """A labelled split (or the root itself) of an ImageFolder or a prepared dataset, its labels
    indexed by ``classes``."""
    root = Path(root).expanduser()
    prepared = _prepared(root)
    if prepared is not None:
        return prepared.source(split, classes=classes, labelled=True)
    return ImageFolderSource(root / split if split else root, classes=classes)


def eval_config(size: int, channels: int) -> EvalConfig:
    return EvalConfig.for_size(int(size), channels=channels)


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
    val_split, test_split = data_cfg["val_split"], data_cfg["test_split"]
    if not has_split(root, val_split):
        raise DatasetError(f"{root / val_split} does not exist (a validation split is needed)")
    if has_split(root, test_split):
        val, test = split_source(root, val_split, classes), split_source(root, test_split, classes)
    else:
        held_out, rest = split_by_patient(train.samples, 0.2, int(data_cfg["label_seed"]))
        train, val = train.with_samples(rest), train.with_samples(held_out)
        test, test_split = split_source(root, val_split, classes), val_split
    if fraction < 1.0:
        train = label_fraction(train, fraction, int(data_cfg["label_seed"]))
    for name, source in (("training", train), ("validation", val), ("test", test)):
        empty = [c for c, n in source.class_counts().items() if n == 0]
        if empty:  # AUC, balanced accuracy and class weights need every class
            raise DatasetError(f"the {name} split ({source.root}) has no image of class {', '.join(empty)}: "
                               "every split needs images of every class")
    return train, val, test, test_split


def split_names(data_cfg: dict, reported: str) -> tuple[str, str]:
    """(selection split, reported split) as the console, summary.md and report.md name them: with
    a test/ split, val/ selects and test/ is reported; without, held-out training patients select
    and val/ is reported (see supervised_sources)."""
    if reported == data_cfg["val_split"]:
        return f"20 % of the {data_cfg['train_split']}/ patients, held out", f"{reported}/"
    return f"{data_cfg['val_split']}/", f"{reported}/"


def supervised_train_loader(source: Source, data_cfg: dict, batch_size: int, *, channels: int, device, shard_id: int,
                            num_shards: int, seed: int):
    """Augmented crops with labels for fine-tuning: random-resized crop + flip, (images, labels)."""
    from dinocxr_fast.data import ViewSpec, build_labelled_loader  # noqa: PLC0415

    crop = ViewSpec(size=int(data_cfg["image_size"]), scale=tuple(data_cfg["train_scale"]), flip_p=0.5, jitter_p=0.0,
                    blur_p=0.0, solarize_p=0.0)
    return build_labelled_loader(source, ViewsConfig(views=(crop,), channels=channels), batch_size, device=device,
                                 shard_id=shard_id, num_shards=num_shards, seed=seed, backend=loader_backend(data_cfg),
                                 num_threads=int(data_cfg["num_workers"]), shuffle=True, drop_last=True)
