"""Linear evaluation: frozen backbone, features extracted once and cached on disk, then a whole
grid of linear heads (learning rates x weight decays) trained together in one pass per epoch
over the cached features. The head with the best validation metric is picked; its test metrics
are the result. The pick is saved as a plain classifier (standardisation folded into the head).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dinocxr_fast import optim
from dinocxr_fast.classifier import (
    FEATURE_BATCH,
    build_classifier,
    classifier_record,
    extract_features,
    load_backbone,
    save_classifier,
)
from dinocxr_fast.data import Source
from dinocxr_fast.data.prepared import PreparedSource
from dinocxr_fast.evaluate import require_every_class, write_report
from dinocxr_fast.metrics import classification_metrics
from dinocxr_fast.runtime import backends as backend_plan
from dinocxr_fast.runtime import checkpoint as ckpt
from dinocxr_fast.runtime import data_setup
from dinocxr_fast.runtime import distributed
from dinocxr_fast.runtime.precision import autocast as precision_autocast
from dinocxr_fast.runtime.precision import resolve_precision
from dinocxr_fast.runtime.run_log import MetricsWriter, Progress, print_startup


def _source_fingerprint(source: Source) -> list:
    if isinstance(source, PreparedSource):  # the stored pixels, wherever the source files are now
        return [[s.path, s.label, source.dataset.entries[k].crc32] for s, k in zip(source.samples, source.entry_ids)]
    rows = []
    for s in source.samples:
        try:
            st = Path(s.path).stat()
            rows.append([s.path, s.label, st.st_size, int(st.st_mtime)])
        except OSError:
            rows.append([s.path, s.label, -1, -1])
    return rows


def cache_key(backbone: torch.nn.Module, sources: dict[str, Source], eval_cfg: dict) -> str:
    """Same weights, same files, same transform -> same key."""
    h = hashlib.sha256()
    for name, t in sorted(backbone.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps({k: _source_fingerprint(v) for k, v in sorted(sources.items())}).encode())
    h.update(json.dumps(eval_cfg, sort_keys=True).encode())
    return h.hexdigest()[:24]


def train_head_grid(x_train: torch.Tensor, y_train: torch.Tensor, num_classes: int, lrs: list[float],
                    weight_decays: list[float], *, epochs: int, batch_size: int, class_weights: torch.Tensor,
                    seed: int = 0, progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor, list[tuple]]:
    """SGD (momentum 0.9, cosine lr) on every (lr, wd) head at once. Returns W [G, D, C], b [G, C]
    and the grid [(lr, wd), ...]. Heads share the minibatches but not their parameters."""
    grid = [(float(lr), float(wd)) for lr in lrs for wd in weight_decays]
    g, d = len(grid), x_train.shape[1]
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(g, d, num_classes, generator=gen) * 0.01
    b = torch.zeros(g, num_classes)
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    lr = torch.tensor([p[0] for p in grid]).view(g, 1, 1)
    wd = torch.tensor([p[1] for p in grid]).view(g, 1, 1)
    n = x_train.shape[0]
    steps_per_epoch = max(math.ceil(n / batch_size), 1)
    total = epochs * steps_per_epoch
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            xb, yb = x_train[idx], y_train[idx]
            w.requires_grad_(True)
            b.requires_grad_(True)
            logits = torch.einsum("nd,gdc->gnc", xb, w) + b[:, None, :]
            # sum over heads of each head's weighted-mean cross-entropy: independent gradients
            loss = F.cross_entropy(logits.reshape(-1, num_classes), yb.repeat(g), reduction="none").view(g, -1)
            loss = (loss * class_weights[yb][None]).sum(1) / class_weights[yb].sum()
            gw, gb = torch.autograd.grad(loss.sum(), (w, b))
            with torch.no_grad():
                w, b = w.detach(), b.detach()
                scale = 0.5 * (1 + math.cos(math.pi * step / total))
                vw.mul_(0.9).add_(gw + wd * w)
                vb.mul_(0.9).add_(gb)
                w -= lr * scale * vw
                b -= lr.view(g, 1) * scale * vb
            step += 1
        if progress is not None:
            progress.update(epoch + 1, {"heads": str(g)})
    return w.detach(), b.detach(), grid


def run_linear(cfg: dict, run_dir: Path, *, show_progress: bool = True) -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    from dinocxr_fast.config import save_config  # noqa: PLC0415

    save_config(cfg, run_dir / "config.yaml")
    d, m, lin, t = cfg["data"], cfg["model"], cfg["linear"], cfg["train"]
    torch.manual_seed(int(t["seed"]))
    device = distributed.device_from(t["device"])
    precision = resolve_precision(t["precision"], device)

    def autocast():
        return precision_autocast(device, precision)

    train_src, val_src, test_src, test_split = data_setup.supervised_sources(d)
    classes = list(train_src.classes)
    in_chans = int(m["in_chans"])
    model = build_classifier(m["arch"], in_chans, len(classes))
    origin = load_backbone(model, m["pretrained"])
    model.to(device).eval()
    eval_cfg = data_setup.eval_config(d["image_size"], in_chans)
    sources = {"train": train_src, "val": val_src, "test": test_src}

    selection, reported = data_setup.split_names(d, test_split)
    key = cache_key(model.backbone, sources, eval_cfg.to_dict())
    cache_dir = Path(lin["cache_dir"]).expanduser() if lin["cache_dir"] else run_dir / "features"
    cache = cache_dir / f"features-{key}.pt"
    if cache.is_file():
        backends_line = f"none run: the features are cached ({cache})"
    else:  # the fused ops of the frozen backbone's forward, at the extraction's batch sizes
        batches = sorted({min(FEATURE_BATCH, len(src)) for src in sources.values()})
        backends_line = backend_plan.plan(
            lambda: [c for b in batches for c in backend_plan.model_calls(
                model.backbone, batch=b, channels=in_chans, size=eval_cfg.crop, device=device, autocast=autocast)],
            device, out_dir=run_dir).summary
    print_startup("linear evaluation", [
        ("run folder", run_dir), ("device", f"{device}, {precision}"), ("loader", data_setup.loader_backend(d)),
        ("model", f"{m['arch']} (frozen) from {origin}"),
        ("data", f"{d['path']}: train {len(train_src)} images (label fraction {d['label_fraction']}), "
                 f"selection split {selection} {len(val_src)}, reported split {reported} {len(test_src)}"),
        ("backends", backends_line),
        ("schedule", f"{len(lin['lrs']) * len(lin['weight_decays'])} linear heads x {lin['epochs']} epochs on "
                     f"{eval_cfg.crop} px features" + ("; train.max_minutes does not apply to a linear evaluation "
                                                       "(it runs to its end)" if t.get("max_minutes") else ""))])
    cache_dir.mkdir(parents=True, exist_ok=True)
    metrics_log = MetricsWriter(run_dir)
    t0 = time.perf_counter()
    if cache.is_file():
        feats = ckpt.load(cache)
        cached = True
    else:
        backend = data_setup.loader_backend(d)
        feats = {}
        for split, src in sources.items():
            x, y = extract_features(model.backbone, src, eval_cfg, device, backend, autocast,
                                    progress_desc=f"features of {split} ({len(src)} images)" if show_progress else None)
            feats[split] = {"x": x, "y": y}
        ckpt.atomic_torch_save(feats, cache)
        cached = False
    extract_s = time.perf_counter() - t0

    mean = feats["train"]["x"].mean(0)
    std = feats["train"]["x"].std(0).clamp_min(1e-6)

    def norm(x):
        return (x - mean) / std

    cw = optim.class_weights(feats["train"]["y"].numpy(), len(classes), cfg["optim"]["class_weighting"])
    progress = Progress(int(lin["epochs"]), enabled=show_progress, unit="epoch", desc="linear heads")
    t1 = time.perf_counter()
    w, b, grid = train_head_grid(norm(feats["train"]["x"]), feats["train"]["y"], len(classes), list(lin["lrs"]),
                                 list(lin["weight_decays"]), epochs=int(lin["epochs"]),
                                 batch_size=int(lin["batch_size"]), class_weights=cw, seed=int(t["seed"]),
                                 progress=progress)
    progress.close()
    train_s = time.perf_counter() - t1

    def probs_of(split, gi):
        logits = norm(feats[split]["x"]) @ w[gi] + b[gi]
        return torch.softmax(logits, 1).numpy()

    select = lin["select_by"]
    for split in ("val", "test"):  # a split without a class leaves the selection metric undefined
        require_every_class(feats[split]["y"].numpy(), classes, f"the {split} split ({sources[split].root})")
    results = []
    for gi, (lr, wd) in enumerate(grid):
        val = classification_metrics(feats["val"]["y"].numpy(), probs_of("val", gi))
        score = val[select]
        results.append({"lr": lr, "weight_decay": wd, "val_" + select: score, "val_accuracy": val["accuracy"],
                        "val_roc_auc": val["roc_auc"]})
        metrics_log.write({"step": gi, "lr": lr, "weight_decay": wd, "val_metric": score,
                           "val_accuracy": val["accuracy"], "val_roc_auc": val["roc_auc"]}, gi)
    best = max(range(len(grid)), key=lambda i: (results[i]["val_" + select], -i))
    metrics_log.close()

    # fold the standardisation into the chosen head: (x - mean) / std @ W + b = x @ (W / std) + b'
    with torch.no_grad():
        w_raw = w[best] / std[:, None]
        model.head.weight.copy_(w_raw.T.to(model.head.weight.device))
        model.head.bias.copy_((b[best] - (mean / std) @ w[best]).to(model.head.bias.device))
    record = classifier_record(model, arch=m["arch"], in_chans=in_chans, classes=classes, eval_cfg=eval_cfg.to_dict(),
                               extra={"pretrained": origin, "linear_head": {"lr": grid[best][0], "weight_decay": grid[best][1]}})
    save_classifier(record, run_dir / "classifier.pt")
    y_test = feats["test"]["y"].numpy()
    report = write_report(run_dir / "report", y_test, probs_of("test", best), classes, paths=test_src.paths(),
                          title=f"Linear evaluation of {m['arch']} ({run_dir.name}), reported split: {reported}",
                          meta={"run": str(run_dir), "pretrained": origin, "label_fraction": d["label_fraction"],
                                "train_images": len(train_src),
                                "selection split": f"{selection} ({select})", "reported split": reported,
                                "head": f"lr {grid[best][0]}, weight decay {grid[best][1]} (best {select} on the "
                                        f"selection split {results[best]['val_' + select]:.4f} of {len(grid)} heads)",
                                "features": f"{'cached' if cached else 'extracted'} in {extract_s:.1f} s ({cache.name})"},
                          n_boot=int(cfg["eval"]["bootstrap"]))
    summary = {"pretrained": origin, "grid": results, "best": results[best], "test": {k: report[k] for k in (
        "accuracy", "balanced_accuracy", "roc_auc", "f1", "precision", "recall", "specificity")},
        "test_ci95": report["ci95"], "features_cached": cached, "extract_seconds": extract_s, "train_seconds": train_s,
        "feature_dim": int(w.shape[1]), "heads": len(grid)}
    (run_dir / "linear_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"linear evaluation: {len(grid)} heads in {train_s:.1f} s on {'cached' if cached else 'fresh'} features; "
          f"best lr={grid[best][0]} wd={grid[best][1]} (selection split {selection}: {select} "
          f"{results[best]['val_' + select]:.4f}); reported split {reported}: accuracy {report['accuracy']:.4f}, AUC {report['roc_auc']:.4f}, F1 {report['f1']:.4f}; "
          f"report in {run_dir / 'report'}", flush=True)
    return summary
