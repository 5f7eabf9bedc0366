"""Does DINO-CXR pretraining help? One reproducible experiment on ../shared/data/cxr-sample.

    python -m benchmarks.ssl_quality [--steps N] [--view-size S] [--out DIR] [--json PATH] [--quick]

1. pretrain vitaev2_tiny on the 160 train images with their labels ignored, for a fixed budget;
2. linear-probe the teacher backbone on the train labels (a grid of heads on cached features,
   selection on a patient-grouped 20 % of train) and evaluate on val (40 images);
3. the same probe on a randomly initialised backbone, in the same run.

Prints accuracy and AUC of both (with bootstrap 95 % intervals) and the teacher-entropy trace of
the pretraining (collapse watch: log K means uniform outputs, 0 means one-hot).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from dinocxr_fast import train

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr-sample"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SAMPLE))
    parser.add_argument("--steps", type=int, default=950, help="pretraining steps (batch 32)")
    parser.add_argument("--view-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64, help="linear-probe eval crop")
    parser.add_argument("--teacher-temp", type=float, default=0.02)
    parser.add_argument("--out", default="runs/ssl_quality")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--quick", action="store_true", help="40 pretraining steps (a smoke run, not a result)")
    args = parser.parse_args(argv)
    data = Path(args.data)
    if not (data / "train").is_dir():
        raise SystemExit(f"{data}/train not found: pass --data PATH to an ImageFolder with train/ and val/")
    steps = 40 if args.quick else args.steps
    out = Path(args.out)
    t0 = time.perf_counter()
    pre = out / "pretrain"
    code = train.main([
        "pretrain", "--out", str(pre), "--data", str(data), "--quiet", "--set", "data.split=train",
        "--set", f"data.view_size={args.view_size}", "--set", "optim.batch_size=32",
        "--set", f"train.max_steps={steps}", "--set", f"train.epochs={max(math.ceil(steps / 5), 10)}",
        "--set", "optim.warmup_epochs=5", "--set", "train.log_every=10", "--set", "train.ckpt_every=100000",
        "--knn-data", str(data), "--set", f"train.knn_size={args.view_size}",
        "--set", f"dino.teacher_temp={args.teacher_temp}", "--set", f"dino.warmup_teacher_temp={args.teacher_temp}",
    ])
    if code != 0:
        raise SystemExit(f"pretraining failed with exit code {code}")
    pretrain_s = time.perf_counter() - t0
    records = [json.loads(line) for line in (pre / "metrics.jsonl").read_text().splitlines()]
    trace = [(r["step"], round(r["loss"], 4), round(r["teacher_entropy"], 3)) for r in records if "loss" in r]
    knn = [(r["step"], round(r["knn_acc"], 4)) for r in records if "knn_acc" in r]

    results = {}
    for name, pretrained in (("dino_cxr", str(pre)), ("random_init", "none")):
        run = out / f"linear_{name}"
        assert train.main(["linear", "--data", str(data), "--pretrained", pretrained, "--out", str(run),
                           "--preset", "supervised_tiny_cpu", "--set", f"data.image_size={args.image_size}",
                           "--quiet"]) == 0
        res = json.loads((run / "linear_results.json").read_text())
        results[name] = {"accuracy": res["test"]["accuracy"], "roc_auc": res["test"]["roc_auc"],
                         "f1": res["test"]["f1"], "ci95": {k: res["test_ci95"][k] for k in ("accuracy", "roc_auc")},
                         "head": res["best"]}

    k = 1024  # tiny_cpu out_dim
    print(f"\npretraining: {steps} steps of vitaev2_tiny on {data}/train (labels unused), views "
          f"{args.view_size} px, {pretrain_s:.0f} s; loss / teacher entropy (log K = {math.log(k):.2f}):")
    for step, loss, ent in trace[:: max(len(trace) // 12, 1)] + trace[-1:]:
        print(f"  step {step:4d}  loss {loss:.4f}  teacher entropy {ent:.3f}")
    print("kNN accuracy of the teacher features on val, by step:", knn)
    print(f"\nlinear probe on train labels, evaluated on {data}/val (40 images):")
    print(f"{'backbone':<12} {'accuracy':>9} {'95% CI':>16} {'AUC':>7} {'95% CI':>16}")
    for name, r in results.items():
        a, u = r["ci95"]["accuracy"], r["ci95"]["roc_auc"]
        print(f"{name:<12} {r['accuracy']:9.4f} [{a[0]:.3f}, {a[1]:.3f}] {r['roc_auc']:7.4f} [{u[0]:.3f}, {u[1]:.3f}]")
    d_acc = results["dino_cxr"]["accuracy"] - results["random_init"]["accuracy"]
    d_auc = results["dino_cxr"]["roc_auc"] - results["random_init"]["roc_auc"]
    print(f"DINO-CXR minus random: accuracy {d_acc:+.4f}, AUC {d_auc:+.4f}")
    summary = {"steps": steps, "view_size": args.view_size, "pretrain_seconds": pretrain_s, "trace": trace, "knn": knn,
               "results": results, "delta_accuracy": d_acc, "delta_auc": d_auc}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
