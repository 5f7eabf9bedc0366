"""What the tests of training runs share: a tiny, fast pretraining configuration and the readers
of a run's metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

FAST = [
    "--set", "data.synthetic_count=24", "--set", "data.synthetic_size=64", "--set", "data.view_size=64",
    "--set", "optim.batch_size=4", "--set", "model.out_dim=256", "--set", "model.head_hidden_dim=64",
    "--set", "model.head_bottleneck_dim=32", "--set", "train.epochs=2", "--set", "train.log_every=1",
    "--set", "train.ckpt_every=3", "--set", "data.num_workers=1", "--set", "model.drop_path_rate=0.1",
    "--set", "optim.warmup_epochs=1", "--set", "train.knn_every=0",  # tiny_cpu's kNN monitor: its own test
    "--quiet",
]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}
