"""Does DINO-CXR pretraining beat a random backbone on real X-rays it never saw?

    python -m benchmarks.ssl_quality [--quick] [--out DIR] [--json PATH] [--eval-data ROOT]
                                     [--pretrain-minutes M] [--seeds N] [--set KEY=VALUE ...]

The protocol (defaults: the shared data beside the repository):

1. Split ``cxr-pool`` (582 real pediatric X-rays, 429 patients) by patient, stratified by label:
   ``--holdout`` of the patients (30 %) become evaluation images, the rest are pretraining images.
2. Pretrain vitaev2_tiny (preset ``tiny_cpu`` + ``--set`` overrides) on the pretraining images and
   the unlabelled images of the evaluation's training split, for ``--pretrain-minutes`` (the
   schedules are fitted to that budget). Labels are never read; the test images are never seen.
3. Evaluate the teacher backbone and random initialisations (seeds 0..N-1) with the same
   protocols, label fractions and seeds: weighted kNN, the linear probe (``train linear``) and
   fine-tuning (``train finetune``) at 10 % and 100 % of the labelled training images.
   Evaluation data: train = ``cxr-sample/train`` (160), model selection = 20 % of its patients,
   test = ``cxr-sample/val`` (40) + the held-out cxr-pool patients; or ``--eval-data ROOT`` with
   train/, val/ (selection) and test/.
4. The paired bootstrap (same resampled test images for both arms) of the AUC difference
   pretrained minus random init, each arm's AUC averaged over its seeds.

Everything (the symlinked split, the pretraining run, every evaluation run) stays under ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CLASSES = ("normal", "pneumonia")
FRACTIONS = (0.1, 1.0)
PROTOCOLS = ("knn", "linear", "finetune")


# ---- 1. the split ------------------------------------------------------------------------------
def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.is_symlink():
        os.symlink(src.resolve(), dst)


def build_protocol(out: Path, pool: Path, sample: Path, eval_data: Path | None, holdout: float, seed: int) -> dict:
    """Symlinked folders under ``out``: ``pretrain/`` (flat, unlabelled) and ``eval/`` (ImageFolder).
    Returns the folders and their image counts."""
    rows = list(csv.DictReader(open(pool / "manifest.csv", newline="")))
    by_patient: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_patient[r["patient_key"]].append(r)
    held: set[str] = set()
    rng = random.Random(seed)
    if eval_data is None:
        for label in CLASSES:
            patients = sorted(p for p, rs in by_patient.items() if rs[0]["label"] == label)
            rng.shuffle(patients)
            held |= set(patients[: round(holdout * len(patients))])
    counts: dict[str, int] = defaultdict(int)
    for patient, rs in by_patient.items():
        for r in rs:
            src = pool / "images" / r["file"]
            if patient in held:
                _link(src, out / "eval" / "val" / r["label"] / r["file"])
                counts["test (held-out cxr-pool)"] += 1
            else:
                _link(src, out / "pretrain" / r["file"])
                counts["pretrain (cxr-pool)"] += 1
    if eval_data is None:
        for split, name in (("train", "train"), ("val", "val")):
            for label in CLASSES:
                for f in sorted((sample / split / label).iterdir()):
                    _link(f, out / "eval" / name / label / f.name)
                    counts[f"{'train' if split == 'train' else 'test'} (cxr-sample/{split})"] += 1
        eval_root = out / "eval"
    else:
        eval_root = eval_data
    # the labelled training images join the pretraining set without their labels
    for f in sorted((eval_root / "train").rglob("*")):
        if f.is_file() or f.is_symlink():
            _link(f, out / "pretrain" / f"train-{f.parent.name}-{f.name}")
            counts["pretrain (eval train, unlabelled)"] += 1
    return {"pretrain": out / "pretrain", "eval": eval_root, "counts": dict(counts),
            "test_split": "test" if (eval_root / "test").is_dir() else "val"}


# ---- 2. pretraining ----------------------------------------------------------------------------
def pretrain(protocol: dict, run: Path, minutes: float | None, steps: int | None, size: int, sets: list[str]) -> dict:
    """One pretraining run bounded by ``steps`` (reproducible whatever the machine's load) or by
    ``minutes`` of wall time; the schedules span that budget."""
    from dinocxr_fast import train  # noqa: PLC0415

    budget = f"train.max_steps={steps}" if steps else f"train.max_minutes={minutes}"
    argv = ["pretrain", "--out", str(run), "--data", str(protocol["pretrain"]), "--quiet",
            "--knn-data", str(protocol["eval"]), "--set", f"train.knn_size={size}", "--set", f"data.view_size={size}",
            "--set", budget, "--set", "train.epochs=1000", "--set", "optim.warmup_epochs=100",
            "--set", "train.knn_every=20",  # the warm-up: 10 % of the fitted run, as in DINO
            # The committed results (benchmarks/results/*ssl_quality*) were measured at lr 3e-4; the
            # tiny_cpu preset moved to 1e-3 for the 3-minute demo (configs/tiny_cpu.yaml), which this
            # protocol has not been measured with. --set optim.lr=... overrides it.
            "--set", "optim.lr=0.0003"]
    for s in sets:
        argv += ["--set", s]
    t0 = time.perf_counter()
    if train.main(argv) != 0:
        raise SystemExit(f"pretraining failed: python -m dinocxr_fast.train {' '.join(argv)}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return {"command": "python -m dinocxr_fast.train " + " ".join(argv), "seconds": time.perf_counter() - t0,
            "steps": steps[-1]["step"] if steps else 0,
            "loss": [(r["step"], round(r["loss"], 4)) for r in steps[:: max(len(steps) // 20, 1)]],
            "teacher_entropy": [(r["step"], round(r["teacher_entropy"], 3)) for r in steps[:: max(len(steps) // 20, 1)]],
            "knn_monitor": [(r["step"], round(r["knn_acc"], 4)) for r in records if "knn_acc" in r]}


# ---- 3. evaluations ----------------------------------------------------------------------------
def knn_scores(backbone_from: str, seed: int, protocol: dict, fraction: float, size: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Weighted kNN (k=20, T=0.07) of the frozen backbone: (test paths, labels, P(positive))."""
    import torch  # noqa: PLC0415

    from dinocxr_fast.classifier import build_classifier, load_backbone  # noqa: PLC0415
    from dinocxr_fast.dino.knn import knn_classify  # noqa: PLC0415
    from dinocxr_fast.classifier import extract_features  # noqa: PLC0415
    from dinocxr_fast.runtime import data_setup  # noqa: PLC0415

    d = {"path": str(protocol["eval"]), "train_split": "train", "val_split": "val", "test_split": "test",
         "label_fraction": fraction, "label_seed": seed}
    train_src, _, test_src, _ = data_setup.supervised_sources(d)
    torch.manual_seed(seed)
    model = build_classifier("vitaev2_tiny", 1, len(train_src.classes))
    load_backbone(model, None if backbone_from == "none" else backbone_from)
    eval_cfg = data_setup.eval_config(size, 1)

    def no_autocast():
        return torch.autocast("cpu", enabled=False)

    x_tr, y_tr = extract_features(model.backbone, train_src, eval_cfg, torch.device("cpu"), "torch", no_autocast)
    x_te, y_te = extract_features(model.backbone, test_src, eval_cfg, torch.device("cpu"), "torch", no_autocast)
    scores = knn_classify(x_tr, y_tr, x_te, k=20, temperature=0.07, num_classes=len(train_src.classes))
    probs = (scores / scores.sum(1, keepdim=True).clamp_min(1e-12)).numpy()
    return test_src.paths(), y_te.numpy(), probs[:, 1]


def supervised_scores(command: str, backbone_from: str, seed: int, protocol: dict, fraction: float, size: int,
                      run: Path, finetune_epochs: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``train linear`` / ``train finetune`` as a user runs them; their test predictions.csv."""
    from dinocxr_fast import train  # noqa: PLC0415
    from dinocxr_fast.evaluate import read_predictions  # noqa: PLC0415

    argv = [command, "--pretrained", backbone_from, "--data", str(protocol["eval"]), "--out", str(run),
            "--preset", "supervised_tiny_cpu", "--label-fraction", str(fraction), "--quiet",
            "--set", f"train.seed={seed}", "--set", f"data.label_seed={seed}", "--set", f"data.image_size={size}",
            "--set", "eval.bootstrap=100"]
    if command == "finetune":
        argv += ["--set", f"train.epochs={finetune_epochs}"]
    if train.main(argv) != 0:
        raise SystemExit(f"evaluation failed: python -m dinocxr_fast.train {' '.join(argv)}")
    paths, labels, probs, classes = read_predictions(run / "report" / "predictions.csv")
    return paths, labels, probs[:, classes.index(CLASSES[1])]


# ---- 4. the paired bootstrap -------------------------------------------------------------------
def mean_auc(labels: np.ndarray, score_sets: list[np.ndarray], idx: np.ndarray | None = None) -> float:
    from dinocxr_fast.metrics import roc_auc_binary  # noqa: PLC0415

    if idx is None:
        idx = np.arange(labels.size)
    return float(np.mean([roc_auc_binary(labels[idx] == 1, s[idx]) for s in score_sets]))


def paired_bootstrap(labels: np.ndarray, ours: list[np.ndarray], theirs: list[np.ndarray], n_boot: int = 2000,
                     seed: int = 0) -> dict:
    """AUC(ours) - AUC(theirs), each averaged over its seeds, with the percentile 95 % interval of
    the difference over resamples of the test images (the same resample for both arms)."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = rng.integers(0, labels.size, labels.size)
        if labels[idx].min() == labels[idx].max():
            continue
        diffs.append(mean_auc(labels, ours, idx) - mean_auc(labels, theirs, idx))
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return {"auc_pretrained": mean_auc(labels, ours), "auc_random": mean_auc(labels, theirs),
            "diff_auc": mean_auc(labels, ours) - mean_auc(labels, theirs), "ci_low": float(lo), "ci_high": float(hi),
            "n_test": int(labels.size), "n_boot": len(diffs)}


# ---- the run -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pool", default=str(SHARED / "cxr-pool"), help="unlabelled pool with manifest.csv")
    parser.add_argument("--sample", default=str(SHARED / "cxr-sample"), help="labelled ImageFolder (train/, val/)")
    parser.add_argument("--eval-data", help="labelled ImageFolder with train/, val/, test/ (report on test/)")
    parser.add_argument("--holdout", type=float, default=0.3, help="fraction of cxr-pool patients held out for testing")
    parser.add_argument("--pretrain-minutes", type=float, default=35.0, help="wall-time budget of the pretraining")
    parser.add_argument("--pretrain-steps", type=int, help="a step budget instead of --pretrain-minutes (results then do "
                        "not depend on the machine's speed or load)")
    parser.add_argument("--size", type=int, default=64, help="view and evaluation size (px)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the random-init baseline and of the probes")
    parser.add_argument("--finetune-epochs", type=int, default=20)
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--pretrained", help="evaluate this pretraining run instead of pretraining")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="pretraining config override")
    parser.add_argument("--out", default="runs/ssl_quality")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--quick", action="store_true", help="a 10-minute smoke run: 4 min of pretraining, 2 seeds")
    args = parser.parse_args(argv)
    if args.quick:
        args.pretrain_minutes, args.seeds, args.finetune_epochs = 4.0, 2, 8
    pool, sample = Path(args.pool), Path(args.sample)
    eval_data = Path(args.eval_data) if args.eval_data else None
    for need in ([pool / "manifest.csv"] + ([sample / "train", sample / "val"] if eval_data is None else
                                            [eval_data / "train", eval_data / "val", eval_data / "test"])):
        if not need.exists():
            print(f"error: {need} not found (see --pool, --sample, --eval-data)", file=sys.stderr)
            return 2
    out = Path(args.out)
    t0 = time.perf_counter()
    protocol = build_protocol(out / "data", pool, sample, eval_data, args.holdout, seed=0)
    print("images:", ", ".join(f"{k}: {v}" for k, v in protocol["counts"].items()), flush=True)
    if args.pretrained:
        pre = {"run": args.pretrained}
        backbone = args.pretrained
    else:
        pre = pretrain(protocol, out / "pretrain", args.pretrain_minutes, args.pretrain_steps, args.size, args.set)
        backbone = str(out / "pretrain")
        print(f"pretrained {pre['steps']} steps in {pre['seconds']:.0f} s; kNN monitor {pre['knn_monitor']}", flush=True)

    seeds = list(range(args.seeds))
    protocols = [p for p in args.protocols.split(",") if p]
    scores: dict = {}
    for proto in protocols:
        for fraction in FRACTIONS:
            for arm, source in (("pretrained", backbone), ("random", "none")):
                for seed in seeds:
                    run = out / "eval" / f"{proto}-{fraction}-{arm}-{seed}"
                    if proto == "knn":
                        paths, labels, s = knn_scores(source, seed, protocol, fraction, args.size)
                    else:
                        paths, labels, s = supervised_scores(proto, source, seed, protocol, fraction, args.size, run,
                                                             args.finetune_epochs)
                    scores[(proto, fraction, arm, seed)] = (paths, labels, s)
            print(f"{proto} at {fraction:.0%} labels: done ({time.perf_counter() - t0:.0f} s)", flush=True)

    comparisons = []
    for proto in protocols:
        for fraction in FRACTIONS:
            paths, labels, _ = scores[(proto, fraction, "pretrained", 0)]
            for arm in ("pretrained", "random"):
                for seed in seeds:
                    if scores[(proto, fraction, arm, seed)][0] != paths:
                        raise RuntimeError(f"{proto} {fraction} {arm} seed {seed}: test images differ between runs")
            result = paired_bootstrap(labels, [scores[(proto, fraction, "pretrained", s)][2] for s in seeds],
                                      [scores[(proto, fraction, "random", s)][2] for s in seeds])
            comparisons.append({"protocol": proto, "label_fraction": fraction, **result})

    print(f"\n{'protocol':<9} {'labels':>6} {'AUC DINO-CXR':>12} {'AUC random':>10} {'diff':>7} {'95% CI':>17}")
    for c in comparisons:
        print(f"{c['protocol']:<9} {c['label_fraction']:>6.0%} {c['auc_pretrained']:>12.4f} {c['auc_random']:>10.4f} "
              f"{c['diff_auc']:>+7.4f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]")
    summary = {"command": "python -m benchmarks.ssl_quality " + " ".join(sys.argv[1:] if argv is None else argv),
               "images": protocol["counts"], "seeds": seeds, "size": args.size, "pretraining": pre,
               "seconds": time.perf_counter() - t0, "comparisons": comparisons,
               "per_seed_auc": {f"{p}-{f}-{a}-{s}": mean_auc(v[1], [v[2]]) for (p, f, a, s), v in scores.items()}}
    print(f"\ntotal {summary['seconds'] / 60:.1f} min", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
