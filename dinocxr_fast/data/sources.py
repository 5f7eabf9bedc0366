"""Dataset sources: ImageFolder trees, CSV/TXT lists (COVIDx), DICOM trees. Each is a Source."""
from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .imageio import IMAGE_EXTENSIONS, dicom_patient_id
from .samples import UNLABELLED, DatasetError, Sample, Source
from .subsets import label_fraction

log = logging.getLogger("dinocxr_fast.data")
PatientFn = Callable[[str], "str | None"]


def kermany_patient_id(path: str) -> str | None:
    """Patient of a Kermany chest_xray file name; keys as in cxr-sample's manifest.

    ``person1001_bacteria_2932.jpeg`` -> ``P1001``; ``IM-0117-0001.jpeg`` -> ``N-117``;
    ``NORMAL2-IM-1427-0001.jpeg`` -> ``N2-1427``; anything else -> None (one group per file).
    """
    name = os.path.basename(path)
    m = re.match(r"person(\d+)_", name)
    if m:
        return f"P{int(m.group(1))}"
    m = re.match(r"(NORMAL2-)?IM-(\d+)-", name)
    if m:
        return f"{'N2' if m.group(1) else 'N'}-{int(m.group(2))}"
    return None


def _require_dir(root: Path) -> None:
    if not root.exists():
        raise DatasetError(f"dataset path does not exist: {root}")
    if not root.is_dir():
        raise DatasetError(f"dataset path is not a directory: {root}")


def scan_images(folder: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Image files under ``folder`` (recursive, hidden entries skipped), sorted for a stable order.

    Directory symlinks are followed, but every directory is read once: a link back to a folder
    already scanned (a loop, or a second way into the same folder) is named in the log and
    skipped. Links to nothing are listed: reading them fails, and the loaders name them."""
    exts = tuple(e.lower() for e in extensions)
    found = []
    seen: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            kind = "a symlink loop" if seen[key] == os.path.commonpath([seen[key], dirpath]) else "a second link"
            log.warning("skipping %s: %s to %s, which is read once", dirpath, kind, seen[key])
            dirnames[:] = []
            continue
        seen[key] = dirpath
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".") and f.lower().endswith(exts)]
    return sorted(found)


class ImageFolderSource(Source):
    """``root/<class>/**/<image>``: class names are the sub-folder names, sorted.

    ``labelled=False`` takes every image under ``root`` (any depth) without labels, e.g. the whole
    Kermany ``chest_xray/`` tree for pretraining. ``patient_id`` maps a path to a patient key
    (default: Kermany file names; None: every file its own patient).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        labelled: bool = True,
        classes: Sequence[str] | None = None,
        patient_id: PatientFn | None = kermany_patient_id,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        root = Path(root)
        _require_dir(root)
        pid = patient_id or (lambda p: None)
        if not labelled:
            samples = [Sample(p, UNLABELLED, pid(p)) for p in scan_images(root, extensions)]
            classes = ()
        else:
            found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
            if not found:
                raise DatasetError(f"no class sub-folders in {root} (use labelled=False for a flat folder)")
            if classes is None:
                classes = found
            missing = [c for c in classes if c not in found]
            if missing:
                raise DatasetError(f"class folder(s) {missing} not found in {root} (found {found})")
            samples = [Sample(p, ci, pid(p)) for ci, c in enumerate(classes) for p in scan_images(root / c, extensions)]
        if not samples:
            raise DatasetError(f"no images ({', '.join(extensions)}) found under {root}")
        super().__init__(samples, classes, str(root))


class DicomSource(ImageFolderSource):
    """A tree of DICOM files; patient ids come from the PatientID tag (header only is read).

    Unlabelled by default; ``labelled=True`` reads class sub-folders like ImageFolderSource.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        labelled: bool = False,
        classes: Sequence[str] | None = None,
        extensions: Sequence[str] = (".dcm", ".dicom"),
    ) -> None:
        super().__init__(root, labelled=labelled, classes=classes, patient_id=dicom_patient_id, extensions=extensions)


def _sniff_delimiter(first_line: str) -> str | None:
    for d in (",", "\t", ";"):
        if d in first_line:
            return d
    return None  # runs of whitespace (COVIDx .txt files)


class CsvSource(Source):
    """A list file of images relative to ``image_root`` (default: the list's folder).

    With ``columns`` the file has no header row and those are its column names (COVIDx:
    ``patient_id filename label source``, space separated); otherwise the first row is the header.
    ``where={"split": "train"}`` keeps matching rows only. ``patient_col="auto"`` uses a
    ``patient_id`` column if the list has one. Listed files that do not exist are
    logged and left out; a list whose files are all missing is an error.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        *,
        path_col: str = "filename",
        label_col: str | None = "label",
        patient_col: str | None = "auto",
        columns: Sequence[str] | None = None,
        delimiter: str | None = "auto",
        classes: Sequence[str] | None = None,
        where: Mapping[str, str] | None = None,
    ) -> None:
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise DatasetError(f"list file does not exist: {csv_path}")
        root = Path(image_root) if image_root is not None else csv_path.parent
        _require_dir(root)
        rows = self._read_rows(csv_path, columns, delimiter)
        if not rows:
            raise DatasetError(f"list file has no rows: {csv_path}")
        if patient_col == "auto":  # optional: use a patient_id column when there is one
            patient_col = "patient_id" if "patient_id" in rows[0] else None
        for col in (path_col, label_col, patient_col):
            if col is not None and col not in rows[0]:
                raise DatasetError(f"{csv_path} has no column {col!r} (columns: {list(rows[0])})")
        rows = [r for r in rows if all(r.get(k) == v for k, v in (where or {}).items())]
        if label_col is not None:
            names = sorted({r[label_col] for r in rows}) if classes is None else list(classes)
            index = {c: i for i, c in enumerate(names)}
            unknown = sorted({r[label_col] for r in rows} - set(index))
            if unknown:
                raise DatasetError(f"{csv_path}: labels {unknown} are not among classes {names}")
        else:
            names, index = [], {}
        samples, missing = [], []
        for r in rows:
            path = str(root / r[path_col])
            if not os.path.exists(path):
                missing.append(path)
                continue
            label = index[r[label_col]] if label_col is not None else UNLABELLED
            pid = (r.get(patient_col) or None) if patient_col else None
            samples.append(Sample(path, label, pid))
        if missing:
            log.warning("%s: %d listed file(s) missing under %s, left out (first: %s)", csv_path, len(missing), root, missing[0])
        if not samples:
            raise DatasetError(f"none of the {len(rows)} files listed in {csv_path} exist under {root}")
        super().__init__(samples, names, str(root))

    @staticmethod
    def _read_rows(path: Path, columns: Sequence[str] | None, delimiter: str | None) -> list[dict[str, str]]:
        with open(path, newline="") as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        if not lines:
            return []
        if delimiter == "auto":
            delimiter = _sniff_delimiter(lines[0])
        if delimiter is None:
            table = [ln.split() for ln in lines]
        else:
            table = [[c.strip() for c in row] for row in csv.reader(lines, delimiter=delimiter)]
        header = list(columns) if columns is not None else table.pop(0)
        return [dict(zip(header, row)) for row in table]

    @classmethod
    def covidx(cls, list_path: str | os.PathLike, image_root: str | os.PathLike, **kw: Any) -> "CsvSource":
        """A COVIDx split file (``train.txt``/``test.txt``: patient_id filename label source)."""
        return cls(list_path, image_root, columns=("patient_id", "filename", "label", "source"), delimiter=None, **kw)


def source_from_config(cfg: Mapping[str, Any]) -> Source:
    """Build a source from a YAML mapping: ``{kind: imagefolder|dicom|csv|covidx|synthetic, ...}``.

    The other keys are the constructor's arguments (``root`` for folders, ``csv_path`` /
    ``image_root`` for lists, ``n``/``size``/``seed`` for phantoms); ``label_fraction`` and
    ``label_seed`` take a subset; ``unlabelled: true`` drops the labels.
    """
    cfg = dict(cfg)
    kind = cfg.pop("kind", "imagefolder")
    fraction = cfg.pop("label_fraction", None)
    label_seed = cfg.pop("label_seed", 0)
    unlabelled = cfg.pop("unlabelled", False)
    if kind == "imagefolder":
        src: Source = ImageFolderSource(cfg.pop("root"), **cfg)
    elif kind == "dicom":
        src = DicomSource(cfg.pop("root"), **cfg)
    elif kind == "csv":
        src = CsvSource(cfg.pop("csv_path"), cfg.pop("image_root", None), **cfg)
    elif kind == "covidx":
        src = CsvSource.covidx(cfg.pop("csv_path"), cfg.pop("image_root"), **cfg)
    elif kind == "synthetic":
        from .synthetic import SyntheticSource

        src = SyntheticSource(**cfg)
    else:
        raise ValueError(f"unknown source kind {kind!r} (imagefolder, dicom, csv, covidx, synthetic)")
    if fraction is not None and float(fraction) < 1.0:
        src = label_fraction(src, float(fraction), int(label_seed))
    return src.unlabelled() if unlabelled else src
