"""``python -m dinocxr_fast.evaluate --checkpoint CLASSIFIER --data PATH``: the evaluation report.

Scores a classifier checkpoint (written by ``train finetune`` or ``train linear``) on a labelled
ImageFolder split and writes ``report.md``, ``metrics.json`` (every metric with its 95 %
bootstrap interval), ``roc.png`` and ``confusion.png``.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from dinocxr_fast import cli
from dinocxr_fast.cli import parser as cli_parser
from dinocxr_fast.metrics import SCALAR_METRICS, bootstrap_ci, classification_metrics, roc_curve

log = logging.getLogger("dinocxr_fast.evaluate")


class MissingClassError(ValueError):
    """A split lacks (readable images of) a class: AUC and the per-class metrics are undefined."""


def require_every_class(y_true: np.ndarray, classes: Sequence[str], what: str) -> None:
    """Raise MissingClassError naming the classes ``what`` has no (readable) image of."""
    counts = np.bincount(np.asarray(y_true, dtype=np.int64), minlength=len(classes))
    missing = [c for c, n in zip(classes, counts) if n == 0]
    if missing:
        raise MissingClassError(
            f"{what} has no readable image of class {', '.join(missing)} ({len(y_true)} images of "
            f"{', '.join(c for c, n in zip(classes, counts) if n) or 'no class'}): ROC AUC and balanced accuracy "
            "are undefined; give every split images of every class (evaluate --allow-one-class reports the "
            "defined metrics only)")


def undefined_metrics(y_true: np.ndarray, num_classes: int) -> list[str]:
    """The report's metrics that one-class data cannot define."""
    present = np.unique(np.asarray(y_true)).size
    return [] if present == num_classes else ["roc_auc", "balanced_accuracy", "f1", "precision", "recall",
                                              "specificity"]


def evaluate_predictions(y_true: np.ndarray, probs: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    metrics = classification_metrics(y_true, probs)
    metrics["ci95"] = bootstrap_ci(y_true, probs, n_boot=n_boot, seed=seed) if n_boot > 0 else {}
    metrics["bootstrap_resamples"] = n_boot
    return metrics


def _wrapped(title: str) -> str:
    import textwrap  # noqa: PLC0415

    return "\n".join(textwrap.wrap(title, 48))


def plot_roc(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path, title: str,
             metrics: dict | None = None) -> None:
    """ROC curve(s) with the number of images and, for two classes, the AUC with its 95 % interval
    and the operating point of the reported predictions (the most probable class)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(4.6, 4.8), dpi=100)
    targets = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    counts = np.bincount(np.asarray(y_true, dtype=np.int64), minlength=len(classes))
    ci = (metrics or {}).get("ci95", {}).get("roc_auc")
    for c in targets:
        fpr, tpr, _ = roc_curve(y_true == c, probs[:, c])
        auc = float(np.trapezoid(tpr, fpr))
        interval = f", 95 % CI {ci[0]:.3f}-{ci[1]:.3f}" if ci is not None and len(targets) == 1 else ""
        ax.plot(fpr, tpr, lw=2, label=f"{classes[c]}: AUC {auc:.3f}{interval}")
    if metrics is not None and len(classes) == 2:
        cm = np.asarray(metrics["confusion_matrix"], dtype=np.float64)
        point = (cm[0, 1] / max(cm[0].sum(), 1), cm[1, 1] / max(cm[1].sum(), 1))
        ax.plot(*point, "o", ms=8, mfc="none", mec="black", mew=1.5,
                label=f"operating point (most probable class): sens {point[1]:.2f}, spec {1 - point[0]:.2f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    n = ", ".join(f"{counts[i]} {name}" for i, name in enumerate(classes))
    ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(_wrapped(title) + f"\n{int(counts.sum())} images ({n})", fontsize=8)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    """Counts and row percentages (the share of each true class given each prediction)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    cm = np.asarray(cm)
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(2.4 + 1.2 * len(classes), 2.2 + 1.0 * len(classes)), dpi=100)
    shown = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}\n{rows[i, j]:.0%}", ha="center", va="center", fontsize=9,
                    color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted (most probable class)")
    ax.set_ylabel("true")
    ax.set_title(_wrapped(title) + f"\n{int(cm.sum())} images; counts and % of each true class", fontsize=8)
    bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the true class", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_predictions(path: Path, paths: Sequence[str], y_true: np.ndarray, probs: np.ndarray,
                      classes: Sequence[str]) -> None:
    """One row per image: path, true label, and the probability of each class."""
    if len(paths) != len(y_true):  # the loader skipped unreadable files: rows no longer map to paths
        log.warning("not writing %s: %d predictions for %d files (unreadable files were skipped)",
                    path, len(y_true), len(paths))
        return
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", *[f"prob_{c}" for c in classes]])
        for p, y, row in zip(paths, y_true, probs):
            writer.writerow([p, classes[int(y)], *[f"{v:.6g}" for v in row]])


def read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(paths, labels as class indices, probs [N, C], classes) of a predictions.csv."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    classes = [h[len("prob_"):] for h in rows[0][2:]]
    paths = [r[0] for r in rows[1:]]
    labels = np.array([classes.index(r[1]) for r in rows[1:]], dtype=np.int64)
    probs = np.array([[float(v) for v in r[2:]] for r in rows[1:]], dtype=np.float64).reshape(len(paths), len(classes))
    return paths, labels, probs, classes


def write_report(out_dir: Path, y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], *,
                 title: str, meta: dict, n_boot: int = 1000, paths: Sequence[str] | None = None,
                 allow_one_class: bool = False) -> dict:
    """Metrics with CIs -> metrics.json, report.md, roc.png, confusion.png in ``out_dir``; with
    ``paths`` (one per row of ``probs``) also predictions.csv, so runs can be compared per image.

    Data without every class is an error (MissingClassError), unless ``allow_one_class``: then the
    metrics it cannot define are listed as undefined, in metrics.json and in the report."""
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    if not allow_one_class:
        require_every_class(y_true, classes, title)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = evaluate_predictions(y_true, probs, n_boot=n_boot)
    undefined = undefined_metrics(y_true, len(classes))
    for key in undefined:
        metrics[key] = float("nan")
    metrics["undefined"] = undefined
    record = {"title": title, "classes": list(classes), **meta, "metrics": metrics}
    (out_dir / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")  # NaN for the undefined
    if paths is not None:
        write_predictions(out_dir / "predictions.csv", paths, y_true, probs, classes)
    plot_roc(y_true, probs, classes, out_dir / "roc.png", title, metrics)
    plot_confusion(np.array(metrics["confusion_matrix"]), classes, out_dir / "confusion.png", title)
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    positive = f" (positive class: {classes[1]})" if len(classes) == 2 else " (macro averages)"
    lines += ["", f"{metrics['n']} images, classes {list(classes)}{positive}.", "",
              "| metric | value | 95 % CI (bootstrap) |", "|---|---|---|"]
    for key in SCALAR_METRICS:
        if key in undefined:
            lines.append(f"| {key} | undefined (one class only) | |")
            continue
        lo, hi = metrics["ci95"].get(key, (float("nan"), float("nan")))
        lines.append(f"| {key} | {metrics[key]:.4f} | [{lo:.4f}, {hi:.4f}] |")
    lines += ["", "Confusion matrix (rows: true, columns: predicted):", "",
              "| | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for name, row in zip(classes, metrics["confusion_matrix"]):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", "![ROC](roc.png) ![confusion matrix](confusion.png)", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return metrics


def run_label(checkpoint: str | Path) -> str:
    """RUN/classifier.pt, naming the run a figure is about."""
    path = Path(checkpoint)
    path = path / "classifier.pt" if path.is_dir() else path
    return f"{path.parent.name}/{path.name}"


def check_split(root: Path, split: str | None) -> None:
    """A missing folder or split is one line naming the splits that exist."""
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such folder")
    from dinocxr_fast.runtime import data_setup  # noqa: PLC0415  (torch: after --help)

    if split and not data_setup.has_split(root, split):
        present = data_setup.available_splits(root)
        raise FileNotFoundError(f"--split {split}: {root} has no {split}/ folder (it has: {', '.join(present) or 'none'}); "
                                f"pick one of those, e.g. --split {present[-1] if present else 'val'}")


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, out_dir: str | Path, *, split: str | None = None,
                        loader: str = "auto", n_boot: int = 1000, batch_size: int = 64, device: str = "auto",
                        allow_one_class: bool = False, show_progress: bool = False) -> dict:
    """Score ``checkpoint`` on ``data`` (/``split``) into ``out_dir``; with ``show_progress`` (the
    command line), a start-up block and a progress line per batch on stderr first."""
    from dinocxr_fast.classifier import load_classifier, predict  # noqa: PLC0415
    from dinocxr_fast.data import EvalConfig, build_labelled_loader  # noqa: PLC0415
    from dinocxr_fast.runtime import backends  # noqa: PLC0415
    from dinocxr_fast.runtime import data_setup  # noqa: PLC0415
    from dinocxr_fast.runtime import distributed  # noqa: PLC0415
    from dinocxr_fast.runtime.run_log import Progress, print_startup  # noqa: PLC0415

    root = Path(data).expanduser()
    folder = root / split if split else root
    check_split(root, split)
    dev = distributed.device_from(device)
    model, record = load_classifier(checkpoint, dev)
    source = data_setup.split_source(root, split, record["classes"])
    eval_cfg = EvalConfig.from_dict(record["eval"])
    backend = data_setup.loader_backend({"loader": loader})
    out_dir = Path(out_dir)
    m = record["model"]
    if show_progress:
        plan = backends.plan(lambda: backends.model_calls(
            model, batch=min(batch_size, max(len(source), 1)), channels=int(m["in_chans"]), size=eval_cfg.crop,
            device=dev), dev, out_dir=out_dir)
        print_startup("evaluation", [
            ("report folder", out_dir), ("device", f"{dev}, fp32"), ("loader", backend),
            ("model", f"{m['arch']} from {checkpoint}, classes {list(record['classes'])}"),
            ("data", f"{len(source)} images from {folder}"),
            ("backends", plan.summary),
            ("work", f"{math.ceil(len(source) / batch_size)} batches of {batch_size} at {eval_cfg.crop} px, then "
                     f"{n_boot} bootstrap resamples for the 95 % intervals")])
    dl = build_labelled_loader(source, eval_cfg, batch_size, device=dev, backend=backend, num_threads=2)
    progress = Progress(len(dl), enabled=show_progress, unit="batch", desc=f"scoring {folder.name}/")
    try:
        probs, labels = predict(model, dl, progress=progress)
        skipped = dl.skipped
    finally:
        progress.close()
        dl.close()
    meta = {"checkpoint": str(checkpoint), "data": str(folder), "arch": record["model"]["arch"],
            "eval_transform": f"resize {eval_cfg.resize}, centre crop {eval_cfg.crop}",
            "unreadable_files_skipped": len(skipped)}
    return write_report(out_dir, labels.numpy(), probs.numpy(), record["classes"], paths=source.paths(),
                        title=f"Evaluation of {run_label(checkpoint)}, reported split: {folder.name}/", meta=meta,
                        n_boot=n_boot, allow_one_class=allow_one_class)


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser("python -m dinocxr_fast.evaluate", __doc__.split("\n\n")[1].strip())
    parser.add_argument("--checkpoint", required=True, help="classifier.pt (or the run folder holding it)")
    parser.add_argument("--data", required=True, help="labelled ImageFolder root (class sub-folders), or its parent with "
                        "--split; or a prepared dataset (python -m dinocxr_fast.prepare)")
    parser.add_argument("--split", help="sub-folder of --data to score, e.g. val or test; default: --data itself")
    parser.add_argument("--out", help="report folder; default: <checkpoint folder>/eval-<data name>[-<split>]")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95 %% CIs (0: none)")
    parser.add_argument("--loader", default="auto", choices=("auto", "dali", "torch"),
                        help="image decoding: DALI, the PIL/torch DataLoader, or DALI when installed")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    parser.add_argument("--allow-one-class", action="store_true",
                        help="score data that lacks a class: the metrics it cannot define are reported as undefined")
    parser.add_argument("--quiet", action="store_true", help="no start-up block and no progress display")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    ckpt_path = Path(args.checkpoint)
    out = Path(args.out) if args.out else (ckpt_path if ckpt_path.is_dir() else ckpt_path.parent) / \
        f"eval-{Path(args.data).name}{'-' + args.split if args.split else ''}"
    try:
        metrics = evaluate_checkpoint(ckpt_path, args.data, out, split=args.split, loader=args.loader,
                                      n_boot=args.bootstrap, device=args.device, allow_one_class=args.allow_one_class,
                                      show_progress=not args.quiet)
    except cli.USER_ERRORS as exc:
        return cli.user_error(exc)
    print((out / "report.md").read_text())
    auc = "undefined (one class only)" if "roc_auc" in metrics["undefined"] else f"{metrics['roc_auc']:.4f}"
    print(f"wrote {out}/report.md, metrics.json, roc.png, confusion.png (accuracy {metrics['accuracy']:.4f}, "
          f"AUC {auc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
